"""The photo recipe end to end (configs/folder224.yaml): a folder of non-square JPEGs at 224 px,
some stored on their side, trained for an epoch, then classified by jobs/predict.py; the centre
crop a model is evaluated on is the one it classifies."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import ray
from PIL import Image

from pipeline.config import load_config
from pipeline.data.images import decode_image
from pipeline.data.manifest import open_manifest
from pipeline.infer.predictor import decode_batch
from pipeline.models.saving import inference_function, load_model
from pipeline.train.run import run_training

from conftest import REPO
from data_files import read_all_shards

pytestmark = pytest.mark.cluster

COLOURS = {"sky": (70, 130, 230), "grass": (60, 170, 60)}
SHAPES = [(320, 240), (240, 320), (300, 200)]  # landscape, portrait, wide (width, height)


def photo(colour, size, rng) -> Image.Image:
    """A noisy picture of ``colour`` with an orange band across each end of its long side: the
    bands are cut by a centre crop and squeezed into the picture by a squash."""
    width, height = size
    pixels = rng.normal(colour, 30, (height, width, 3))
    band = (max(width, height) - min(width, height)) // 2
    if width > height:
        pixels[:, :band], pixels[:, width - band:] = (255, 140, 0), (255, 140, 0)
    else:
        pixels[:band], pixels[height - band:] = (255, 140, 0), (255, 140, 0)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_photo_folder(root, per_class: int, test_per_class: int) -> None:
    """root/{train,test}/<class>/NNN.jpg; every third photo stored on its side with EXIF
    orientation 6, as a phone held upright stores it."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", test_per_class)):
        for name, colour in COLOURS.items():
            os.makedirs(root / split / name)
            for index in range(count):
                picture = photo(colour, SHAPES[index % len(SHAPES)], rng)
                exif = Image.Exif()
                if index % 3 == 2:
                    picture = picture.transpose(Image.Transpose.ROTATE_90)
                    exif[0x0112] = 6
                picture.save(root / split / name / f"{index:03d}.jpg", quality=90, exif=exif)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    write_photo_folder(root, per_class=24, test_per_class=4)
    return root


def test_photos_train_at_224_px_and_are_classified_on_the_same_centre_crop(photos, tmp_path, local_ray):
    # Width 16: at 8, oneDNN (TensorFlow 2.21) segfaults in fit at 48 px and up. Shards stored as
    # PNG: encoded and decoded by the read tasks like the recipe's JPEG, but lossless, so the pixels
    # compare exactly below.
    config = load_config(os.path.join(REPO, "configs/folder224.yaml"), [
        f"data.source={photos}", f"data.output={tmp_path}/data", f"run.storage_path={tmp_path}/runs", "data.encoding=png",
        "run.name=photos", "data.val_fraction=0.25", "data.rows_per_shard=16", "model.width=16", "train.epochs=1",
        "train.global_batch_size=8", "train.warmup_epochs=0", "train.max_failures=0", "train.precision=fp32"])
    summary = run_training(config)
    assert summary["epochs"] == 1

    manifest = open_manifest(f"{tmp_path}/data")
    assert (manifest.image_size, manifest.resize, manifest.encoding) == (224, "crop", "png")
    export = os.path.join(summary["run_dir"], "export")
    model, metadata = load_model(export)
    assert metadata["resize"] == "crop"
    assert model.get_layer("stem_conv").kernel_size == (7, 7)  # the ImageNet stem, for photos

    # What the final evaluation saw of each test photo is what batch inference decodes from the file.
    test_rows = read_all_shards(manifest)["test"]
    files = sorted(str(path) for path in photos.glob("test/*/*.jpg"))
    decoded = list(decode_batch({"path": np.array(files)}, image_size=224, resize="crop",
                                errors_dir=str(tmp_path / "errors")))
    [batch] = decoded
    for path, pixels in zip(files, batch["image"]):
        np.testing.assert_array_equal(pixels, test_rows[os.path.relpath(path, photos)][0])
    # The crop cut the orange bands and turned the side-stored photos upright (a portrait crop of
    # a rotated landscape still has no band).
    orange = (np.abs(batch["image"].astype(int) - (255, 140, 0)).sum(-1) < 90).mean(axis=(1, 2))
    assert orange.max() < 0.01, orange

    # The job, as `ray job submit -- python jobs/predict.py` runs it, joining this Ray.
    finished = subprocess.run(
        [sys.executable, os.path.join(REPO, "jobs", "predict.py"), "--address", ray.get_runtime_context().gcs_address,
         "--model", export, "--input", str(photos / "test"), "--output", str(tmp_path / "predictions.csv")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    predictions = pd.read_csv(tmp_path / "predictions.csv").sort_values("path")
    assert [os.path.realpath(path) for path in predictions["path"]] == [os.path.realpath(path) for path in files]
    expected = inference_function(model, metadata)(batch["image"].astype(np.float32)).numpy()
    np.testing.assert_allclose(predictions["confidence"], expected.max(axis=1), rtol=1e-5, atol=1e-6)
    classes = list(metadata["class_names"])
    assert list(predictions["predicted_class"]) == [classes[index] for index in expected.argmax(axis=1)]
    # A squashed decode would have given other pixels (the bands) and other probabilities.
    squashed = np.stack([decode_image(open(path, "rb").read(), 224, resize="squash") for path in files])
    assert not np.allclose(inference_function(model, metadata)(squashed.astype(np.float32)).numpy(), expected,
                           atol=1e-4)
