"""`ray job submit` for real: a token-authenticated head node started by the test, the smoke
recipe submitted with the repository as working directory, outputs checked, cluster stopped."""

import json
import os
import secrets
import signal
import socket
import subprocess
import time

import pytest

from synthetic_data import make_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.cluster


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    temp = tmp_path_factory.mktemp("ray-head")
    # Token authentication stays on: the token is handed to the cluster and to the client
    # through the environment, so the user's ~/.ray/auth_token is neither read nor written.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    address = f"http://127.0.0.1:{free_port()}"
    # --block keeps `ray start` in the foreground and stops exactly the processes it started when
    # terminated; `ray stop` would also stop every other Ray on the machine.
    head = subprocess.Popen(["ray", "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=4",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={address.rsplit(':', 1)[1]}", f"--temp-dir={temp}",
                             "--disable-usage-stats"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while subprocess.run(["ray", "job", "list", "--address", address], env=env,
                             capture_output=True, timeout=60).returncode != 0:
            assert head.poll() is None and time.time() < deadline, "the Ray head node did not come up"
            time.sleep(2)
        yield {"address": address, "env": env}
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def test_job_without_the_token_is_refused(head_node):
    env = {**head_node["env"], "RAY_AUTH_TOKEN": "not-the-token"}
    result = subprocess.run(["ray", "job", "list", "--address", head_node["address"]], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0


def test_submit_smoke_training_job(head_node, tmp_path):
    source = make_image_folder(str(tmp_path / "images"), classes=3, per_class=24, test_per_class=4)
    command = [
        "ray", "job", "submit", "--address", head_node["address"], "--working-dir", REPO, "--",
        "python", "jobs/train.py", "--config", "configs/smoke.yaml",
        "--set", f"data.source={source}", "--set", f"data.output={tmp_path}/data",
        "--set", f"run.storage_path={tmp_path}/runs", "--set", "run.name=submitted",
        "--set", "train.max_failures=0",
    ]
    for attempt in range(10):
        result = subprocess.run(command, env=head_node["env"], capture_output=True, text=True, timeout=900)
        output = result.stdout + result.stderr
        if "No available agent to submit job" not in output:
            break
        time.sleep(3)  # the head's job agent starts a little after the dashboard answers
    assert result.returncode == 0, output[-4000:]
    assert "succeeded" in output
    run_dir = tmp_path / "runs" / "submitted"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["evaluation"]["rows"] == 12
    assert (run_dir / "export" / "metadata.json").exists()
    assert (tmp_path / "data" / "manifest.json").exists()  # the data stage ran first, inside the job
