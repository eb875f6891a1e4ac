"""pipeline.data.images: the one decode every stage uses (preprocess, batch inference, one image)."""

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import decode_image

ORIENTATION_TAG = 0x0112


def upright_picture() -> np.ndarray:
    """A landscape picture (24 high, 48 wide) that shows which way is up: a red top-left corner,
    a green bottom-right one, the rest grey."""
    pixels = np.full((24, 48, 3), 128, np.uint8)
    pixels[:12, :16] = (255, 0, 0)
    pixels[12:, 32:] = (0, 255, 0)
    return pixels


# What a camera stores for each EXIF orientation: the upright picture turned the other way, so
# that applying the tag gives the upright picture back.
STORED = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def jpeg(image: Image.Image, orientation=None) -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[ORIENTATION_TAG] = orientation
    image.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_photos_are_decoded_upright_as_their_exif_orientation_says(orientation):
    upright = Image.fromarray(upright_picture())
    stored = upright.transpose(STORED[orientation])
    if orientation in (6, 8):
        assert stored.size == (24, 48)  # a portrait as stored: the sensor's pixels
    expected = decode_image(jpeg(upright), 16)
    decoded = decode_image(jpeg(stored, orientation), 16)
    # The same picture, up to JPEG's rounding of differently laid out blocks.
    assert np.abs(decoded.astype(int) - expected.astype(int)).mean() < 4
    assert tuple(decoded[1, 1].astype(int)) == pytest.approx((255, 0, 0), abs=40)  # red stays top-left
    assert tuple(decoded[-2, -2].astype(int)) == pytest.approx((0, 255, 0), abs=40)  # green bottom-right
    # Without the tag the same bytes are the picture on its side (or upside down).
    stored_only = decode_image(jpeg(stored), 16)
    assert np.abs(stored_only.astype(int) - expected.astype(int)).mean() > 30


def test_a_damaged_exif_block_keeps_the_stored_pixels():
    picture = Image.fromarray(upright_picture())
    good = jpeg(picture, orientation=1)
    # Orientation 1 is upright already; an out-of-range tag is ignored rather than refused.
    np.testing.assert_array_equal(decode_image(good, 16), decode_image(jpeg(picture), 16))
    np.testing.assert_array_equal(decode_image(jpeg(picture, orientation=99), 16), decode_image(jpeg(picture), 16))


def twelve_megapixel_photo() -> Image.Image:
    """A 4032x3024 picture with a phone photo's mix of smooth gradients, edges and sensor noise."""
    rng = np.random.default_rng(0)
    height, width = 3024, 4032
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([columns / width * 255, rows / height * 255, (columns + rows) / (width + height) * 255], -1)
    pixels += rng.normal(0, 6, (height, width, 1)).astype(np.float32)
    pixels[:height // 4, :width // 4] = (255, 0, 0)  # the top-left corner, red
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("image_size", [32, 224])
def test_a_12_megapixel_jpeg_is_reduced_while_decoding_to_the_same_picture(image_size):
    # Stored on its side (EXIF orientation 6), as a phone held upright stores it.
    photo = twelve_megapixel_photo()
    data = jpeg(photo.transpose(STORED[6]), orientation=6)
    full = decode_image(data, image_size, reduce=False).astype(int)
    reduced = decode_image(data, image_size).astype(int)
    assert reduced.shape == full.shape == (image_size, image_size, 3)
    corner = image_size // 8
    assert np.abs(reduced[:corner, :corner] - [255, 0, 0]).mean() < 30  # upright: red stays top-left
    # The tolerance: within 2 levels on average and 12 at the 99th percentile of 0-255.
    difference = np.abs(reduced - full)
    assert difference.mean() <= 2 and np.percentile(difference, 99) <= 12, (difference.mean(), difference.max())


def test_large_images_of_other_formats_are_box_reduced_before_the_resize():
    photo = twelve_megapixel_photo().resize((1600, 1200))
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    full = decode_image(buffer.getvalue(), 32, reduce=False).astype(int)
    reduced = decode_image(buffer.getvalue(), 32).astype(int)
    assert np.abs(reduced - full).mean() <= 2


def portrait() -> np.ndarray:
    """60 wide, 90 high: a blue band across the top 15 rows, a yellow one across the bottom 15, a
    grey middle square (rows 15-75) with a red top-left quarter."""
    pixels = np.full((90, 60, 3), 128, np.uint8)
    pixels[:15], pixels[75:] = (0, 0, 255), (255, 255, 0)
    pixels[15:45, :30] = (255, 0, 0)
    return pixels


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_crop_keeps_the_pictures_shape_and_squash_squeezes_it():
    data = png(portrait())
    cropped = decode_image(data, 30, resize="crop")
    # The centred square (rows 15-75) resized: the same pixels as resizing that square by hand.
    by_hand = np.asarray(Image.fromarray(portrait()[15:75]).resize((30, 30), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(cropped, by_hand)
    assert not ((cropped == (0, 0, 255)).all(-1)).any()  # the bands at the ends are cut
    squashed = decode_image(data, 30, resize="squash")
    assert (squashed[0] == (0, 0, 255)).all()  # the whole picture, squeezed: the top band is there
    square = png(portrait()[15:75])
    np.testing.assert_array_equal(decode_image(square, 30, resize="crop"), decode_image(square, 30, resize="squash"))


@pytest.mark.parametrize("image_size, resize", [(31, "squash"), (32, "squash"), (95, "squash"), (96, "crop"),
                                                (224, "crop")])
def test_auto_resize_crops_photos_and_squashes_thumbnails(image_size, resize):
    from pipeline.data.images import resolved_resize

    assert resolved_resize("auto", image_size) == resize
    assert resolved_resize("squash", 224) == "squash" and resolved_resize("crop", 32) == "crop"


def test_a_12_megapixel_jpeg_is_cropped_alike_with_and_without_the_reduction():
    photo = twelve_megapixel_photo()  # landscape 4:3, stored on its side
    data = jpeg(photo.transpose(STORED[6]), orientation=6)
    full = decode_image(data, 224, resize="crop", reduce=False).astype(int)
    reduced = decode_image(data, 224, resize="crop").astype(int)
    assert reduced.shape == full.shape == (224, 224, 3)
    difference = np.abs(reduced - full)
    assert difference.mean() <= 2 and np.percentile(difference, 99) <= 12, (difference.mean(), difference.max())
    # Upright, the crop is the middle 3024 of the 4032 columns: the red corner (1008 x 756) keeps
    # 504 of its columns, 37 of 224 (squashed: 56), and all its 56 rows.
    red = (np.abs(reduced - [255, 0, 0]).sum(-1) < 60)
    assert red[10, :35].all() and not red[10, 40:].any() and red[50, 10] and not red[60, 10]
    squashed = np.abs(decode_image(data, 224, resize="squash").astype(int) - [255, 0, 0]).sum(-1) < 60
    assert squashed[10, :53].all()


def test_large_images_of_other_formats_keep_their_shape_when_box_reduced_for_a_crop():
    photo = twelve_megapixel_photo().resize((1600, 1000))
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    full = decode_image(buffer.getvalue(), 32, resize="crop", reduce=False).astype(int)
    reduced = decode_image(buffer.getvalue(), 32, resize="crop").astype(int)
    assert np.abs(reduced - full).mean() <= 2
