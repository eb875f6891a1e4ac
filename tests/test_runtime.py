"""The TensorFlow settings reach every process before TensorFlow loads: driver and Ray workers."""

import json

import pytest

from pipeline import TENSORFLOW_ENV, runtime
from conftest import stop_local_ray


def test_local_runtime_env_carries_tensorflow_settings_and_checkout(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    env_vars = runtime.runtime_env()["env_vars"]
    for key, value in TENSORFLOW_ENV.items():
        assert env_vars[key] == value
    assert env_vars["TF_ENABLE_ONEDNN_OPTS"] == "1"
    assert env_vars["RAY_TRAIN_V2_ENABLED"] == "1"
    assert runtime.__file__.rsplit("/pipeline/", 1)[0] in env_vars["PYTHONPATH"].split(":")


def test_submitted_job_keeps_its_own_values(monkeypatch):
    # A job submitted with --runtime-env-json '{"env_vars": {"TF_ENABLE_ONEDNN_OPTS": "0"}}' opts out.
    job = {"runtime_env": {"env_vars": {"TF_ENABLE_ONEDNN_OPTS": "0"}, "working_dir": "."}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    env_vars = runtime.runtime_env()["env_vars"]
    assert "TF_ENABLE_ONEDNN_OPTS" not in env_vars  # Ray merges: the job's "0" stays
    assert env_vars["TF_USE_LEGACY_KERAS"] == "1"
    assert "PYTHONPATH" not in env_vars  # the job's working dir is already on the workers' path


@pytest.mark.cluster
@pytest.mark.own_ray
def test_ray_workers_import_tensorflow_with_the_settings():
    ray = pytest.importorskip("ray")
    stop_local_ray()  # a Ray of its own, with the runtime environment under test
    ray.init(num_cpus=1, include_dashboard=False, runtime_env=runtime.runtime_env())
    try:
        @ray.remote
        def inside_worker():
            import os

            import tensorflow as tf

            return ({key: os.environ.get(key) for key in TENSORFLOW_ENV},
                    type(tf.keras.layers.Dense(1)).__module__)

        env, dense_module = ray.get(inside_worker.remote())
    finally:
        ray.shutdown()
    assert env == TENSORFLOW_ENV
    assert dense_module.startswith("tf_keras."), dense_module  # tf.keras is tf-keras, not Keras 3


def test_ray_data_progress_is_lines_in_a_log_and_bars_on_a_terminal(monkeypatch):
    import ray.data

    context = ray.data.DataContext.get_current()
    monkeypatch.setattr(context, "use_ray_tqdm", True)
    runtime.log_friendly_progress(attached_to_terminal=True)
    assert context.use_ray_tqdm  # Ray's own bars, as a person at a terminal expects
    runtime.log_friendly_progress(attached_to_terminal=False)
    assert not context.use_ray_tqdm  # actors log a progress table per interval instead of redrawing bars
    assert runtime.WORKER_ENV_VARS["RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL"] == "60"


def test_provenance_names_the_versions_that_produced_a_result():
    import ray
    import tensorflow as tf

    import pipeline

    stamp = pipeline.provenance()
    assert stamp["pipeline"] == pipeline.__version__
    assert (stamp["tensorflow"], stamp["ray"]) == (tf.__version__, ray.__version__) and stamp["tf_keras"]
    # A checkout (this one) records its commit; outside one it is null rather than a guess.
    assert stamp["git_commit"] is None or len(stamp["git_commit"].split("-")[0]) == 40
