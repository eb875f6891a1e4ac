"""Experiment tracking with MLflow: every training run, every search and its trials, and the
exported model as a registered model version.

    training run   one MLflow run: the resolved config as flat params, each epoch's metrics
                   (step = epoch) once its checkpoint is committed, the test metrics, the run's
                   files (config.yaml, summary.json, history.csv, plots/) and the export as a
                   version of the registered model ``tracking.registered_model``
    search         a parent run (the search's config, the best trial, results.csv, best.yaml,
                   plots/); each training run of a trial is a child run: a PBT segment started
                   from another trial's checkpoint is a child of its own, tagged with where it came
                   from, and a trial stopped by ASHA ends KILLED with ``pipeline.status=early-stopped``

Who logs: the driver (params, final metrics, files, the model) and the Ray Train controller
(``TrackEpochs``, a ``ray.train.UserCallback``): never a training worker. An epoch is logged when
Ray Train reports its checkpoint committed, so a worker failure that retrains epochs never logs an
epoch twice; the driver logs at the end whatever the controller could not (history.json is the
record). The MLflow run id lives in the run folder (``tracking.json``): running the same command
again continues the same MLflow run.

A tracking server that is down or slow never fails or stalls training: each call has a short
timeout and no retries; the first failure is reported once, later calls are skipped, and the run's
summary lists what was not logged.
"""

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Optional

from ray.train import UserCallback

from pipeline import storage
from pipeline.config import Config, TrackingConfig, to_dict

log = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"
# Seconds an MLflow HTTP call may take, and its retries (MLflow's default: 7 with backoff, minutes
# against a server that is down).
CALL_TIMEOUT_S = "10"
CALL_RETRIES = "0"


def store(settings: TrackingConfig) -> tuple[str, Optional[str]]:
    """(tracking URI, artifact location for new experiments): a server URI as given; a local folder
    as a SQLite store inside it, with the artifacts beside (``mlflow ui --backend-store-uri``)."""
    uri = settings.uri
    if "://" in uri and not uri.startswith("file://"):
        return uri, None
    folder = storage.absolute(uri.removeprefix("file://"))
    return f"sqlite:///{folder}/mlflow.db", f"{folder}/artifacts"


def local_folder(settings: TrackingConfig) -> Optional[str]:
    """The local folder a store lives in (None for a server): other nodes cannot reach it."""
    uri = settings.uri
    if uri.startswith("sqlite:///"):
        return os.path.dirname(uri.removeprefix("sqlite:///"))
    if "://" in uri and not uri.startswith("file://"):
        return None
    return storage.absolute(uri.removeprefix("file://"))


def flat_params(values: dict, prefix: str = "") -> dict:
    """``{"train": {"epochs": 10}}`` -> ``{"train.epochs": "10"}`` (MLflow params are strings)."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and name not in ("tune.space", "scaling.custom_resources"):
            flat.update(flat_params(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return flat


@dataclass
class Tracker:
    """One MLflow run, as driver, controller and trials share it (plain fields: it is pickled into
    the Train controller). Every call goes through ``call``: a failure is reported once, and the
    rest is skipped and listed."""
    uri: str
    run_id: str
    record: str                      # the tracking.json beside the run's files
    down: Optional[str] = None       # why the store stopped answering
    skipped: list = field(default_factory=list)

    def client(self):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", CALL_TIMEOUT_S)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", CALL_RETRIES)
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def call(self, what: str, action) -> bool:
        if self.down is not None:
            self.skipped.append(what)
            return False
        try:
            action(self.client())
            return True
        except Exception as error:  # noqa: BLE001 - any failure of the store: training goes on
            self.down = short_reason(error)
            self.skipped.append(what)
            log.warning(f"the tracking store at {self.uri} did not answer ({self.down}); training goes on, and "
                        f"what is not logged is listed at the end")
            return False

    def logged_epochs(self) -> set:
        return set(_read(self.record).get("logged_epochs", []))

    def log_epochs(self, rows: list[dict]) -> None:
        """Each row's numbers at step = its epoch, unless that epoch was logged already."""
        from mlflow.entities import Metric

        done = self.logged_epochs()
        if self.down is None and any(row["epoch"] not in done for row in rows):
            # The store's own record too: a process stopped between logging and writing tracking.json
            # (a trial ASHA ends) must not have its epochs logged again.
            steps: set = set()
            self.call("reading the logged epochs", lambda client: steps.update(
                point.step for point in client.get_metric_history(self.run_id, "loss")))
            done |= steps
        rows = [row for row in rows if row["epoch"] not in done]
        if not rows:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, int(row["epoch"])) for row in rows for key, value in row.items()
                   if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool)]
        what = f"epochs {', '.join(str(row['epoch']) for row in rows)}"
        if self.call(what, lambda client: client.log_batch(self.run_id, metrics=metrics)):
            _update(self.record, logged_epochs=sorted(done | {row["epoch"] for row in rows}))

    def report_skipped(self) -> Optional[dict]:
        if not self.skipped:
            return None
        return {"store": self.uri, "reason": self.down, "not_logged": self.skipped}


