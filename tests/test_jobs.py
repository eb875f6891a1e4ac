"""`ray job submit` for real: a token-authenticated head node started by the test, the smoke
recipe submitted with the repository as working directory, outputs checked, cluster stopped."""

import json
import os
import subprocess

import pytest

from ray_nodes import cluster_env, head_node, submit
from synthetic_data import make_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    with head_node(str(tmp_path_factory.mktemp("ray-head")), cluster_env(), num_cpus=4) as node:
        yield node


def test_job_without_the_token_is_refused(head):
    env = {**head["env"], "RAY_AUTH_TOKEN": "not-the-token"}
    result = subprocess.run(["ray", "job", "list", "--address", head["address"]], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0


def test_submit_smoke_training_job(head, tmp_path):
    source = make_image_folder(str(tmp_path / "images"), classes=3, per_class=24, test_per_class=4)
    result = submit(head["address"], head["env"], REPO,
                    "python", "jobs/train.py", "--config", "configs/smoke.yaml",
                    "--set", f"data.source={source}", "--set", f"data.output={tmp_path}/data",
                    "--set", f"run.storage_path={tmp_path}/runs", "--set", "run.name=submitted",
                    "--set", "train.max_failures=0")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "succeeded" in output
    run_dir = tmp_path / "runs" / "submitted"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["evaluation"]["rows"] == 12
    assert (run_dir / "export" / "metadata.json").exists()
    assert (tmp_path / "data" / "manifest.json").exists()  # the data stage ran first, inside the job


def test_relative_output_in_a_submitted_job_is_refused_before_work(head, tmp_path):
    # Relative to the job's working dir: Ray's unpacked copy of the repository, which it deletes.
    result = submit(head["address"], head["env"], REPO,
                    "python", "jobs/train.py", "--config", "configs/smoke.yaml",
                    "--set", f"data.source={tmp_path}/none", "--set", f"data.output={tmp_path}/data")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "error: run.storage_path=artifacts/runs is a relative path, and this job runs in Ray's temporary " \
           "copy of its working directory" in output
    assert "Traceback" not in output and not (tmp_path / "data").exists()


def test_joining_without_the_token_says_what_to_set(head, tmp_path):
    env = {key: value for key, value in head["env"].items() if key not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["HOME"] = str(tmp_path)  # and no ~/.ray/auth_token
    result = subprocess.run(["python", os.path.join(REPO, "jobs/train.py"), "--config",
                             os.path.join(REPO, "configs/smoke.yaml"), "--address", head["gcs"]],
                            env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: could not join the Ray cluster at {head['gcs']}")
    assert "set RAY_AUTH_MODE=token and its token" in last and "Traceback" not in result.stderr
