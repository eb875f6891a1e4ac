"""Progress lines inside a long epoch (how often, and what they say), the stall watchdog, and the
moving average of the weights."""

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


def test_validation_sees_the_moving_average_and_training_goes_on_from_its_own_weights():
    # One epoch of 12 steps on a small dense model: the average takes the weights in at steps 5 and
    # 10 (every 5 steps, momentum ** steps, lower early on), and the last 2 steps before validation.
    import numpy as np
    import tf_keras as keras

    from pipeline.train.callbacks import MovingAverage

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(48, 6)).astype(np.float32), rng.normal(size=(48, 2)).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="relu"),
                              keras.layers.BatchNormalization(), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    trained = {}
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: trained.update(
        {batch + 1: model.get_weights()}))
    average = MovingAverage(0.9, steps_per_epoch=12)
    seen = {}
    spy = keras.callbacks.LambdaCallback(on_test_begin=lambda logs: seen.update(weights=model.get_weights()))
    logs = model.fit(x, y, batch_size=4, shuffle=False, epochs=1, validation_data=(x[:8], y[:8]),
                     callbacks=[average, record, spy], verbose=0).history

    expected = [np.array(value) for value in trained[5]]
    for step, steps in ((10, 5), (12, 2)):
        kept = min(0.9, (1 + step) / (10 + step)) ** steps
        expected = [kept * mean + (1 - kept) * value for mean, value in zip(expected, trained[step])]
    for mine, theirs in zip(average.weights, expected):
        np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-7)
    # Validation ran on the average (BatchNorm's statistics averaged too) ...
    for mine, theirs in zip(seen["weights"], expected):
        np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-7)
    checked = keras.models.clone_model(model)
    checked.set_weights(expected)
    checked.compile(loss="mse")
    np.testing.assert_allclose(logs["val_loss"][0], checked.evaluate(x[:8], y[:8], verbose=0), rtol=1e-5)
    # ... and the model holds its trained weights again afterwards, which differ from the average.
    for mine, theirs in zip(model.get_weights(), trained[12]):
        np.testing.assert_array_equal(mine, theirs)
    assert not np.allclose(trained[12][0], expected[0])
