"""The one configuration schema: every setting, its default, unit and valid range live here.

A run's configuration is built in three layers, later ones winning:
  1. the defaults below (``Config()``),
  2. a recipe YAML file from ``configs/`` (only the keys it names),
  3. command-line overrides ``--set section.key=value`` (values parsed as YAML: ``5``, ``0.1``,
     ``true``, ``[30, 60]``, ``null``).
Unknown keys, wrong types and out-of-range values raise ``ConfigError`` naming the key (and the
closest valid key for a typo) before any work starts. Derived values (per-worker batch size,
scaled learning rate) are computed in one place each: ``batch_sizes`` and ``scaled_learning_rate``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from pipeline import InputError
from pipeline.suggest import did_you_mean


class ConfigError(InputError):
    """A configuration value or file is invalid; the message names the key."""


def param(default, help: str, *, min=None, max=None, choices=None, min_exclusive=False, auto=False):
    """A config field with its documentation and validation rules beside the default. ``auto``:
    the word ``auto`` is accepted besides values of the field's type (decided per device later)."""
    metadata = {"help": help, "min": min, "max": max, "choices": choices, "min_exclusive": min_exclusive,
                "auto": auto}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


@dataclass
class DataConfig:
    source: str = param(
        "cifar10",
        "'cifar10' downloads the official archive (md5-checked) into cache_dir; otherwise a path "
        "to cifar-10-python.tar.gz, an extracted cifar-10-batches-py/ folder, an image folder "
        "(root/<class>/... or root/{train,test}/<class>/...), or such a folder packed as "
        ".tar/.tar.gz/.zip")
    download_url: str = param(CIFAR10_URL, "where source=cifar10 downloads from (a mirror may be given)")
    cache_dir: str = param("~/.cache/ray-image-pipeline", "downloads and extracted archives")
    max_extract_bytes: int = param(
        200 * 1024**3, "refuse an archive whose members add up to more than this many bytes once extracted "
        "(an archive bomb); 200 GiB holds ImageNet", min=1)
    max_extract_members: int = param(
        5_000_000, "refuse an archive with more members than this (an archive bomb)", min=1)
    output: str = param("artifacts/data", "directory (local or s3://, gs://) for Parquet shards + manifest.json")
    image_size: int = param(32, "images are resized to image_size x image_size RGB (pixels)", min=8, max=1024)
    resize: str = param(
        "auto", "how a picture becomes image_size x image_size: 'squash' resizes the whole picture to a square "
        "(the original tutorial's; a portrait photo is squeezed), 'crop' resizes its centred square (the shape "
        "is kept, the long side's ends are cut), the same in training, evaluation, batch inference and serving; "
        "auto: squash below 96 px (CIFAR), crop from 96 px up (photos)", choices=["auto", "squash", "crop"])
    encoding: str = param(
        "auto", "how the shards store each image: 'raw' uint8 pixels (nothing to decode; 150 KB an image at "
        "224 px), 'jpeg' or 'webp' at encoding_quality, or 'png' (lossless), decoded by the read tasks "
        "across the cluster's CPUs; auto: raw below 96 px (CIFAR), jpeg from 96 px up "
        "(BENCHMARKS.md: what the shards store)", choices=["auto", "raw", "jpeg", "webp", "png"])
    encoding_quality: int = param(90, "quality of data.encoding jpeg and webp (1-100)", min=1, max=100)
    val_fraction: float = param(0.1, "fraction of the training images held out for validation", min=0.0, max=0.9)
    split_method: str = param(
        "stratified", "'stratified': seeded random split with the same fraction per class; "
        "'tail': the last val_fraction of the source order, like Keras validation_split",
        choices=["stratified", "tail"])
    split_seed: int = param(0, "seed of the train/val split", min=0)
    rows_per_shard: int = param(10000, "target rows per Parquet shard file (fewer for large images: a shard "
                                "holds at most 256 MiB of pixels, which bounds a writer task's memory)", min=1)
    max_images_per_class: Optional[int] = param(
        None, "use only the first N training images of each class (quick trials, benchmarks; null = all)",
        min=1)
    max_failed_fraction: float = param(
        0.01, "fail when more than this fraction of the source files cannot be decoded", min=0.0, max=1.0)


