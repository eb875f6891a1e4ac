"""The ResNet family's builder (its variants are rows of ``pipeline.models.registry``).

A variant is only a block type and the number of blocks per stage (as in timm); everything else
(stem, width, conv biases, input normalisation) comes from ``ModelConfig``. The seed config,
``ModelConfig(name="resnet18", stem="cifar", width=64, use_bias=True, normalization="scale")``,
rebuilds the original tutorial's network layer for layer, with its exact parameter counts
(11,184,778 in total, as the tutorial reports; see ``parameter_counts`` and tests/test_models.py).

The model takes RAW RGB pixels, float32 in [0, 255], shape (batch, size, size, 3): normalisation
is the model's first layer, so a saved ``.keras`` file is all that inference needs. Only stock
Keras layers are used, so ``keras.models.load_model`` needs no ``custom_objects``.

Layer names are part of the interface: ``stem_*``, ``stage{1..4}_*``, ``classifier`` (the Dense
layer) and ``probabilities`` (the softmax); ``parameter_counts`` groups weights by them.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import numpy as np

import pipeline  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)
import tf_keras as keras

from pipeline.config import ModelConfig
from pipeline.models.registry import STEM_STRIDES, get_variant, minimum_image_size, resolved_stem

# A bottleneck block's last 1x1 conv widens its output to 4x the block's inner channels
# (He et al. 2016, Table 1): stage 1 of ResNet-50 has 64 inner and 256 output channels.
BOTTLENECK_EXPANSION = 4


def build_model(
    config: ModelConfig,
    *,
    num_classes: int,
    image_size: int,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    name: Optional[str] = None,
) -> keras.Model:
    """A ResNet classifier: raw pixels (batch, image_size, image_size, 3) -> class probabilities.

    ``mean`` and ``std`` are the per-channel statistics of the training split in 0-255 pixel
    units; ``normalization="standardize"`` requires them, ``"scale"`` (divide by 255, the
    original) does not use them. The output is float32 under every mixed-precision policy.
    """
    variant = get_variant(config.name)
    if config.stem != "auto" and config.stem not in STEM_STRIDES:
        raise ValueError(f"stem must be one of {list(STEM_STRIDES)} or auto, got {config.stem!r}")
    if not _is_integer(num_classes) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not _is_integer(config.width) or config.width < 1:
        raise ValueError(f"width must be a positive integer, got {config.width!r}")
    if not _is_integer(image_size):
        raise ValueError(f"image_size must be an integer number of pixels, got {image_size!r}")
    stem = resolved_stem(config.stem, image_size)
    smallest = minimum_image_size(config, image_size)
    if image_size < smallest:
        raise ValueError(
            f"image_size={image_size!r} is too small for {config.name} with the '{stem}' stem: "
            f"it downsamples by {smallest}, so images need at least {smallest}x{smallest} pixels")

    # The input stays float32 whatever the global policy: pixels are 0-255 and the normalisation
    # below runs in float32 too; the first conv then casts to the compute dtype.
    image_size = int(image_size)
    inputs = keras.Input(shape=(image_size, image_size, 3), dtype="float32", name="pixels")
    x = _normalization_layer(config.normalization, mean, std)(inputs)
    # Keras' BN momentum 0.99 (the original) needs hundreds of steps before the moving statistics
    # used at evaluation match the weights; short schedules use 0.9 (PyTorch's default).
    batch_norm = functools.partial(keras.layers.BatchNormalization, momentum=config.bn_momentum)
    x = _stem(x, stem, config, batch_norm)

    for stage_index, block_count in enumerate(variant.blocks_per_stage):
        channels = config.width * 2 ** stage_index
        for block_index in range(block_count):
            # Stage 1 keeps the stem's resolution; the first block of every later stage halves it.
            strides = 2 if stage_index > 0 and block_index == 0 else 1
            prefix = f"stage{stage_index + 1}_block{block_index + 1}"
            if variant.block == "basic":
                x = _basic_block(x, channels, strides, config.use_bias, prefix, batch_norm)
            else:
                x = _bottleneck_block(x, channels, strides, config.use_bias, prefix, batch_norm)

    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(int(num_classes), name="classifier")(x)
    # Softmax in float32: in bfloat16/float16 probabilities round badly and the loss can overflow.
    outputs = keras.layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name or config.name)


def parameter_counts(model: keras.Model) -> dict[str, int]:
    """Weights of a ``build_model`` model, in total and by part (trainable + non-trainable).

    Keys: total, trainable, non_trainable, stem_conv, stem_bn, stage1..stageN, classifier.
    Counts include BatchNorm's moving mean/variance, as Keras' ``model.summary()`` does.
    """
    counts = {
        "total": model.count_params(),
        "trainable": sum(weight.shape.num_elements() for weight in model.trainable_weights),
        "non_trainable": sum(weight.shape.num_elements() for weight in model.non_trainable_weights),
        "stem_conv": model.get_layer("stem_conv").count_params(),
        "stem_bn": model.get_layer("stem_bn").count_params(),
    }
    stages: dict[str, int] = {}
    for layer in model.layers:
        if layer.name.startswith("stage"):
            stage = layer.name.split("_", 1)[0]
            stages[stage] = stages.get(stage, 0) + layer.count_params()
    counts.update(sorted(stages.items(), key=lambda item: int(item[0][len("stage"):])))
    counts["classifier"] = model.get_layer("classifier").count_params()
    return counts


# ---------------------------------------------------------------- building blocks

def _is_integer(value) -> bool:
    # numpy integers count (sizes often come from arrays or manifests); bools do not.
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _normalization_layer(normalization: str, mean, std) -> keras.layers.Layer:
    if normalization == "scale":
        return keras.layers.Rescaling(1.0 / 255.0, dtype="float32", name="rescale")
    if normalization != "standardize":
        raise ValueError(f"normalization must be 'scale' or 'standardize', got {normalization!r}")
    if mean is None or std is None:
        raise ValueError(
            "normalization='standardize' needs the per-channel mean and std of the training "
            "images in 0-255 pixel units, e.g. mean=[125.3, 123.0, 113.9], std=[63.0, 62.1, 66.7]")
    mean_array = np.asarray(mean, dtype=np.float64).reshape(-1)
    std_array = np.asarray(std, dtype=np.float64).reshape(-1)
    if mean_array.shape != (3,) or std_array.shape != (3,):
        raise ValueError(f"mean and std need one value per RGB channel (3 each), got {mean!r} and {std!r}")
    if not (np.all(np.isfinite(mean_array)) and np.all(np.isfinite(std_array)) and np.all(std_array > 0)):
        raise ValueError(f"mean must be finite and std finite and > 0, got mean={mean!r}, std={std!r}")
    # Normalization with a given mean/variance stores them in its config (no weights), so the
    # statistics travel inside the .keras file and parameter counts are unchanged. Plain Python
    # floats keep that config JSON-serialisable.
    return keras.layers.Normalization(
        axis=-1, mean=mean_array.tolist(), variance=(std_array ** 2).tolist(),
        dtype="float32", name="standardize")


def _stem(x, stem: str, config: ModelConfig, batch_norm):
    if stem == "cifar":
        # The original: keeps the 32x32 resolution (a stride-1 pool only smooths).
        kernel_size, conv_strides, pool_size, pool_strides = 3, 1, 2, 1
    else:
        # He et al. 2016: reduces 224x224 to 56x56 before stage 1.
        kernel_size, conv_strides, pool_size, pool_strides = 7, 2, 3, 2
    x = keras.layers.Conv2D(config.width, kernel_size, strides=conv_strides, padding="same",
                            use_bias=config.use_bias, name="stem_conv")(x)
    x = batch_norm(name="stem_bn")(x)
    x = keras.layers.Activation("relu", name="stem_relu")(x)
    return keras.layers.MaxPooling2D(pool_size, strides=pool_strides, padding="same", name="stem_pool")(x)


def _basic_block(x, channels: int, strides: int, use_bias: bool, prefix: str, batch_norm):
    """Conv3x3 -> BN -> ReLU -> Conv3x3 -> BN, + shortcut, ReLU (ResNet-18/34)."""
    shortcut = x
    if strides != 1 or x.shape[-1] != channels:
        # The original projects with a bare 1x1 conv (no BN); kept so the seed counts match.
        shortcut = keras.layers.Conv2D(channels, 1, strides=strides, use_bias=use_bias,
                                       name=f"{prefix}_shortcut_conv")(x)
    y = keras.layers.Conv2D(channels, 3, strides=strides, padding="same", use_bias=use_bias,
                            name=f"{prefix}_conv1")(x)
    y = batch_norm(name=f"{prefix}_bn1")(y)
    y = keras.layers.Activation("relu", name=f"{prefix}_relu1")(y)
    y = keras.layers.Conv2D(channels, 3, padding="same", use_bias=use_bias, name=f"{prefix}_conv2")(y)
    y = batch_norm(name=f"{prefix}_bn2")(y)
    y = keras.layers.Add(name=f"{prefix}_add")([y, shortcut])
    return keras.layers.Activation("relu", name=f"{prefix}_out")(y)


def _bottleneck_block(x, channels: int, strides: int, use_bias: bool, prefix: str, batch_norm):
    """1x1 (c) -> BN -> ReLU -> 3x3 (c, strides) -> BN -> ReLU -> 1x1 (4c) -> BN, + shortcut, ReLU.

    The stride sits on the 3x3 conv ("ResNet v1.5", as torchvision and timm): a strided 1x1
    would skip three quarters of its input pixels.
    """
    output_channels = channels * BOTTLENECK_EXPANSION
    shortcut = x
    if strides != 1 or x.shape[-1] != output_channels:
        shortcut = keras.layers.Conv2D(output_channels, 1, strides=strides, use_bias=use_bias,
                                       name=f"{prefix}_shortcut_conv")(x)
        shortcut = batch_norm(name=f"{prefix}_shortcut_bn")(shortcut)
    y = keras.layers.Conv2D(channels, 1, use_bias=use_bias, name=f"{prefix}_conv1")(x)
    y = batch_norm(name=f"{prefix}_bn1")(y)
    y = keras.layers.Activation("relu", name=f"{prefix}_relu1")(y)
    y = keras.layers.Conv2D(channels, 3, strides=strides, padding="same", use_bias=use_bias,
                            name=f"{prefix}_conv2")(y)
    y = batch_norm(name=f"{prefix}_bn2")(y)
    y = keras.layers.Activation("relu", name=f"{prefix}_relu2")(y)
    y = keras.layers.Conv2D(output_channels, 1, use_bias=use_bias, name=f"{prefix}_conv3")(y)
    y = batch_norm(name=f"{prefix}_bn3")(y)
    y = keras.layers.Add(name=f"{prefix}_add")([y, shortcut])
    return keras.layers.Activation("relu", name=f"{prefix}_out")(y)
