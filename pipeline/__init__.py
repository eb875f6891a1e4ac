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

# Read by TensorFlow when it loads, so they must be in the environment of every process before its
# first `import tensorflow`: here for the driver, and through the Ray runtime environment for
# workers (pipeline.runtime). A value already set (by the user or a job's runtime_env) wins.
TENSORFLOW_ENV = {
    "TF_USE_LEGACY_KERAS": "1",
    # TensorFlow turns its oneDNN CPU kernels on by default only on Intel CPUs with AVX-512 VNNI /
    # bf16 / AMX; elsewhere (AMD EPYC, older Xeons) it falls back to Eigen. Measured on a 2-vCPU
    # AMD EPYC (AVX2), ResNet-18 fp32 training with oneDNN on: the bare Keras script 1.37x faster,
    # this pipeline (MultiWorkerMirroredStrategy) ~1.7x (BENCHMARKS.md). It changes CPU kernels only.
    "TF_ENABLE_ONEDNN_OPTS": "1",
    # TensorFlow's C++ INFO lines (oneDNN notices, cuInit failures on CPU nodes) drown the progress
    # output users need; warnings and errors still show.
    "TF_CPP_MIN_LOG_LEVEL": "1",
}
for _key, _value in TENSORFLOW_ENV.items():
    os.environ.setdefault(_key, _value)

__version__ = "0.1.0"


class PipelineError(RuntimeError):
    """A stage stopped for a reason its message explains: the command prints it and exits with
    status 1, without a traceback (bad configuration is ``config.ConfigError``, status 2)."""
