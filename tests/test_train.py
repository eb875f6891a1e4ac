"""Training on a real local Ray: one worker in fp16 with loss scaling, checkpoints, a killed run resumed
(with a moving average of the weights), export, and the CLI. Two workers (one per node, ring all-reduce across raylets): test_autoscaling."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.fs as pafs
import pytest
import ray.train
import yaml
from ray import cloudpickle
from ray.train.tensorflow import TensorflowTrainer

import pipeline  # noqa: F401
from pipeline import storage
from pipeline.config import load_config
from pipeline.data.manifest import images_from_column, open_manifest
from pipeline.models.saving import checkpoint_problem, load_model
from pipeline.train.run import CheckpointMismatch, run_training

import faulty_storage
from conftest import REPO
from ray_nodes import free_port

pytestmark = pytest.mark.cluster


def smoke_config(source, tmp_path, *overrides):
    return load_config(os.path.join(REPO, "configs/smoke.yaml"), [
        f"data.source={source}", f"data.output={tmp_path}/data", f"run.storage_path={tmp_path}/runs",
        "train.epochs=3", "train.max_failures=0", *overrides])


def checkpoints(run_dir):
    return sorted(name for name in os.listdir(run_dir)
                  if name.startswith("checkpoint_") and os.path.isdir(os.path.join(run_dir, name)))


def test_one_worker_trains_checkpoints_and_exports(source, tmp_path, local_ray, monkeypatch, tracking_server):
    # fp16 (mixed_float16 with a loss-scale optimizer) is the GPU path; it runs, slowly, on a CPU
    # too, and its checkpoint restore and float32 export are what this run checks. It checkpoints
    # every 3 steps too (8 steps an epoch). The upload of its second checkpoint (epoch 1, step 6)
    # fails once (storage unavailable): Ray Train restarts the worker from the first (step 3), which
    # finishes epoch 1 with the 5 steps it had left; the run ends with every epoch exactly once and
    # the optimizer's step counter (hence the schedule) where an uninterrupted run has it.
    real_filesystem = storage.filesystem
    markers = str(tmp_path / "upload-failures")

    def filesystem(path):
        fs, inner = real_filesystem(path)
        if inner.startswith(str(tmp_path / "runs")):
            return pafs.PyFileSystem(faulty_storage.FailSecondCheckpointUpload(markers)), inner
        return fs, inner

    monkeypatch.setattr(storage, "filesystem", filesystem)
    cloudpickle.register_pickle_by_value(faulty_storage)  # the workers cannot import tests/
    config = smoke_config(source, tmp_path, "run.name=one", "train.precision=fp16", "train.max_failures=1",
                          "train.checkpoint_every_steps=3",
                          "tracking.enabled=true", f"tracking.uri={tracking_server}", "tracking.experiment=smoke",
                          "tracking.registered_model=smoke-resnet")
    summary = run_training(config)
    monkeypatch.setattr(storage, "filesystem", real_filesystem)
    assert os.path.exists(os.path.join(markers, "failed"))  # the failure did happen
    run_dir = summary["run_dir"]
    # On a (declared) GPU node, a worker that asked for no GPU saw none: one replica, on its CPU.
    [worker] = summary["workers"]
    assert worker["cuda_visible_devices"] == "" and worker["gpus"] == []
    assert (worker["replicas"], worker["replicas_in_sync"]) == (1, 1)
    assert (worker["collective"], worker["steps_per_execution"], worker["jit_compile"]) == ("ring", 1, False)

    history = storage.read_json(os.path.join(run_dir, "history.json"))
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert [row.get("resumed_at_step") for row in history] == [3, None, None]
    import tensorflow as tf

    reader = tf.train.load_checkpoint(os.path.join(run_dir, checkpoints_by_epoch(run_dir)[-1], "tf_checkpoint", "ckpt"))
    [iterations] = [reader.get_tensor(key) for key in reader.get_variable_to_shape_map()
                    if key in ("optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE",  # the step counter, with or
                               "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")]  # without loss scaling
    assert iterations == 3 * 8  # the schedule is a function of this counter
    assert {row["precision"] for row in history} == {worker["precision"]} == {summary["precision"]} - {None}
    for key in ("loss", "accuracy", "top5_accuracy", "val_loss", "val_accuracy", "val_top5_accuracy", "lr",
                "images_per_second"):
        assert all(np.isfinite(row[key]) for row in history), key
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["val_accuracy"] > 0.5  # 4 easy classes: far above chance (0.25)

    # The latest checkpoint is always kept, plus the best by val_accuracy (num_to_keep=1). What the
    # failed upload left (if anything) is told from a whole checkpoint.
    whole = [name for name in checkpoints(run_dir) if checkpoint_problem(pafs.LocalFileSystem(),
                                                                         os.path.join(run_dir, name)) is None]
    assert 1 <= len(whole) <= 2 and len(checkpoints(run_dir)) - len(whole) <= 1
    # What produced the run and its export: this package and the library versions.
    assert summary["provenance"] == pipeline.provenance() and summary["provenance"]["tensorflow"]
    evaluation = summary["evaluation"]
    assert evaluation["split"] == "test" and evaluation["rows"] == 32
    for name in ("config.yaml", "history.csv", "summary.json", "evaluation.json", "plots/loss.png",
                 "plots/accuracy.png", "plots/top5_accuracy.png", "plots/train_images.png"):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0, name
    assert os.listdir(os.path.join(run_dir, "tensorboard"))

    # The export and the latest checkpoint hold the same weights and give the same predictions;
    # the export takes raw 0-255 pixels (normalisation inside).
    manifest = open_manifest(config.data.output)
    rows = manifest.read_split("test").take(16)
    images = images_from_column([row["image"] for row in rows], manifest.image_size).astype("float32")
    exported, metadata = load_model(run_dir)
    restored, _ = load_model(os.path.join(run_dir, checkpoints_by_epoch(run_dir)[-1]))
    assert metadata["class_names"] == manifest.class_names
    assert metadata["provenance"]["ray"] == ray.__version__ and manifest.raw["provenance"]["tf_keras"]
    np.testing.assert_allclose(exported.predict(images, verbose=0), restored.predict(images, verbose=0), atol=1e-5)
    accuracy = np.mean(exported.predict(images, verbose=0).argmax(1) == np.array([r["label"] for r in rows]))
    assert accuracy > 0.5
    # The recorded test evaluation is the exported model's, over every test row.
    table = manifest.read_split("test").to_pandas()
    probabilities = exported.predict(images_from_column(table["image"].to_numpy(), manifest.image_size)
                                     .astype("float32"), verbose=0)
    labels = table["label"].to_numpy()
    assert evaluation["accuracy"] == np.mean(probabilities.argmax(1) == labels)
    assert evaluation["loss"] == pytest.approx(-np.mean(np.log(probabilities[np.arange(32), labels])), rel=1e-4)

    # Tracked in MLflow: every epoch once although part of epoch 1 was trained twice (the failed upload),
    # equal to history.json; the config as params; the test metrics, files and the export as a
    # model version that predicts as the export does.
    import mlflow
    from mlflow.tracking import MlflowClient

    tracked = summary["tracking"]
    client = MlflowClient(tracking_server)
    run = client.get_run(tracked["run_id"])
    assert run.info.status == "FINISHED" and "not_logged" not in tracked
    assert run.data.params["train.epochs"] == "3" and run.data.params["model.width"] == "8"
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "val_top5_accuracy", "lr", "images_per_second"):
        points = sorted((point.step, point.value) for point in client.get_metric_history(run.info.run_id, key))
        assert points == [(row["epoch"], pytest.approx(row[key])) for row in history], key
    assert run.data.metrics["test_accuracy"] == pytest.approx(evaluation["accuracy"])
    files = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json", "history.csv", "plots"} <= files
    version = client.get_model_version("smoke-resnet", tracked["model_version"])
    assert version.run_id == run.info.run_id
    mlflow.set_tracking_uri(tracking_server)
    registered = mlflow.pyfunc.load_model(f"models:/smoke-resnet/{tracked['model_version']}")
    assert registered.metadata.metadata["class_names"] == manifest.class_names
    np.testing.assert_array_equal(np.asarray(registered.predict(images)).argmax(1),
                                  exported.predict(images, verbose=0).argmax(1))

    # The same run name with a wider model: its checkpoints cannot be resumed, and the finished
    # run is left as it was.
    with pytest.raises(CheckpointMismatch, match=r"run 'one' cannot resume: .* other model \(model\.\*\)"):
        run_training(smoke_config(source, tmp_path, "run.name=one", "train.precision=fp16", "model.width=16"))
    assert os.path.exists(os.path.join(run_dir, "summary.json"))
    assert yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))["model"]["width"] == 8


def checkpoints_by_epoch(run_dir):
    epochs = {name: storage.read_json(os.path.join(run_dir, name, "state.json"))["epoch"]
              for name in checkpoints(run_dir) if os.path.exists(os.path.join(run_dir, name, "state.json"))}
    return sorted(epochs, key=epochs.get)


def test_stopped_run_resumes_at_the_right_epoch(source, tmp_path, local_ray):
    """Ctrl-C a training job after its first checkpoint; the same command again continues from it
    and ends with exactly the configured number of epochs. The job joins this module's Ray, as a
    job joins its cluster: the driver's exit ends its Train run there (and no Ray start per run).
    (A crashed driver, SIGKILLed with everything it started, is the search test's case.)"""
    address = ray.get_runtime_context().gcs_address
    # The second command runs with the source gone (preprocessed elsewhere, download host down):
    # the shards and their manifest are all a training job needs.
    own_source = shutil.copytree(source, tmp_path / "images")
    arguments = [sys.executable, os.path.join(REPO, "jobs/train.py"), "--address", address,
                 "--config", os.path.join(REPO, "configs/smoke.yaml"),
                 "--set", f"data.source={own_source}", "--set", f"data.output={tmp_path}/data",
                 "--set", f"run.storage_path={tmp_path}/runs", "--set", "run.name=resume",
                 "--set", "train.epochs=4", "--set", "train.precision=fp32", "--set", "train.ema_momentum=0.9",
                 # A tracking server that is down: the run trains on and says what was not logged.
                 "--set", "tracking.enabled=true", "--set", f"tracking.uri=http://127.0.0.1:{free_port()}"]
    run_dir = os.path.join(tmp_path, "runs", "resume")
    first = subprocess.Popen(arguments, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:
        # Ray Train's snapshot is its commit point: a checkpoint folder alone may be half copied.
        if os.path.exists(os.path.join(run_dir, "checkpoint_manager_snapshot.json")):
            break
        time.sleep(0.5)
    assert first.poll() is None, first.stdout.read().decode()[-3000:]
    # Ctrl-C, to the driver alone as a terminal sends it: it unwinds, says what was kept and how
    # to go on, and exits with 130; Ray ends the driver's actors (the Train controller and
    # workers) with it. Never `ray stop`, which would also stop other tests' clusters.
    first.send_signal(signal.SIGINT)
    output = first.communicate(timeout=180)[0].decode()
    assert first.returncode == 130, output[-3000:]
    assert "stopped by Ctrl-C (SIGINT): run 'resume' keeps its committed checkpoints; the same command " \
           "resumes it" in output
    assert not os.path.exists(os.path.join(run_dir, "summary.json"))
    # The oldest checkpoint is a committed one; its history is what the resumed run must keep.
    done_before = storage.read_json(os.path.join(run_dir, checkpoints_by_epoch(run_dir)[0], "state.json"))["history"]
    assert 1 <= len(done_before) < 4

    shutil.rmtree(own_source)
    second = subprocess.run(arguments, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming run 'resume'" in second.stdout
    # The local Ray has its dashboard, so Ray Train's State API queries work (no warning flood).
    assert "Failed to query Ray Train Controller" not in second.stdout + second.stderr
    history = storage.read_json(os.path.join(run_dir, "history.json"))
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]
    # The epochs done before the crash were not trained again: their rows (timings included)
    # came back from the checkpoint unchanged.
    assert history[:len(done_before)] == done_before
    summary = storage.read_json(os.path.join(run_dir, "summary.json"))
    assert summary["epochs"] == 4
    not_logged = summary["tracking"]["not_logged"]
    assert not_logged["store"].startswith("http://127.0.0.1:") and "Connection refused" in not_logged["reason"]
    assert "the training run" in not_logged["not_logged"] and "the model version" in not_logged["not_logged"]
    assert f"not logged to MLflow at {not_logged['store']}" in second.stdout

    # train.ema_momentum: the run exported the moving average that its last checkpoint carries
    # beside the trained weights, and inference from that checkpoint uses it too.
    last = os.path.join(run_dir, checkpoints_by_epoch(run_dir)[-1])
    exported, _ = load_model(os.path.join(run_dir, "export"))
    with np.load(os.path.join(last, "average.npz")) as average:
        for index, weights in enumerate(exported.get_weights()):
            np.testing.assert_array_equal(weights, average[f"arr_{index}"])
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(load_model(last)[0].predict_on_batch(images), exported.predict_on_batch(images),
                               atol=1e-5)


def test_a_hung_worker_ends_its_attempt_and_the_run_goes_on(source, tmp_path, local_ray, monkeypatch):
    """A worker that is alive but makes no progress (here its second checkpoint upload never
    returns, as on a black-holed connection) would hold the run forever: nothing in Ray or
    TensorFlow times out a call that hangs in a live process. Its watchdog ends it after
    train.stall_timeout_seconds; Ray Train restarts from the first checkpoint and the run finishes.
    (A worker stopped outright, SIGSTOP, is caught without the watchdog too: measured.)"""
    real_filesystem = storage.filesystem
    markers = str(tmp_path / "upload-hangs")

    def filesystem(path):
        fs, inner = real_filesystem(path)
        if inner.startswith(str(tmp_path / "runs")):
            return pafs.PyFileSystem(faulty_storage.FailSecondCheckpointUpload(markers, hang_seconds=3600)), inner
        return fs, inner

    monkeypatch.setattr(storage, "filesystem", filesystem)
    cloudpickle.register_pickle_by_value(faulty_storage)  # the workers cannot import tests/
    config = smoke_config(source, tmp_path, "run.name=hang", "train.epochs=2", "train.max_failures=1",
                          "train.precision=fp32", "train.stall_timeout_seconds=8")
    summary = run_training(config)
    assert os.path.exists(os.path.join(markers, "failed"))  # the upload did hang
    assert summary["epochs"] == 2
    assert [attempt["from_epoch"] for attempt in summary["attempts"]] == [0, 1]  # restarted from epoch 1's


def precision_probe(loop_config):
    """A Ray Train worker loop that only decides the run's precision, as the training loop does."""
    from pipeline import storage
    from pipeline.train import devices

    rank = ray.train.get_context().get_world_rank()
    strategy = devices.make_strategy("ring")
    # As if rank 0 were an A100 (bf16 and fp16 tensor cores) and rank 1 a V100 (fp16 only).
    fast = {"bf16", "fp16"} if rank == 0 else {"fp16"}
    storage.write_json(os.path.join(loop_config["out"], f"rank-{rank}.json"), {
        "precision": devices.agreed_precision(strategy, "auto", fast),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "collective": devices.collective("auto", True, loop_config["gpus_per_worker"])})


def test_workers_agree_on_one_precision_and_see_their_own_gpu(local_ray, tmp_path):
    # Each worker alone would pick its own (bf16 on rank 0, fp16 on rank 1): replicas in different
    # dtypes, one loss-scaled. Decided once, by all-reduce, both train in fp16.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    for gpus in (1, 0.5):
        out = tmp_path / f"gpus-{gpus}"
        trainer = TensorflowTrainer(
            precision_probe, train_loop_config={"out": str(out), "gpus_per_worker": gpus},
            scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=True,
                                                   resources_per_worker={"CPU": 1, "GPU": gpus}),
            run_config=ray.train.RunConfig(name=f"probe-{gpus}", storage_path=str(tmp_path / "runs")))
        trainer.fit()
        records = [storage.read_json(os.path.join(out, f"rank-{rank}.json")) for rank in (0, 1)]
        assert [record["precision"] for record in records] == ["fp16", "fp16"]
        if gpus == 1:
            # Ray gave each GPU worker one of the node's two GPUs, and only that one: NCCL.
            assert sorted(record["cuda_visible_devices"] for record in records) == ["0", "1"]
            assert {record["collective"] for record in records} == {"nccl"}
        else:
            # Half a GPU each: Ray packs both onto one GPU, two NCCL ranks on one device, which
            # NCCL refuses; auto chose ring.
            assert [record["cuda_visible_devices"] for record in records] == ["0", "0"]
            assert {record["collective"] for record in records} == {"ring"}