def short_reason(error: Exception) -> str:
    """An MLflow client error in a few words: its OS-level cause (``[Errno 111] Connection refused``,
    a timeout) when it has one, else its first line."""
    text = str(error)
    cause = re.search(r"\[Errno -?\d+\] [^'\")]+|[Rr]ead timed out|timed out", text)
    return f"{type(error).__name__}: {cause.group(0) if cause else (text.splitlines() or [''])[0][:200]}"


class TrackEpochs(UserCallback):
    """On the Ray Train controller: each epoch's metrics once the checkpoint that holds it is
    committed (rows of epochs without a checkpoint wait for the next one)."""

    def __init__(self, tracker: Tracker):
        self.tracker, self.pending = tracker, {}

    def after_report(self, run_context, metrics, checkpoint):
        row = dict(metrics[0]) if metrics else {}
        if "epoch" not in row:
            return
        row["epoch"] = int(row["epoch"])
        self.pending[row["epoch"]] = row  # a retrained epoch replaces the row of the failed attempt
        if checkpoint is not None:
            committed = [self.pending.pop(epoch) for epoch in sorted(self.pending) if epoch <= row["epoch"]]
            self.tracker.log_epochs(committed)
            _update(self.tracker.record, skipped=self.tracker.skipped, down=self.tracker.down)


# ---------------------------------------------------------------- the driver

def start_run(config: Config, folder: str, name: str, kind: str, parent_run_id: Optional[str] = None,
              tags: Optional[dict] = None) -> Optional[Tracker]:
    """The MLflow run of the training run or search in ``folder``: continued when its tracking.json
    names one in the same store, else created with the config as params. None when tracking is off."""
    settings = config.tracking
    if not enabled(settings):
        return None
    uri, artifacts = store(settings)
    record = storage.join(folder, TRACKING_FILE)
    previous = _read(record)
    if previous.get("uri") == uri and previous.get("run_id"):
        tracker = Tracker(uri, previous["run_id"], record)
        tracker.call("reopening the run", lambda client: client.update_run(tracker.run_id, status="RUNNING"))
        return tracker
    tracker = Tracker(uri, "", record)

    def create(client):
        experiment = client.get_experiment_by_name(settings.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(
            settings.experiment, artifact_location=artifacts)
        run_tags = {"pipeline.kind": kind, "pipeline.folder": folder, "pipeline.recipe": config.recipe,
                    **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {}), **(tags or {})}
        run = client.create_run(experiment_id, run_name=name, tags=run_tags)
        tracker.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(key, value[:6000]) for key, value in flat_params(to_dict(config)).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(tracker.run_id, params=params[start:start + 100])

    if not tracker.call(f"creating the {kind} run", create):
        log.warning(f"tracking: no MLflow run for {kind} '{name}'")
        return tracker if tracker.run_id else _offline(tracker, record)
    _update(record, uri=uri, run_id=tracker.run_id, experiment=settings.experiment)
    log.info(f"tracking {kind} '{name}' in MLflow at {uri} (run {tracker.run_id})")
    return tracker


def _offline(tracker: Tracker, record: str) -> Tracker:
    """A tracker whose store never answered: it only counts what it skips."""
    tracker.run_id = "none"
    _update(record, down=tracker.down)
    return tracker


