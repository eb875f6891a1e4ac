"""Models and images the inference tests build for themselves: a tiny exported model (8x8 pixels,
3 classes), folders of images in many formats and states, a labelled folder, the checks of
predictions against a direct ``model.predict``, and the small ResNet export that Ray Serve serves."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.config import Config, ModelConfig, to_dict
from pipeline.data.images import decode_image

IMAGE_SIZE = 8
CLASS_NAMES = ["cat", "dog", "ship"]
PREDICTION_COLUMNS = ["path", "predicted_class", "confidence", "top_k_classes", "top_k_probabilities"]
SERVED_CLASSES = ["cat", "dog", "fox"]


def export_small_model(folder: str):
    """(export folder, in-memory model): see ``conftest.exported_model``."""
    import tf_keras as keras

    from pipeline.models.saving import model_metadata, save_export

    keras.utils.set_random_seed(0)
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    # Large weights: confident, varied predictions, so that some labelled images are right and some wrong.
    x = keras.layers.Dense(3, kernel_initializer=keras.initializers.RandomNormal(stddev=8.0))(x)
    outputs = keras.layers.Activation("softmax", dtype="float32")(x)
    model = keras.Model(inputs, outputs)
    metadata = model_metadata(kind="export", class_names=CLASS_NAMES, image_size=IMAGE_SIZE,
                              config=to_dict(Config()))
    save_export(model, metadata, folder)
    return folder, model


def export_served_model(folder: str) -> str:
    """A width-8 ResNet over 16-pixel images and ``SERVED_CLASSES``, exported to ``folder``."""
    import tf_keras as keras

    from pipeline.models import build_model
    from pipeline.models.saving import model_metadata, save_export

    keras.utils.set_random_seed(0)
    model_config = ModelConfig(width=8, use_bias=False)
    config = to_dict(Config(model=model_config))
    model = build_model(model_config, num_classes=3, image_size=16, mean=[120.0] * 3, std=[60.0] * 3)
    return save_export(model, model_metadata(kind="export", class_names=SERVED_CLASSES, image_size=16,
                                             config=config, mean=[120.0] * 3, std=[60.0] * 3), folder)


def random_image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    if mode == "RGB":
        return rgb
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (size[1], size[0]), dtype=np.uint16))
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8), "L")
        rgba = rgb.convert("RGBA")
        rgba.putalpha(alpha)
        return rgba
    return rgb.convert(mode)


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# relative path -> (mode, size): every format and mode decode_image promises to handle
GOOD_FILES = {
    "rgb.png": ("RGB", (8, 8)),
    "gray.PNG": ("L", (13, 7)),                 # upper-case extension
    "alpha.png": ("RGBA", (20, 20)),
    "deep.png": ("I;16", (9, 11)),              # 16-bit grayscale
    "palette.gif": ("P", (16, 10)),
    "photos/photo.jpg": ("RGB", (40, 30)),
    "photos/cmyk.jpeg": ("CMYK", (12, 12)),
    "photos/bitmap.bmp": ("RGB", (5, 9)),
    "photos/modern.webp": ("RGB", (33, 17)),
    "scans/deeper/scan.tiff": ("RGB", (64, 48)),
    "scans/gray.tif": ("L", (8, 8)),
}
BROKEN_FILES = ["broken/truncated.jpg", "broken/empty.png", "broken/text.png"]
SKIPPED_FILES = [".hidden.png", ".cache/x.png", "photos/._photo.jpg", "notes.txt", "readme.md"]


def write_mixed_folder(root) -> None:
    for seed, (relative, (mode, size)) in enumerate(GOOD_FILES.items()):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        random_image(mode, size, seed).save(path)
    (root / "broken").mkdir()
    whole = _jpeg_bytes(random_image("RGB", (64, 64), 99))
    (root / "broken/truncated.jpg").write_bytes(whole[: len(whole) * 6 // 10])
    (root / "broken/empty.png").write_bytes(b"")
    (root / "broken/text.png").write_text("this is not an image\n")
    for relative in SKIPPED_FILES:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        random_image("RGB", (8, 8), 7).save(path, format="PNG")


def write_labelled_folder(root) -> None:
    rng = np.random.default_rng(1)
    for name in CLASS_NAMES:
        (root / name).mkdir()
        for image_index in range(7):
            # Noise over two tints that the untrained test model tells apart: the predictions then
            # differ within each class folder, so the confusion matrix has more than one column.
            tint = (30, 230, 60) if image_index % 3 == 0 else (200, 150, 120)
            pixels = 0.3 * rng.integers(0, 256, (10, 10, 3)) + 0.7 * np.array(tint)
            Image.fromarray(pixels.astype(np.uint8), "RGB").save(root / name / f"{image_index}.png")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")


def direct_predictions(model, paths: list[str]) -> np.ndarray:
    """What the model says about these files when called directly on the decoded pixels."""
    pixels = np.stack([decode_image(open(path, "rb").read(), IMAGE_SIZE) for path in paths])
    return model.predict(pixels.astype(np.float32), verbose=0)


def infer_config(model: str, input: str, output: str, **infer_settings) -> Config:
    config = Config()
    config.infer.model, config.infer.input, config.infer.output = model, str(input), str(output)
    config.infer.batch_size = 4  # several batches and actors' worth of work even with 20 files
    config.infer.max_failed_fraction = 1.0  # the folders hold broken files on purpose
    for key, value in infer_settings.items():
        setattr(config.infer, key, value)
    return config


def check_against_model(predictions: pd.DataFrame, model, top_k: int) -> None:
    paths = list(predictions["path"])
    assert paths == sorted(paths)
    expected = direct_predictions(model, paths)
    order = np.argsort(-expected, axis=1, kind="stable")
    np.testing.assert_allclose(predictions["confidence"], expected.max(axis=1), rtol=1e-5, atol=1e-6)
    assert list(predictions["predicted_class"]) == [CLASS_NAMES[index] for index in expected.argmax(axis=1)]
    for row, expected_row, expected_order in zip(predictions.itertuples(), expected, order):
        classes = json.loads(row.top_k_classes)
        probabilities = json.loads(row.top_k_probabilities)
        assert len(classes) == len(probabilities) == min(top_k, len(CLASS_NAMES))
        assert classes == [CLASS_NAMES[index] for index in expected_order[: len(classes)]]
        np.testing.assert_allclose(probabilities, expected_row[expected_order[: len(classes)]], atol=2e-6)


def no_staging_left(folder) -> None:
    leftovers = [name for name in os.listdir(folder) if ".staging-" in name or ".tmp-" in name]
    assert leftovers == []
