"""Two real Ray nodes on this machine (a head and a worker, token-authenticated), and `ray job
submit` to them for real, with the repository as working directory: what a single node never
shows. Jobs that would fail late or hang on several nodes stop before work; a client without the
token is refused and told what to set."""

import os
import subprocess
import time

import pytest

from conftest import REPO, stop_local_ray
from ray_nodes import cluster_env, head_node, submit, worker_node

pytestmark = [pytest.mark.cluster, pytest.mark.own_ray]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    stop_local_ray()
    env = cluster_env()
    # One "slot" per node: a job whose workers each ask for one gets one worker per node.
    slot = ('--resources={"slot": 1}',)
    with head_node(str(tmp_path_factory.mktemp("ray-head")), env, num_cpus=1, extra=slot) as head:
        with worker_node(head["gcs"], env, num_cpus=1, expected_nodes=2,
                         temp_dir=str(tmp_path_factory.mktemp("ray-worker")), extra=slot):
            yield head


def test_local_paths_on_two_nodes_are_refused_before_work(two_nodes, tmp_path):
    started = time.perf_counter()
    result = submit(two_nodes["address"], two_nodes["env"], REPO,
                    "python", "jobs/train.py", "--config", "configs/smoke.yaml",
                    "--set", f"data.source={tmp_path}/none", "--set", f"data.output={tmp_path}/data",
                    "--set", f"run.storage_path={tmp_path}/runs")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"error: data.output={tmp_path}/data is a local path, but this cluster has 2 nodes" in output, output[-3000:]
    assert "Traceback" not in output and not (tmp_path / "data").exists()
    assert time.perf_counter() - started < 120  # refused, not after an epoch of compute


def test_workers_taking_every_cpu_are_refused_instead_of_hanging(two_nodes, tmp_path):
    # What hung for over ten minutes before: 2 nodes x 1 CPU, 2 workers x 1 CPU, no CPU for Ray Data.
    result = submit(two_nodes["address"], two_nodes["env"], REPO,
                    "python", "jobs/train.py", "--config", "configs/smoke.yaml",
                    "--set", "scaling.num_workers=2", "--set", "data.output=s3://bucket/data",
                    "--set", "run.storage_path=s3://bucket/runs", timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert ("error: scaling.num_workers=2 x scaling.cpus_per_worker=1 reserve 2 of this cluster's 2 CPUs, "
            "leaving none for the Ray Data tasks") in output, output[-3000:]


def test_job_without_the_token_is_refused(two_nodes):
    env = {**two_nodes["env"], "RAY_AUTH_TOKEN": "not-the-token"}
    result = subprocess.run(["ray", "job", "list", "--address", two_nodes["address"]], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0


def test_relative_output_in_a_submitted_job_is_refused_before_work(two_nodes, tmp_path):
    # Relative to the job's working dir: Ray's unpacked copy of the repository, which it deletes.
    result = submit(two_nodes["address"], two_nodes["env"], REPO,
                    "python", "jobs/train.py", "--config", "configs/smoke.yaml",
                    "--set", f"data.source={tmp_path}/none", "--set", f"data.output={tmp_path}/data",
                    "--set", f"run.shared_paths=[{tmp_path}]")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "error: run.storage_path=artifacts/runs is a relative path, and this job runs in Ray's temporary " \
           "copy of its working directory" in output, output[-3000:]
    assert "Traceback" not in output and not (tmp_path / "data").exists()


def test_joining_without_the_token_says_what_to_set(two_nodes, tmp_path):
    env = {key: value for key, value in two_nodes["env"].items() if key not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["HOME"] = str(tmp_path)  # and no ~/.ray/auth_token
    wrong = {**two_nodes["env"], "RAY_AUTH_TOKEN": "not-the-token"}
    for environment, expected in ((env, "it uses token authentication; set RAY_AUTH_MODE=token and its token"),
                                  (wrong, "it refused this shell's token")):
        result = subprocess.run(["python", os.path.join(REPO, "jobs/train.py"), "--config",
                                 os.path.join(REPO, "configs/smoke.yaml"), "--address", two_nodes["gcs"]],
                                env=environment, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert result.returncode == 1
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: could not join the Ray cluster at {two_nodes['gcs']}: {expected}"), last
        assert "Traceback" not in result.stderr
        # Asked once before ray.init, whose retries printed ~20 InvalidAuthToken warnings over 25 s.
        assert result.stderr.count("InvalidAuthToken") <= 1, result.stderr[-3000:]


def test_ray_job_stop_ends_a_training_job_saying_what_was_kept(two_nodes, source, tmp_path):
    # `ray job stop` sends SIGTERM to the entrypoint and SIGKILLs it RAY_JOB_STOP_WAIT_TIME_S (3)
    # seconds later: the stage must say what it kept within that time.
    job_id = f"stop-{os.getpid()}"
    result = submit(two_nodes["address"], two_nodes["env"], REPO,
                    "python", "jobs/train.py", "--config", "configs/smoke.yaml",
                    "--set", f"data.source={source}", "--set", f"data.output={tmp_path}/data",
                    "--set", f"run.storage_path={tmp_path}/runs", "--set", f"run.shared_paths=[{tmp_path}]",
                    "--set", "run.name=stopped", "--set", "train.epochs=50", "--set", "train.precision=fp32",
                    "--set", "scaling.custom_resources={slot: 1}",
                    options=("--no-wait", "--submission-id", job_id), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "stopped"
    deadline = time.time() + 400
    while time.time() < deadline and not list(run_dir.glob("checkpoint_*/state.json")):
        time.sleep(1)
    assert list(run_dir.glob("checkpoint_*/state.json")), "no checkpoint was committed"

    def job(*arguments):
        return subprocess.run(["ray", "job", *arguments, "--address", two_nodes["address"], job_id],
                              env=two_nodes["env"], capture_output=True, text=True, timeout=120)

    stop = job("stop")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert "was stopped" in job("status").stdout
    logs = job("logs").stdout
    assert "stopped by SIGTERM: run 'stopped' keeps its committed checkpoints; the same command resumes it" in logs, \
        logs[-3000:]
    assert not (run_dir / "summary.json").exists()  # not mistaken for a finished run
