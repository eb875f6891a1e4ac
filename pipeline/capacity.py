"""The resource arithmetic of every stage: what a training worker asks Ray for, how many workers
or trials a cluster holds, the size of a local Ray, the CPUs left for decoding.

Pure functions of the config and of resource dicts as Ray reports them (``ray.cluster_resources()``,
each node's ``Resources`` in ``ray.nodes()``): no Ray here, so every number is unit-tested without
a cluster (``tests/test_capacity.py``). The callers ask Ray and act on the answer: ``preflight``
refuses what cannot run, ``cli`` sizes a local Ray, ``tune.search`` sets the trials at once,
``train.run`` the workers' request, ``infer.run`` warns.
"""

from __future__ import annotations

import os
from typing import Optional

# Logical CPUs kept free of training workers for the Ray Data tasks that feed them: reserving
# every CPU for workers starves the input pipeline and the run hangs.
INGEST_CPUS = 2


def worker_request(scaling) -> dict:
    """What one training worker asks Ray for (as ``run_training`` passes it to Ray Train)."""
    request = {"CPU": scaling.cpus_per_worker, **scaling.custom_resources}
    if scaling.use_gpu:
        request["GPU"] = scaling.gpus_per_worker
    return {name: amount for name, amount in request.items() if amount}


def workers_that_fit(request: dict, nodes: list[dict], wanted: int) -> int:
    """How many workers of ``request`` the nodes' total resources hold, placed greedily."""
    free = [dict(node) for node in nodes]
    placed = 0
    for _ in range(wanted):
        node = next((node for node in free if all(node.get(k, 0.0) >= v for k, v in request.items())), None)
        if node is None:
            break
        for name, amount in request.items():
            node[name] -= amount
        placed += 1
    return placed


def workers_per_run(scaling, cpus: float, runs: int = 1) -> int:
    """Workers each of ``runs`` runs takes on a cluster of ``cpus`` CPUs: ``scaling.num_workers``;
    an elastic run (``min_workers``) as many as the CPUs hold, from its minimum to num_workers."""
    if not (scaling.min_workers and scaling.cpus_per_worker):
        return scaling.num_workers
    return max(scaling.min_workers, min(scaling.num_workers, int(cpus // (runs * scaling.cpus_per_worker))))


def concurrent_trials_that_fit(config, resources: dict) -> int:
    """Trials whose workers ``resources`` hold at once, after the ``INGEST_CPUS``; at least one
    (the others queue)."""
    scaling = config.scaling
    fits = []
    if scaling.cpus_per_worker:
        spare = resources.get("CPU", 0) - INGEST_CPUS
        fits.append(spare // (scaling.num_workers * scaling.cpus_per_worker))
    if scaling.use_gpu and scaling.gpus_per_worker:
        fits.append(resources.get("GPU", 0) // (scaling.num_workers * scaling.gpus_per_worker))
    return max(1, int(min(fits))) if fits else 1


def concurrent_trials(config, resources: dict) -> int:
    """``tune.max_concurrent_trials``, or as many trials as ``resources`` hold now."""
    return config.tune.max_concurrent_trials or concurrent_trials_that_fit(config, resources)


def local_cpus_for_training(config, trials: int = 1) -> int:
    """Logical CPUs for a local Ray that trains ``trials`` runs at once: the workers' reservations
    plus ``INGEST_CPUS``. TensorFlow's threads are sized separately in the worker loop."""
    reserved = trials * config.scaling.num_workers * config.scaling.cpus_per_worker
    return max(os.cpu_count() or 1, int(reserved + 0.999) + INGEST_CPUS)


def local_trials(config) -> int:
    """Trials a local Ray runs at once: ``tune.max_concurrent_trials``, else one per core's worth
    of worker reservations."""
    per_trial = config.scaling.num_workers * max(config.scaling.cpus_per_worker, 1.0)
    return config.tune.max_concurrent_trials or max(1, int((os.cpu_count() or 1) // per_trial))


def decode_cpu_warning(settings, cpus: float) -> Optional[str]:
    """The warning for model actors (``settings``: ``config.infer``) that reserve all but less
    than one of the cluster's ``cpus``: the decode tasks wait for CPUs to join. A warning, not an
    error: an autoscaling cluster may be about to grow."""
    reserved = settings.num_actors * settings.cpus_per_actor
    if cpus - reserved >= 1:
        return None
    return (f"the model actors reserve {reserved:g} of the cluster's {cpus:g} CPUs "
            "(infer.num_actors x infer.cpus_per_actor), leaving less than one for the decode "
            "tasks: the job waits until more CPUs join; lower one of them (e.g. "
            "--set infer.cpus_per_actor=0.5)")
