"""Two real Ray nodes on this machine (a head and a worker, token-authenticated): what a
single node never shows. Jobs that would fail late or hang on several nodes stop before work."""

import json
import os
import time

import pytest

from ray_nodes import cluster_env, head_node, submit, worker_node

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
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


def test_two_workers_on_two_one_cpu_nodes_train(two_nodes, source, tmp_path):
    # One worker per node at 0.5 CPU leaves half a CPU on each: enough for Ray Data's read tasks
    # only if they ask for less than a whole CPU. With Ray's default of 1 this run waited forever.
    result = submit(two_nodes["address"], two_nodes["env"], REPO,
                    "python", "jobs/train.py", "--config", "configs/smoke.yaml",
                    "--set", f"data.source={source}", "--set", f"data.output={tmp_path}/data",
                    "--set", f"run.storage_path={tmp_path}/runs", "--set", f"run.shared_paths=[{tmp_path}]",
                    "--set", "run.name=halves", "--set", "train.epochs=1", "--set", "train.precision=fp32",
                    "--set", "train.max_failures=0", "--set", "scaling.num_workers=2",
                    "--set", "scaling.cpus_per_worker=0.5", "--set", "scaling.custom_resources={slot: 1}",
                    timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    summary = json.loads((tmp_path / "runs" / "halves" / "summary.json").read_text())
    assert summary["epochs"] == 1
    assert len({worker["node_id"] for worker in summary["workers"]}) == 2  # one worker per node