@dataclass
class ModelConfig:
    name: str = param("resnet18", "variant from pipeline.models.VARIANTS (resnet18/34/50/101/152)")
    stem: str = param(
        "auto", "'cifar': 3x3 conv + stride-1 max-pool (the original, for 32x32 inputs); "
        "'imagenet': 7x7/2 conv + 3x3/2 max-pool (for larger images); auto: cifar below 96 px, imagenet "
        "from 96 px up", choices=["auto", "cifar", "imagenet"])
    width: int = param(64, "channels of the first stage; later stages double it (64 = standard ResNet)", min=1)
    use_bias: bool = param(True, "conv layers keep a bias, as the original (Keras default); redundant before BN")
    bn_momentum: float = param(
        0.99, "BatchNorm moving-average momentum (0.99 = Keras default, the original; 0.9 = PyTorch's, "
        "better for short schedules)", min=0.0, max=1.0)
    normalization: str = param(
        "standardize", "first layer of the model: 'scale' divides pixels by 255 (the original); "
        "'standardize' subtracts the train split's per-channel mean and divides by its std",
        choices=["scale", "standardize"])
    test_time_flip: bool = param(
        False, "average each image's probabilities with those of its mirror image (test-time augmentation): "
        "the final evaluation, batch inference and serving alike, as the export records it; twice the compute "
        "per image. Per-epoch validation stays without it")


@dataclass
class TrainConfig:
    epochs: int = param(100, "passes over the training split", min=1)
    global_batch_size: Optional[int] = param(
        100, "examples per optimizer step across all workers; set this or per_worker_batch_size", min=1)
    per_worker_batch_size: Optional[int] = param(
        None, "examples per step on each worker; global = per_worker x num_workers", min=1)
    optimizer: str = param("sgd", "optimizer", choices=["sgd"])
    learning_rate: float = param(
        0.005, "peak learning rate at lr_batch_size examples per step; scaled linearly with the "
        "global batch size (see scaled_learning_rate)", min=0.0, min_exclusive=True)
    lr_batch_size: Optional[int] = param(
        None, "batch size that learning_rate is given for; null = no scaling (learning_rate is used "
        "as is at any batch size)", min=1)
    momentum: float = param(0.9, "SGD momentum", min=0.0, max=0.999)
    nesterov: bool = param(False, "Nesterov momentum")
    weight_decay: float = param(
        0.0, "decoupled weight decay per step, multiplied by the learning rate; BN and biases excluded",
        min=0.0)
    label_smoothing: float = param(0.0, "label smoothing of the cross-entropy", min=0.0, max=0.5)
    lr_schedule: str = param(
        "constant", "constant (original) | step | cosine | onecycle",
        choices=["constant", "step", "cosine", "onecycle"])
    warmup_epochs: float = param(0.0, "linear warm-up from 0 (cosine, onecycle, step)", min=0.0)
    step_epochs: list = param([], "step schedule: epochs at which the rate is multiplied by step_gamma")
    step_gamma: float = param(0.1, "step schedule factor", min=0.0, max=1.0)
    final_lr_fraction: float = param(0.0, "cosine/onecycle end at learning_rate x this", min=0.0, max=1.0)
    ema_momentum: Optional[float] = param(
        None, "keep an exponential moving average of the weights, this much of it kept per optimizer step "
        "(Keras' ema_momentum: 0.99 averages about the last 100 steps); each epoch's validation, the test "
        "evaluation, the export and inference from a checkpoint use the average; null: off",
        min=0.0, max=0.99999, min_exclusive=True)
    random_crop_padding: int = param(0, "augmentation: pad by this many pixels, then crop back (0 = off)", min=0)
    horizontal_flip: bool = param(False, "augmentation: random left-right flip")
    cutout: int = param(0, "augmentation: zero one random square of this side (pixels; 0 = off)", min=0)
    random_resized_crop: float = param(
        0.0, "augmentation for photos: each training image is a random crop of at least this fraction of the "
        "stored image's area (aspect ratio 3/4 to 4/3), resized back to image_size (0 = off; 0.25 suits "
        "224 px). Evaluation sees the stored image whole: with data.resize=crop, the centre crop", min=0.0, max=1.0)
    precision: str = param(
        "fp32", "fp32 | bf16 (mixed_bfloat16: CPUs with AMX/AVX-512 bf16, A100+ GPUs) | fp16 "
        "(mixed_float16 + loss scaling, older GPUs) | auto (decided once per run: the mixed precision "
        "every worker's device runs fast, bf16 on Ampere+ GPUs and CPUs with bf16 units, fp16 on "
        "Volta/Turing, else fp32)",
        choices=["auto", "fp32", "bf16", "fp16"])
    steps_per_execution: int = param(
        "auto", "optimizer steps per call into TensorFlow (Keras steps_per_execution); auto: 1 on CPUs, "
        "where a step dwarfs the per-call overhead, 16 with GPUs, where per-step Python and kernel "
        "launches would leave the GPU idle between short steps", min=1, auto=True)
    jit_compile: bool = param(
        "auto", "compile the train step with XLA; auto: on with GPUs (fused kernels), off on CPUs "
        "(measured slower there, see BENCHMARKS.md)", auto=True)
    shuffle_buffer_size: int = param(
        10000, "rows in each worker's local shuffle buffer, on top of a new shard-file order every epoch", min=0)
    shuffle_buffer_bytes: int = param(
        2**30, "at most this many bytes of pixels in each worker's shuffle buffer: fewer rows than "
        "shuffle_buffer_size for large images (10,000 rows at 224 px would be 1.5 GB)", min=0)
    checkpoint_every_epochs: int = param(1, "report a checkpoint every N epochs (and at the last)", min=1)
    checkpoints_to_keep: int = param(
        1, "best checkpoints kept by val_accuracy; the latest is always kept as well", min=1)
    max_failures: int = param(2, "restarts from the latest checkpoint after a worker dies", min=-1)
    max_preemptions: int = param(
        -1, "restarts after a node of the run is reclaimed (drained with reason preemption: a spot or "
        "preemptible node, see cluster/README.md); not counted in max_failures; -1: no limit", min=-1)
    stall_timeout_seconds: float = param(
        900.0, "a worker that finishes no step (or checkpoint) for this long while training ends itself, and "
        "Ray Train restarts the attempt from the latest checkpoint: a worker hung in a call that never returns "
        "would otherwise hold the run forever; 0: never", min=0.0)
    checkpoint_every_steps: int = param(
        0, "also checkpoint inside an epoch every N optimizer steps (long epochs); a restart resumes at "
        "that step; 0: at epoch ends only", min=0)
    preemption_check_steps: int = param(
        1, "ask Ray Train every N steps whether a node of the run is being reclaimed (every worker at the "
        "same steps); on a notice a checkpoint is written at once and again just before the deadline; "
        "0: never", min=0)
    seed: Optional[int] = param(
        0, "seed of the initial weights, the augmentation, each worker's shuffle buffer and the "
        "shard-file order (both per epoch); null: all random", min=0)


