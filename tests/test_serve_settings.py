"""pipeline.serve without Ray: its settings are checked as any others and become the deployment's options."""

import json

import pytest

from pipeline.config import load_config

from infer_files import export_served_model


def test_serve_settings_are_checked_like_any_other(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.serve import app_from_args

    with pytest.raises(ConfigError, match="serve.min_replicas=3 is above serve.max_replicas=2"):
        load_config(None, ["serve.min_replicas=3", "serve.max_replicas=2"])
    with pytest.raises(ConfigError, match="'serve.max_batch_size' must be >= 1"):
        app_from_args({"model": str(tmp_path), "max_batch_size": 0})
    export = export_served_model(str(tmp_path / "export"))
    application = app_from_args({"model": export, "max_replicas": "3", "min_replicas": 1})
    deployment = application._bound_deployment
    assert deployment._deployment_config.autoscaling_config.max_replicas == 3
    assert json.loads(json.dumps(deployment.ray_actor_options)) == {"num_cpus": 1.0, "num_gpus": 0.0}
