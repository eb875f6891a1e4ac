"""``run_search``: Ray Tune over distributed training runs, from a config to a finished search.

Each trial is a Tune function trainable (``train_trial``) that builds and fits its own
``TensorflowTrainer`` through ``run_training`` (Ray's pattern; ``Tuner(trainer)`` is deprecated, see
docs/design-notes.md, "Tune over training runs"): its own Ray Train workers, checkpoints, history and
export, in a run folder of the search. ``TuneReportCallback`` forwards each epoch's metrics from Ray
Train to Tune, where the scheduler (ASHA by default) stops weak trials early.

A search folder (``<tune.storage_path>/<tune.name>/``, local or s3:// / gs://) holds:
``search.yaml`` (the resolved config, written first), ``tune/`` (Ray Tune's experiment state:
what lets the same command resume), ``trials/<trial id>/`` (each trial's training run) and
``trials/<trial id>.json`` (its sampled values and, under PBT, the checkpoints it continued from),
``errors/<trial id>.pkl`` (an error a retry would only repeat, see ``FINAL_ERRORS``), then ``results.csv``/``results.json``, ``best.yaml``, ``plots/`` and ``summary.json``, written last.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import threading
import time

import pipeline  # noqa: F401  (TF_USE_LEGACY_KERAS before anything imports TensorFlow)
import ray
from pyarrow.fs import LocalFileSystem
from ray import tune
from ray.train import UserCallback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining, TrialScheduler

from pipeline import InputError, PipelineError, capacity, storage, tracking
from pipeline.config import (TUNE_METRICS, Config, ConfigError, from_dict, saved_dict, to_dict, to_yaml,
                             with_absolute_paths)
from pipeline.models.saving import checkpoint_problem
from pipeline.tune import results
from pipeline.tune.space import Dimension, param_space, parse_space, pbt_mutations, trial_config

log = logging.getLogger(__name__)

# A trial's own process only waits on its Ray Train run (whose workers hold the CPUs/GPUs), so
# it asks for memory, not a CPU: trials then queue on their workers' resources.
TRIAL_DRIVER_RESOURCES = {"memory": 512 * 1024**2}
# Advertised by the head node of every cluster config (ray-cluster.yaml, cluster/gcp.yaml,
# cluster/kuberay/): a trial's driver (and the Ray Train controller pinned beside it) then runs
# there, never on a spot worker whose reclaim would take the trial with it.
HEAD_RESOURCE = "trial_driver"
# Settings that may change when a search is resumed; anything else must match search.yaml.
RESUMABLE_CHANGES = ("tune.max_concurrent_trials", "run.progress_seconds")
# PBT copies a trial's checkpoints into Tune (it clones them into weaker trials); it warns below 3.
PBT_CHECKPOINTS_TO_KEEP = 4


class SearchFailed(PipelineError):
    """Every trial of a search failed before reporting a result."""


class FinishLastEpoch:
    """Scheduler mixin: a trial that reported its last epoch finishes. Plain ASHA stops it there
    (and, when train.epochs is grace_period x reduction_factor^k, may judge it at a rung on that
    very epoch); PBT may exploit it there. Either ends the trial before it evaluates and exports
    its model, which is all that is left to do."""

    last_epoch: int

    def on_trial_result(self, tune_controller, trial, result):
        if result.get("epoch", 0) >= self.last_epoch:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


class FinishingASHA(FinishLastEpoch, ASHAScheduler):
    pass


class FinishingPBT(FinishLastEpoch, PopulationBasedTraining):
    pass


def search_name(config: Config) -> str:
    return config.tune.name or config.recipe


def check_search(config: Config) -> list[Dimension]:
    """Everything about the search that can be checked before any work; ConfigError otherwise."""
    dimensions = parse_space(config)
    tune_config, epochs = config.tune, config.train.epochs
    if tune_config.scheduler == "asha" and tune_config.grace_period >= epochs:
        raise ConfigError(f"tune.grace_period={tune_config.grace_period} must be below train.epochs={epochs} "
                          f"(ASHA stops trials only after the grace period)")
    if tune_config.scheduler == "pbt" and tune_config.perturbation_interval >= epochs:
        raise ConfigError(f"tune.perturbation_interval={tune_config.perturbation_interval} must be below "
                          f"train.epochs={epochs}, or PBT never exploits")
    if tune_config.metric.startswith("val_") and config.data.val_fraction == 0:
        raise ConfigError(f"tune.metric={tune_config.metric} needs a validation split: set data.val_fraction > 0")
    if tune_config.search_alg == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("tune.search_alg=optuna needs the optuna package: "
                              "pip install 'ray-image-pipeline[optuna]'") from None
    return dimensions


def run_search(config: Config) -> dict:
    """Run (or resume) the search; returns its summary (also written to ``summary.json``)."""
    from pipeline.data.preprocess import ensure_preprocessed

    dimensions = check_search(config)
    config = with_absolute_paths(config)  # trials run in folders of their own
    name = search_name(config)
    search_dir = storage.join(storage.absolute(config.tune.storage_path), name)
    tune_dir = storage.join(search_dir, "tune")
    resuming = tune.Tuner.can_restore(tune_dir)
    _check_same_search(search_dir, config, resuming)
    # Once for the whole search: every trial then reuses these shards.
    ensure_preprocessed(config)
    storage.delete(storage.join(search_dir, "summary.json"))  # not complete until rewritten
    storage.write_text(storage.join(search_dir, "search.yaml"), to_yaml(config))

    pbt = config.tune.scheduler == "pbt"
    parent = tracking.start_run(config, search_dir, name, "search")
    parent_id = parent.run_id if parent is not None and parent.run_id != "none" else None
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, base=to_dict(config), search_dir=search_dir, forward_checkpoints=pbt,
                             tracking_parent=parent_id),
        trial_driver_resources(ray.cluster_resources()))
    started = time.perf_counter()
    if resuming:
        log.info(f"resuming search '{name}' from {tune_dir}: finished trials are kept, unfinished ones continue "
                 f"from their last checkpoint; use another tune.name to start afresh")
        # Errored trials too: a trial lost with its node continues from its checkpoint; one whose
        # error is final (diverged, bad values) fails again at once (see train_trial).
        tuner = tune.Tuner.restore(tune_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        concurrency = trial_concurrency(config)
        log.info(f"search '{name}' in {search_dir}: {config.tune.num_samples} sample(s) of "
                 f"{', '.join(f'{d.key} {d.describe()}' for d in dimensions)}; scheduler {config.tune.scheduler}, "
                 f"search {config.tune.search_alg}, up to {concurrency} trial(s) at once, "
                 f"{config.scaling.num_workers} worker(s) each, metric {config.tune.metric}")
        tuner = tune.Tuner(
            trainable, param_space=param_space(dimensions),
            tune_config=tune.TuneConfig(
                metric=config.tune.metric, mode=TUNE_METRICS[config.tune.metric],
                scheduler=make_scheduler(config, dimensions), search_alg=make_search_alg(config, concurrency),
                num_samples=config.tune.num_samples,
                trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(
                name="tune", storage_path=search_dir,
                # Worker failures are retried inside a trial by Ray Train (train.max_failures); a lost
                # trial driver, or a run that failed past that, by Tune. A trial that still fails is
                # reported with its error and the search goes on.
                failure_config=tune.FailureConfig(max_failures=config.tune.max_trial_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=PBT_CHECKPOINTS_TO_KEEP) if pbt else None,
                verbose=1))
    try:
        result_grid = tuner.fit()
    except BaseException as error:
        tracking.end_run(parent, "KILLED" if isinstance(error, (KeyboardInterrupt, pipeline.Stopped)) else "FAILED")
        raise
    summary = results.write_results(config, dimensions, search_dir, result_grid,
                                    wall_seconds=time.perf_counter() - started)
    tracked = tracking.finish_search(parent, summary)
    if tracked is not None:
        summary["tracking"] = tracked
        storage.write_json(storage.join(search_dir, "summary.json"), summary)
    if summary["best"] is None:
        errors = [result.error for result in result_grid if result.error is not None]
        raise SearchFailed(f"search '{name}': no trial reported a result ({summary['failed']} of {summary['trials']} "
                           f"failed); the first error: {results.error_line(errors[0]) if errors else 'none'}. "
                           f"Every trial's error is in {summary['results_csv']}")
    return summary



def trial_driver_resources(cluster_resources: dict) -> dict:
    """What each trial's driver asks of Ray: a little memory, and a share of the head's
    ``HEAD_RESOURCE`` where the cluster has it (a local Ray does not)."""
    if cluster_resources.get(HEAD_RESOURCE):
        return {**TRIAL_DRIVER_RESOURCES, HEAD_RESOURCE: 1}
    return dict(TRIAL_DRIVER_RESOURCES)


def _trial_dirname(trial) -> str:
    return trial.trial_id


def trial_concurrency(config: Config) -> int:
    """``tune.max_concurrent_trials``, or as many trials as the cluster's resources hold now
    (after the CPUs left to Ray Data's input tasks)."""
    return capacity.concurrent_trials(config, ray.cluster_resources())


def make_scheduler(config: Config, dimensions: list[Dimension]):
    settings = config.tune
    # Time is counted in epochs (the "epoch" every report carries), so rungs and perturbation
    # intervals are whole epochs.
    if settings.scheduler == "asha":
        scheduler = FinishingASHA(time_attr="epoch", max_t=config.train.epochs, grace_period=settings.grace_period,
                                  reduction_factor=settings.reduction_factor)
    elif settings.scheduler == "pbt":
        scheduler = FinishingPBT(time_attr="epoch", perturbation_interval=settings.perturbation_interval,
                                 hyperparam_mutations=pbt_mutations(dimensions), synch=settings.pbt_synch)
    else:
        return FIFOScheduler()
    scheduler.last_epoch = config.train.epochs
    return scheduler


def make_search_alg(config: Config, concurrency: int):
    if config.tune.search_alg == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=config.tune.seed), max_concurrent=concurrency)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Tune ignores TuneConfig(max_concurrent_trials) for a generator passed in: it takes the cap
    # itself. Trials beyond it wait as PENDING; started, they would take every CPU and starve the
    # Ray Data tasks that feed all of them.
    return BasicVariantGenerator(random_state=config.tune.seed, max_concurrent=concurrency)


