"""Distributed image-classification pipeline on Ray: preprocess -> train -> tune -> infer.

Keras flavour: this package uses tf-keras (Keras 2), imported as ``tf_keras``, not Keras 3.
Keras 3's ``model.fit`` fails under ``tf.distribute.MultiWorkerMirroredStrategy`` ("Attempt to
convert a value (PerReplica...)"), while tf-keras' ``fit`` supports it with per-replica datasets,
mixed precision and loss scaling. ``TF_USE_LEGACY_KERAS=1`` makes ``tf.keras`` resolve to tf-keras
too, so that TensorFlow internals and our code agree; it only works if set before TensorFlow is
first imported, hence here (driver) and in the Ray runtime environment (every worker, see
``pipeline.runtime``).
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# TensorFlow's C++ INFO lines (oneDNN notices, cuInit failures on CPU nodes) drown the progress
# output users need; warnings and errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

__version__ = "0.1.0"
