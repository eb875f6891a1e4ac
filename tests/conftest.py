"""Fixtures shared by the test modules that train on a real local Ray."""

import pytest
import ray

import pipeline  # noqa: F401  (TF_USE_LEGACY_KERAS before anything imports TensorFlow)
from pipeline import runtime
from synthetic_data import make_image_folder


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A learnable 4-class image folder with a test split: 160 training and 32 test images."""
    return make_image_folder(str(tmp_path_factory.mktemp("images")), classes=4, per_class=40, test_per_class=8)


@pytest.fixture(scope="module")
def training_ray():
    """A local Ray for the module: two 1-CPU training workers (or trials) plus the CPUs that
    Ray Data's input tasks need beside them."""
    runtime.connect(num_cpus=runtime.INGEST_CPUS + 2)
    yield
    ray.shutdown()
