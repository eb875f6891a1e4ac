"""Every stage on s3:// against a real S3-compatible server (moto's server mode) that this test
starts on 127.0.0.1: preprocess into it, train with checkpoints there, resume from it, tune into
it, predict from and to it. Credentials come only from the standard environment variables, set
here to the dummy values the local server accepts."""

import csv
import io
import json
import os

import pytest
import ray

from pipeline import capacity, runtime, storage
from pipeline.config import load_config
from pipeline.data.preprocess import run_preprocess
from pipeline.infer import run_inference
from pipeline.train.run import run_training
from pipeline.tune.search import run_search
from conftest import REPO, stop_local_ray
from s3_server import s3_server

pytestmark = [pytest.mark.cluster, pytest.mark.own_ray]
BUCKET = "s3://pipeline-test"


@pytest.fixture(scope="module")
def s3_environment():
    with s3_server(BUCKET.removeprefix("s3://")) as env:
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)  # before Ray starts: its workers inherit the environment
        try:
            yield env
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture(scope="module")
def s3_ray(s3_environment):
    stop_local_ray()  # its workers must inherit the S3 environment: a Ray of its own
    runtime.connect(num_cpus=capacity.INGEST_CPUS + 2)
    yield
    ray.shutdown()


def test_every_stage_on_s3(source, s3_environment, s3_ray, tmp_path):
    common = [f"data.source={source}", f"data.output={BUCKET}/data", f"run.storage_path={BUCKET}/runs",
              f"tune.storage_path={BUCKET}/searches", "train.max_failures=0"]
    smoke = os.path.join(REPO, "configs/smoke.yaml")

    manifest = run_preprocess(load_config(smoke, common))
    assert storage.exists(f"{BUCKET}/data/manifest.json") and manifest.rows("train") == 128

    # A search into the bucket: its one trial trains an epoch, with its checkpoint, run folder and
    # export there.
    search = run_search(load_config(os.path.join(REPO, "configs/search-smoke.yaml"), common + [
        "tune.name=s3search", "tune.scheduler=fifo", "tune.num_samples=1", "train.epochs=1",
        "tune.max_concurrent_trials=1", "tune.space={train.learning_rate: {grid: [0.05]}}", "train.precision=fp32"]))
    assert search["completed"] == 1 and search["search_dir"] == f"{BUCKET}/searches/s3search"
    assert storage.exists(f"{BUCKET}/searches/s3search/best.yaml")
    assert storage.exists(search["best"]["export"] if "://" in search["best"]["export"]
                          else f"s3://{search['best']['export']}")

    # The trial's run asked for two epochs: it resumes from its checkpoint in the bucket.
    trials, trial = f"{BUCKET}/searches/s3search/trials", search["best"]["trial"]
    first = storage.read_json(f"{trials}/{trial}/history.json")
    summary = run_training(load_config(smoke, common + [f"run.storage_path={trials}", f"run.name={trial}",
                                                        "train.epochs=2", "train.precision=fp32"]))
    assert summary["run_dir"] == f"{trials}/{trial}" and summary["checkpoint"].startswith("pipeline-test/")
    history = storage.read_json(f"{trials}/{trial}/history.json")
    assert [row["epoch"] for row in history] == [1, 2] and history[:1] == first
    assert storage.exists(f"{trials}/{trial}/export/metadata.json")

    # Predict: images uploaded to the bucket, predictions written back to it.
    storage.upload_dir(os.path.join(source, "test"), f"{BUCKET}/photos")
    result = run_inference(load_config(smoke, common + [
        f"infer.model={trials}/{trial}", f"infer.input={BUCKET}/photos", f"infer.output={BUCKET}/predictions.csv"]))
    assert result["files_seen"] == 32 and result["classified"] == 32 and result["failed"] == 0
    assert result["accuracy"] is not None  # class folders in the bucket label the images
    predictions = list(csv.DictReader(io.StringIO(storage.read_text(f"{BUCKET}/predictions.csv"))))
    assert len(predictions) == 32 and all(row["path"].startswith(f"{BUCKET}/photos/class_") for row in predictions)
    assert json.loads(storage.read_text(f"{BUCKET}/predictions.summary.json"))["classified"] == 32
