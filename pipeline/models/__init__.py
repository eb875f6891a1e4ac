"""Models: the table of names (``registry``, no TensorFlow) and the ResNet family's builder.

``create_model`` is what training, export loading and benchmarks call; the TensorFlow-using
names below are imported on first use, so that ``pipeline.models.registry`` (the config's check
of ``model.name`` and the image size) stays light.
"""

from pipeline.models.registry import VARIANTS, ResNetVariant, create_model, get_variant, minimum_image_size

__all__ = ["VARIANTS", "ResNetVariant", "build_model", "create_model", "get_variant", "minimum_image_size",
           "parameter_counts"]


def __getattr__(name):
    if name in ("build_model", "parameter_counts"):
        from pipeline.models import resnet

        return getattr(resnet, name)
    raise AttributeError(f"module 'pipeline.models' has no attribute {name!r}")
