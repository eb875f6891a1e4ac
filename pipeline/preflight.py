"""Checks before any work that depend on where a stage runs, not on the config alone.

``check_before_ray`` runs first, without a cluster: every folder the stage writes into can be
written (not a file, not below one, not a read-only place). ``check`` runs once Ray is up:

* On a cluster of several nodes (or one an autoscaler may grow), every node must reach the shards,
  runs, searches and inference files: Ray Train workers, Ray Data tasks and model actors run on
  whichever node Ray picks. A local path there fails late (Ray Train's storage check after an
  epoch of compute) or silently (parts written to another node's disk). Local paths are accepted
  only under a folder the user declares shared (``run.shared_paths``, e.g. an NFS mount).
* A job submitted with ``--working-dir`` runs in Ray's unpacked copy of that folder, a cache Ray
  deletes: a relative output path would put shards, checkpoints and exports there.
* Training workers that reserve every CPU of a fixed-size cluster leave none for the Ray Data
  tasks that feed them, and the run waits for input forever; GPUs asked of a cluster without any
  would wait forever too. (A local embedded Ray is sized for its stage instead, see
  ``capacity.local_cpus_for_training``; an autoscaling cluster adds nodes for pending work.)
* Preprocessing runs its decode tasks on the driver's node (where a local source lives): a head
  node with no CPUs (ray-cluster.yaml) can never run them.

Every failure is a ``ConfigError`` naming the key and what to set instead (exit status 2).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

from pipeline import capacity, runtime, storage
from pipeline.config import Config, ConfigError

# The paths each stage's workers, tasks or actors read or write on other nodes.
SHARED_PATHS = {
    "preprocess": ("data.output",),  # written here, read by training workers anywhere
    "train": ("data.output", "run.storage_path", "tracking.uri"),
    "tune": ("data.output", "run.storage_path", "tune.storage_path", "tracking.uri"),
    "predict": ("infer.input", "infer.model", "infer.output"),
    "serve": ("serve.model",),
}
# Paths a stage writes: never into a submitted job's temporary copy of its working directory.
OUTPUT_PATHS = ("data.output", "run.storage_path", "tune.storage_path", "infer.output")
WHO_USES = {
    "data.output": "the Parquet shards are read by training workers on every node",
    "run.storage_path": "Ray Train's workers write checkpoints there from every node",
    "tune.storage_path": "trials run on every node and write their results there",
    "infer.input": "decode tasks on every node read the images",
    "infer.model": "model actors on every node load it",
    "infer.output": "prediction parts are written from every node",
    "serve.model": "model replicas on every node load it",
    "tracking.uri": "the Train controller of every run (and trial) logs its epochs there from the node it runs on",
}


@dataclass
class ClusterShape:
    local: bool                  # an embedded Ray this process started: one machine, sized for the stage
    nodes: int                   # alive nodes now
    autoscaling: bool            # an autoscaler may add (and remove) nodes
    cpus: float                  # the cluster's CPUs now
    gpus: float
    driver_node_cpus: float      # CPUs of the node this driver runs on
    working_dir: Optional[str]   # Ray's copy of a submitted job's working directory, else None
    node_resources: list = field(default_factory=list)  # each alive node's total resources

    @property
    def multi_node(self) -> bool:
        return self.nodes > 1 or self.autoscaling


def cluster_shape() -> ClusterShape:
    """What the connected Ray cluster looks like (call after ``runtime.connect``)."""
    import ray

    alive = [node for node in ray.nodes() if node.get("Alive")]
    this_node = ray.get_runtime_context().get_node_id()
    driver_cpus = next((node["Resources"].get("CPU", 0.0) for node in alive if node["NodeID"] == this_node), 0.0)
    resources = ray.cluster_resources()
    return ClusterShape(local=runtime.started_locally(), nodes=len(alive), autoscaling=_autoscaler_running(),
                        cpus=resources.get("CPU", 0.0), gpus=resources.get("GPU", 0.0),
                        driver_node_cpus=driver_cpus, working_dir=_job_working_dir(),
                        node_resources=[dict(node["Resources"]) for node in alive])


def _autoscaler_running() -> bool:
    """True when a cluster-launcher or KubeRay autoscaler manages the cluster (autoscaler v2 is
    only ever on with one; v1 publishes its status in the GCS)."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        if is_autoscaler_v2():
            return True
    except Exception:  # older Ray, or no GCS answer: fall back to the published status
        pass
    status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    return autoscaler_in_status(json.loads(status)) if status else False