def finish_training(tracker: Optional[Tracker], config: Config, run_dir: str, summary: dict) -> Optional[dict]:
    """At the end of a training run: epochs the controller could not log, the test metrics, the
    run's files, the export as a model version, the run ended. Returns what the summary records."""
    if tracker is None:
        return None
    state = _read(tracker.record)
    tracker.skipped = list(state.get("skipped", [])) + tracker.skipped
    tracker.down = tracker.down or state.get("down")
    if tracker.run_id == "none":
        tracker.skipped += ["the training run", "the model version"]
        return _tracking_summary(tracker, config, None)
    history = storage.read_json(storage.join(run_dir, "history.json"))
    if tracker.down is not None:  # a store that failed in the controller may be back: try once more
        tracker.down = None
    tracker.log_epochs(history)
    evaluation = summary.get("evaluation") or {}
    test = {f"{evaluation.get('split', 'test')}_{key}": value for key, value in evaluation.items()
            if key in ("loss", "accuracy", "top5_accuracy") and isinstance(value, (int, float))}
    step = len(history)
    tracker.call("the test metrics", lambda client: [client.log_metric(tracker.run_id, key, value, step=step)
                                                     for key, value in test.items()])
    for name in ("config.yaml", "summary.json", "history.csv", "history.json", "evaluation.json"):
        path = storage.join(run_dir, name)
        if storage.exists(path):
            tracker.call(name, lambda client, path=path: _log_file(client, tracker.run_id, path, ""))
    for plot in summary.get("plots", []):
        tracker.call(storage.basename(plot), lambda client, plot=plot: _log_file(client, tracker.run_id, plot, "plots"))
    version = None
    if summary.get("export"):
        version = register_export(tracker, config, summary["export"])
    tracker.call("ending the run", lambda client: client.set_terminated(tracker.run_id, "FINISHED"))
    return _tracking_summary(tracker, config, version)


def _tracking_summary(tracker: Tracker, config: Config, version) -> dict:
    uri = tracker.uri
    result = {"uri": uri, "experiment": config.tracking.experiment, "run_id": tracker.run_id,
              "registered_model": config.tracking.registered_model if version else None, "model_version": version,
              "ui": f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else uri}
    skipped = tracker.report_skipped()
    if skipped:
        result["not_logged"] = skipped
    _update(tracker.record, skipped=tracker.skipped, down=tracker.down)
    return result


def register_export(tracker: Tracker, config: Config, export: str) -> Optional[str]:
    """The export as a new version of ``tracking.registered_model``: an MLflow pyfunc model that
    takes float32 (batch, size, size, 3) RGB pixels in 0-255 and returns the class probabilities;
    the class names are in its metadata."""
    import tempfile

    import numpy as np

    metadata = storage.read_json(storage.join(export, "metadata.json"))
    size, classes = int(metadata["image_size"]), list(metadata["class_names"])
    version = {}

    def log_model(client):
        import mlflow
        import mlflow.pyfunc
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, size, size, 3), "images")]),
                                   outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(classes)),
                                                              "probabilities")]))
        mlflow.set_tracking_uri(tracker.uri)
        with tempfile.TemporaryDirectory(prefix="export-") as local:
            local_export = storage.download_dir(export, os.path.join(local, "export"))
            with mlflow.start_run(run_id=tracker.run_id):
                info = mlflow.pyfunc.log_model(
                    name="model", python_model=ExportedClassifier(), artifacts={"export": local_export},
                    signature=signature, registered_model_name=config.tracking.registered_model,
                    metadata={"class_names": classes, "image_size": size, "resize": metadata.get("resize", "squash"),
                              "input": metadata.get("input"),
                              "output": metadata.get("output")},
                    pip_requirements=["tensorflow", "tf-keras", "ray-image-pipeline"])
        version["number"] = str(info.registered_model_version)

    tracker.call(f"the model version of {config.tracking.registered_model}", log_model)
    return version.get("number")


def _log_file(client, run_id: str, path: str, folder: str) -> None:
    import tempfile

    if not storage.is_uri(path):
        client.log_artifact(run_id, path, folder or None)
        return
    with tempfile.TemporaryDirectory() as local:
        target = os.path.join(local, storage.basename(path))
        with open(target, "wb") as handle:
            handle.write(storage.read_bytes(path))
        client.log_artifact(run_id, target, folder or None)


