"""Decoding one image file into the pixels every stage agrees on: RGB uint8, size x size.

Training shards, batch inference and the single-image predict path all call ``decode_image``, so
a picture is resized and converted exactly the same way wherever it enters the pipeline.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

from pipeline import InputError
from pipeline.models.registry import PHOTO_SIZE

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# Raised when decode_image gives other pixels for the same file: shards built before are stale.
DECODE_VERSION = 2
DECODE_CHANGES = {2: "photos are turned upright as their EXIF orientation says, and large images are "
                     "reduced to twice the target size while decoding, before the resize"}

# A truncated file must fail loudly rather than decode into grey padding.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class UnreadableImage(InputError):
    """The bytes are not a decodable image; ``str(error)`` is the reason recorded in reports."""


def is_hidden(name: str) -> bool:
    """A file or folder name that is not content: .DS_Store, ._x.jpg (macOS resource forks),
    .git/, .ipynb_checkpoints/, and __MACOSX/, the resource-fork folder macOS zips carry. The
    data stage and inference skip the same names."""
    return name.startswith(".") or name == "__MACOSX"


def is_image_path(path: str) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


RESIZE_MODES = ("squash", "crop")


def resolved_resize(resize: str, image_size: int) -> str:
    """``data.resize`` with ``auto`` decided by the image size: squash below PHOTO_SIZE (the
    original tutorial's resize of 32-px CIFAR images), crop from there up (a photo keeps its shape)."""
    if resize == "auto":
        return "crop" if image_size >= PHOTO_SIZE else "squash"
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES} or auto, got {resize!r}")
    return resize


def decode_image(data: bytes, image_size: int, *, resize: str = "squash", reduce: bool = True) -> np.ndarray:
    """Bytes of any PIL-readable image -> uint8 array (image_size, image_size, 3), RGB.

    The picture is turned upright first, as its EXIF orientation says (phones and cameras store
    the sensor's pixels and record the turn). Any mode becomes RGB: palette and grayscale are
    expanded, alpha is composited on black (what a dropped alpha channel shows), CMYK converted,
    16-bit scaled to 8-bit. ``resize="squash"``: a plain bicubic resize to a square, as the
    original tutorial's ``img.resize((32, 32))`` (a portrait photo is squeezed). ``resize="crop"``:
    the centred square of side the shorter side, resized (bicubic) to the target: the shape is
    kept and the long side's ends are cut, as evaluation does for ImageNet-style recipes. A
    square picture gives the same pixels either way.

    A picture much larger than the target is first reduced: a JPEG while it is decoded, to no less
    than twice the target on each side (draft mode: the decoder scales by 1/2, 1/4 or 1/8 in the
    DCT domain, skipping most of the work), other formats to four times the target by box averaging
    (``Image.reduce``). A large photo then costs a fraction of a full decode, with the same accuracy
    (see BENCHMARKS.md, "Photos: decoding at the size needed"). ``reduce=False``: the full decode,
    for comparisons.
    """
    if not data:
        raise UnreadableImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                drafted = reduce and image.format == "JPEG"
                if drafted:
                    image.draft("RGB", (2 * image_size, 2 * image_size))  # at least this on both sides
                image.load()
                rgb = _to_rgb(upright(image))
    except UnreadableImage:
        raise
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        # PIL names the in-memory buffer ("<_io.BytesIO object at 0x...>"): noise in a report.
        reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(error)) or type(error).__name__
        raise UnreadableImage(f"cannot decode image: {reason}") from None
    crop = resolved_resize(resize, image_size) == "crop"
    if reduce and not drafted:
        # Box averaging is a coarser filter than the DCT scaling: it stops at four times the target,
        # where the bicubic resize's own smoothing takes over (see BENCHMARKS.md, "Photos: decoding
        # at the size needed").
        factors = tuple(max(1, side // (4 * image_size)) for side in rgb.size)
        if crop:  # one factor for both sides, or the crop would see a reshaped picture
            factors = (min(factors),) * 2
        if factors != (1, 1):
            rgb = rgb.reduce(factors)
    width, height = rgb.size
    if crop and width != height:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        # Cut, then resize: the filter never reaches into the cut ends (resize's box= would).
        rgb = rgb.crop((left, top, left + side, top + side)).resize((image_size, image_size), Image.Resampling.BICUBIC)
    elif rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation tag (2-8) says; unchanged without one. A damaged
    EXIF block leaves the stored pixels as they are: the picture itself is still good."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # PIL parses EXIF lazily; a malformed block raises many types
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale the actual range down to 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        high = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return Image.fromarray(np.clip(array / high * 255.0, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        high = 1.0 if array.max() <= 1.0 else 255.0
        return Image.fromarray(np.clip(array / high * 255.0, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
