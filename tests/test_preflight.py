"""Checks that depend on the cluster a stage runs on: shared storage on several nodes, relative
paths in a submitted job's working-dir copy, CPUs left for input, a driver on a CPU-less head."""

import os

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.preflight import ClusterShape, autoscaler_in_status, check

from conftest import REPO


def cluster(**changes):
    values = dict(local=False, nodes=1, autoscaling=False, cpus=8.0, gpus=0.0, driver_node_cpus=8.0,
                  working_dir=None)
    return ClusterShape(**{**values, **changes})


def config(*overrides):
    return load_config(os.path.join(REPO, "configs/smoke.yaml"), [
        "data.output=/data/shards", "run.storage_path=/data/runs", "tune.storage_path=/data/searches", *overrides])


@pytest.mark.parametrize("stage, key", [
    ("preprocess", "data.output"), ("train", "data.output"), ("train", "run.storage_path"),
    ("tune", "tune.storage_path"), ("predict", "infer.output"), ("predict", "infer.input"),
    ("predict", "infer.model")])
def test_local_paths_are_refused_on_several_nodes(stage, key, tmp_path):
    cloud = [f"{name}=s3://bucket/{name}" for name in (
        "data.output", "run.storage_path", "tune.storage_path", "infer.output", "infer.input", "infer.model")]
    settings = config(*[value for value in cloud if not value.startswith(key + "=")], f"{key}={tmp_path}/x")
    check(settings, stage, cluster(nodes=1))  # one node: its own disk is everyone's
    with pytest.raises(ConfigError) as error:
        check(settings, stage, cluster(nodes=2))
    message = str(error.value)
    assert message.startswith(f"{key}={tmp_path}/x is a local path, but this cluster has 2 nodes")
    assert "s3://" in message and "run.shared_paths" in message
    # One node now, but an autoscaler may add more: the same.
    with pytest.raises(ConfigError, match="1 nodes and an autoscaler that adds more"):
        check(settings, stage, cluster(nodes=1, autoscaling=True))
    # A folder every node mounts, declared as such, is accepted; so is the embedded local Ray.
    check(config(*settings_overrides(settings), f"run.shared_paths=[{tmp_path}]"), stage, cluster(nodes=2))
    check(settings, stage, cluster(nodes=2, local=True))


def settings_overrides(settings):
    return [f"{key}={getattr(getattr(settings, key.split('.')[0]), key.split('.')[1])}" for key in (
        "data.output", "run.storage_path", "tune.storage_path", "infer.output", "infer.input", "infer.model")
        if getattr(getattr(settings, key.split('.')[0]), key.split('.')[1])]


def test_object_storage_passes_on_several_nodes():
    settings = config("data.output=s3://bucket/data", "run.storage_path=gs://bucket/runs",
                      "tune.storage_path=s3://bucket/searches", "infer.input=s3://bucket/photos",
                      "infer.model=s3://bucket/runs/x", "infer.output=s3://bucket/out")
    for stage in ("preprocess", "train", "tune", "predict"):
        check(settings, stage, cluster(nodes=3, autoscaling=True))


def test_relative_outputs_are_refused_in_a_submitted_jobs_working_dir():
    cache = "/tmp/ray/session_x/runtime_resources/working_dir_files/_ray_pkg_abc"
    settings = config("run.storage_path=artifacts/runs")
    with pytest.raises(ConfigError) as error:
        check(settings, "train", cluster(working_dir=cache))
    assert str(error.value).startswith("run.storage_path=artifacts/runs is a relative path")
    assert cache in str(error.value) and "deletes" in str(error.value)
    check(settings, "train", cluster())  # not submitted with --working-dir: a relative path is fine
    check(config("run.storage_path=~/runs"), "train", cluster(working_dir=cache))


def test_workers_that_take_every_cpu_are_refused_on_a_fixed_cluster():
    # The hang seen for real: 2 nodes x 1 CPU, 2 workers x 1 CPU, nothing left for Ray Data.
    settings = config("scaling.num_workers=2", "data.output=s3://b/d", "run.storage_path=s3://b/r")
    with pytest.raises(ConfigError) as error:
        check(settings, "train", cluster(nodes=2, cpus=2.0))
    assert "reserve 2 of this cluster's 2 CPUs, leaving none for the Ray Data tasks" in str(error.value)
    assert "scaling.cpus_per_worker=0.5" in str(error.value)
    check(config("scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "data.output=s3://b/d",
                 "run.storage_path=s3://b/r"), "train", cluster(nodes=2, cpus=2.0))
    check(settings, "train", cluster(nodes=2, cpus=2.0, autoscaling=True))  # pending work adds nodes
    check(settings, "train", cluster(nodes=1, cpus=2.0, local=True))  # sized for the stage


