"""Progress lines inside a long epoch (how often, and what they say), and the stall watchdog."""

from pipeline.train.callbacks import ProgressLog


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_lines_at_the_interval_with_speed_and_time_left(capsys):
    clock = FakeClock()
    progress = ProgressLog(epochs=3, steps=100, global_batch=50, interval=30, clock=clock)
    progress.on_epoch_begin(1)
    for batch in range(100):
        clock.now += 2.0  # 2 s per step of 50 images: 25 images/s
        progress.on_train_batch_end(batch, {"loss": 1.23456, "accuracy": 0.5})
    lines = capsys.readouterr().out.splitlines()
    # a line every 15 steps (30 s), none for the last step (the epoch's own summary follows)
    assert [line.split(" ")[4] for line in lines] == [f"{step}/100" for step in range(15, 100, 15)]
    assert lines[0] == ("[train] epoch 2/3 step 15/100 loss=1.2346 accuracy=0.5000 25.0 images/s, "
                        "epoch ends in 170 s")


def test_quiet_when_steps_are_faster_than_the_interval(capsys):
    clock = FakeClock()
    progress = ProgressLog(epochs=1, steps=10, global_batch=8, interval=30, clock=clock)
    progress.on_epoch_begin(0)
    for batch in range(10):
        clock.now += 1.0
        progress.on_train_batch_end(batch, {})
    assert capsys.readouterr().out == ""


def test_the_watchdog_ends_a_worker_whose_training_stalls(monkeypatch):
    from pipeline.train.callbacks import StallWatchdog

    monkeypatch.setattr(StallWatchdog, "on_train_begin", lambda self, logs=None: (self.beat(), setattr(self, "armed", True)))
    now, ended = [0.0], []
    dog = StallWatchdog(30.0, clock=lambda: now[0], end=lambda: ended.append(now[0]))
    now[0] = 100.0
    assert not dog.stalled()  # not armed before the first epoch starts (start-up takes as long as it takes)
    dog.on_train_begin()
    for _ in range(3):  # steps of 20 s each: slow, not stalled
        now[0] += 20.0
        dog.on_train_batch_end(0)
    assert not dog.stalled()
    now[0] += 31.0  # a peer stopped: no step ends
    assert dog.stalled()
    dog.watch(interval=0.001)
    assert ended == [now[0]]
    dog.disarm()  # after training: evaluation and export are not watched
    now[0] += 1000.0
    assert not dog.stalled()