def finish_search(tracker: Optional[Tracker], summary: dict) -> Optional[dict]:
    """At the end of a search: the best trial's numbers and files on the parent run, each trial's
    runs ended as their trial ended (an ASHA stop: KILLED, tagged early-stopped), the parent ended."""
    if tracker is None:
        return None
    from pipeline.tune.results import COMPLETED, EARLY_STOPPED

    search_dir = summary["search_dir"]
    best = summary.get("best") or {}
    metric = summary["metric"]
    numbers = {f"best_{metric}": best.get(metric), "trials": summary["trials"], "completed": summary[COMPLETED],
               "early_stopped": summary[EARLY_STOPPED], "failed": summary["failed"]}
    if tracker.run_id != "none":
        tracker.call("the search's results", lambda client: [client.log_metric(tracker.run_id, key, float(value))
                                                             for key, value in numbers.items() if value is not None])
        if best:
            tracker.call("the best trial", lambda client: client.set_tag(tracker.run_id, "pipeline.best_trial",
                                                                         best["trial"]))
        for path in [summary.get("results_csv"), summary.get("best_yaml"), *summary.get("plots", [])]:
            if path and storage.exists(path):
                folder = "plots" if "/plots/" in path else ""
                tracker.call(storage.basename(path), lambda client, path=path, folder=folder: _log_file(
                    client, tracker.run_id, path, folder))
    for row in storage.read_json(storage.join(search_dir, "results.json")):
        record = storage.join(search_dir, "trials", f"{row['trial']}.json")
        segments = storage.read_json(record)["segments"] if storage.exists(record) else []
        for index, segment in enumerate(segments):
            run_dir = storage.join(search_dir, "trials", segment["run"])
            child = run_of(run_dir)
            last = index == len(segments) - 1
            history = _read_list(storage.join(run_dir, "history.json"))
            if child is not None:  # a stopped trial's epochs past its last committed checkpoint
                child.log_epochs([row for row in history if not row.get("diverged")])
            # An earlier PBT segment ended when its trial took over another's weights.
            status = {COMPLETED: "FINISHED", EARLY_STOPPED: "KILLED"}.get(row["status"], "FAILED") if last else "KILLED"
            tags = {"pipeline.status": row["status"] if last else "exploited (PBT)"}
            end_run(child, status, tags)
            if child is not None and child.skipped:
                tracker.skipped += [f"trial {row['trial']}: {what}" for what in child.skipped]
    end_run(tracker, "FINISHED")
    return _tracking_summary(tracker, _search_config(summary), None) if tracker.run_id != "none" else {
        "uri": tracker.uri, "not_logged": tracker.report_skipped()}


def _search_config(summary: dict) -> Config:
    import yaml

    from pipeline.config import from_dict

    return from_dict(yaml.safe_load(storage.read_text(storage.join(summary["search_dir"], "search.yaml"))))


def end_run(tracker: Optional[Tracker], status: str, tags: Optional[dict] = None) -> None:
    if tracker is None or tracker.run_id == "none":
        return
    for key, value in (tags or {}).items():
        tracker.call(f"tag {key}", lambda client, key=key, value=value: client.set_tag(tracker.run_id, key, value))
    tracker.call("ending the run", lambda client: client.set_terminated(tracker.run_id, status))


def run_of(folder: str) -> Optional[Tracker]:
    """The tracker recorded in a run or search folder (a trial's run, read by the search's driver)."""
    record = storage.join(folder, TRACKING_FILE)
    state = _read(record)
    if not state.get("run_id") or state["run_id"] == "none":
        return None
    return Tracker(state["uri"], state["run_id"], record)


try:  # MLflow is an extra (pip install -e ".[tracking]"); the wrapper class needs its base class
    import mlflow.pyfunc as _pyfunc

    class ExportedClassifier(_pyfunc.PythonModel):
        """The registered model: the export, loaded as ``pipeline.models.saving.load_model`` does."""

        # The tensor signature given when the model is logged describes the input; MLflow's
        # type-hint validation (and its warning at every import that predict has no hints) is off.
        _skip_type_hint_validation = True

        def load_context(self, context):
            from pipeline.models.saving import inference_function, load_model

            self.model, self.metadata = load_model(context.artifacts["export"])
            self.predict_batch = inference_function(self.model, self.metadata)

        def predict(self, context, model_input, params=None):
            import numpy as np

            if isinstance(model_input, dict):  # the signature's named tensor
                model_input = model_input["images"]
            return self.predict_batch(np.asarray(model_input, dtype=np.float32)).numpy()
except ImportError:  # tracking.enabled=true without MLflow is refused by check_tracking
    ExportedClassifier = None


def enabled(settings: TrackingConfig) -> bool:
    """``tracking.enabled``: true, false, or auto (on when MLflow is installed)."""
    return ExportedClassifier is not None if settings.enabled == "auto" else bool(settings.enabled)


def check_tracking(config: Config) -> None:
    """Before any work: MLflow installed when tracking is asked for."""
    if config.tracking.enabled is True and ExportedClassifier is None:
        from pipeline.config import ConfigError

        raise ConfigError("tracking.enabled=true needs MLflow: pip install -e \".[tracking]\" (or set "
                          "tracking.enabled=false)")


def _read_list(path: str) -> list:
    try:
        return storage.read_json(path) if storage.exists(path) else []
    except ValueError:
        return []


def _read(path: str) -> dict:
    try:
        return storage.read_json(path) if storage.exists(path) else {}
    except ValueError:
        return {}


def _update(path: str, **values) -> None:
    storage.write_json(path, {**_read(path), **values})
