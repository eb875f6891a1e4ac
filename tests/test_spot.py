"""A spot node reclaimed while it trains, on real Ray nodes: the cloud's notice (a metadata server
on 127.0.0.1) is turned into a drain with reason preemption by `pipeline drain-on-preemption`,
the training workers checkpoint inside the epoch before the deadline, the node is killed at the
deadline, the elastic run goes on with the worker left and grows back when a node returns. With
``train.max_failures=0`` the run still finishes: a preemption is not a failure, and what is
trained again is a few seconds, not the epoch."""

import json
import os
import re
import signal
import subprocess
import time

import pytest

from conftest import REPO, stop_local_ray
from metadata_server import metadata_server
from ray_nodes import cluster_env, head_node, submit, worker_node
from synthetic_data import make_image_folder

pytestmark = [pytest.mark.cluster, pytest.mark.own_ray]
SLOT = '--resources={"slot": 1}'
DEADLINE_SECONDS = 12


def ask_cluster(gcs: str, env: dict, expression: str):
    """The JSON value of a Python ``expression`` evaluated by a driver that joins the cluster."""
    script = ("import json, ray; ray.init(address='%s', logging_level='ERROR', log_to_driver=False); "
              "print('ANSWER', json.dumps(%s))" % (gcs, expression))
    result = subprocess.run(["python", "-c", script], env=env, capture_output=True, text=True, timeout=120)
    [line] = [line for line in result.stdout.splitlines() if line.startswith("ANSWER ")]
    return json.loads(line.split(" ", 1)[1])


def draining_nodes(gcs: str, env: dict) -> dict:
    return ask_cluster(gcs, env, "ray._private.state.state.get_draining_nodes()")


def node_ids(gcs: str, env: dict) -> list:
    return ask_cluster(gcs, env, "[node['NodeID'] for node in ray.nodes() if node['Alive']]")


def job_logs(address: str, env: dict, job_id: str) -> str:
    return subprocess.run(["ray", "job", "logs", "--address", address, job_id], env=env, capture_output=True,
                          text=True, timeout=120).stdout


def job_status(address: str, env: dict, job_id: str) -> str:
    result = subprocess.run(["ray", "job", "status", "--address", address, job_id], env=env, capture_output=True,
                            text=True, timeout=120)
    return result.stdout + result.stderr


PROGRESS = re.compile(r"epoch (\d+)/\d step (\d+)/(\d+)")


