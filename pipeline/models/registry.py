"""The model table: every name ``model.name`` accepts, what it is, and how to build it.

A family is one module with a ``build_model(config, *, num_classes, image_size, mean, std)``;
its variants are rows here. This module imports no TensorFlow, so the config can be checked
against it (an unknown name, an image too small for the network) before any work starts, and
the builder is imported only when a model is made (``create_model``), in the process that uses it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from pipeline.suggest import did_you_mean

BLOCK_TYPES = ("basic", "bottleneck")

# Total spatial downsampling of each stem (conv stride x pool stride).
STEM_STRIDES = {"cifar": 1, "imagenet": 4}


@dataclass(frozen=True)
class ResNetVariant:
    """One depth of the ResNet family: block type and number of residual blocks in each stage."""

    block: str
    blocks_per_stage: tuple[int, ...]
    family: str = "pipeline.models.resnet"  # the module whose build_model makes it

    def __post_init__(self):
        if self.block not in BLOCK_TYPES:
            raise ValueError(f"block must be one of {BLOCK_TYPES}, got {self.block!r}")
        if not self.blocks_per_stage or any(count < 1 for count in self.blocks_per_stage):
            raise ValueError(f"blocks_per_stage must be positive counts, got {self.blocks_per_stage!r}")


VARIANTS: dict[str, ResNetVariant] = {
    "resnet18": ResNetVariant(block="basic", blocks_per_stage=(2, 2, 2, 2)),
    "resnet34": ResNetVariant(block="basic", blocks_per_stage=(3, 4, 6, 3)),
    "resnet50": ResNetVariant(block="bottleneck", blocks_per_stage=(3, 4, 6, 3)),
    "resnet101": ResNetVariant(block="bottleneck", blocks_per_stage=(3, 4, 23, 3)),
    "resnet152": ResNetVariant(block="bottleneck", blocks_per_stage=(3, 8, 36, 3)),
}


def get_variant(name: str) -> ResNetVariant:
    """The variant called ``name``; an unknown name raises ValueError with the closest match."""
    if name in VARIANTS:
        return VARIANTS[name]
    raise ValueError(f"unknown model '{name}'{did_you_mean(name, list(VARIANTS))} (valid names: {', '.join(VARIANTS)})")


# From this input size up a picture is a photo, not a thumbnail: ``model.stem: auto`` takes the
# ImageNet stem (the CIFAR stem's full-resolution first stage would cost 9x or more the arithmetic)
# and ``data.resize: auto`` crops instead of squashing (pipeline.data.images).
PHOTO_SIZE = 96


def resolved_stem(stem: str, image_size: int) -> str:
    """``model.stem`` with ``auto`` decided by the input size: cifar below PHOTO_SIZE, imagenet from it up."""
    if stem == "auto":
        return "imagenet" if image_size >= PHOTO_SIZE else "cifar"
    return stem


def minimum_image_size(config, image_size: int) -> int:
    """Smallest input side (pixels) whose last stage still sees at least one real pixel, for the
    stem ``config`` resolves to at ``image_size``.

    With "same" padding a too-small image would not crash; the later stages would simply
    convolve padding, so the model would train on nothing. We refuse such sizes instead:
    the stem and every stage after the first halve the resolution once.
    """
    variant = get_variant(config.name)
    return STEM_STRIDES[resolved_stem(config.stem, image_size)] * 2 ** (len(variant.blocks_per_stage) - 1)


def create_model(config, *, num_classes: int, image_size: int, mean=None, std=None):
    """The tf-keras model ``config`` (a ``ModelConfig``) names: raw 0-255 pixels in, float32
    class probabilities out."""
    family = importlib.import_module(get_variant(config.name).family)
    return family.build_model(config, num_classes=num_classes, image_size=image_size, mean=mean, std=std)
