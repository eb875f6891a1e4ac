"""Fixtures shared by the test modules: a real local Ray, the data they train on, the model and
images the inference tests classify, and the repository's root (``REPO``)."""

import contextlib
import os

import pytest
import ray

import pipeline  # noqa: F401  (TF_USE_LEGACY_KERAS before anything imports TensorFlow)
from pipeline import capacity, runtime
from synthetic_data import make_image_folder

pytest.register_assert_rewrite("infer_files")  # its checks are the inference tests' assertions
from infer_files import export_small_model, write_labelled_folder, write_mixed_folder  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout: configs/, jobs/, benchmarks/


# Fixtures that start Ray (or a cluster of it): tests that use them are `slow`, and
# `pytest -m "not slow"` is the quick inner loop.
RAY_FIXTURES = {"local_ray", "s3_ray", "two_nodes", "autoscaling_cluster"}


def pytest_collection_modifyitems(items):
    for item in items:
        if RAY_FIXTURES & set(item.fixturenames) or item.get_closest_marker("cluster"):
            item.add_marker(pytest.mark.slow)
    # The shared local Ray starts once: the tests that stop it for a Ray of their own come last
    # (a stable sort: each module keeps its order).
    items.sort(key=lambda item: item.get_closest_marker("own_ray") is not None)


@pytest.fixture(autouse=True)
def _track_only_when_asked(monkeypatch):
    """``tracking.enabled: auto`` tracks wherever MLflow is installed, as the dev extra installs it,
    into artifacts/mlflow below the working directory: the checkout, for runs in this process.
    Here a run tracks only when its test sets tracking.enabled=true (jobs in subprocesses run in
    their test's folder)."""
    from pipeline import tracking

    real = tracking.enabled
    monkeypatch.setattr(tracking, "enabled", lambda settings: settings.enabled is True and real(settings))


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the session, shared by every module that needs a plain one: two 1-CPU
    training workers (or trials) plus the CPUs that Ray Data's input tasks need beside them, on
    what looks like a node with two GPUs (see ``gpu_node_environment``). Started on first use;
    a module that needs a Ray of its own (another environment, several nodes) calls
    ``stop_local_ray`` first, and the next test that asks for this one starts it again."""
    if not ray.is_initialized():
        with gpu_node_environment() as gpus:
            runtime.connect(num_cpus=capacity.INGEST_CPUS + 2, num_gpus=gpus)
    yield


def stop_local_ray():
    """Before a module starts Ray processes of its own: two Ray instances on one machine confuse
    Ray Train's placement-group clean-up (it watches the wrong one) and share default ports."""
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def _stop_local_ray_at_the_end():
    yield
    stop_local_ray()


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 for the session's tracking tests (its URL)."""
    from mlflow_server import mlflow_server

    with mlflow_server(str(tmp_path_factory.mktemp("mlflow"))) as url:
        yield url


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A learnable 4-class image folder with a test split: 160 training and 32 test images."""
    return make_image_folder(str(tmp_path_factory.mktemp("images")), classes=4, per_class=40, test_per_class=8)


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory):
    """(export folder, in-memory model) of a small tf-keras model with the export contract:
    float32 (N, 8, 8, 3) pixels in [0, 255] -> float32 probabilities over infer_files.CLASS_NAMES.
    One for the session, as the folders below: the test_infer_* modules share them."""
    return export_small_model(str(tmp_path_factory.mktemp("model") / "export"))


@pytest.fixture(scope="session")
def mixed_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    write_mixed_folder(root)
    return root.resolve()


@pytest.fixture(scope="session")
def labelled_folder(tmp_path_factory):
    """root/<class>/*.png, 7 images per class, plus one broken file in a class folder."""
    root = tmp_path_factory.mktemp("labelled")
    write_labelled_folder(root)
    return root.resolve()


@contextlib.contextmanager
def gpu_node_environment(gpus: int = 2):
    """The environment of a GPU node's raylet while Ray starts: Ray is told of ``gpus`` GPUs and
    the processes it starts inherit ``CUDA_VISIBLE_DEVICES=0,1``, as on a real GPU machine. Ray
    rewrites the variable for processes that hold GPUs; one that asked for none must not see them (pipeline.accelerators).
    TensorFlow here finds no CUDA device either way, so the runs themselves work on CPUs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(gpus))))
        yield gpus
