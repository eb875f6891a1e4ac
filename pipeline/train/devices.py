"""What a training worker computes on, decided the same way on every worker of a run.

Everything here must agree across workers, or MultiWorkerMirroredStrategy breaks in ways that
show only on GPUs:
- visible devices: MWMS makes one replica per GPU the process sees, so a CPU worker on a GPU node
  must see none (``pipeline.accelerators``) and a GPU worker exactly the GPUs it asked for;
- replicas: each replica takes its own per-replica batch from the worker's dataset per step, so
  the input must be batched and counted per replica (``pipeline.config.replicas_per_worker``);
- precision: resolved per worker, mixed hardware would train replicas in different dtypes, one
  with a loss-scale optimizer and one without; ``agreed_precision`` decides once, by all-reduce;
- collective, XLA and steps per execution shape the traced step and its collectives; they follow
  from the config (``use_gpu``), never from what one worker happens to see.
"""

from __future__ import annotations

import os

import pipeline  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from pipeline import accelerators

PRECISION_POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
COLLECTIVES = {
    "ring": tf.distribute.experimental.CommunicationImplementation.RING,
    "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
}
# Mixed precisions in order of preference where a device runs both fast: bfloat16 keeps float32's
# range, so it needs no loss scaling.
MIXED_PRECISIONS = ("bf16", "fp16")
GPU_STEPS_PER_EXECUTION = 16


def local_gpus(scaling, rank: int) -> list:
    """The GPUs this worker sees (none unless it asked for some), checked against its request."""
    accelerators.hide_unrequested_gpus(scaling.gpus_per_worker if scaling.use_gpu else 0)
    gpus = accelerators.visible_gpus()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if scaling.use_gpu and not gpus:
        raise RuntimeError(f"scaling.use_gpu=true but worker {rank} sees no GPU (CUDA_VISIBLE_DEVICES="
                           f"{visible!r}); check the cluster's GPU nodes and the TensorFlow CUDA install")
    expected = int(scaling.gpus_per_worker) if scaling.gpus_per_worker >= 1 else 1
    if scaling.use_gpu and len(gpus) != expected:
        raise RuntimeError(f"worker {rank} sees {len(gpus)} GPU(s) (CUDA_VISIBLE_DEVICES={visible!r}) but asked "
                           f"for scaling.gpus_per_worker={scaling.gpus_per_worker:g}: the replica count and "
                           "per-replica batch would be wrong")
    return gpus


def collective(requested: str, use_gpu: bool, gpus_per_worker: float = 1.0) -> str:
    """``auto`` -> NCCL between GPU workers (TensorFlow's own AUTO never picks it), ring (gRPC) on
    CPUs and between workers that hold a fraction of a GPU: Ray packs those onto one GPU, and NCCL
    refuses two ranks on one device ("Duplicate GPU detected")."""
    if requested == "auto":
        return "nccl" if use_gpu and gpus_per_worker >= 1 else "ring"
    return requested


def make_strategy(collective_name: str) -> tf.distribute.MultiWorkerMirroredStrategy:
    return tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            implementation=COLLECTIVES[collective_name]))


def fast_precisions(gpus) -> set[str]:
    """The mixed precisions this worker's device runs fast."""
    if gpus:
        major, _ = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0))
        # Ampere (8.x) and later have bf16 and fp16 tensor cores; Volta/Turing (7.x) fp16 only;
        # older GPUs gain little from either.
        return {"bf16", "fp16"} if major >= 8 else {"fp16"} if major >= 7 else set()
    # On a CPU without bf16 units (AMX, AVX512_BF16) TensorFlow emulates bfloat16 and training gets
    # several times slower than fp32 (see BENCHMARKS.md, "Training speed (issue 3)").
    return {"bf16"} if cpu_has_bf16_units() else set()


def cpu_has_bf16_units() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:  # not Linux: no cheap way to tell, fp32 is the safe choice
        return False
    return bool({"amx_bf16", "avx512_bf16"} & set(flags))


def choose_precision(requested: str, fast_on_every_worker: set[str]) -> str:
    """``auto`` -> the preferred mixed precision that every worker runs fast, else fp32."""
    if requested != "auto":
        return requested
    return next((name for name in MIXED_PRECISIONS if name in fast_on_every_worker), "fp32")


def agreed_precision(strategy, requested: str, local_fast: set[str]) -> str:
    """The run's precision, the same on every worker: ``auto`` becomes the mixed precision that all
    replicas run fast, found with one all-reduce (a sum of per-replica flags that equals the replica
    count only if every replica has the flag). Call on every worker alike: it is a collective."""
    if requested != "auto":
        return requested
    flags = [float(name in local_fast) for name in MIXED_PRECISIONS]
    totals = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(flags)), axis=None)
    everywhere = {name for name, total in zip(MIXED_PRECISIONS, totals.numpy())
                  if round(float(total)) == strategy.num_replicas_in_sync}
    return choose_precision("auto", everywhere)


def steps_per_execution(requested, use_gpu: bool) -> int:
    """``auto`` -> several steps per call on GPUs, where a ResNet-18 step on CIFAR takes
    milliseconds and Keras' per-call Python would leave the GPU idle between steps; one on CPUs,
    where a step takes seconds and per-step callbacks (progress, speed) stay exact."""
    if requested == "auto":
        return GPU_STEPS_PER_EXECUTION if use_gpu else 1
    return int(requested)


def jit_compile(requested, use_gpu: bool) -> bool:
    """``auto`` -> XLA on GPUs (fused element-wise kernels around the convolutions); off on CPUs,
    where it measured slower than TensorFlow's oneDNN kernels (see BENCHMARKS.md, "XLA, steps per
    execution and precision on this CPU")."""
    if requested == "auto":
        return use_gpu
    return bool(requested)


def worker_record(context, gpus, strategy, **decided) -> dict:
    """What one worker ran on, for ``<run>/workers/rank-N.json`` (gathered into summary.json)."""
    return {
        "rank": context.get_world_rank(), "local_rank": context.get_local_rank(),
        "node_rank": context.get_node_rank(), **accelerators.process_placement(gpus),
        "replicas": len(strategy.extended.worker_devices),
        "replicas_in_sync": strategy.num_replicas_in_sync,
        **decided,
    }