@dataclass
class ScalingConfig:
    num_workers: int = param(
        1, "Ray Train workers (one TensorFlow replica each); [min, max] (or min_workers) for elastic training",
        min=1)
    min_workers: Optional[int] = param(
        None, "elastic training: when nodes are lost and none come back (no spot capacity) the run goes on "
        "with as few as this many workers, and grows back to num_workers when nodes return (a restart "
        "from the latest checkpoint, checked every resize_check_seconds). The global batch and learning "
        "rate stay as configured: each worker takes global_batch_size / workers. null: always num_workers",
        min=1)
    resize_check_seconds: float = param(
        60.0, "elastic training: how often Ray Train looks for room to grow the run back", min=0.0)
    use_gpu: bool = param(False, "give each worker GPUs")
    gpus_per_worker: float = param(
        1.0, "GPUs per worker when use_gpu: a fraction below 1 lets workers share a GPU (small models); "
        "a whole number N >= 2 makes each worker N replicas (one per GPU), each taking "
        "global_batch_size / (num_workers x N) examples per step", min=0.0, min_exclusive=True)
    cpus_per_worker: float = param(
        1.0, "CPUs reserved per worker (TensorFlow still uses all cores of its node)", min=0.0)
    custom_resources: dict = param(
        {}, "other Ray resources each worker asks for, e.g. {spot: 1} to train on the spot nodes of "
        "ray-cluster.yaml, or a custom accelerator resource")
    collective: str = param(
        "auto", "all-reduce implementation: auto (NCCL between workers with whole GPUs; ring on CPUs and "
        "between workers sharing a GPU, which NCCL refuses) | ring | nccl",
        choices=["auto", "ring", "nccl"])


@dataclass
class RunConfig:
    name: Optional[str] = param(None, "run name; re-using a name resumes that run (null: from the recipe)")
    storage_path: str = param("artifacts/runs", "where runs live (local or s3://, gs://; shared by all nodes)")
    progress_seconds: float = param(
        30.0, "print training progress (step, loss, accuracy, images/s, time left) this often; 0: per epoch only",
        min=0.0)
    shared_paths: list = param(
        [], "local folders that every node of the cluster mounts (an NFS share: [/mnt/shared]); on a "
        "cluster of several nodes, local paths for data, runs, searches and inference must be under one")


@dataclass
class InferConfig:
    model: Optional[str] = param(None, "export dir, checkpoint dir or run dir to load the model from")
    input: Optional[str] = param(None, "image file, directory, glob, file list (.txt) or s3:// prefix")
    output: Optional[str] = param(None, "predictions: .csv, .parquet, or a directory of Parquet parts")
    batch_size: int = param(256, "images per model call", min=1)
    num_actors: int = param(1, "model replicas (actors) in the pool", min=1)
    gpus_per_actor: float = param(
        0.0, "GPUs per model actor: 0 on CPU nodes, 1 for one model replica per GPU (num_actors = GPUs), a "
        "fraction to share a GPU between actors of a small model", min=0.0, max=1.0)
    cpus_per_actor: float = param(1.0, "CPUs reserved per model actor", min=0.0)
    top_k: int = param(5, "classes listed per image", min=1)
    rows_per_file: int = param(
        10000, "target rows per Parquet part of the predictions (fewer, larger files than one per batch)",
        min=1)
    max_failed_fraction: float = param(
        0.05, "exit with an error (after writing every output) when more than this fraction of the files "
        "cannot be read or decoded: a folder of broken files or a storage outage, not a few bad photos",
        min=0.0, max=1.0)