def _check_same_search(search_dir: str, config: Config, resuming: bool) -> None:
    saved_path = storage.join(search_dir, "search.yaml")
    if not storage.exists(saved_path):
        return
    import yaml

    saved = _flat(to_dict(from_dict(yaml.safe_load(storage.read_text(saved_path)))))
    current = _flat(saved_dict(config))  # as saved: a download URL's credentials are not in the file
    changed = sorted(key for key in set(saved) | set(current)
                     if saved.get(key) != current.get(key) and key not in RESUMABLE_CHANGES and key != "recipe")
    if changed:
        raise ConfigError(f"search '{search_name(config)}' in {search_dir} was started with other settings "
                          f"(changed: {', '.join(changed)}); use another tune.name to start a new search")
    if not resuming:
        log.info(f"search '{search_name(config)}': {search_dir} has no Tune state yet; starting it")


def _flat(values: dict) -> dict:
    return {f"{section}.{key}": value for section, keys in values.items() if isinstance(keys, dict)
            for key, value in keys.items()}


# ---------------------------------------------------------------- one trial (runs in a Tune actor)

# Errors a retry cannot fix: the same values diverge or are refused again. Kept per trial, so a
# retried trial (tune.max_trial_failures, or the same command again) fails at once with the same
# error instead of training again.
FINAL_ERRORS = (PipelineError, InputError)


