"""Ray Tune over real distributed training trials on a local Ray: ASHA, a diverging trial, the
results a search leaves, best.yaml trained again, PBT exploiting a checkpoint, a trial whose driver
is lost retried from its checkpoint, and a killed Optuna search resumed by the same command."""

import contextlib
import csv
import os
import re
import subprocess
import sys
import time

import psutil
import pytest
import ray
import yaml

import pipeline  # noqa: F401
from pipeline import cli, storage
from pipeline.config import load_config, to_dict
from pipeline.tune.search import run_search

from conftest import REPO
SMOKE_SEARCH = os.path.join(REPO, "configs/search-smoke.yaml")
pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """One data folder for the module's searches: the first preprocesses ``source`` into it, the
    others find its manifest current (same data settings) and reuse the shards."""
    return str(tmp_path_factory.mktemp("shards"))


def search_overrides(source, shards, root, name):
    return [f"data.source={source}", f"data.output={shards}", f"run.storage_path={root}/runs",
            f"tune.storage_path={root}/searches", f"tune.name={name}", "tune.max_concurrent_trials=2"]


@pytest.fixture(scope="module")
def asha_search(source, shards, tmp_path_factory, local_ray, tracking_server):
    """Four trials, two at a time: two good learning rates first, then one too small to learn in
    an epoch (ASHA stops it at the first rung) and one so large that the weights overflow. Five
    epochs (rungs at 1, 2 and 4): Ray Train runs on while Tune decides, so a stopped trial may
    record an epoch or two past its rung, but not the whole budget."""
    root = tmp_path_factory.mktemp("asha")
    config = load_config(SMOKE_SEARCH, search_overrides(source, shards, root, "asha") + [
        "tune.num_samples=1", "train.epochs=5", "tune.space={train.learning_rate: {grid: [0.05, 0.03, 0.00001, 1.0e+30]}}",
        # The diverging trial is not retried (Tune would start it again only to re-raise its kept
        # error: test_a_search_whose_every_trial_fails_exits_with_the_reason checks that).
        "tune.max_trial_failures=0",
        "tracking.enabled=true", f"tracking.uri={tracking_server}", "tracking.experiment=asha-search"])
    return config, run_search(config)


def rows_of(summary):
    with open(summary["results_csv"]) as handle:
        return list(csv.DictReader(handle))


def test_asha_stops_weak_trials_and_a_diverging_trial_fails(asha_search):
    config, summary = asha_search
    rows = {float(row["train.learning_rate"]): row for row in rows_of(summary)}
    assert len(rows) == 4 and summary["trials"] == 4
    # Read from the results, not the logs: the tiny rate ran fewer epochs than the budget.
    assert rows[0.00001]["status"] == "early-stopped" and int(rows[0.00001]["epochs"]) < config.train.epochs
    assert summary["early-stopped"] >= 1
    # The overflowing rate failed with the reason; the search went on and finished the others.
    diverged = rows[1.0e30]
    assert diverged["status"] == "failed"
    assert "TrainingDiverged" in diverged["error"] and "NaN or infinite" in diverged["error"]
    assert re.search(r"diverged in epoch 1, its loss first NaN or infinite at step \d+ of 8: ", diverged["error"])
    assert "\n" not in diverged["error"]
    assert summary["completed"] >= 1 and rows[0.05]["status"] in ("completed", "early-stopped")
    for row in rows.values():
        if row["status"] == "completed":
            assert int(row["epochs"]) == config.train.epochs and float(row["val_accuracy"]) > 0.25