def test_concurrent_trials_count_in_the_cpu_check():
    settings = config("data.output=s3://b/d", "run.storage_path=s3://b/r", "tune.storage_path=s3://b/s",
                      "tune.max_concurrent_trials=4")
    with pytest.raises(ConfigError, match="4 concurrent trials x scaling.num_workers=1"):
        check(settings, "tune", cluster(nodes=2, cpus=4.0))
    check(settings, "tune", cluster(nodes=2, cpus=5.0))


def test_elastic_runs_start_with_their_minimum_and_take_the_cpus_that_fit():
    shared = ("data.output=s3://b/d", "run.storage_path=s3://b/r", "train.global_batch_size=24")
    # One GPU: a fixed 2-worker run would wait forever, an elastic [1, 2] one starts with one.
    check(config("scaling.use_gpu=true", "scaling.num_workers=[1, 2]", *shared), "train", cluster(gpus=1.0))
    with pytest.raises(ConfigError, match=r"asks for 2 GPUs \(scaling.min_workers=2"):
        check(config("scaling.use_gpu=true", "scaling.num_workers=[2, 4]", *shared), "train", cluster(gpus=1.0))
    # Three CPUs: an elastic run takes as many 1-CPU workers as fit (3 of up to 4), starving its input.
    with pytest.raises(ConfigError, match=r"3 elastic workers \(scaling.min_workers=1 to num_workers=4, as many "
                                          r"as fit\) x scaling.cpus_per_worker=1 reserve 3 of this cluster's 3 CPUs"):
        check(config("scaling.num_workers=[1, 4]", *shared), "train", cluster(nodes=3, cpus=3.0))
    check(config("scaling.num_workers=[1, 4]", "scaling.cpus_per_worker=0.5", *shared), "train",
          cluster(nodes=3, cpus=3.0))


def test_gpus_a_cluster_does_not_have_are_refused():
    settings = config("scaling.use_gpu=true", "scaling.num_workers=2")
    with pytest.raises(ConfigError, match="asks for 2 GPUs .* this cluster has 1 and no autoscaler"):
        check(settings, "train", cluster(gpus=1.0))
    check(settings, "train", cluster(gpus=2.0))
    cloud = config("scaling.use_gpu=true", "scaling.num_workers=2", "data.output=s3://b/d", "run.storage_path=s3://b/r")
    check(cloud, "train", cluster(gpus=0.0, autoscaling=True))  # the autoscaler adds GPU nodes for them


def test_preprocessing_needs_cpus_on_the_drivers_node(tmp_path):
    settings = config(f"data.output={tmp_path}/data", f"run.storage_path={tmp_path}/runs",
                      f"run.shared_paths=[{tmp_path}]")
    with pytest.raises(ConfigError, match="--entrypoint-num-cpus 1"):
        check(settings, "preprocess", cluster(nodes=3, autoscaling=True, driver_node_cpus=0.0))
    with pytest.raises(ConfigError, match="--entrypoint-num-cpus 1"):
        check(settings, "train", cluster(nodes=3, autoscaling=True, driver_node_cpus=0.0))  # shards missing
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text("{}")
    check(settings, "train", cluster(nodes=3, autoscaling=True, driver_node_cpus=0.0))  # already built


def test_a_plain_head_nodes_monitor_is_not_an_autoscaler():
    # The status a plain `ray start --head` publishes once a second node joined (read in Ray 2.60).
    readonly = {"autoscaler_report": {"active_nodes": {"node_720a": 1}, "pending_launches": {}, "legacy": True,
                                      "node_type_mapping": {"720a": "node_720a", "81bc": "node_81bc"}}}
    assert not autoscaler_in_status(readonly)
    assert not autoscaler_in_status({"load_metrics_report": {}})  # before its first update
    launcher = {"autoscaler_report": {"active_nodes": {"ray.head.default": 1}, "pending_launches": {"gpu-1x": 2},
                                      "node_type_mapping": {"720a": "ray.head.default"}}}
    assert autoscaler_in_status(launcher)