def train_trial(params: dict, *, base: dict, search_dir: str, forward_checkpoints: bool,
                tracking_parent: str | None = None) -> None:
    """One trial: the search's config with ``params`` set, trained as an ordinary run.

    The Ray Train run is named after the trial, so a retried trial or a resumed search continues
    it from its own latest checkpoint. Under PBT a trial may restart from another trial's
    checkpoint (Tune hands it over through ``tune.get_checkpoint``): that becomes a new run, named
    after the checkpoint.
    """
    from ray import cloudpickle

    trial_id = tune.get_context().get_trial_id()
    final = storage.join(search_dir, "errors", f"{trial_id}.pkl")
    if storage.exists(final):
        raise cloudpickle.loads(storage.read_bytes(final))
    try:
        _train_trial(trial_id, params, base, search_dir, forward_checkpoints, tracking_parent)
    except FINAL_ERRORS as error:
        storage.write_bytes(final, cloudpickle.dumps(error))
        raise


def _train_trial(trial_id: str, params: dict, base: dict, search_dir: str, forward_checkpoints: bool,
                 tracking_parent: str | None) -> None:
    from pipeline.train.run import run_training

    import ray.data

    # Several runs at once under one driver: Ray Data's progress bars (redrawn many times a
    # second per run) would bury Tune's status table. Each epoch's line still shows progress.
    ray.data.DataContext.get_current().enable_progress_bars = False
    name, start_from, origin = _segment_start(trial_id, search_dir)
    results.record_segment(search_dir, trial_id, {"run": name, "from": origin, "params": params})
    config = trial_config(base, params)  # a bad combination fails this trial, with the key named
    config.run.name = name
    config.run.storage_path = storage.join(search_dir, "trials")
    # A child run of the search's MLflow run; a PBT segment says where its weights came from.
    tracked = {"tracking_parent": tracking_parent, "tracking_tags": {
        "pipeline.trial": trial_id, **({"pipeline.pbt_from": f"trial {origin['trial']} at epoch {origin['epoch']}"}
                                       if origin else {})}}
    if forward_checkpoints:
        _run_reporting_checkpoints(config, start_from, tracked)
    else:
        run_training(config, callbacks=[EpochReportsToTune()], start_from=start_from, **tracked)


