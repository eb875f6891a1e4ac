"""A real autoscaling cluster on this machine: Ray's fake multi-node provider (which forgets a lost
node, as a cloud does: reclaiming_provider.py), with the head and the 1-GPU worker type of
ray-cluster.yaml (its GPU mapped to a custom resource, so it runs on CPUs). A 2-worker training job
makes the autoscaler start worker nodes, one Ray Train worker on each (the all-reduce crosses
raylets); one of them is lost mid-run, the autoscaler replaces it and the job trains on and
exports; two Tune trials run on two nodes; batch inference spreads over them; the idle nodes are
removed afterwards. Every node is a real raylet process."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

import psutil
import pytest
import yaml

from conftest import REPO, stop_local_ray
from ray_nodes import alive_nodes, cluster_env, free_port, stop_node, submit
from s3_server import s3_server
from synthetic_data import make_image_folder

pytestmark = [pytest.mark.cluster, pytest.mark.own_ray]
# Long enough that the nodes one test scaled up are still there for the next (a job's start-up
# takes seconds), short enough for the last test to watch them go.
IDLE_SECONDS = 30
BUCKET = "s3://autoscaling-test"


def fake_cluster_config(gcs_address: str) -> dict:
    """ray-cluster.yaml's head and gpu-1x worker type, on the fake provider. Ray's own example
    config for this provider is not in the wheel, so every top-level key is given here."""
    launcher = yaml.safe_load(open(os.path.join(REPO, "ray-cluster.yaml")))
    head = launcher["available_node_types"][launcher["head_node_type"]]
    gpu_type = launcher["available_node_types"]["gpu-1x"]
    worker_resources = {"CPU": 2, "fake_gpu": gpu_type["resources"]["GPU"], "object_store_memory": 300 * 1024**2}
    return {
        "cluster_name": "fake-autoscaling", "max_workers": 2, "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_SECONDS / 60,
        "provider": {"type": "external", "module": "reclaiming_provider.ReclaimingFakeProvider",
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "auth": {}, "docker": {},
        "available_node_types": {
            "ray.head.default": {"resources": head["resources"], "node_config": {}, "max_workers": 0},
            "gpu-1x": {"resources": worker_resources, "node_config": {},
                       "min_workers": gpu_type["min_workers"], "max_workers": min(2, gpu_type["max_workers"])},
        },
        "head_node_type": "ray.head.default",
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


@pytest.fixture(scope="module")
def bucket_env():
    """An S3 server every node reaches (the autoscaler starts its nodes with the head's environment)."""
    with s3_server(BUCKET.removeprefix("s3://")) as env:
        yield env


@pytest.fixture(scope="module")
def autoscaling_cluster(tmp_path_factory, bucket_env):
    import ray._private.services

    stop_local_ray()
    root = tmp_path_factory.mktemp("autoscaling")
    env = {**cluster_env(), **bucket_env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]))}
    port = free_port()
    gcs = f"{ray._private.services.get_node_ip_address()}:{port}"
    # Short: Ray's socket paths live under it, and a Unix socket path has at most 107 characters.
    temp_dir = tempfile.mkdtemp(prefix="ray-as-")
    config = root / "fake.yaml"
    config.write_text(yaml.safe_dump(fake_cluster_config(gcs)))
    dashboard = f"http://127.0.0.1:{free_port()}"
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=0", f"--autoscaling-config={config}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard.rsplit(':', 1)[1]}",
         f"--temp-dir={temp_dir}", f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while subprocess.run(["ray", "job", "list", "--address", dashboard], env=env, capture_output=True,
                             timeout=60).returncode != 0:
            assert head.poll() is None and time.time() < deadline, "the autoscaling head did not come up"
            time.sleep(2)
        assert alive_nodes(gcs, env) == 1  # min_workers 0: the head alone
        yield {"address": dashboard, "gcs": gcs, "env": env, "root": root}
    finally:
        stop_node(head)
        # The fake nodes are raylets the head's autoscaler started: stop any it left behind.
        subprocess.run(["pkill", "-f", f"--gcs-address={gcs}"], check=False)
        subprocess.run(["pkill", "-f", f"--gcs_address={gcs}"], check=False)
        shutil.rmtree(temp_dir, ignore_errors=True)


def watch_nodes(cluster, until, timeout):
    """Alive node counts, polled until ``until(count)`` holds."""
    counts, deadline = [], time.time() + timeout
    while time.time() < deadline:
        counts.append(alive_nodes(cluster["gcs"], cluster["env"]))
        if until(counts[-1]):
            break
        time.sleep(2)
    return counts


