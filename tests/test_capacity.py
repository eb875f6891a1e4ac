"""The resource arithmetic (pipeline/capacity.py), with values worked out by hand from each rule:
pure, no Ray."""

import os

import pytest

from pipeline import capacity
from pipeline.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(*overrides):
    # global_batch_size 24 divides among 1, 2, 3 and 4 workers.
    return load_config(os.path.join(REPO, "configs/smoke.yaml"), ["train.global_batch_size=24", *overrides])


def search_config(*overrides):
    return load_config(os.path.join(REPO, "configs/search-smoke.yaml"), list(overrides))


@pytest.fixture
def cores(monkeypatch):
    """Sets the machine's core count that ``os.cpu_count`` reports."""
    return lambda count: monkeypatch.setattr(capacity.os, "cpu_count", lambda: count)


def test_a_workers_request_names_what_it_asks_for_and_drops_zeros():
    assert capacity.worker_request(config().scaling) == {"CPU": 1.0}
    # gpus_per_worker counts only with use_gpu.
    assert capacity.worker_request(config("scaling.gpus_per_worker=2").scaling) == {"CPU": 1.0}
    assert capacity.worker_request(config("scaling.use_gpu=true", "scaling.gpus_per_worker=0.5").scaling) == {
        "CPU": 1.0, "GPU": 0.5}
    assert capacity.worker_request(config("scaling.cpus_per_worker=0", "scaling.custom_resources={spot: 1}",
                                           "scaling.use_gpu=true").scaling) == {"spot": 1, "GPU": 1.0}


def test_workers_are_placed_greedily_node_by_node():
    nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 4.0}]
    # One per GPU node; the third node has no GPU.
    assert capacity.workers_that_fit({"CPU": 1.0, "GPU": 1.0}, nodes, wanted=4) == 2
    # 3 CPUs each: two on each 8-CPU node (8 -> 5 -> 2), one on the 4-CPU node.
    assert capacity.workers_that_fit({"CPU": 3.0}, nodes, wanted=10) == 5
    assert capacity.workers_that_fit({"CPU": 1.0}, nodes, wanted=3) == 3  # never more than wanted
    assert capacity.workers_that_fit({"spot": 1}, nodes, wanted=1) == 0  # a resource no node has
    assert nodes[0] == {"CPU": 8.0, "GPU": 1.0}  # the nodes given are not used up


def test_an_elastic_run_takes_the_workers_the_cpus_hold_within_its_bounds():
    # A fixed-size run has its num_workers, whatever the CPUs.
    assert capacity.workers_per_run(config("scaling.num_workers=4").scaling, cpus=1.0) == 4
    elastic = config("scaling.num_workers=[1, 4]").scaling
    assert capacity.workers_per_run(elastic, cpus=3.0) == 3  # 3 CPUs // 1 per worker
    assert capacity.workers_per_run(elastic, cpus=9.0) == 4  # at most num_workers
    assert capacity.workers_per_run(elastic, cpus=4.0, runs=2) == 2  # 4 CPUs // (2 runs x 1)
    assert capacity.workers_per_run(config("scaling.num_workers=[3, 4]").scaling, cpus=4.0, runs=2) == 3  # its minimum
    assert capacity.workers_per_run(config("scaling.num_workers=[1, 4]", "scaling.cpus_per_worker=0.5").scaling,
                                    cpus=1.5) == 3  # 1.5 // 0.5
    # Workers that reserve no CPU are not limited by CPUs.
    assert capacity.workers_per_run(config("scaling.num_workers=[1, 4]", "scaling.cpus_per_worker=0").scaling,
                                    cpus=1.0) == 4


def test_concurrency_from_the_cluster_resources():
    config = search_config("scaling.num_workers=2", "train.global_batch_size=16")
    # Two CPUs stay with Ray Data's input tasks; each trial's 2 workers take one CPU each.
    assert capacity.concurrent_trials_that_fit(config, {"CPU": 10}) == 4
    assert capacity.concurrent_trials_that_fit(config, {"CPU": 2}) == 1  # never zero: trials queue
    gpus = search_config("scaling.use_gpu=true", "scaling.gpus_per_worker=1")
    assert capacity.concurrent_trials_that_fit(gpus, {"CPU": 64, "GPU": 4}) == 4
    assert capacity.concurrent_trials_that_fit(gpus, {"CPU": 64, "GPU": 0}) == 1


def test_the_scarcer_resource_bounds_the_trials_and_a_set_maximum_wins():
    both = search_config("scaling.num_workers=2", "train.global_batch_size=16", "scaling.use_gpu=true")
    # CPUs: (10 - 2) // 2 = 4 trials; GPUs: 8 // 2 = 4, then 4 // 2 = 2.
    assert capacity.concurrent_trials_that_fit(both, {"CPU": 10, "GPU": 8}) == 4
    assert capacity.concurrent_trials_that_fit(both, {"CPU": 10, "GPU": 4}) == 2
    # Workers that reserve nothing countable: one trial at a time.
    assert capacity.concurrent_trials_that_fit(search_config("scaling.cpus_per_worker=0"), {"CPU": 64}) == 1
    assert capacity.concurrent_trials(both, {"CPU": 10, "GPU": 4}) == 2
    assert capacity.concurrent_trials(search_config("tune.max_concurrent_trials=3"), {"CPU": 2}) == 3


def test_a_local_ray_has_the_workers_reservations_plus_the_ingest_cpus(cores):
    cores(2)
    # 1 trial x 2 workers x 1 CPU = 2, plus INGEST_CPUS = 2.
    assert capacity.local_cpus_for_training(config("scaling.num_workers=2")) == 4
    # 3 trials x 2 workers x 0.5 CPU = 3, plus 2.
    assert capacity.local_cpus_for_training(config("scaling.num_workers=2", "scaling.cpus_per_worker=0.5"),
                                            trials=3) == 5
    # 2 x 0.4 = 0.8 CPUs reserved round up to 1, plus 2.
    assert capacity.local_cpus_for_training(config("scaling.num_workers=2", "scaling.cpus_per_worker=0.4")) == 3
    cores(16)
    assert capacity.local_cpus_for_training(config("scaling.num_workers=2")) == 16  # never fewer than the cores


def test_a_local_ray_runs_one_trial_per_cores_worth_of_workers(cores):
    cores(8)
    assert capacity.local_trials(config("scaling.num_workers=2")) == 4  # 8 // 2
    # A worker counts as at least one core: 8 // (2 x 1).
    assert capacity.local_trials(config("scaling.num_workers=2", "scaling.cpus_per_worker=0.5")) == 4
    assert capacity.local_trials(config("scaling.num_workers=3")) == 2  # 8 // 3
    assert capacity.local_trials(config("tune.max_concurrent_trials=5")) == 5
    cores(2)
    assert capacity.local_trials(config("scaling.num_workers=4")) == 1  # 2 // 4 is 0: one trial at a time


def test_model_actors_that_leave_less_than_a_cpu_for_decoding_are_warned_about():
    two_actors = config("infer.num_actors=2").infer
    assert capacity.decode_cpu_warning(two_actors, cpus=2.0).startswith(
        "the model actors reserve 2 of the cluster's 2 CPUs (infer.num_actors x infer.cpus_per_actor)")
    assert capacity.decode_cpu_warning(two_actors, cpus=3.0) is None
    half = config("infer.num_actors=2", "infer.cpus_per_actor=0.5").infer
    assert capacity.decode_cpu_warning(half, cpus=2.0) is None  # 1 reserved, 1 left
    assert "reserve 1 of the cluster's 1.5 CPUs" in capacity.decode_cpu_warning(half, cpus=1.5)