def test_a_worker_larger_than_every_node_is_refused_on_a_fixed_cluster():
    nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 4.0}]
    four_gpus = config("data.output=s3://b/d", "run.storage_path=s3://b/r", "scaling.use_gpu=true",
                       "scaling.gpus_per_worker=4", "train.global_batch_size=64")
    # Two GPUs in the cluster, but a worker needs four on one node.
    with pytest.raises(ConfigError, match=r"one training worker asks for 1 CPU, 4 GPU .*the most any node has: "
                                          r"8 CPU, 1 GPU"):
        check(four_gpus, "train", cluster(nodes=3, cpus=20.0, gpus=2.0, node_resources=nodes))
    spot = config("data.output=s3://b/d", "run.storage_path=s3://b/r", "scaling.custom_resources={spot: 1}")
    with pytest.raises(ConfigError, match=r"asks for 1 CPU, 1 spot .* 8 CPU, 0 spot"):
        check(spot, "train", cluster(nodes=3, cpus=20.0, node_resources=nodes))
    one_gpu = config("data.output=s3://b/d", "run.storage_path=s3://b/r", "scaling.use_gpu=true",
                     "scaling.num_workers=2")
    check(one_gpu, "train", cluster(nodes=3, cpus=20.0, gpus=2.0, node_resources=nodes))
    # An autoscaler may add a node that fits: no refusal.
    check(four_gpus, "train", cluster(nodes=3, cpus=20.0, gpus=2.0, node_resources=nodes, autoscaling=True))


def test_an_autoscaling_cluster_that_must_grow_first_says_it_is_waiting():
    from pipeline.preflight import waiting_note

    gpu_job = config("data.output=s3://b/d", "run.storage_path=s3://b/r", "scaling.use_gpu=true",
                     "scaling.num_workers=4")
    head_only = [{"CPU": 0.0}]
    note = waiting_note(gpu_job, "train", cluster(nodes=1, cpus=0.0, autoscaling=True, node_resources=head_only))
    assert note.startswith("the cluster's 1 node(s) hold 0 of the 4 training workers (1 CPU, 1 GPU each) now: "
                           "waiting for the autoscaler")
    grown = head_only + [{"CPU": 8.0, "GPU": 4.0}]
    assert waiting_note(gpu_job, "train", cluster(nodes=2, cpus=8.0, gpus=4.0, autoscaling=True,
                                                 node_resources=grown)) is None
    # Fixed clusters are refused by check() instead; predictions are not training workers.
    assert waiting_note(gpu_job, "train", cluster(nodes=1, node_resources=head_only)) is None
    assert waiting_note(gpu_job, "predict", cluster(nodes=1, autoscaling=True, node_resources=head_only)) is None


def test_a_local_tracking_store_is_refused_on_several_nodes_and_auto_turns_off(tmp_path, monkeypatch):
    from pipeline import tracking
    from pipeline.preflight import settle_tracking

    # As where MLflow is installed (the tests' own fixture keeps auto off).
    monkeypatch.setattr(tracking, "enabled", lambda settings: settings.enabled in ("auto", True))
    cloud = ["data.output=s3://bucket/data", "run.storage_path=s3://bucket/runs", "tune.storage_path=s3://bucket/s"]
    asked = config(*cloud, "tracking.enabled=true", f"tracking.uri={tmp_path}/mlflow")
    check(asked, "train", cluster(nodes=1))
    with pytest.raises(ConfigError, match=r"tracking.uri=.*/mlflow is a local path, but this cluster has 2 nodes"):
        check(asked, "train", cluster(nodes=2))
    for uri in (f"{tmp_path}/mlflow", f"sqlite:///{tmp_path}/mlflow/mlflow.db"):
        automatic = config(*cloud, f"tracking.uri={uri}")
        note = settle_tracking(automatic, "tune", cluster(nodes=2))
        assert automatic.tracking.enabled is False and "set tracking.uri to a tracking server" in note
        check(automatic, "tune", cluster(nodes=2))  # off: nothing to refuse
    server = config(*cloud, "tracking.uri=http://mlflow.internal:5000")
    assert settle_tracking(server, "train", cluster(nodes=3)) is None and server.tracking.enabled == "auto"
    check(server, "train", cluster(nodes=3))
