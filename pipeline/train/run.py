"""``run_training``: the driver side of training, from a config to a finished, summarised run.

config -> preprocessed data (built first if missing) -> ``TensorflowTrainer`` with the worker loop
-> checkpoints and history in ``<storage_path>/<run name>/`` -> export, summary.json and plots.

A run folder holds: ``config.yaml`` (the resolved config), ``history.json``/``.csv`` (per epoch),
``checkpoint_*/`` (Ray Train: the best by val_accuracy and the latest), ``tensorboard/``,
``export/`` (the serving model), ``evaluation.json`` (test metrics), ``plots/`` and
``summary.json``, written last. Running again with the same name resumes from the latest
checkpoint; a finished run is not trained again, only evaluated and exported again.
"""

from __future__ import annotations

import math
import time

import pipeline  # noqa: F401
import ray.train
from ray.train.tensorflow import TensorflowTrainer

from pipeline import PipelineError, reports, storage
from pipeline.config import Config, batch_sizes, scaled_learning_rate, to_dict, to_yaml
from pipeline.data.manifest import images_from_column
from pipeline.data.preprocess import ensure_preprocessed
from pipeline.train.loop import train_loop_per_worker


def run_name(config: Config) -> str:
    return config.run.name or config.recipe


class TrainingDiverged(PipelineError):
    """The loss became NaN or infinite: the run stopped instead of training on garbage weights."""


def run_training(config: Config, *, callbacks=(), start_from=None) -> dict:
    """Train as configured; returns the run summary (also written to ``summary.json``).

    ``callbacks``: extra ``ray.train.UserCallback``s (a Tune trial forwards metrics with one).
    ``start_from``: a ``ray.train.Checkpoint`` to start a new run from, as population-based training
    does with another trial's weights; the run's own checkpoints take precedence on resume.
    """
    manifest = ensure_preprocessed(config)
    storage_path = storage.absolute(config.run.storage_path)
    name = run_name(config)
    run_dir = storage.join(storage_path, name)
    storage.makedirs(run_dir)
    # Ray Train V2 resumes from the checkpoints listed in this snapshot (its commit point).
    if storage.exists(storage.join(run_dir, "checkpoint_manager_snapshot.json")):
        history_path = storage.join(run_dir, "history.json")
        done = len(storage.read_json(history_path)) if storage.exists(history_path) else 0
        print(f"resuming run '{name}' from its latest checkpoint ({done} of {config.train.epochs} epochs "
              f"recorded); use another run.name to start afresh")
    storage.delete(storage.join(run_dir, "summary.json"))  # the run is not complete until rewritten
    storage.delete(storage.join(run_dir, "workers"))  # rewritten by this attempt's workers
    storage.write_text(storage.join(run_dir, "config.yaml"), to_yaml(config))
    per_worker_batch, global_batch = batch_sizes(config)
    print(f"training run '{name}' in {run_dir}: {config.model.name}, {config.train.epochs} epochs, "
          f"{config.scaling.num_workers} worker(s) x {per_worker_batch} = global batch {global_batch}, "
          f"lr {scaled_learning_rate(config):g} ({config.train.lr_schedule}), precision {config.train.precision}")

    datasets = {"train": manifest.read_split("train").randomize_block_order()}
    for split in ("val", "test"):
        if manifest.has_split(split):
            datasets[split] = manifest.read_split(split)
    final_split = "test" if manifest.has_split("test") else "val"
    if final_split in datasets:
        datasets[f"{final_split}_full"] = datasets[final_split]
    has_val = "val" in datasets
    dataset_info = {
        "class_names": manifest.class_names, "image_size": manifest.image_size,
        "mean": manifest.mean, "std": manifest.std,
        "rows": {split: manifest.rows(split) for split in ("train", "val", "test") if manifest.has_split(split)},
    }

    scaling = config.scaling
    resources = {"CPU": scaling.cpus_per_worker, **scaling.custom_resources}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(config), "dataset": dataset_info, "run_dir": run_dir,
                           "start_from": start_from},
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                               resources_per_worker=resources),
        datasets=datasets,
        # train and val are split across workers; "<split>_full" is read whole by rank 0 at the end.
        dataset_config=ray.train.DataConfig(datasets_to_split=[s for s in ("train", "val") if s in datasets]),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.train.checkpoints_to_keep,
                checkpoint_score_attribute="val_accuracy" if has_val else "accuracy",
                checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=config.train.max_failures),
            callbacks=list(callbacks)),
    )
    started = time.perf_counter()
    result = trainer.fit()
    wall_seconds = time.perf_counter() - started
    check_finite(storage.read_json(storage.join(run_dir, "history.json")), name)
    return summarise(config, manifest, run_dir, result, wall_seconds)


def check_finite(history: list[dict], name: str) -> None:
    """The workers stop together at the end of an epoch whose weights are no longer finite (see
    ``ReportToRayTrain``); this makes that the run's error, so a diverged run never looks finished."""
    last = history[-1] if history else {}
    if last.get("diverged"):
        raise TrainingDiverged(
            f"run '{name}' diverged in epoch {last['epoch']}: the weights became NaN or infinite (training "
            f"loss {last.get('loss')}, learning rate {last.get('lr', math.nan):.4g}); lower "
            f"train.learning_rate, lengthen train.warmup_epochs, or use train.precision=fp32")


def summarise(config: Config, manifest, run_dir: str, result, wall_seconds: float) -> dict:
    history = storage.read_json(storage.join(run_dir, "history.json"))
    evaluation = storage.read_json(storage.join(run_dir, "evaluation.json"))
    plots_dir = storage.join(run_dir, "plots")
    plots = reports.plot_history(_columns(history), plots_dir)
    sample = manifest.read_split("train").limit(25).to_pandas()
    grid = storage.join(plots_dir, "train_images.png")
    reports.plot_image_grid(images_from_column(sample["image"].to_numpy(), manifest.image_size),
                            sample["label"].to_numpy(), manifest.class_names, grid)
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
        "export": evaluation.get("export"),
        "plots": plots + [grid],
        "config": to_dict(config),
    }
    storage.write_json(storage.join(run_dir, "summary.json"), summary)
    return summary


def _worker_records(run_dir: str) -> list[dict]:
    """What each worker saw when it started (see ``loop.record_worker``), by rank."""
    folder = storage.join(run_dir, "workers")
    return [storage.read_json(storage.join(folder, name)) for name in storage.list_dir(folder) if name.endswith(".json")]


def _columns(history: list[dict]) -> dict[str, list[float]]:
    keys = list(dict.fromkeys(key for row in history for key in row))
    return {key: [row.get(key) for row in history] for key in keys}