def _segment_start(trial_id: str, search_dir: str):
    """(run name, checkpoint to start from, where it came from) of this segment of the trial: its own
    run, or under PBT a new run from the copy of another trial's checkpoint that Tune handed over."""
    handed_over = tune.get_checkpoint()
    if handed_over is None:
        return trial_id, None, None
    name = f"{trial_id}-{hashlib.sha1(handed_over.path.encode()).hexdigest()[:8]}"
    start_from = _settled_copy(handed_over, storage.join(search_dir, "trials", name, "start_checkpoint"))
    return name, start_from, _checkpoint_origin(start_from)


def _run_reporting_checkpoints(config: Config, start_from, tracked: dict) -> None:
    """``run_training`` under PBT, which clones trials through Tune checkpoints while
    TuneReportCallback forwards metrics only. So the run goes to a thread, and this (Tune's) thread
    reports each epoch with its checkpoint, one at a time: the queue holds one item, as
    TuneReportCallback's does, so Ray Train waits for Tune's decision (continue, pause, exploit)
    after every report."""
    from ray.util.queue import Queue

    from pipeline.train.run import run_training

    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
    outcome: dict = {}

    def fit():
        try:
            run_training(config, callbacks=[ReportCheckpointsToTune(reports)], start_from=start_from, **tracked)
        except BaseException as error:  # re-raised below, in the trial's thread
            outcome["error"] = error
        finally:
            reports.put(None)

    thread = threading.Thread(target=fit, name=f"train-{config.run.name}", daemon=True)
    thread.start()
    while (item := reports.get()) is not None:
        metrics, checkpoint = item
        tune.report(metrics, checkpoint=tune.Checkpoint(checkpoint.path, checkpoint.filesystem) if checkpoint else None)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]