def test_the_search_is_a_parent_run_with_a_child_run_per_trial(asha_search, tracking_server):
    from mlflow.tracking import MlflowClient

    config, summary = asha_search
    client = MlflowClient(tracking_server)
    parent = client.get_run(summary["tracking"]["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["pipeline.kind"] == "search"
    assert parent.data.params["tune.scheduler"] == "asha"
    assert parent.data.metrics["trials"] == 4 and parent.data.tags["pipeline.best_trial"] == summary["best"]["trial"]
    assert {artifact.path for artifact in client.list_artifacts(parent.info.run_id)} >= {"results.csv", "best.yaml"}
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_trial = {child.data.tags["pipeline.trial"]: child for child in children}
    rows = {row["trial"]: row for row in rows_of(summary)}
    assert by_trial.keys() == rows.keys()
    ended = {"completed": "FINISHED", "early-stopped": "KILLED", "failed": "FAILED"}
    for trial, child in by_trial.items():
        assert child.info.status == ended[rows[trial]["status"]], trial
        assert child.data.tags["pipeline.status"] == rows[trial]["status"]
        assert child.data.params["train.learning_rate"] == rows[trial]["train.learning_rate"]
        # Each epoch the trial recorded, once.
        history = storage.read_json(os.path.join(rows[trial]["run_dir"], "history.json"))
        logged = sorted(point.step for point in client.get_metric_history(child.info.run_id, "val_accuracy"))
        assert logged == [row["epoch"] for row in history if not row.get("diverged")], trial


def test_search_folder_holds_results_best_recipe_plots_and_export(asha_search):
    config, summary = asha_search
    search_dir = summary["search_dir"]
    best = summary["best"]
    assert best["status"] == "completed"
    completed = [row for row in rows_of(summary) if row["status"] == "completed"]
    assert best["val_accuracy"] == max(float(row["val_accuracy"]) for row in completed)
    # The best trial's export was evaluated on the test split like any run.
    assert os.path.exists(os.path.join(best["export"], "metadata.json"))
    assert best["evaluation"]["split"] == "test" and best["evaluation"]["rows"] == 32
    assert best["checkpoint"] and os.path.isdir(best["checkpoint"])
    for name in ("results.csv", "results.json", "best.yaml", "search.yaml", "summary.json",
                 "plots/val_accuracy_per_epoch.png", "plots/parameters.png"):
        assert os.path.getsize(os.path.join(search_dir, name)) > 0, name
    # Each trial is a full training run of its own, inside the search folder.
    for row in rows_of(summary):
        if row["status"] != "failed":
            assert os.path.exists(os.path.join(row["run_dir"], "history.json"))
            assert row["run_dir"].startswith(os.path.join(search_dir, "trials"))


def test_best_yaml_trains_unchanged_with_the_best_trials_config(asha_search, local_ray):
    config, summary = asha_search
    best_yaml = summary["best_yaml"]
    recipe = yaml.safe_load(open(best_yaml))
    assert "tune" not in recipe  # a plain recipe: same schema, no search keys
    assert cli.main(["train", "--config", best_yaml]) == 0

    trained = load_config(best_yaml)
    trial = yaml.safe_load(open(os.path.join(summary["best"]["run_dir"], "config.yaml")))
    resolved = to_dict(trained)
    # Identical to the trial's resolved config, except that it is a run of its own.
    for section in ("data", "model", "train", "scaling", "infer", "tune"):
        assert resolved[section] == trial[section], section
    assert resolved["train"]["learning_rate"] == summary["best"]["params"]["train.learning_rate"]
    assert trained.run.name == "asha-best"
    run_dir = os.path.join(trained.run.storage_path, "asha-best")
    assert storage.read_json(os.path.join(run_dir, "summary.json"))["epochs"] == config.train.epochs


def test_pbt_continues_a_trial_from_a_better_trials_checkpoint(source, shards, tmp_path, local_ray):
    # Synchronous PBT: at epoch 2 both trials wait for each other (paused), then the lower one
    # exploits the upper one. (Asynchronous PBT exploits only if the upper trial reached a point
    # before the lower one reaches its next: left to timing, too flaky for a test.) Two trials
    # that cannot tie: the smoke model and one a single channel wide.
    config = load_config(SMOKE_SEARCH, search_overrides(source, shards, tmp_path, "pbt") + [
        "tune.scheduler=pbt", "tune.pbt_synch=true", "tune.perturbation_interval=2", "train.epochs=3",
        "tune.num_samples=1", "tune.metric=loss",
        "tune.space={train.learning_rate: {uniform: [0.01, 0.06]}, model.width: {grid: [8, 1]}}"])
    summary = run_search(config)
    rows = rows_of(summary)
    assert {row["status"] for row in rows} == {"completed"}, [(row["trial"], row["error"]) for row in rows]
    exploited = [row for row in rows if row["pbt_exploits"]]
    assert exploited, rows
    row = exploited[0]
    source_trial = next(other for other in rows if other is not row)["trial"]
    assert f"from trial {source_trial}" in row["pbt_exploits"]
    # It continued from the other trial's checkpoint, with a perturbed learning rate, and still
    # ran exactly the budget of epochs: the inherited epochs came with the checkpoint.
    def segments(trial):
        return storage.read_json(os.path.join(summary["search_dir"], "trials", f"{trial}.json"))["segments"]

    # A trial's later segments start from a checkpoint: the other trial's (an exploit) or its own
    # (PBT pauses a trial while another waits for resources, and resumes it).
    own = segments(row["trial"])
    index = next((i for i, segment in enumerate(own) if i and segment["from"]["trial"] == source_trial), None)
    assert index is not None, own
    handed = own[index]
    # It took the other trial's whole config, its model too (the checkpoint's shape): model.* is
    # not perturbed, so the width is one the source trial ran with. Which of the two trials is
    # ahead when is left to training (the narrow one can lead early on).
    assert handed["params"]["model.width"] in [segment["params"]["model.width"] for segment in segments(source_trial)]
    # PBT's explore multiplies the source's rate by 0.8 or 1.2 (or resamples it): a value neither
    # trial had before.
    rate = handed["params"]["train.learning_rate"]
    assert rate != own[index - 1]["params"]["train.learning_rate"]
    assert rate not in [segment["params"]["train.learning_rate"] for segment in segments(source_trial)]
    history = storage.read_json(os.path.join(row["run_dir"], "history.json"))
    assert [entry["epoch"] for entry in history] == [1, 2, 3]


def test_a_search_whose_every_trial_fails_exits_with_the_reason(source, shards, tmp_path, local_ray, capsys):
    arguments = ["tune", "--config", SMOKE_SEARCH]
    for override in search_overrides(source, shards, tmp_path, "diverged") + [
            "tune.space={train.learning_rate: {grid: [1.0e+30]}}", "tune.num_samples=1", "train.epochs=1",
            "tune.scheduler=fifo", "tune.max_trial_failures=1"]:
        arguments += ["--set", override]
    assert cli.main(arguments) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: search 'diverged': no trial reported a result (1 of 1 failed); the first "
                            "error: TrainingDiverged: run ") and "results.csv" in error
    # Tune retried the trial (tune.max_trial_failures=1), but a diverged run is final: the retry
    # raised the kept error at once instead of training again (its history is older than the error).
    [kept] = (tmp_path / "searches" / "diverged" / "errors").glob("*.pkl")
    history = tmp_path / "searches" / "diverged" / "trials" / kept.stem / "history.json"
    assert history.stat().st_mtime < kept.stat().st_mtime


def kill_trial_drivers() -> None:
    """As when the node hosting a trial's driver is reclaimed: the driver's process dies, and with it
    the Train controller and workers it owns."""
    drivers = [process for process in psutil.process_iter(["cmdline"])
               if any("ImplicitFunc" in part for part in process.info["cmdline"] or [])]
    assert drivers
    for process in drivers:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def test_killed_optuna_search_resumes_without_training_finished_trials_again(source, tmp_path, local_ray):
    # The job joins this module's Ray, as a job joins its cluster (see test_train's resume test).
    # Optuna samples the smoke search's space; relative paths mean the job's working directory,
    # although Tune runs each trial elsewhere. First the driver of the first trial is lost after its
    # first epoch: Tune starts the trial again and its run resumes from its own checkpoint. Then,
    # once that trial has finished, the whole job is killed and the same command run again.
    arguments = [sys.executable, os.path.join(REPO, "jobs/tune.py"), "--address", ray.get_runtime_context().gcs_address,
                 "--config", SMOKE_SEARCH]
    for override in [f"data.source={os.path.relpath(source, tmp_path)}", "data.output=data", "run.storage_path=runs",
                     "tune.storage_path=searches", "tune.name=resume", "tune.search_alg=optuna",
                     "tune.scheduler=fifo", "tune.max_concurrent_trials=1", "train.epochs=2", "tune.num_samples=2",
                     # Tracked searches are the ASHA fixture's case; here it would only add a SQLite
                     # store's set-up and a model version per trial to each of the two jobs.
                     "tracking.enabled=false"]:
        arguments += ["--set", override]
    search_dir = tmp_path / "searches" / "resume"
    log = tmp_path / "first.log"  # a file, not a pipe nobody reads until the end: that could fill and block
    first = subprocess.Popen(arguments, cwd=tmp_path, stdout=log.open("w"), stderr=subprocess.STDOUT,
                             start_new_session=True)

    def first_trials(pattern: str) -> list:
        deadline = time.time() + 400
        while time.time() < deadline and first.poll() is None:
            found = list((search_dir / "trials").glob(pattern)) if search_dir.exists() else []
            if found:
                return found
            time.sleep(0.5)
        raise AssertionError(log.read_text()[-3000:])

    [snapshot] = first_trials("*/checkpoint_manager_snapshot.json")
    lost = snapshot.parent
    # Epoch 1 is committed (the snapshot lists its checkpoint); a later row may not be yet.
    committed = storage.read_json(str(lost / "history.json"))[0]
    kill_trial_drivers()
    finished = first_trials("*/summary.json")
    history = storage.read_json(str(lost / "history.json"))
    assert [path.parent for path in finished] == [lost] and [row["epoch"] for row in history] == [1, 2]
    assert history[0] == committed  # resumed from its checkpoint: epoch 1 not trained again
    time.sleep(5)  # Tune records the finished trial in its experiment state
    job = psutil.Process(first.pid)
    for process in [job, *job.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    first.wait()
    assert not (search_dir / "summary.json").exists()
    done = {path.parent: (path.parent / "history.json").read_bytes() for path in finished}

    second = subprocess.run(arguments, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming search 'resume'" in second.stdout
    summary = storage.read_json(str(search_dir / "summary.json"))
    assert summary["search_dir"] == str(search_dir) and (tmp_path / "data" / "manifest.json").exists()
    assert summary["trials"] == 2 and summary["completed"] == 2
    rows = rows_of(summary)
    for row in rows:
        assert 0.001 <= float(row["train.learning_rate"]) <= 0.3
        assert 0.00001 <= float(row["train.weight_decay"]) <= 0.001
    assert rows[0]["train.learning_rate"] != rows[1]["train.learning_rate"]
    for run_dir, history in done.items():
        assert (run_dir / "history.json").read_bytes() == history  # not trained again
    assert len(list((search_dir / "trials").glob("*/summary.json"))) == 2
