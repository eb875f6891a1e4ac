"""What the shards store (data.encoding): raw pixels or an encoded picture, chosen by image size,
decoded back into the contiguous pixel column a raw shard reads as."""

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import DataConfig
from pipeline.data import preprocess
from pipeline.data.encoding import decode_block, described, encode_pixels, resolved_encoding, stored_encoding
from pipeline.data.manifest import images_from_column


def smooth_images(count: int, size: int) -> np.ndarray:
    """Photo-like pixels (gradients and a blob): what lossy codecs are made for; noise is not."""
    y, x = np.mgrid[0:size, 0:size] / size
    images = []
    for index in range(count):
        blob = 120 * np.exp(-((x - 0.3 - 0.1 * index) ** 2 + (y - 0.6) ** 2) * 12)
        images.append(np.stack([60 + 150 * x + blob, 40 + 180 * y, 200 - 120 * x * y + blob / 2], axis=-1))
    return np.clip(images, 0, 255).astype(np.uint8)


def block_of(stored: list[bytes]) -> pa.Table:
    return pa.table({"id": [f"i{n}" for n in range(len(stored))], "label": pa.array(range(len(stored)), pa.int64()),
                     "image": pa.array(stored, pa.binary())})


def test_auto_stores_raw_pixels_below_photo_size_and_jpeg_from_there():
    assert resolved_encoding("auto", 32) == "raw" and resolved_encoding("auto", 95) == "raw"
    assert resolved_encoding("auto", 96) == "jpeg" and resolved_encoding("auto", 224) == "jpeg"
    assert resolved_encoding("png", 32) == "png"
    assert stored_encoding(DataConfig(image_size=224)) == {"format": "jpeg", "quality": 90}
    assert stored_encoding(DataConfig(image_size=224, encoding="png", encoding_quality=50)) == {"format": "png"}
    assert described({"format": "webp", "quality": 80}) == "webp q80"
    assert described(None) == "raw"  # a build from before data.encoding


@pytest.mark.parametrize("encoding, tolerance", [("png", 0.0), ("jpeg", 2.5), ("webp", 2.5)])
def test_a_decoded_block_is_the_stored_pixels_as_one_contiguous_column(encoding, tolerance):
    images = smooth_images(5, 48)
    stored = [encode_pixels(image, encoding, 90) for image in images]
    assert sum(map(len, stored)) < images.nbytes / 3  # 3x smaller at least, even losslessly
    decoded = decode_block(block_of(stored), 48)
    assert decoded.column_names == ["id", "label", "image"] and decoded.column("label").to_pylist() == list(range(5))
    pixels = images_from_column(decoded.column("image"), 48)
    assert not pixels.flags.owndata  # a view of the column's one buffer, as a raw shard gives
    error = np.abs(pixels.astype(np.int16) - images).mean()
    assert error <= tolerance, error
    if tolerance == 0:
        np.testing.assert_array_equal(pixels, images)


def test_raw_is_the_pixel_bytes_and_a_wrong_size_is_refused():
    images = smooth_images(2, 16)
    assert encode_pixels(images[0], "raw", 90) == images[0].tobytes()
    with pytest.raises(ValueError, match=r"a stored image is 16x16 RGB, not 32x32 RGB: the shards do not match"):
        decode_block(block_of([encode_pixels(image, "png", 90) for image in images]), 32)


def test_the_encoding_is_in_the_fingerprint_only_where_it_is_not_raw():
    def fingerprint(**data):
        return preprocess.data_config_fingerprint(DataConfig(source="/images", **data))

    # A 32-px build from before data.encoding stored raw pixels: auto and raw find it current.
    assert fingerprint(encoding="auto") == fingerprint(encoding="raw") != fingerprint(encoding="png")
    assert fingerprint(image_size=224) == fingerprint(image_size=224, encoding="jpeg")
    assert fingerprint(image_size=224) != fingerprint(image_size=224, encoding="jpeg", encoding_quality=95)
    assert fingerprint(image_size=224, encoding="png") == fingerprint(image_size=224, encoding="png",
                                                                      encoding_quality=95)  # lossless: no quality


def test_decode_images_keeps_each_images_exact_channel_sums():
    # The train split's mean and std come from these sums, taken before a lossy encoding.
    import os
    import tempfile

    from PIL import Image

    images = smooth_images(3, 24)
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for index, image in enumerate(images):
            paths.append(os.path.join(folder, f"{index}.png"))
            Image.fromarray(image).save(paths[-1])
        table = preprocess.decode_images({"path": np.array(paths), "row": np.full(3, -1), "index": np.arange(3),
                                          "id": np.array(["a", "b", "c"]), "label": np.zeros(3, int)},
                                         image_size=24, resize="squash", encoding="jpeg", quality=90)
    sums = np.asarray(table.column("pixel_sums").combine_chunks().flatten()).reshape(-1, 6)
    values = images.reshape(3, -1, 3).astype(np.int64)
    np.testing.assert_array_equal(sums[:, :3], values.sum(axis=1))
    np.testing.assert_array_equal(sums[:, 3:], (values ** 2).sum(axis=1))
    assert table.column("image")[0].as_py()[:2] == b"\xff\xd8"  # a JPEG