@pytest.fixture(scope="module")
def shards(autoscaling_cluster):
    """Preprocessed outside the cluster (its head has no CPUs for the decode tasks, see preflight)."""
    root = autoscaling_cluster["root"]
    # 60 per class: a 2-epoch run at batch 2 has time for a node to be lost in its second epoch.
    source = make_image_folder(str(root / "images"), classes=3, per_class=60, test_per_class=4)
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    result = subprocess.run(["python", os.path.join(REPO, "jobs/preprocess.py"), "--config",
                             os.path.join(REPO, "configs/smoke.yaml"), "--set", f"data.source={source}",
                             "--set", f"data.output={root}/data"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return source


def cluster_job(cluster, source, *arguments, script="jobs/train.py", config="configs/smoke.yaml", options=()):
    # No --working-dir: the fake nodes share this machine's Ray temp dir, and one node's clean-up of
    # the runtime-env cache would delete another's copy; the installed package is on every node.
    root = cluster["root"]
    command = ["python", os.path.join(REPO, script), "--config", os.path.join(REPO, config),
               "--set", f"data.source={source}", "--set", f"data.output={root}/data",
               "--set", f"run.storage_path={root}/runs", "--set", f"tune.storage_path={root}/searches",
               # every fake node is on this machine's disk: declared shared, as an NFS mount would be
               "--set", f"run.shared_paths=[{root}]", "--set", "scaling.custom_resources={fake_gpu: 1}",
               "--set", "train.max_failures=0", *arguments]
    return submit(cluster["address"], cluster["env"], None, *command, options=options)


def history_improved(run_dir) -> bool:
    history = json.loads((run_dir / "history.json").read_text())
    return [row["epoch"] for row in history] == [1, 2] and history[-1]["loss"] < history[0]["loss"]


def node_processes(node_id: str) -> list:
    """Every process of a fake node (raylet, agents, workers): the provider starts them with the
    node's id in RAY_OVERRIDE_NODE_ID_FOR_TESTING, and each child inherits it."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            if process.environ().get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") == node_id:
                found.append(process)
    return found


def test_training_job_scales_up_and_a_lost_node_is_replaced(autoscaling_cluster, shards):
    """The job makes the autoscaler add two GPU nodes; in the second epoch one of them is lost
    (every process of it killed, no goodbye: a reclaimed spot VM, a kernel panic). Ray Train
    restarts from the epoch's checkpoint (train.max_failures=1) and waits for two nodes; the
    autoscaler launches a replacement; the run finishes on it and the node that was left."""
    cluster = autoscaling_cluster
    run_dir = cluster["root"] / "runs" / "scaled"
    job_id = f"scaled-{os.getpid()}"
    result = cluster_job(cluster, shards, "--set", "scaling.num_workers=2", "--set", "run.name=scaled",
                         "--set", "train.precision=fp32", "--set", "train.global_batch_size=2",
                         "--set", "train.max_failures=1", options=("--no-wait", "--submission-id", job_id))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    deadline = time.time() + 600
    while not (run_dir / "checkpoint_manager_snapshot.json").exists():  # epoch 1 committed
        assert time.time() < deadline and "failed" not in job_status(cluster, job_id), job_output(cluster, job_id)[-4000:]
        time.sleep(0.5)
    first = [json.loads((run_dir / "workers" / f"rank-{rank:03d}.json").read_text()) for rank in (0, 1)]
    lost = first[1]["node_id"]
    processes = node_processes(lost)
    assert processes, f"no process of node {lost}"
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)

    deadline = time.time() + 600
    while time.time() < deadline and not re.search(r"succeeded|failed|stopped", job_status(cluster, job_id)):
        time.sleep(3)
    output = job_output(cluster, job_id)
    assert "succeeded" in job_status(cluster, job_id), output[-4000:]
    # The head alone holds no worker: the job said it waits for the autoscaler, not silence.
    assert "waiting for the autoscaler to add nodes" in output, output[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and os.path.exists(summary["export"])
    assert history_improved(run_dir)  # each epoch once
    assert [(attempt["workers"], attempt["from_epoch"]) for attempt in summary["attempts"]] == [(2, 0), (2, 1)]
    assert summary["evaluation"]["rows"] == 12  # rank 0 evaluates every test row, none dropped by the split
    # One Ray Train worker per autoscaled node: the all-reduce crossed raylets; the last attempt
    # ran on the node that was left and the one that replaced the lost one.
    nodes = {worker["node_id"] for worker in summary["workers"]}
    assert len(summary["workers"]) == 2 and len(nodes) == 2
    assert lost not in nodes and first[0]["node_id"] in nodes


def job_status(cluster, job_id: str) -> str:
    result = subprocess.run(["ray", "job", "status", "--address", cluster["address"], job_id], env=cluster["env"],
                            capture_output=True, text=True, timeout=120)
    return result.stdout + result.stderr


def job_output(cluster, job_id: str) -> str:
    return subprocess.run(["ray", "job", "logs", "--address", cluster["address"], job_id], env=cluster["env"],
                          capture_output=True, text=True, timeout=120).stdout


def test_two_trials_run_at_once_on_different_nodes(autoscaling_cluster, shards):
    cluster = autoscaling_cluster
    result = cluster_job(cluster, shards, "--set", "tune.name=spread", "--set", "tune.max_concurrent_trials=2",
                         "--set", "tune.scheduler=fifo", "--set", "tune.num_samples=1", "--set", "train.epochs=1",
                         "--set", "tune.space={train.learning_rate: {grid: [0.05, 0.02]}}",
                         script="jobs/tune.py", config="configs/search-smoke.yaml")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    search = cluster["root"] / "searches" / "spread"
    summary = json.loads((search / "summary.json").read_text())
    assert summary["completed"] == 2
    runs = [json.loads(path.read_text()) for path in (search / "trials").glob("*/summary.json")]
    nodes = {run["workers"][0]["node_id"] for run in runs}
    assert len(nodes) == 2  # each trial's worker had a fake GPU node of its own
    started = [os.path.getmtime(search / "trials" / run["run"] / "config.yaml") for run in runs]
    ended = [os.path.getmtime(search / "trials" / run["run"] / "summary.json") for run in runs]
    assert max(started) < min(ended)  # both were running at the same time


def test_batch_inference_across_nodes_from_and_to_s3(autoscaling_cluster, shards, bucket_env):
    """Decode tasks and two model actors on autoscaled nodes, images in and predictions out of a
    bucket: every file classified exactly once."""
    cluster = autoscaling_cluster
    model = cluster["root"] / "runs" / "scaled"
    assert (model / "export" / "metadata.json").exists()  # trained by the first test of this module
    upload = subprocess.run(["python", "-c", (
        "import sys; from pipeline import storage; storage.upload_dir(sys.argv[1], sys.argv[2])"),
        os.path.join(shards, "train"), f"{BUCKET}/photos"], env={**os.environ, **bucket_env},
        capture_output=True, text=True, timeout=120)
    assert upload.returncode == 0, upload.stderr[-2000:]
    result = submit(cluster["address"], cluster["env"], None, "python", os.path.join(REPO, "jobs/predict.py"),
                    "--model", str(model), "--input", f"{BUCKET}/photos", "--output", f"{BUCKET}/predictions/",
                    "--set", f"run.shared_paths=[{cluster['root']}]", "--set", "infer.num_actors=2",
                    "--set", "infer.batch_size=16")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    check = subprocess.run(["python", "-c", (
        "import json, sys, pyarrow.parquet as pq; from pipeline import storage\n"
        "fs, inner = storage.filesystem(sys.argv[1] + 'predictions')\n"
        "paths = pq.read_table(inner, filesystem=fs).column('path').to_pylist()\n"
        "print(json.dumps({'paths': paths, 'summary': storage.read_json(sys.argv[1] + 'summary.json')}))"),
        f"{BUCKET}/predictions/"], env={**os.environ, **bucket_env}, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr[-2000:]
    found = json.loads(check.stdout.strip().splitlines()[-1])
    assert found["summary"]["files_seen"] == 180 and found["summary"]["classified"] == 180
    assert len(found["paths"]) == 180 == len(set(found["paths"]))  # each file exactly once


def test_idle_nodes_are_removed(autoscaling_cluster):
    # Last in the module: the tests above reuse the nodes the first one scaled up (they are idle
    # for less than idle_timeout_minutes in between). Once nothing runs: back to the head alone.
    counts = watch_nodes(autoscaling_cluster, lambda count: count == 1, timeout=IDLE_SECONDS + 120)
    assert counts[-1] == 1, counts
