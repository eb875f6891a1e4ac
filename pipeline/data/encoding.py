"""How the shards store an image: raw pixels, or an encoded picture decoded as the shards are read.

``data.encoding``: ``raw`` stores uint8 pixels (image_size x image_size x 3, row-major): nothing to
decode, but 150 KB an image at 224 px (ImageNet-1k would be ~190 GB), and reading those bytes is
what limits a worker at that size. ``jpeg`` and ``webp`` (at ``data.encoding_quality``) and ``png``
(lossless) store a picture of the same pixels, 5-20x smaller; the read tasks decode it, so the
work is spread over the cluster's CPUs and a training worker receives raw pixels either way.
``auto``: raw below PHOTO_SIZE (a 32-px CIFAR image is 3 KB and reads faster than it decodes),
JPEG at quality 90 from there up (what FFCV stores for ImageNet). The figures behind the choice:
BENCHMARKS.md, "What the shards store (issue 29)".
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.models.registry import PHOTO_SIZE

ENCODINGS = ("raw", "jpeg", "webp", "png")
LOSSY = ("jpeg", "webp")


def resolved_encoding(encoding: str, image_size: int) -> str:
    """``data.encoding`` with ``auto`` decided by the image size (see the module docstring)."""
    if encoding == "auto":
        return "jpeg" if image_size >= PHOTO_SIZE else "raw"
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS} or auto, got {encoding!r}")
    return encoding


def stored_encoding(data) -> dict:
    """What a build with DataConfig ``data`` stores, as its manifest records it:
    ``{"format": ...}``, with ``"quality"`` for the lossy formats."""
    encoding = resolved_encoding(data.encoding, data.image_size)
    return {"format": encoding, "quality": data.encoding_quality} if encoding in LOSSY else {"format": encoding}


def described(encoding: dict | None) -> str:
    """A manifest's ``encoding`` in words (``raw``, ``png``, ``jpeg q90``); None (a build from
    before data.encoding) stored raw pixels."""
    encoding = encoding or {"format": "raw"}
    return encoding["format"] + (f" q{encoding['quality']}" if "quality" in encoding else "")


def encode_pixels(pixels: np.ndarray, encoding: str, quality: int) -> bytes:
    """uint8 (size, size, 3) RGB pixels as the shards store them."""
    if encoding == "raw":
        return np.ascontiguousarray(pixels).tobytes()
    buffer = io.BytesIO()
    options = {"quality": quality} if encoding in LOSSY else {}
    Image.fromarray(pixels).save(buffer, format=encoding.upper(), **options)
    return buffer.getvalue()


def decode_block(block: pa.Table, image_size: int) -> pa.Table:
    """A block of encoded shard rows with its ``image`` column as raw pixels: one contiguous
    buffer behind a binary column, as a raw shard's column reads (``images_from_column`` takes a
    view of it, no copy per row)."""
    column = block.column("image")
    pixels = np.empty((len(column), image_size, image_size, 3), dtype=np.uint8)
    row = 0
    for chunk in column.chunks:
        for value in chunk.to_pylist():
            with Image.open(io.BytesIO(value)) as image:
                if image.size != (image_size, image_size) or image.mode != "RGB":
                    raise ValueError(f"a stored image is {image.size[0]}x{image.size[1]} {image.mode}, not "
                                     f"{image_size}x{image_size} RGB: the shards do not match their manifest")
                pixels[row] = np.asarray(image)
            row += 1
    row_bytes = image_size * image_size * 3
    offsets = np.arange(len(column) + 1, dtype=np.int32) * row_bytes
    images = pa.Array.from_buffers(pa.binary(), len(column), [None, pa.py_buffer(offsets), pa.py_buffer(pixels)])
    return block.set_column(block.schema.get_field_index("image"), "image", images)
