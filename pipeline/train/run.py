"""``run_training``: the driver side of training, from a config to a finished, summarized run.

config -> preprocessed data (built first if missing) -> ``TensorflowTrainer`` with the worker loop
-> checkpoints and history in ``<storage_path>/<run name>/`` -> export, summary.json and plots.

A run folder holds: ``config.yaml`` (the resolved config), ``history.json``/``.csv`` (per epoch),
``checkpoint_*/`` (Ray Train: the best by val_accuracy and the latest), ``tensorboard/``,
``export/`` (the serving model), ``evaluation.json`` (test metrics), ``plots/`` and
``summary.json``, written last. Running again with the same name resumes from the latest
checkpoint; a finished run is not trained again, only evaluated and exported again.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time

import pipeline
import ray.train
from ray.train.tensorflow import TensorflowTrainer

from pipeline import PipelineError, reports, storage, tracking
from pipeline.capacity import worker_request
from pipeline.config import Config, batch_sizes, scaled_learning_rate, to_dict, to_yaml
from pipeline.data.images import resolved_resize
from pipeline.data.manifest import DatasetInfo, images_from_column, lease
from pipeline.data.preprocess import ensure_preprocessed
from pipeline.models.registry import resolved_stem
from pipeline.models.saving import checkpoint_problem
from pipeline.train.history import columns as history_columns
from pipeline.train.loop import train_loop_per_worker

log = logging.getLogger(__name__)


def run_name(config: Config) -> str:
    return config.run.name or config.recipe


class TrainingDiverged(PipelineError):
    """The loss became NaN or infinite: the run stopped instead of training on garbage weights."""


class CheckpointMismatch(PipelineError):
    """The run's checkpoints were made from other data or another model than the config asks for."""


def run_training(config: Config, *, callbacks=(), start_from=None, tracking_parent=None, tracking_tags=None) -> dict:
    """Train as configured; returns the run summary (also written to ``summary.json``).

    ``callbacks``: extra ``ray.train.UserCallback``s (a Tune trial forwards metrics with one).
    ``start_from``: a ``ray.train.Checkpoint`` to start a new run from, as population-based training
    does with another trial's weights; the run's own checkpoints take precedence on resume.
    ``tracking_parent``, ``tracking_tags``: the MLflow run of the search this run is a trial of, and
    tags for this run's (``pipeline.tracking``).
    """
    manifest = ensure_preprocessed(config)
    # The workers read the shards every epoch: leased, so that a rebuild of data.output meanwhile
    # (another recipe, --force) replaces the manifest but leaves these files alone.
    holder = "run-" + re.sub(r"[^A-Za-z0-9_.-]", "-", run_name(config))
    with lease(manifest.root, manifest.build, holder):
        if not storage.exists(storage.join(manifest.root, manifest.build)):
            raise PipelineError(f"the preprocessed data at {manifest.root} was rebuilt while this run started "
                                f"(its shard folder {manifest.build} is gone); run the same command again")
        return _train(config, manifest, callbacks, start_from, tracking_parent, tracking_tags)


def _train(config: Config, manifest, callbacks, start_from, tracking_parent, tracking_tags) -> dict:
    name = run_name(config)
    run_dir = storage.join(storage.absolute(config.run.storage_path), name)
    identity = training_identity(config, manifest)
    prepare_run_dir(config, run_dir, identity)
    log_plan(config, run_dir)
    datasets = read_datasets(config, manifest)
    tracker = tracking.start_run(config, run_dir, name, "training", parent_run_id=tracking_parent, tags=tracking_tags)
    if tracker is not None and tracker.run_id != "none":
        callbacks = [*callbacks, tracking.TrackEpochs(tracker)]
    trainer = make_trainer(config, run_dir, datasets, DatasetInfo.from_manifest(manifest, identity), callbacks,
                           start_from)
    result, wall_seconds = fit_checked(trainer, tracker, run_dir, name)
    summary = summarize(config, manifest, run_dir, result, wall_seconds)
    tracked = tracking.finish_training(tracker, config, run_dir, summary)
    if tracked is not None:
        summary["tracking"] = tracked
        storage.write_json(storage.join(run_dir, "summary.json"), summary)
    return summary


