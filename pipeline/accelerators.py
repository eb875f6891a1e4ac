"""The GPUs a Ray worker process sees: exactly those Ray gave it, none if it asked for none.

Ray sets ``CUDA_VISIBLE_DEVICES`` for a task or actor that holds GPUs, but current Ray leaves the
variable as the node had it for one that asked for none (ray-project/ray#54868; see the comment
at the top of ``ray/_private/accelerators/accelerator.py``). On a GPU node, a CPU training worker
would then mirror its model over every GPU of the node and a CPU inference actor would load its
model onto GPU 0, beside the processes that were given it. Two layers keep that from happening:
``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1`` in the runtime environment of everything we start
(``pipeline.runtime``), which restores Ray's old clearing, and ``hide_unrequested_gpus`` in our
own workers and actors, which holds even where a job's runtime environment overrides ours.
Imports TensorFlow lazily: call these in the Ray process, before it first touches a device.
"""

from __future__ import annotations

import os
import socket


def hide_unrequested_gpus(gpus_requested: float) -> None:
    """No GPU for a process that asked Ray for none. Must run before TensorFlow initialises its
    devices (its first device query or op)."""
    if gpus_requested:
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as error:  # devices already initialised: they can no longer be hidden
        raise RuntimeError(f"cannot hide the GPUs from a process that asked Ray for none ({error}); "
                           "TensorFlow touched its devices before this point") from None


def visible_gpus() -> list:
    """TensorFlow's GPUs, with memory growth on: several processes that hold a fraction of one GPU
    share it, instead of the first one taking all of its memory."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    return gpus


def process_placement(gpus) -> dict:
    """Where this Ray process runs and what it sees, for the run's and the inference summaries."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
            "pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "gpus": [gpu.name for gpu in gpus]}