@dataclass
class ServeConfig:
    """Online serving (``pipeline serve``): the model behind an HTTP endpoint, a Ray Serve application."""
    model: Optional[str] = param(None, "export dir, checkpoint dir or run dir to serve (local or s3://, gs://)")
    host: str = param("127.0.0.1", "address the HTTP proxy listens on: 127.0.0.1 on a laptop, 0.0.0.0 on a cluster")
    port: int = param(8000, "HTTP port of the proxy (on every node that runs one)", min=1, max=65535)
    route_prefix: str = param("/", "URL prefix of the application: POST <prefix>predict, GET <prefix>healthz")
    top_k: int = param(5, "classes returned per image", min=1)
    max_batch_size: int = param(
        32, "requests a replica classifies together (Ray Serve's dynamic batching): throughput under load, "
        "no wait when idle", min=1)
    batch_wait_timeout_s: float = param(
        0.005, "how long a replica waits for a batch to fill before it classifies what it has (seconds)", min=0.0)
    min_replicas: int = param(1, "model replicas always running", min=0)
    max_replicas: int = param(1, "replicas under load; above min_replicas, Ray Serve autoscales between them", min=1)
    target_ongoing_requests: float = param(
        8.0, "requests in flight per replica that autoscaling aims at (more adds a replica)", min=0.0,
        min_exclusive=True)
    cpus_per_replica: float = param(1.0, "CPUs reserved per model replica", min=0.0)
    gpus_per_replica: float = param(
        0.0, "GPUs per replica: 0 on CPU nodes (the replica then sees none), 1 for one per GPU, a fraction to "
        "share a GPU", min=0.0, max=1.0)
    max_request_bytes: int = param(
        64 * 2**20, "larger request bodies get HTTP 413 instead of being decoded", min=1)


@dataclass
class TrackingConfig:
    """Experiment tracking with MLflow (pipeline/tracking.py): runs, searches and their trials, models."""
    enabled: bool = param(
        "auto", "log training runs, searches and exported models to MLflow; auto: when MLflow is installed "
        "(pip install -e \".[tracking]\")", auto=True)
    uri: str = param(
        "artifacts/mlflow", "a local folder (a SQLite store, artifacts beside it: no server needed; "
        "mlflow ui --backend-store-uri sqlite:///<folder>/mlflow.db), or a tracking server http(s)://host:5000")
    experiment: str = param("ray-image-pipeline", "the MLflow experiment runs and searches are logged in")
    registered_model: str = param(
        "ray-image-pipeline", "the registered model each finished run's export becomes a new version of")


# Metrics a search can rank trials by (per epoch, as reported to Ray Train), with their direction.
TUNE_METRICS = {"val_accuracy": "max", "val_top5_accuracy": "max", "val_loss": "min",
                "accuracy": "max", "top5_accuracy": "max", "loss": "min"}


@dataclass
class TuneConfig:
    """The search (stage 3): which keys to vary and how trials are scheduled. A trial is an ordinary
    training run of the rest of this config with the sampled values set; ``train.epochs`` is every
    trial's budget (ASHA's ``max_t``)."""
    name: Optional[str] = param(None, "search name; re-using a name resumes that search (null: the recipe's)")
    storage_path: str = param(
        "artifacts/searches", "where searches live (local, or s3://, gs:// shared by all nodes)")
    space: dict = param(
        {}, "the search space, one entry per config key: 'train.learning_rate: {loguniform: [0.01, 1]}'; "
        "distributions: loguniform / uniform [low, high], integer [low, high] (both included), "
        "choice [a, b, ...] (sampled), grid [a, b, ...] (every value, times num_samples)")
    metric: str = param("val_accuracy", "per-epoch metric that ranks, stops and picks trials",
                        choices=list(TUNE_METRICS))
    num_samples: int = param(4, "trials sampled from the space (each grid combination this many times)", min=1)
    max_concurrent_trials: Optional[int] = param(
        None, "trials running at once; null: as many as the cluster's CPUs/GPUs hold now. On an "
        "autoscaling cluster set it higher: queued trials' workers are the demand that adds nodes", min=1)
    scheduler: str = param(
        "asha", "asha: stop trials below the top 1/reduction_factor at epochs grace_period x "
        "reduction_factor^k; pbt: population-based training (exploit a better trial's checkpoint, "
        "perturb its train.* values every perturbation_interval epochs); fifo: run every trial to the end",
        choices=["asha", "pbt", "fifo"])
    search_alg: str = param(
        "random", "random (random sampling and grid); optuna (model-based TPE: later trials sample "
        "where earlier ones did well; needs the optuna package; no grid)", choices=["random", "optuna"])
    grace_period: int = param(1, "ASHA: epochs every trial runs before it may be stopped", min=1)
    reduction_factor: float = param(3.0, "ASHA: keep the top 1/reduction_factor of trials at each rung",
                                    min=1.0, min_exclusive=True)
    perturbation_interval: int = param(2, "PBT: epochs between exploit/explore steps", min=1)
    pbt_synch: bool = param(
        False, "PBT: perturb every trial at once at each interval (synchronous PBT: a trial that gets "
        "there first is paused, and resumed from its checkpoint, until the others arrive; the lower "
        "trials then always exploit) instead of each trial on its own when it gets there (asynchronous: "
        "no pauses, but an exploit needs the better trial to have reached a point first)")
    seed: Optional[int] = param(0, "seed of the search algorithm's sampling (null: random)", min=0)
    max_trial_failures: int = param(
        2, "retries of a trial whose driver was lost (its node reclaimed) or whose run failed past "
        "train.max_failures; it resumes from its own latest checkpoint. A diverged run or a bad "
        "combination of values is final, never retried", min=0)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    recipe: str = "default"  # file stem of the recipe, used as the default run name