@pytest.mark.parametrize("grows_back", [False, pytest.param(True, marks=pytest.mark.long)])
def test_a_reclaimed_spot_node_costs_seconds_and_an_elastic_run_goes_on(grows_back, tmp_path_factory, tmp_path):
    """Two 1-CPU nodes (a head and a spot node, one slot each), an elastic run of 1-2 workers. The
    spot node is reclaimed (notice, drain, kill at the deadline) and no replacement comes: the run
    goes on with one worker from the checkpoint written just before the deadline. With
    ``grows_back`` (a second epoch, 3 more minutes: ``pytest -m long``) a node joins again and the
    run grows back to two workers. ``train.max_failures=0``: none of it is a failure."""
    stop_local_ray()
    # Ray Train first tries to restart at the old size after a node is lost (its view of the
    # cluster lags the kill) and gives up after this start timeout (60 s by default): shorter here.
    env = {**cluster_env(), "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"}
    # 640 training images at batch 2: 320 steps an epoch (~25 s on two vCPUs), so that the notice
    # and the deadline 12 s later fall inside the first epoch; 1,600 (800 steps) with a second epoch
    # for the regrowth to fall inside.
    per_class = 500 if grows_back else 200
    source = make_image_folder(str(tmp_path / "images"), classes=4, per_class=per_class, test_per_class=2)
    job_id = f"spot-{os.getpid()}"
    run_dir = tmp_path / "runs" / "spot"
    with metadata_server() as (metadata_url, metadata), \
            head_node(str(tmp_path_factory.mktemp("ray-head")), env, num_cpus=1, extra=(SLOT,)) as head:
        head_ids = set(node_ids(head["gcs"], env))
        # Short: a Ray node's socket paths under its temp dir must fit in 107 bytes.
        spot_temp = str(tmp_path_factory.mktemp("ray-spot"))
        spot = worker_node(head["gcs"], env, num_cpus=1, expected_nodes=2, temp_dir=spot_temp, extra=(SLOT,))
        spot_process = spot.__enter__()
        watcher = subprocess.Popen(["pipeline", "drain-on-preemption", "--address", head["gcs"], "--cloud", "aws",
                                    "--metadata-url", metadata_url, "--temp-dir", spot_temp,
                                    "--poll-seconds", "0.5"],
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        returned = None
        try:
            spot_id = (set(node_ids(head["gcs"], env)) - head_ids).pop()
            result = submit(head["address"], env, REPO,
                            "python", "jobs/train.py", "--config", "configs/smoke.yaml",
                            "--set", f"data.source={source}", "--set", f"data.output={tmp_path}/data",
                            "--set", f"run.storage_path={tmp_path}/runs", "--set", f"run.shared_paths=[{tmp_path}]",
                            "--set", "run.name=spot", "--set", f"train.epochs={2 if grows_back else 1}",
                            "--set", "train.precision=fp32",
                            "--set", "train.global_batch_size=2", "--set", "train.shuffle_buffer_size=16",
                            "--set", "train.max_failures=0", "--set", "train.checkpoint_every_steps=100",
                            "--set", "run.progress_seconds=1",
                            "--set", "scaling.num_workers=[1, 2]", "--set", "scaling.resize_check_seconds=5",
                            "--set", "scaling.cpus_per_worker=0.5", "--set", "scaling.custom_resources={slot: 1}",
                            options=("--no-wait", "--submission-id", job_id), timeout=300)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

            # Some way into the first epoch, the cloud announces the reclaim.
            deadline = time.time() + 600
            while time.time() < deadline:
                steps = [(int(epoch), int(done), int(total)) for epoch, done, total in
                         PROGRESS.findall(job_logs(head["address"], env, job_id))]
                if steps and steps[-1][1] >= 10:
                    break
                assert "failed" not in job_status(head["address"], env, job_id)
                time.sleep(2)
            steps_per_epoch = steps[-1][2]
            reclaim_at = time.time() + DEADLINE_SECONDS
            metadata.announce(reclaim_at)
            assert watcher.wait(timeout=60) == 0, watcher.stdout.read()
            assert "drained with reason preemption" in watcher.stdout.read()
            draining = draining_nodes(head["gcs"], env)
            assert list(draining) == [spot_id]
            assert abs(draining[spot_id] / 1000 - int(reclaim_at)) <= 1  # the notice's own deadline

            # The cloud takes the node at the deadline: no goodbye (SIGKILL to its processes).
            time.sleep(max(0.0, reclaim_at - time.time()))
            os.killpg(spot_process.pid, signal.SIGKILL)
            spot.__exit__(None, None, None)
            spot = None
            # No capacity for a while: the run goes on with the one worker that fits.
            deadline = time.time() + 300
            while time.time() < deadline and len(attempts_of(run_dir)) < 2:
                time.sleep(1)
            assert [attempt["workers"] for attempt in attempts_of(run_dir)] == [2, 1]
            if grows_back:  # capacity returns
                returned = worker_node(head["gcs"], env, num_cpus=1, expected_nodes=2,
                                       temp_dir=str(tmp_path_factory.mktemp("ray-spot")), extra=(SLOT,))
                returned.__enter__()

            deadline = time.time() + 900
            # `ray job status` says "Job '<id>' succeeded" (or failed, or was stopped).
            while time.time() < deadline and not re.search(r"succeeded|failed|was stopped",
                                                           status := job_status(head["address"], env, job_id)):
                time.sleep(3)
            logs = job_logs(head["address"], env, job_id)
            assert "succeeded" in status, logs[-5000:]
        finally:
            if watcher.poll() is None:
                watcher.kill()
            for node in (spot, returned):
                if node is not None:
                    node.__exit__(None, None, None)

    epochs = [1, 2] if grows_back else [1]
    history = json.loads((run_dir / "history.json").read_text())
    assert [row["epoch"] for row in history] == epochs  # each epoch once, although attempts overlapped
    summary = json.loads((run_dir / "summary.json").read_text())
    attempts = summary["attempts"]
    assert [attempt["workers"] for attempt in attempts] == ([2, 1, 2] if grows_back else [2, 1]), attempts
    assert sorted(epoch for attempt in attempts for epoch in attempt["epochs"]) == epochs
    # What the reclaim cost: the steps the first attempt reached in epoch 1 (rank 0's progress
    # lines) beyond where the one-worker attempt resumed, the checkpoint just before the deadline.
    shrunk = attempts[1]
    assert shrunk["from_epoch"] == 0 and shrunk["from_step"] > 0
    first_attempt = logs.split("resumed from", 1)[0]
    reached = max(done for epoch, done, _ in
                  ((int(e), int(d), t) for e, d, t in PROGRESS.findall(first_attempt)) if epoch == 1)
    redone = reached - shrunk["from_step"]
    print(f"RECLAIM steps/epoch {steps_per_epoch} reached {reached} resumed at {shrunk['from_step']} redone {redone}")
    assert 0 <= redone < steps_per_epoch // 2
    assert "(preemption," in logs and "(preemption deadline," in logs  # the checkpoint at once, and the last
    assert "Source: preemption" in logs  # counted by Ray Train as a preemption, not one of max_failures (0)
    # Progress lines show the running accuracy of one replica, not the sum over the two workers.
    assert all(float(value) <= 1 for value in re.findall(r" top5_accuracy=([\d.]+)", logs))
    # A log, not a terminal: no progress-bar redraws (cursor-up sequences) from Ray Data's actors.
    assert "\x1b[A" not in logs
    # The last attempt ran on the head (and the node that came back), each a worker.
    assert len({worker["node_id"] for worker in summary["workers"]} - {spot_id}) == (2 if grows_back else 1)
    assert summary["evaluation"]["rows"] == 8 and (run_dir / "export" / "metadata.json").exists()
    assert (tmp_path / "data" / "manifest.json").exists()  # the data stage ran first, inside the job
    # (One worker per 1-CPU node at 0.5 CPU leaves half a CPU on each: enough for Ray Data's read
    # tasks only if they ask for less than a whole CPU. With Ray's default of 1 this run waited forever.)


def attempts_of(run_dir) -> list:
    try:
        return json.loads((run_dir / "attempts.json").read_text())
    except (OSError, ValueError):
        return []
