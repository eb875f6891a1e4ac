"""Preemption without Ray: the clouds' reclaim notices read from a metadata server on 127.0.0.1,
and when the training loop checkpoints inside an epoch. The drain on real Ray nodes and a
training run that survives it: test_spot.py."""

import time

import pytest

import pipeline.train.callbacks as callbacks
from pipeline import InputError
from pipeline.preemption import GCP_NOTICE_SECONDS, AwsSpotNotice, GcpPreemptedNotice, watch

from metadata_server import metadata_server


def test_aws_spot_notice_uses_a_session_token_and_reads_the_reclaim_time():
    with metadata_server() as (url, state):
        notice = AwsSpotNotice(url)
        assert notice() is None  # 404: nothing scheduled
        deadline = int(time.time()) + 120
        state.announce(deadline)
        found = notice()
        assert found.deadline == deadline and "terminate" in found.reason
        # IMDSv2: one token for many reads; a revoked token is replaced.
        assert state.requests.count("PUT /latest/api/token") == 1
        state.token = "rotated"
        assert notice() is None  # 401 with the old token
        assert notice().deadline == deadline
        assert state.requests.count("PUT /latest/api/token") == 2


def test_gcp_preempted_gives_thirty_seconds_from_when_it_was_first_seen():
    now = [1000.0]
    with metadata_server() as (url, state):
        notice = GcpPreemptedNotice(url, clock=lambda: now[0])
        assert notice() is None
        state.announce(0)
        assert notice().deadline == 1000.0 + GCP_NOTICE_SECONDS
        now[0] += 10
        assert notice().deadline == 1000.0 + GCP_NOTICE_SECONDS  # the same reclaim, the same deadline


def test_watcher_refuses_an_unknown_cloud_before_asking_anything():
    with pytest.raises(InputError, match="--cloud 'azure': one of aws, gcp"):
        watch("127.0.0.1:1", "azure")


class FakeTrain:
    """What CheckpointInsideEpochs asks of ray.train, for one worker: the preemption notice appears
    at a given step, rank 0's clock is the test's."""

    class Info:
        def __init__(self, deadline_ms):
            self.deadline_ms, self.preempted_node_ids, self.preempted_ranks = deadline_ms, ["node-b"], [1]

    def __init__(self, notice_at_step: int | None, deadline: float, clock):
        self.notice_at_step, self.deadline, self.clock, self.step, self.asked = notice_at_step, deadline, clock, 0, []

    def get_preemption_info(self):
        self.asked.append(self.step)
        if self.notice_at_step is not None and self.step >= self.notice_at_step:
            return self.Info(self.deadline * 1000)
        return None


class Reporter:
    def __init__(self):
        self.reports = []

    def report_checkpoint(self, metrics, position):
        self.reports.append((metrics, position))


def run_epochs(monkeypatch, *, epochs=2, steps=20, every=0, check=1, notice_at=None, seconds_per_step=1.0,
               deadline_after=10.0, steps_per_execution=1):
    now = [0.0]
    fake = FakeTrain(notice_at, deadline=(notice_at or 0) * seconds_per_step + deadline_after, clock=lambda: now[0])
    monkeypatch.setattr(callbacks.ray.train, "get_preemption_info", fake.get_preemption_info)
    monkeypatch.setattr(callbacks.ray.train.collective, "broadcast_from_rank_zero", lambda value: value)
    reporter = Reporter()
    inside = callbacks.CheckpointInsideEpochs(reporter, steps_per_epoch=steps, every_steps=every, check_steps=check,
                                             score_key="val_accuracy", clock=lambda: now[0])
    for epoch in range(epochs):
        inside.on_epoch_begin(epoch)
        # Keras calls the batch hook once per steps_per_execution steps, with the last step's index.
        for batch in range(steps_per_execution - 1, steps, steps_per_execution):
            fake.step = epoch * steps + batch + 1
            now[0] = fake.step * seconds_per_step
            inside.on_train_batch_end(batch)
    return reporter.reports, fake


def test_no_notice_no_interval_no_checkpoint_inside_an_epoch(monkeypatch):
    reports, fake = run_epochs(monkeypatch, check=4)
    assert reports == []
    # Every 4 steps, counted across epochs; not at an epoch's last step (its own checkpoint follows).
    assert fake.asked == [4, 8, 12, 16, 21, 25, 29, 33, 37]


def test_every_n_steps_counts_across_epochs_and_leaves_epoch_ends_to_the_epoch(monkeypatch):
    reports, _ = run_epochs(monkeypatch, every=15, check=0)
    assert [position for _, position in reports] == [{"epoch": 0, "step": 15}, {"epoch": 1, "step": 10}]
    metrics = reports[0][0]
    # Never the best by score, never taken for an epoch's report.
    assert metrics["val_accuracy"] == float("-inf") and "epoch" not in metrics and metrics["epoch_progress"] == 0.75


def test_a_notice_checkpoints_at_once_and_again_just_before_the_deadline(monkeypatch):
    # Notice seen at step 5, deadline 10 s (steps) later; a checkpoint takes almost no time here,
    # so the second one is due once 5 s (plus twice that time) are left: at step 10.
    reports, _ = run_epochs(monkeypatch, notice_at=5, deadline_after=10.0, epochs=1, steps=40)
    assert [position["step"] for _, position in reports] == [5, 10]
    assert all(position["epoch"] == 0 for _, position in reports)


def test_intervals_hold_when_keras_calls_once_per_many_steps(monkeypatch):
    # steps_per_execution 16 (GPUs): hooks at steps 16, 32, ...; every 100 steps means the first
    # hook at least 100 steps after the last checkpoint, not only multiples of both.
    reports, fake = run_epochs(monkeypatch, epochs=1, steps=400, every=100, check=40, steps_per_execution=16)
    assert [position["step"] for _, position in reports] == [112, 224, 336]
    assert fake.asked[:3] == [48, 96, 144]