def prepare_run_dir(config: Config, run_dir: str, identity: dict) -> None:
    """The run folder, checked before a resume and cleared of what this attempt rewrites."""
    name = run_name(config)
    storage.makedirs(run_dir)
    # Ray Train V2 resumes from the checkpoints listed in this snapshot (its commit point).
    if not storage.exists(storage.join(run_dir, "checkpoint_manager_snapshot.json")):
        storage.delete(storage.join(run_dir, "attempts.json"))  # of a run that never committed
    else:
        history_path = storage.join(run_dir, "history.json")
        done = len(storage.read_json(history_path)) if storage.exists(history_path) else 0
        check_resumable(run_dir, name, identity)
        log.info(f"resuming run '{name}' from its latest checkpoint ({done} of {config.train.epochs} epochs "
                 f"recorded); use another run.name to start afresh")
    # The run is not complete until these are rewritten (evaluation.json by the workers, last).
    storage.delete(storage.join(run_dir, "summary.json"))
    storage.delete(storage.join(run_dir, "evaluation.json"))
    storage.delete(storage.join(run_dir, "workers"))  # rewritten by this attempt's workers
    storage.write_text(storage.join(run_dir, "config.yaml"), to_yaml(config))


def log_plan(config: Config, run_dir: str) -> None:
    per_worker_batch, global_batch = batch_sizes(config)
    workers = config.scaling.num_workers
    elastic = config.scaling.min_workers is not None
    size = config.data.image_size
    log.info(f"training run '{run_name(config)}' in {run_dir}: {config.model.name} "
             f"({resolved_stem(config.model.stem, size)} stem, {size} px {resolved_resize(config.data.resize, size)}), "
             f"{config.train.epochs} epochs, "
             + (f"{config.scaling.min_workers}-{workers} workers (elastic; {per_worker_batch} each at {workers}) = "
                if elastic else f"{workers} worker(s) x {per_worker_batch} = ")
             + f"global batch {global_batch}, "
             f"lr {scaled_learning_rate(config):g} ({config.train.lr_schedule}), precision {config.train.precision}")


def read_datasets(config: Config, manifest) -> dict:
    """The Ray Datasets the workers read: train, val and test, and ``<split>_full`` for the final
    evaluation (test, else val)."""
    # A new file order every epoch, streamed (see Manifest.read_split), plus each worker's buffer.
    datasets = {"train": manifest.read_split("train", shuffle_files=True, seed=config.train.seed)}
    for split in ("val", "test"):
        if manifest.has_split(split):
            datasets[split] = manifest.read_split(split)
    final_split = "test" if manifest.has_split("test") else "val"
    if final_split in datasets:
        datasets[f"{final_split}_full"] = datasets[final_split]
    return datasets


def make_trainer(config: Config, run_dir: str, datasets: dict, dataset: DatasetInfo, callbacks,
                 start_from) -> TensorflowTrainer:
    scaling = config.scaling
    elastic = scaling.min_workers is not None
    resources = {"CPU": scaling.cpus_per_worker, **worker_request(scaling)}
    storage_fs, storage_fs_path = storage.filesystem(storage.absolute(config.run.storage_path))
    return TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(config), "dataset": dataset.to_dict(), "run_dir": run_dir,
                           "start_from": start_from},
        scaling_config=ray.train.ScalingConfig(
            num_workers=(scaling.min_workers, scaling.num_workers) if elastic else scaling.num_workers,
            use_gpu=scaling.use_gpu, resources_per_worker=resources,
            elastic_resize_monitor_interval_s=scaling.resize_check_seconds),
        datasets=datasets,
        # train and val are split across workers; "<split>_full" is read whole by every worker at the
        # end, each evaluating the rows that fall to it by id (loop.evaluate_split).
        dataset_config=ray.train.DataConfig(datasets_to_split=[s for s in ("train", "val") if s in datasets]),
        run_config=ray.train.RunConfig(
            # The filesystem this package reads and writes the run folder with, given to Ray Train
            # too: its checkpoint uploads and our own files go through one client and one config.
            name=run_name(config), storage_path=storage_fs_path, storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.train.checkpoints_to_keep,
                checkpoint_score_attribute="val_accuracy" if "val" in datasets else "accuracy",
                checkpoint_score_order="max"),
            # A node drained with reason preemption (pipeline.preemption on spot nodes) is retried
            # without using up max_failures, which is for real failures.
            failure_config=ray.train.FailureConfig(max_failures=config.train.max_failures,
                                                   max_preemption_failures=config.train.max_preemptions),
            callbacks=list(callbacks)),
    )