# ---------------------------------------------------------------- derived values (one place each)

def batch_sizes(config: Config, workers: Optional[int] = None) -> tuple[int, int]:
    """(per_worker_batch_size, global_batch_size) with ``workers`` workers (default
    scaling.num_workers; an elastic run's actual count): one is configured, the other derived."""
    workers = workers or config.scaling.num_workers
    train = config.train
    if train.per_worker_batch_size is not None:
        return train.per_worker_batch_size, train.per_worker_batch_size * workers
    if train.global_batch_size % workers:
        if workers != config.scaling.num_workers:
            raise ConfigError(
                f"train.global_batch_size={train.global_batch_size} is not divisible by {workers} workers, a "
                f"count elastic training may shrink to (scaling.min_workers={config.scaling.min_workers}); "
                f"choose a batch divisible by every count from min_workers to num_workers")
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} is not divisible by "
            f"scaling.num_workers={workers}; change one, or set train.per_worker_batch_size")
    return train.global_batch_size // workers, train.global_batch_size


def replicas_per_worker(config: Config) -> int:
    """TensorFlow replicas in each worker: MultiWorkerMirroredStrategy mirrors the model on every
    GPU the worker sees, so a worker holding N GPUs is N replicas; a CPU worker, or one holding a
    fraction of a GPU, is one."""
    scaling = config.scaling
    return int(scaling.gpus_per_worker) if scaling.use_gpu and scaling.gpus_per_worker >= 1 else 1


def per_replica_batch_size(config: Config, workers: Optional[int] = None) -> int:
    """Examples each replica takes per step: what a worker's input pipeline batches by, since every
    replica draws its own batch from the worker's dataset."""
    per_worker, _ = batch_sizes(config, workers)
    replicas = replicas_per_worker(config)
    if per_worker % replicas:
        raise ConfigError(
            f"the per-worker batch ({per_worker}) is not divisible by scaling.gpus_per_worker={replicas:g} "
            f"(one replica per GPU); choose a global batch divisible by num_workers x gpus_per_worker")
    return per_worker // replicas


def scaled_learning_rate(config: Config) -> float:
    """Linear scaling rule (Goyal et al. 2017): lr = learning_rate x global_batch / lr_batch_size.

    With ``lr_batch_size: null`` the rate is used unchanged, as the original recipe did.
    """
    _, global_batch = batch_sizes(config)
    if config.train.lr_batch_size is None:
        return config.train.learning_rate
    return config.train.learning_rate * global_batch / config.train.lr_batch_size


# ---------------------------------------------------------------- loading and validation