def ends_an_epoch(metrics: list) -> bool:
    """A Ray Train report at an epoch's end. Checkpoints inside an epoch (a preemption notice,
    train.checkpoint_every_steps) are the run's own business: to Tune's schedulers one result is
    one epoch."""
    return bool(metrics) and "epoch" in metrics[0]


class EpochReportsToTune(TuneReportCallback):
    """Ray's ``TuneReportCallback``, given epoch-end reports only (see ``ends_an_epoch``)."""

    def after_report(self, run_context, metrics, checkpoint):
        if ends_an_epoch(metrics):
            super().after_report(run_context, metrics, checkpoint)


class ReportCheckpointsToTune(UserCallback):
    """Ray Train callback (runs in the Train controller): each epoch's rank-0 metrics and its
    persisted checkpoint, handed to the trial's thread that reports them to Tune."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        if ends_an_epoch(metrics):
            self.queue.put((metrics[0], checkpoint))


def _settled_copy(checkpoint, target: str, attempts: int = 10, wait_seconds: float = 3.0):
    """A complete copy of a checkpoint Tune handed over, in this run's folder. Tune may be
    re-writing the source folder at this moment (a trial restarted from its own checkpoint
    persists it again), so a copy is taken only once every part is there, and retried.

    PBT hands over the better trial's latest checkpoint *when it decides*; that trial trains on
    while this one restarts, and Tune's checkpoint manager may delete the folder meanwhile (it keeps
    ``PBT_CHECKPOINTS_TO_KEEP`` registrations, and registers a checkpoint again when PBT pauses a
    trial). The trial then continues from the better trial's newest complete checkpoint instead:
    the same exploit, a few epochs later, and the epochs come with the checkpoint."""
    for attempt in range(attempts):
        source = _handed_over_or_newest(checkpoint)
        if source is not None:
            try:
                with source.as_directory() as local:
                    staging = tempfile.mkdtemp(prefix="start-checkpoint-")
                    try:
                        shutil.copytree(local, staging, dirs_exist_ok=True)
                        if checkpoint_problem(LocalFileSystem(), staging) is None:
                            if source.path != checkpoint.path:
                                log.warning(f"{checkpoint.path} was deleted before this trial could copy it (the source "
                                            f"trial trained on meanwhile); continuing from its newest, {source.path}")
                            storage.delete(target)
                            storage.upload_dir(staging, target)
                            return tune.Checkpoint(target)
                    finally:
                        shutil.rmtree(staging, ignore_errors=True)
            except (OSError, shutil.Error):
                pass  # parts vanished while copying: the source is being re-written
        time.sleep(wait_seconds)
    raise PipelineError(f"the checkpoint {checkpoint.path} handed over by Tune stayed incomplete")


def _handed_over_or_newest(checkpoint):
    """The handed-over checkpoint while it is complete; once its folder is gone, the newest complete
    ``checkpoint_*`` beside it (the same trial's); None while neither is (a copy is being written)."""
    from pyarrow.fs import FileSelector, FileType

    filesystem = checkpoint.filesystem

    def complete(path: str) -> bool:
        return checkpoint_problem(filesystem, path) is None

    if filesystem.get_file_info(checkpoint.path).type != FileType.NotFound:
        return checkpoint if complete(checkpoint.path) else None
    parent = checkpoint.path.rstrip("/").rsplit("/", 1)[0]
    siblings = sorted((info.path for info in filesystem.get_file_info(FileSelector(parent, allow_not_found=True))
                       if info.type == FileType.Directory and info.base_name.startswith("checkpoint_")), reverse=True)
    newest = next((path for path in siblings if complete(path)), None)
    return tune.Checkpoint(newest, filesystem) if newest else None


def _checkpoint_origin(checkpoint) -> dict:
    """Which run and epoch a handed-over checkpoint came from (its ``state.json``)."""
    import json

    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/state.json") as stream:
        state = json.loads(stream.read())
    run = state.get("run") or ""
    return {"trial": run.split("-")[0], "run": run, "epoch": state["epoch"]}