def fit_checked(trainer: TensorflowTrainer, tracker, run_dir: str, name: str):
    """(result, wall seconds) of a run that finished with finite weights; a run that fails, diverges
    or is stopped ends its tracking run first."""
    started = time.perf_counter()
    try:
        result = fit_in_thread(trainer)
        wall_seconds = time.perf_counter() - started
        check_finite(storage.read_json(storage.join(run_dir, "history.json")), name,
                     result.checkpoint.path if result.checkpoint else None)
    except BaseException as error:
        tracking.end_run(tracker, "KILLED" if isinstance(error, (KeyboardInterrupt, pipeline.Stopped)) else "FAILED")
        raise
    return result, wall_seconds


def training_identity(config: Config, manifest) -> dict:
    """What a checkpoint's weights are only valid with: the exact data (source and split, by their
    fingerprints), its classes and normalisation, and the model's architecture. Stored in every
    checkpoint's metadata (``identity``) and compared on resume."""
    return {"data": {"source": manifest.raw.get("source_fingerprint"), "config": manifest.raw.get("config_fingerprint")},
            "class_names": manifest.class_names, "image_size": manifest.image_size,
            "normalization": {"mean": manifest.mean, "std": manifest.std},
            # What the weights depend on: not the test-time flip, which only changes their use.
            "model": {key: value for key, value in to_dict(config)["model"].items() if key != "test_time_flip"}}


IDENTITY_NAMES = {"data": "data (source or split: data.* settings, or the source files changed)",
                  "class_names": "class names", "image_size": "image size (data.image_size)",
                  "normalization": "normalisation statistics (the train split changed)", "model": "model (model.*)"}


def check_resumable(run_dir: str, name: str, identity: dict) -> None:
    """Refuse to resume a run whose checkpoints were made from other data or another model: the
    old weights would be trained on a moved split or under new normalisation, silently."""
    fs, inner = storage.filesystem(run_dir)
    folders = sorted(folder for folder in storage.list_dir(run_dir) if folder.startswith("checkpoint_"))
    # Whole checkpoints only: a failed upload may leave a metadata.json beside missing weights.
    whole = (folder for folder in reversed(folders) if checkpoint_problem(fs, f"{inner.rstrip('/')}/{folder}") is None)
    metadata = next((storage.read_json(storage.join(run_dir, folder, "metadata.json")) for folder in whole), None)
    stored = (metadata or {}).get("identity")
    if stored is None:
        return  # no committed checkpoint yet, or one written before identities were recorded
    changed = [IDENTITY_NAMES[key] for key in IDENTITY_NAMES if _differs(stored.get(key), identity[key])]
    if changed:
        raise CheckpointMismatch(
            f"run '{name}' cannot resume: its checkpoints were trained with other {'; '.join(changed)} than "
            f"this config gives. Use another run.name to start afresh, or restore the settings it was started "
            f"with ({storage.join(run_dir, 'config.yaml')})")


def _differs(old, new) -> bool:
    if isinstance(old, dict) and isinstance(new, dict):
        return old.keys() != new.keys() or any(_differs(old[key], new[key]) for key in old)
    if isinstance(old, list) and isinstance(new, list):
        return len(old) != len(new) or any(_differs(a, b) for a, b in zip(old, new))
    if isinstance(old, float) or isinstance(new, float):
        return not math.isclose(float(old), float(new), rel_tol=1e-9, abs_tol=1e-9)
    return old != new