def autoscaler_in_status(status: dict) -> bool:
    """Ray's monitor runs on every head node. Without an autoscaling config (a plain
    ``ray start --head``) it runs a read-only "autoscaler" that only reports the nodes it sees,
    typed ``node_<node id>``; a real autoscaler reports its configured node types."""
    report = status.get("autoscaler_report")
    if not report:
        return False
    mapping = report.get("node_type_mapping") or {}
    return any(node_type != f"node_{node_id}" for node_id, node_type in mapping.items())


def _job_working_dir() -> Optional[str]:
    """Inside ``ray job submit --working-dir``: the driver runs in Ray's unpacked copy of it."""
    injected = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not injected:
        return None
    runtime_env = json.loads(injected).get("runtime_env") or {}
    if not runtime_env.get("working_dir"):
        return None
    try:
        return os.getcwd()
    except FileNotFoundError:  # already deleted under us: the very hazard this check is about
        return os.environ.get("PWD") or "Ray's runtime-env cache"


def _value(config: Config, dotted: str):
    section, key = dotted.split(".", 1)
    return getattr(getattr(config, section), key)


def check_before_ray(config: Config, stage: str) -> None:
    """What can be refused without a cluster: every folder the stage writes into can be written."""
    for key in OUTPUT_PATHS:
        if key in SHARED_PATHS[stage] and key != "infer.output":  # predict checks its own output's layout
            value = _value(config, key)
            storage.check_writable_folder(value, f"{key}={value}")


def settle_tracking(config: Config, stage: str, cluster: ClusterShape) -> Optional[str]:
    """``tracking.enabled: auto`` with the default local store on a cluster of several nodes: off,
    with a note (runs and trials log from any node, which cannot reach this node's store). Asked
    for explicitly (``true``), the same store is refused by ``check``."""
    from pipeline import tracking

    settings = config.tracking
    if stage not in ("train", "tune") or settings.enabled != "auto" or not tracking.enabled(settings):
        return None
    if cluster.multi_node and not cluster.local and tracking.local_folder(settings) is not None:
        shared = [storage.absolute(path) for path in config.run.shared_paths]
        folder = tracking.local_folder(settings)
        if not any(folder == root or folder.startswith(root.rstrip("/") + "/") for root in shared):
            settings.enabled = False
            return (f"[tracking] off: tracking.uri={settings.uri} is a local store, which the other nodes of this "
                    f"cluster cannot reach; set tracking.uri to a tracking server (http://...) to track")
    return None


def check(config: Config, stage: str, cluster: ClusterShape) -> None:
    """Raise ConfigError if ``stage`` cannot work here as configured."""
    if cluster.working_dir:
        for key in [key for key in SHARED_PATHS[stage] if key in OUTPUT_PATHS]:
            value = _value(config, key)
            if value and not storage.is_uri(value) and not os.path.isabs(os.path.expanduser(value)):
                raise ConfigError(
                    f"{key}={value} is a relative path, and this job runs in Ray's temporary copy of its "
                    f"working directory ({cluster.working_dir}), which Ray deletes: give an absolute path on "
                    f"storage that outlives the job (s3://bucket/..., gs://bucket/..., or a shared mount)")
    if cluster.multi_node and not cluster.local:
        shared = [storage.absolute(path) for path in config.run.shared_paths]
        for key in SHARED_PATHS[stage]:
            value = _value(config, key)
            if key == "tracking.uri":  # a local SQLite store (or folder) is a local path too
                from pipeline import tracking

                value = tracking.local_folder(config.tracking) if tracking.enabled(config.tracking) else None
            if not value or (storage.is_uri(value) and not value.startswith("file://")):
                continue
            path = storage.absolute(value.removeprefix("file://"))
            if not any(path == root or path.startswith(root.rstrip("/") + "/") for root in shared):
                size = f"{cluster.nodes} nodes" + (" and an autoscaler that adds more" if cluster.autoscaling else "")
                raise ConfigError(
                    f"{key}={value} is a local path, but this cluster has {size}: {WHO_USES[key]}, "
                    f"and other nodes cannot see this node's disk. Use s3://bucket/... or gs://bucket/..., "
                    f"or a folder every node mounts declared with run.shared_paths=[/mnt/shared]")
    if stage in ("preprocess", "train", "tune") and not cluster.local and cluster.driver_node_cpus == 0 \
            and (stage == "preprocess" or not _preprocessed(config)):
        raise ConfigError(
            "preprocessing decodes on the driver's node (where a local data.source lives), and this driver "
            "runs on a node with no CPUs (a head node with CPU: 0): submit the job with "
            "`ray job submit --entrypoint-num-cpus 1 ...` so that the driver runs on a worker node")
    if stage in ("train", "tune") and not cluster.local and not cluster.autoscaling:
        _check_resources(config, stage, cluster)


