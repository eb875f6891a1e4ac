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
    # TensorFlow turns its oneDNN CPU kernels on only on recent Intel CPUs; elsewhere (AMD EPYC, older
    # Xeons) its Eigen kernels train far slower, most of all under MultiWorkerMirroredStrategy. CPU
    # kernels only (see BENCHMARKS.md, "Training speed (issue 3)").
    "TF_ENABLE_ONEDNN_OPTS": "1",
    # TensorFlow's C++ INFO lines (oneDNN notices, cuInit failures on CPU nodes) drown the progress
    # output users need; warnings and errors still show.
    "TF_CPP_MIN_LOG_LEVEL": "1",
}
for _key, _value in TENSORFLOW_ENV.items():
    os.environ.setdefault(_key, _value)

__version__ = "0.1.0"


def provenance() -> dict:
    """What produced a result file: this package's version and git commit (when it runs from a
    checkout), and the TensorFlow, tf-keras and Ray versions. Recorded in every manifest, run
    and search summary, export and inference summary."""
    from importlib import metadata

    def version(distribution: str):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            return None

    return {"pipeline": __version__, "git_commit": _git_commit(), "tensorflow": version("tensorflow"),
            "tf_keras": version("tf-keras"), "ray": version("ray")}


_commit_cache: list = []


def _git_commit():
    """The checkout's commit (with ``-dirty`` for uncommitted changes), or None outside a checkout
    (an installed wheel, a job's working-dir copy without .git)."""
    if not _commit_cache:
        import subprocess

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        try:
            commit = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty", "--abbrev=40"],
                                    capture_output=True, text=True, timeout=5)
            _commit_cache.append(commit.stdout.strip() if commit.returncode == 0 and os.path.isdir(
                os.path.join(root, ".git")) else None)
        except (OSError, subprocess.TimeoutExpired):
            _commit_cache.append(None)
    return _commit_cache[0]


class InputError(ValueError):
    """Something the user gave (a config value, a path, a file, a model) cannot be used; the message
    names it. The command prints it and exits with status 2, without a traceback. Errors of other
    types are bugs or failures of the machinery (TensorFlow, Ray) and keep their traceback."""


class NotFound(InputError, FileNotFoundError):
    """A path the user gave does not exist."""


class PipelineError(RuntimeError):
    """A stage stopped for a reason its message explains: the command prints it and exits with
    status 1, without a traceback (bad configuration is ``config.ConfigError``, status 2)."""


class Stopped(BaseException):
    """SIGTERM (``ray job stop``, a scheduler's kill), raised in the driver's main thread so that a
    stage unwinds (leases released, Ray shut down) as on Ctrl-C instead of vanishing mid-write.
    ``pipeline.runtime.connect`` installs the handler; the CLI says what was kept."""


# Every process that imports the package logs the same way (see pipeline.logs).
from pipeline import logs as _logs  # noqa: E402

_logs.install()