def fit_in_thread(trainer):
    """``trainer.fit()``, from a thread of its own. Called from the main thread, Ray Train installs
    its own Ctrl-C handler, whose abort ends the driver with status 1 and no word of what was kept
    (see docs/design-notes.md, "Ray Train's Ctrl-C handler"). Here Ctrl-C and SIGTERM reach the main
    thread as exceptions while it waits: ``pipeline.cli`` says what was kept, and the driver's exit
    ends the run's actors."""
    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def check_finite(history: list[dict], name: str, last_checkpoint: str | None = None) -> None:
    """The workers stop together at the end of an epoch whose weights are no longer finite (see
    ``ReportToRayTrain``); this makes that the run's error, so a diverged run never looks finished.
    No checkpoint is written of the diverged epoch: the last one holds finite weights."""
    last = history[-1] if history else {}
    if last.get("diverged"):
        kept = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint
                else "no checkpoint was written before it")
        step = last.get("diverged_step")
        where = f"epoch {last['epoch']}" + (f", its loss first NaN or infinite at step {step} of {last.get('steps')}"
                                             if step else "")
        raise TrainingDiverged(
            f"run '{name}' diverged in {where}: the weights became NaN or infinite (training "
            f"loss {last.get('loss')}, learning rate {last.get('lr', math.nan):.4g}); {kept}. Lower "
            f"train.learning_rate, lengthen train.warmup_epochs, or use train.precision=fp32")


def summarize(config: Config, manifest, run_dir: str, result, wall_seconds: float) -> dict:
    history = storage.read_json(storage.join(run_dir, "history.json"))
    evaluation = storage.read_json(storage.join(run_dir, "evaluation.json"))
    plots_dir = storage.join(run_dir, "plots")
    plots = reports.plot_history(history_columns(history), plots_dir)
    sample = manifest.head("train", 25)
    grid = storage.join(plots_dir, "train_images.png")
    reports.plot_image_grid(images_from_column(sample.column("image"), manifest.image_size),
                            sample.column("label").to_numpy(), manifest.class_names, grid)
    last = history[-1] if history else {}
    speeds = [row["images_per_second"] for row in history]
    summary = {
        "run": run_name(config), "run_dir": run_dir, "recipe": config.recipe,
        "epochs": len(history), "final": {k: v for k, v in last.items() if k.startswith(("loss", "accuracy",
                                                                                          "top5", "val_"))},
        "best_val_accuracy": max((row.get("val_accuracy", 0.0) for row in history), default=None),
        "evaluation": evaluation,
        "precision": last.get("precision"),
        "wall_seconds": round(wall_seconds, 1),
        "train_images_per_second": round(sorted(speeds)[len(speeds) // 2], 1) if speeds else None,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "workers": _worker_records(run_dir),
        "attempts": attempts(run_dir, history),
        "export": evaluation.get("export"),
        "plots": plots + [grid],
        "config": to_dict(config),
        "provenance": pipeline.provenance(),
    }
    storage.write_json(storage.join(run_dir, "summary.json"), summary)
    return summary


def attempts(run_dir: str, history: list[dict]) -> list[dict]:
    """Each start of the worker group (``loop.record_attempt``) with the epochs it finished: a
    restart after a failure or a preemption, or an elastic resize, begins a new one."""
    path = storage.join(run_dir, "attempts.json")
    started = storage.read_json(path) if storage.exists(path) else []
    finished = [row["epoch"] for row in history]
    # An attempt's epochs end where the next one started from (epochs it trained past that point,
    # before a failure, were trained again by the next).
    return [{**attempt, "epochs": [epoch for epoch in finished if attempt["from_epoch"] < epoch and (
                following is None or epoch <= following["from_epoch"])]}
            for attempt, following in zip(started, [*started[1:], None])]


def _worker_records(run_dir: str) -> list[dict]:
    """What each worker saw when it started (see ``loop.set_up_devices``), by rank."""
    folder = storage.join(run_dir, "workers")
    return [storage.read_json(storage.join(folder, name)) for name in storage.list_dir(folder) if name.endswith(".json")]
