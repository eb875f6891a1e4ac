"""Model family: the ResNet variant table and the builder used by train, tune and infer."""

from pipeline.models.resnet import (
    VARIANTS,
    ResNetVariant,
    build_model,
    get_variant,
    minimum_image_size,
    parameter_counts,
)

__all__ = [
    "VARIANTS",
    "ResNetVariant",
    "build_model",
    "get_variant",
    "minimum_image_size",
    "parameter_counts",
]
