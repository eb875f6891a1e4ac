"""The TensorFlow settings reach every process before TensorFlow loads: driver and Ray workers."""

import json

import pytest

from pipeline import TENSORFLOW_ENV, runtime


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


def test_ray_workers_import_tensorflow_with_the_settings():
    ray = pytest.importorskip("ray")
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