def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults, then the recipe file at ``path``, then ``key=value`` overrides; validated."""
    raw: dict[str, Any] = {}
    recipe = "default"
    if path is not None:
        file = Path(path)
        if file.is_dir():
            raise ConfigError(f"--config {path} is a folder; give a recipe file in it, e.g. "
                              f"{file / 'fast.yaml'}" if any(file.glob('*.yaml')) else
                              f"--config {path} is a folder; give a recipe file, e.g. configs/fast.yaml")
        if not file.is_file():
            nearby = [str(f) for f in file.parent.glob("*.y*ml")] if file.parent.is_dir() else []
            raise ConfigError(f"config file not found: {path}{did_you_mean(str(file), nearby)}")
        try:
            loaded = yaml.safe_load(file.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {yaml_problem(error)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(loaded).__name__}")
        raw = loaded or {}
        recipe = file.stem
    config = from_dict(raw)
    config.recipe = recipe
    for override in overrides or []:
        apply_override(config, override)
    validate(config)
    return config


def from_dict(raw: dict) -> Config:
    config = Config()
    for section_name, values in raw.items():
        if section_name == "recipe":
            config.recipe = str(values)
            continue
        section = _section(config, section_name)
        if not isinstance(values, dict):
            raise ConfigError(f"section '{section_name}' must be a mapping of keys, got {values!r}")
        for key, value in values.items():
            _set(section, section_name, key, value)
    return config


def apply_override(config: Config, override: str) -> None:
    """Apply one ``--set`` override; the one description of what an override may say:

    ``section.key=value``
        The value is read as YAML (``5``, ``0.1``, ``true``, ``[30, 60]``, ``{a: 1}``, ``null``;
        nothing after ``=`` is the empty string, what YAML cannot read stays text), then checked as
        a recipe's value is. A text key takes the text as written, so ``run.name=2024`` stays the
        string "2024" (``null`` is still none).
    ``section.key.entry=value``
        Only for a mapping key (``tune.space``, ``scaling.custom_resources``): sets the one entry
        named by everything after ``key.`` and keeps the others, e.g.
        ``tune.space.train.momentum={choice: [0.9, 0.95]}``. On any other key the whole dotted
        name is an unknown key, reported with the closest one.
    ``scaling.num_workers=[min, max]``
        Elastic training, kept as ``min_workers`` and ``num_workers`` (as in a recipe file).
    """
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like section.key=value, e.g. train.epochs=5")
    dotted, text = override.split("=", 1)
    if "." not in dotted:
        raise ConfigError(f"override '{override}': the key must be section.key, e.g. train.epochs")
    section_name, key = dotted.strip().split(".", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    section = _section(config, section_name)
    key, _, entry = key.partition(".")
    if not entry and value is not None and not isinstance(value, str) and _is_text_key(f"{section_name}.{key}"):
        # A text key takes the text as written: YAML would read run.name=40527_00000 (a Tune trial
        # id) as the integer 4052700000, 2024-01 as text but 2024 as a number, yes as true.
        value = text.strip()
    if entry and field_base_type(f"{section_name}.{key}") is dict:
        # One entry of a mapping key: tune.space.train.learning_rate={loguniform: [0.01, 1]}
        value = {**getattr(section, key), entry: value}
    elif entry:
        key = f"{key}.{entry}"  # reported as an unknown key, with the closest one
    _set(section, section_name, key, value)


def _is_text_key(dotted: str) -> bool:
    try:
        return field_base_type(dotted) is str
    except ConfigError:
        return False  # an unknown key: reported by _set with the closest one


def _all_keys() -> list[str]:
    keys = []
    for section in dataclasses.fields(Config):
        if section.name != "recipe":
            keys += [f"{section.name}.{f.name}" for f in dataclasses.fields(section.default_factory())]
    return keys


def _section(config: Config, name: str):
    sections = [f.name for f in dataclasses.fields(Config) if f.name != "recipe"]
    if name not in sections:
        raise ConfigError(f"unknown config section '{name}'{did_you_mean(name, sections)} "
                          f"(sections: {', '.join(sections)})")
    return getattr(config, name)


def _set(section, section_name: str, key: str, value) -> None:
    if f"{section_name}.{key}" == "scaling.num_workers" and isinstance(value, list):
        # Ray Train's own spelling of elastic training, (min, max): kept as min_workers + num_workers.
        if len(value) != 2:
            raise ConfigError(f"config key 'scaling.num_workers' must be a number of workers or [min, max], "
                              f"got {value!r}")
        _set(section, section_name, "min_workers", value[0])
        value = value[1]
    setattr(section, key, check_value(f"{section_name}.{key}", value, check_rules=False))


def field_type(dotted: str):
    """The type hint of ``section.key``; ConfigError naming the closest key if there is none."""
    section_name, _, key = dotted.partition(".")
    section = _section(Config(), section_name)
    fields = {f.name: f for f in dataclasses.fields(section)}
    if key not in fields:
        suggestion = did_you_mean(dotted, _all_keys()) or did_you_mean(key, list(fields))
        raise ConfigError(f"unknown config key '{dotted}'{suggestion}")
    return typing.get_type_hints(type(section))[key]


def field_base_type(dotted: str) -> type:
    """``int``, ``float``, ``bool``, ``str``, ``list`` or ``dict`` for ``section.key`` (Optional removed)."""
    hint = field_type(dotted)
    if typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return typing.get_origin(hint) or hint


def check_value(dotted: str, value, check_rules: bool = True):
    """``value`` coerced to the type of ``section.key`` and checked against its range and choices,
    exactly as a recipe or ``--set`` value would be; raises ConfigError naming the key."""
    hint = field_type(dotted)
    section_name, _, key = dotted.partition(".")
    rules = next(f.metadata for f in dataclasses.fields(_section(Config(), section_name)) if f.name == key)
    if rules.get("auto") and value == "auto":
        return value
    value = _coerce(dotted, value, hint, or_auto=bool(rules.get("auto")))
    if check_rules:
        _check_rules(dotted, value, rules)
    return value


def _coerce(dotted: str, value, hint, or_auto: bool = False):
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    if optional:
        if value is None:
            return None
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    base = typing.get_origin(hint) or hint
    if base in (int, float):
        value = _as_number(value, base)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        list: isinstance(value, list),
        dict: isinstance(value, dict),
    }[base]
    if not ok:
        wanted = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                  list: "a list such as [30, 60]", dict: "a mapping of key: value"}[base]
        raise ConfigError(f"config key '{dotted}' must be {wanted}{' or auto' if or_auto else ''}, got {value!r}")
    if base is float and not math.isfinite(value):
        raise ConfigError(f"config key '{dotted}' must be a finite number, got {value!r}")
    return float(value) if base is float else value


def _as_number(value, base: type):
    """A number as people write it: YAML 1.1 (PyYAML) reads ``3e-4``, ``1E-3`` and ``5.`` as text, so
    text that Python's ``int()``/``float()`` reads is that number; an integer key takes an integral
    float (``5.0``, ``1e3``). Anything else is returned as it was, for the type error to name."""
    if isinstance(value, str) and value.strip():
        for parse in (int, float):
            try:
                value = parse(value.strip())
                break
            except ValueError:
                continue
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def validate(config: Config) -> None:
    """Ranges, choices and cross-field rules; raises ConfigError naming the key."""
    for section in dataclasses.fields(Config):
        if section.name == "recipe":
            continue
        values = getattr(config, section.name)
        for f in dataclasses.fields(values):
            _check_rules(f"{section.name}.{f.name}", getattr(values, f.name), f.metadata)
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        if getattr(getattr(config, section), key) == "":
            raise ConfigError(f"config key '{dotted}' is empty: give a path"
                              + (" (or 'cifar10' to download CIFAR-10)" if dotted == "data.source" else "")
                              + ("" if section not in ("infer", "serve") else ", or leave it out"))
    for dotted in ("run.name", "tune.name"):
        section, key = dotted.split(".")
        name = getattr(getattr(config, section), key)
        if name is not None and (not name.strip() or "/" in name or "\\" in name or name in (".", "..")):
            raise ConfigError(f"config key '{dotted}' must be one folder name (no '/', not '.' or '..'), "
                              f"got {name!r}")
    train = config.train
    if (train.global_batch_size is None) == (train.per_worker_batch_size is None):
        raise ConfigError("set exactly one of train.global_batch_size and train.per_worker_batch_size "
                          "(the other is derived from scaling.num_workers); set the other to null")
    per_replica_batch_size(config)
    scaling = config.scaling
    if scaling.min_workers is not None:
        if scaling.min_workers > scaling.num_workers:
            raise ConfigError(f"scaling.min_workers={scaling.min_workers} is above scaling.num_workers="
                              f"{scaling.num_workers}")
        if train.per_worker_batch_size is not None:
            raise ConfigError("elastic training (scaling.min_workers) keeps the global batch fixed, so that the "
                              "learning rate and the steps of an epoch do not change with the worker count: set "
                              "train.global_batch_size instead of train.per_worker_batch_size")
        for workers in range(scaling.min_workers, scaling.num_workers):
            per_replica_batch_size(config, workers)  # every count the run may shrink to divides the batch
    gpus = config.scaling.gpus_per_worker
    if config.scaling.use_gpu and gpus > 1 and gpus != int(gpus):
        raise ConfigError(f"scaling.gpus_per_worker={gpus:g}: above 1 it must be a whole number of GPUs "
                          "(Ray shares only fractions of a single GPU)")
    if not all(isinstance(e, int) and e > 0 for e in train.step_epochs):
        raise ConfigError(f"config key 'train.step_epochs' must be a list of positive epochs, got {train.step_epochs!r}")
    if train.lr_schedule == "step" and not train.step_epochs:
        raise ConfigError("train.lr_schedule=step needs train.step_epochs, e.g. [30, 60]")
    if train.warmup_epochs >= train.epochs and train.lr_schedule != "constant":
        raise ConfigError(f"train.warmup_epochs={train.warmup_epochs} must be below train.epochs={train.epochs}")
    from pipeline.models.registry import VARIANTS, minimum_image_size, resolved_stem

    if config.model.name not in VARIANTS:
        raise ConfigError(f"config key 'model.name' must be one of {list(VARIANTS)}, got {config.model.name!r}"
                          f"{did_you_mean(config.model.name, list(VARIANTS))}")
    smallest = minimum_image_size(config.model, config.data.image_size)
    if config.data.image_size < smallest:
        raise ConfigError(f"data.image_size={config.data.image_size} is too small for {config.model.name} with the "
                          f"'{resolved_stem(config.model.stem, config.data.image_size)}' stem: it downsamples by "
                          f"{smallest}, so images need at least "
                          f"{smallest}x{smallest} pixels (raise data.image_size, or use model.stem=cifar)")
    if train.cutout >= config.data.image_size:
        raise ConfigError(f"train.cutout={train.cutout} must be smaller than data.image_size={config.data.image_size}")
    serve = config.serve
    if serve.min_replicas > serve.max_replicas:
        raise ConfigError(f"serve.min_replicas={serve.min_replicas} is above serve.max_replicas={serve.max_replicas}")
    if not serve.route_prefix.startswith("/"):
        raise ConfigError(f"config key 'serve.route_prefix' must start with '/', got {serve.route_prefix!r}")
    if config.scaling.collective == "nccl" and not config.scaling.use_gpu:
        raise ConfigError("scaling.collective=nccl needs scaling.use_gpu=true (NCCL is GPU-only); use ring or auto")
    if config.scaling.collective == "nccl" and gpus < 1 and config.scaling.num_workers > 1:
        raise ConfigError(f"scaling.collective=nccl with scaling.gpus_per_worker={gpus:g}: Ray packs workers that "
                          f"hold a fraction of a GPU onto one GPU, and NCCL refuses two ranks on one device "
                          f"(\"Duplicate GPU detected\"); use collective ring or auto (ring for shared GPUs)")


def _check_rules(dotted: str, value, rules) -> None:
    if value is None or (rules.get("auto") and value == "auto"):
        return
    if rules.get("choices") and value not in rules["choices"]:
        raise ConfigError(f"config key '{dotted}' must be one of {rules['choices']}, got {value!r}"
                          f"{did_you_mean(str(value), rules['choices'])}")
    low, high = rules.get("min"), rules.get("max")
    if low is not None and (value < low or (rules.get("min_exclusive") and value == low)):
        relation = ">" if rules.get("min_exclusive") else ">="
        raise ConfigError(f"config key '{dotted}' must be {relation} {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"config key '{dotted}' must be <= {high}, got {value!r}")


# Keys that name local paths (or URIs). data.source may also be the word "cifar10" (the download).
PATH_KEYS = ("data.source", "data.cache_dir", "data.output", "run.storage_path", "tune.storage_path",
             "infer.model", "infer.input", "infer.output", "serve.model", "tracking.uri")


def with_absolute_paths(config: Config) -> Config:
    """A copy whose relative local paths are absolute, against this process' working directory:
    code that runs elsewhere (a Tune trial runs in its own folder, Ray workers in theirs) then
    reads and writes where the user meant. URIs, ``~`` paths and ``data.source: cifar10`` stay."""
    from pipeline import storage

    config = from_dict(to_dict(config))
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        value = getattr(getattr(config, section), key)
        if value and not storage.is_uri(value) and not value.startswith("~") and not (
                dotted == "data.source" and value == "cifar10"):
            setattr(getattr(config, section), key, storage.absolute(value))
    config.run.shared_paths = [storage.absolute(path) for path in config.run.shared_paths]
    return config


# ---------------------------------------------------------------- serialisation

def yaml_problem(error: Exception) -> str:
    """A YAML parser error on one line: what is wrong and where (PyYAML's own message spans
    several lines with a caret drawing)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(error, "context", None)
    return f"{problem}{where}" + (f" ({context})" if context else "")


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def redact_url(url: str) -> str:
    """``url`` without its credentials: the ``user:password@`` part and the query string (signed
    URLs carry their keys there). Used wherever a URL is printed or saved."""
    parts = urllib.parse.urlsplit(str(url))
    if not (parts.username or parts.password or parts.query):
        return str(url)
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    netloc = f"***@{host}" if parts.username or parts.password else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))


def saved_dict(config: Config) -> dict:
    """The config as it is written to files (config.yaml, search.yaml, best.yaml, manifests):
    credentials in ``data.download_url`` are never saved."""
    values = to_dict(config)
    values["data"]["download_url"] = redact_url(values["data"]["download_url"])
    return values


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(saved_dict(config), sort_keys=False)


def fingerprint(values: dict) -> str:
    """Short stable hash of a JSON-able dict (used to tell whether outputs match a config)."""
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def describe() -> str:
    """Every key with its default and help: printed by ``pipeline config --help-keys``."""
    lines = []
    for section in dataclasses.fields(Config):
        if section.name == "recipe":
            continue
        for f in dataclasses.fields(section.default_factory()):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{section.name}.{f.name} = {default!r}\n    {f.metadata.get('help', '')}")
    return "\n".join(lines)