def _preprocessed(config: Config) -> bool:
    return storage.exists(storage.join(config.data.output, "manifest.json"))


def _check_resources(config: Config, stage: str, cluster: ClusterShape) -> None:
    scaling = config.scaling
    _check_one_worker_fits_a_node(scaling, cluster)
    runs = capacity.concurrent_trials(config, {"CPU": cluster.cpus, "GPU": cluster.gpus}) if stage == "tune" else 1
    # An elastic run starts with min_workers, and then takes as many workers as fit, up to num_workers.
    fewest = scaling.min_workers or scaling.num_workers
    if scaling.use_gpu and scaling.gpus_per_worker:
        wanted = runs * fewest * scaling.gpus_per_worker
        if cluster.gpus < wanted:
            raise ConfigError(
                f"scaling.use_gpu=true asks for {wanted:g} GPUs ({_runs(runs)}{_workers_key(scaling)}={fewest} "
                f"x scaling.gpus_per_worker={scaling.gpus_per_worker:g}), and this cluster has {cluster.gpus:g} and no "
                f"autoscaler: the run would wait forever. Lower them, or add GPU nodes")
    workers = capacity.workers_per_run(scaling, cluster.cpus, runs)
    reserved = runs * workers * scaling.cpus_per_worker
    if cluster.cpus - reserved < 1:
        raise ConfigError(
            f"{_runs(runs)}" + (f"{workers} elastic workers (scaling.min_workers={scaling.min_workers} to "
                                f"num_workers={scaling.num_workers}, as many as fit)" if scaling.min_workers
                                else f"scaling.num_workers={scaling.num_workers}") + " x scaling.cpus_per_worker="
            f"{scaling.cpus_per_worker:g} reserve {reserved:g} of this cluster's {cluster.cpus:g} CPUs, leaving "
            f"none for the Ray Data tasks that feed the workers: training would wait for input forever. "
            f"Lower scaling.cpus_per_worker (TensorFlow uses every core of its node whatever is reserved, "
            f"e.g. --set scaling.cpus_per_worker=0.5), lower the workers{' or tune.max_concurrent_trials' if runs > 1 else ''}, "
            f"or add CPUs")


def _check_one_worker_fits_a_node(scaling, cluster: ClusterShape) -> None:
    """A worker is placed on one node: a request larger than every node (4 GPUs per worker on
    1-GPU nodes) waits forever on a cluster that cannot grow, however many nodes it has."""
    if not cluster.node_resources:
        return
    request = capacity.worker_request(scaling)
    if capacity.workers_that_fit(request, cluster.node_resources, wanted=1):
        return
    largest = {name: max(node.get(name, 0.0) for node in cluster.node_resources) for name in request}
    wanted = ", ".join(f"{amount:g} {name}" for name, amount in request.items())
    offered = ", ".join(f"{amount:g} {name}" for name, amount in largest.items())
    raise ConfigError(
        f"one training worker asks for {wanted} (scaling.cpus_per_worker, gpus_per_worker, custom_resources), "
        f"and no node of this cluster has that much (the most any node has: {offered}), nor an autoscaler to "
        f"add one: the run would wait forever. Lower the per-worker request (more workers, fewer GPUs each), "
        f"or add larger nodes")


def waiting_note(config: Config, stage: str, cluster: ClusterShape) -> Optional[str]:
    """On an autoscaling cluster a request the nodes up now cannot hold is a wait, not an error:
    the pending workers are the demand that makes the autoscaler add nodes. Say so, so that a
    quiet job is not mistaken for a hung one."""
    if stage not in ("train", "tune") or cluster.local or not cluster.autoscaling or not cluster.node_resources:
        return None
    request = capacity.worker_request(config.scaling)
    wanted = config.scaling.num_workers * ((config.tune.max_concurrent_trials or 1) if stage == "tune" else 1)
    fit = capacity.workers_that_fit(request, cluster.node_resources, wanted)
    if fit >= wanted:
        return None
    asked = ", ".join(f"{amount:g} {name}" for name, amount in request.items())
    return (f"the cluster's {cluster.nodes} node(s) hold {fit} of the {wanted} training workers ({asked} each) now: "
            f"waiting for the autoscaler to add nodes (`ray status` shows the pending demand)")


def _workers_key(scaling) -> str:
    return "scaling.min_workers" if scaling.min_workers else "scaling.num_workers"


def _runs(runs: int) -> str:
    return f"{runs} concurrent trials x " if runs > 1 else ""
