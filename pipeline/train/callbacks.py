"""Keras callbacks of the worker loop: each epoch's report to Ray Train (metrics, checkpoint,
divergence), progress lines inside long epochs, and TensorBoard logs copied to the run's storage.

All declare ``_supports_tf_logs``: they read no value on a step unless they need it, so Keras
passes its logs as tensors and the steps stay asynchronous on GPUs.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time

import numpy as np

import pipeline  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import ray.train
import ray.train.collective
import tf_keras as keras

from pipeline import storage
from pipeline.models.saving import write_checkpoint
from pipeline.train.history import write_history

log = logging.getLogger(__name__)


def current_learning_rate(optimizer) -> float:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    rate = inner.learning_rate
    if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
        rate = rate(inner.iterations)
    return float(rate.numpy() if hasattr(rate, "numpy") else rate)


class ReportToRayTrain(keras.callbacks.Callback):
    """Reports every epoch's metrics to Ray Train, with a checkpoint every N epochs.

    Ray's own ``ReportCheckpointCallback`` subclasses Keras 3's callback and breaks inside a
    tf-keras ``fit``; this one also carries the history and epoch counter inside the checkpoint.
    """

    def __init__(self, *, config, metadata, history, run_dir, rank, images_per_epoch, steps_per_epoch, precision,
                 workers=1, average: MovingAverage | None = None):
        super().__init__()
        # Batch hooks read no values, so Keras may pass its logs as tensors: without this flag it
        # converts them to numpy after every step, a host sync that serialises GPU execution.
        self._supports_tf_logs = True
        self.config, self.metadata, self.history, self.run_dir = config, metadata, history, run_dir
        self.rank, self.images_per_epoch, self.precision = rank, images_per_epoch, precision
        self.steps_per_epoch, self.workers = steps_per_epoch, workers
        self.average = average

    diverged = False
    first_step = 0  # steps of the current epoch done before a restart (see CheckpointInsideEpochs)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start, self.train_seconds = time.perf_counter(), None
        self.epoch_images = self.images_per_epoch * (1 - self.first_step / self.steps_per_epoch)
        self.first_batch_end, self.last_batch_end, self.batches = None, None, 0
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        # Steady-state speed leaves out the epoch's first step (the input pipeline starting up,
        # and graph tracing in the first epoch): on short epochs that start-up hides the speed.
        self.last_batch_end = time.perf_counter()
        self.batches += 1
        if self.first_batch_end is None:
            self.first_batch_end = self.last_batch_end
        # The epoch's running loss after each step, kept as it comes (a tensor: no host sync) and
        # read only if the epoch diverges, to name the step where it stopped being finite.
        self.losses.append((batch + 1, (logs or {}).get("loss")))

    def first_non_finite_step(self):
        return next((step for step, loss in self.losses if loss is not None and not np.isfinite(float(loss))), None)

    def steady_images_per_second(self):
        if self.batches < 2 or self.last_batch_end <= self.first_batch_end:
            return None
        per_batch = self.epoch_images / self.batches
        return round((self.batches - 1) * per_batch / (self.last_batch_end - self.first_batch_end), 2)

    def on_test_begin(self, logs=None):
        if self.train_seconds is None:  # validation inside fit starts: training part of the epoch ends
            self.train_seconds = time.perf_counter() - self.epoch_start

    def on_epoch_end(self, epoch, logs=None):
        train_seconds = self.train_seconds or (time.perf_counter() - self.epoch_start)
        row = {"epoch": epoch + 1, **{key: float(value) for key, value in (logs or {}).items()},
               "lr": current_learning_rate(self.model.optimizer),
               "train_seconds": round(train_seconds, 3),
               "epoch_seconds": round(time.perf_counter() - self.epoch_start, 3),
               "images_per_second": round(self.epoch_images / train_seconds, 2),
               "steady_images_per_second": self.steady_images_per_second(),
               "precision": self.precision, "workers": self.workers}
        if self.first_step:
            row["resumed_at_step"] = self.first_step  # the metrics are of the steps after it
        # Decided from the weights, which are identical on every worker after the all-reduce, so
        # all workers stop at the same epoch without a collective (a loss differs per worker, and
        # under fp16 loss scaling a non-finite loss only skips a step).
        self.diverged = not all(np.isfinite(variable.numpy()).all() for variable in self.model.trainable_variables)
        if self.diverged:
            row["diverged"] = True
            row["diverged_step"] = self.first_non_finite_step()
            row["steps"] = self.batches
        self.history.append(row)
        last = epoch + 1 == self.config.train.epochs
        if self.rank == 0:
            write_history(self.history, self.run_dir)
        if self.diverged:
            self.model.stop_training = True
            return  # no report and no checkpoint of NaN weights; the run ends after this epoch
        if not (last or (epoch + 1) % self.config.train.checkpoint_every_epochs == 0):
            ray.train.report(numeric(row))
            return
        self.report_checkpoint(numeric(row), {"epoch": epoch + 1})

    def report_checkpoint(self, metrics: dict, position: dict) -> None:
        """Every worker writes (a MirroredStrategy save may involve all replicas); only rank 0's
        copy is handed to Ray Train, which uploads it to the run's storage before returning.
        ``position``: the epochs done and, inside an epoch, the steps done of the next one."""
        if self.average is not None:
            self.average.catch_up()
        with tempfile.TemporaryDirectory(prefix="checkpoint-") as directory:
            write_checkpoint(directory, model=self.model, optimizer=self.model.optimizer,
                             average=None if self.average is None else self.average.weights,
                             state={**position, "history": self.history,
                                    "run": os.path.basename(self.run_dir.rstrip("/"))},
                             metadata=self.metadata)
            checkpoint = ray.train.Checkpoint.from_directory(directory) if self.rank == 0 else None
            ray.train.report(metrics, checkpoint=checkpoint)


class MovingAverage(keras.callbacks.Callback):
    """An exponential moving average of the weights (``train.ema_momentum`` per optimizer step):
    the model each epoch's validation sees, checkpoints carry and the run evaluates and exports.

    Kept in numpy on the host and updated every ``EVERY_STEPS`` steps with ``momentum ** steps``:
    reading the weights copies them off the device, and BatchNorm's statistics (averaged with the
    rest, as timm's ModelEmaV2 does) are an all-reduce to read; every worker updates at the same
    steps. Early on the momentum is ``min(momentum, (1 + n) / (10 + n))`` after n steps (the
    ``num_updates`` rule of tf.train.ExponentialMovingAverage), so the average forgets the random
    initial weights quickly."""

    EVERY_STEPS = 5

    def __init__(self, momentum: float, *, steps_per_epoch: int, weights: list | None = None):
        super().__init__()
        self._supports_tf_logs = True
        self.momentum, self.steps_per_epoch = momentum, steps_per_epoch
        self.weights = weights  # float32 arrays in model.get_weights() order; None before the first update
        self.first_step = 0  # steps of the current epoch done before this fit (a resumed epoch)
        self.updated_at = self.seen = None  # total optimizer steps the average includes / trained so far
        self._trained = None  # the trained weights while validation runs on the average

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        # Once per steps_per_execution steps: counted as steps since the last update, like CheckpointInsideEpochs.
        self.seen = self.epoch * self.steps_per_epoch + self.first_step + batch + 1
        if self.updated_at is None:
            self.updated_at = self.seen - batch - 1  # where this attempt started
        if self.seen - self.updated_at >= self.EVERY_STEPS:
            self.catch_up()

    def catch_up(self) -> None:
        """Take the steps trained since the last update into the average (every worker alike)."""
        if self.seen is None or self.seen == self.updated_at:
            return
        steps, self.updated_at = self.seen - self.updated_at, self.seen
        current = self.model.get_weights()
        if self.weights is None:
            self.weights = [np.array(value, dtype=np.float32) for value in current]
            return
        kept = min(self.momentum, (1 + self.seen) / (10 + self.seen)) ** steps
        for average, value in zip(self.weights, current):
            average *= kept
            average += (1 - kept) * value

    def on_test_begin(self, logs=None):
        # Validation inside fit runs on the average; the trained weights go back for the next epoch.
        self.catch_up()
        if self.weights is not None:
            self._trained = self.model.get_weights()
            self.model.set_weights(self.weights)

    def on_test_end(self, logs=None):
        if self._trained is not None:
            self.model.set_weights(self._trained)
            self._trained = None


class CheckpointInsideEpochs(keras.callbacks.Callback):
    """Checkpoints inside an epoch that resume at their step: every ``every_steps`` steps, and when
    Ray Train says a node of the run is being reclaimed (``ray.train.get_preemption_info``, asked
    every ``check_steps`` steps: a barrier, so every worker asks at the same steps). On a notice the
    checkpoint is written at once, and again once the deadline is near (the worker group is torn
    down at the deadline: what was trained after the last checkpoint is trained again). The restart
    is a preemption, not a failure (``train.max_preemptions``)."""

    def __init__(self, reporter: ReportToRayTrain, *, steps_per_epoch: int, every_steps: int, check_steps: int,
                 score_key: str, clock=time.time):
        super().__init__()
        self._supports_tf_logs = True
        self.reporter, self.steps_per_epoch = reporter, steps_per_epoch
        self.every_steps, self.check_steps, self.score_key, self.clock = every_steps, check_steps, score_key, clock
        self.first_step = 0  # steps of the current epoch done before this fit (a resumed epoch)
        self.last_saved = self.last_asked = None  # total steps at the last checkpoint / question
        self.notice, self.saved_for_notice, self.saved_before_deadline = None, False, False
        self.checkpoint_seconds = 0.0  # the longest checkpoint so far: how early "near the deadline" is

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        # Keras calls this once per steps_per_execution steps (16 on GPUs), so intervals are counted
        # as steps since the last time, not as multiples; every worker counts alike.
        step = self.first_step + batch + 1
        total = self.epoch * self.steps_per_epoch + step
        if self.last_saved is None:
            self.last_saved = self.last_asked = total - batch - 1  # where this attempt started
        if step >= self.steps_per_epoch:
            return  # the epoch's own checkpoint follows
        reason = None
        if self.every_steps and total - self.last_saved >= self.every_steps:
            reason = "interval"
        if self.check_steps and total - self.last_asked >= self.check_steps:
            self.last_asked = total
            reason = self.preemption_reason() or reason
        if reason:
            self.last_saved = total
            self.checkpoint(step, reason)

    def preemption_reason(self):
        info = ray.train.get_preemption_info()  # rank 0's answer, on every worker
        if info is None:
            return None
        if self.notice is None:
            self.notice = info
            log.warning(f"nodes {', '.join(info.preempted_node_ids)} (ranks {info.preempted_ranks}) are being "
                        f"reclaimed{self._deadline_text(info)}: checkpointing inside epoch {self.epoch + 1}")
        if not self.saved_for_notice:
            self.saved_for_notice = True
            return "preemption"
        if self.saved_before_deadline or info.deadline_ms is None:
            return None
        # Rank 0 decides (by its clock and how long its checkpoints take, upload included) for every
        # worker: workers that decided apart would meet in different collectives and fail.
        left = info.deadline_ms / 1000 - self.clock()
        if ray.train.collective.broadcast_from_rank_zero(left < 2 * self.checkpoint_seconds + 5):
            self.saved_before_deadline = True
            return "preemption deadline"
        return None

    def _deadline_text(self, info) -> str:
        return "" if info.deadline_ms is None else f" in {info.deadline_ms / 1000 - self.clock():.0f} s"

    def checkpoint(self, step: int, reason: str) -> None:
        started = time.perf_counter()
        # The score Ray Train ranks checkpoints by, lowest: a checkpoint inside an epoch is kept as
        # the latest, never as the best.
        metrics = {"epoch_progress": self.epoch + step / self.steps_per_epoch, self.score_key: float("-inf")}
        self.reporter.report_checkpoint(metrics, {"epoch": self.epoch, "step": step})
        seconds = time.perf_counter() - started
        self.checkpoint_seconds = max(self.checkpoint_seconds, seconds)
        log.info(f"checkpoint at epoch {self.epoch + 1} step {step}/{self.steps_per_epoch} ({reason}, {seconds:.1f} s)")


class StallWatchdog(keras.callbacks.Callback):
    """Ends this worker's process when training makes no progress for ``timeout`` seconds.

    A worker that hangs alive (a storage call on a black-holed connection, a stuck NFS read) holds
    itself and the other workers forever: nothing times out a call in a live process, TensorFlow's
    collectives and Ray's barriers have no deadline, and the health checks see live processes.
    Every step and epoch boundary beats (a checkpoint ends with one); a thread checks, from the
    first epoch's start until ``disarm``. A worker that exits is a worker failure to Ray Train,
    which restarts the attempt from the latest checkpoint."""

    def __init__(self, timeout: float, *, clock=time.monotonic, end=None):
        super().__init__()
        self._supports_tf_logs = True
        self.timeout, self.clock, self.end = timeout, clock, end or _end_process
        self.last, self.armed = clock(), False
        self.stop = threading.Event()
        self.thread = None

    def beat(self, *args, **kwargs):
        self.last = self.clock()

    on_train_batch_end = on_test_batch_end = on_epoch_begin = on_epoch_end = beat

    def on_train_begin(self, logs=None):
        self.beat()
        self.armed = True
        if self.timeout and self.thread is None:
            self.thread = threading.Thread(target=self.watch, name="stall-watchdog", daemon=True)
            self.thread.start()

    def disarm(self):
        """After the last epoch: evaluation and export take as long as they take."""
        self.armed = False
        self.stop.set()

    def watch(self, interval: float | None = None):
        interval = interval or min(10.0, self.timeout / 4)
        while not self.stop.wait(interval):
            if self.stalled():
                log.error(f"no training step finished for {self.clock() - self.last:.0f} s "
                          f"(train.stall_timeout_seconds={self.timeout:g}): a peer is stopped or hung; ending this "
                          f"worker so that Ray Train restarts the attempt from the latest checkpoint")
                self.end()
                return

    def stalled(self) -> bool:
        return self.armed and self.clock() - self.last > self.timeout


def _end_process():
    logging.shutdown()
    os._exit(75)  # EX_TEMPFAIL: a worker failure to Ray Train, retried under train.max_failures


class ProgressLog(keras.callbacks.Callback):
    """A line every ``interval`` seconds inside an epoch: on a CPU an epoch can take half an hour,
    and Keras' own progress bar is either per epoch (verbose=2) or a carriage-return bar that
    floods Ray's log files (verbose=1)."""

    def __init__(self, epochs: int, steps: int, global_batch: int, interval: float, clock=time.perf_counter):
        super().__init__()
        self.epochs, self.steps, self.global_batch, self.interval, self.clock = (
            epochs, steps, global_batch, interval, clock)
        self._supports_tf_logs = True  # values are read (a host sync) only when a line is due

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.epoch_start = self.last_line = self.clock()

    first_step = 0  # steps of the current epoch done before a restart

    def on_train_batch_end(self, batch, logs=None):
        now = self.clock()
        done = self.first_step + batch + 1
        if now - self.last_line < self.interval or done >= self.steps:
            return
        self.last_line = now
        elapsed = now - self.epoch_start
        speed = (batch + 1) * self.global_batch / elapsed
        left = (self.steps - done) * elapsed / (batch + 1)
        values = " ".join(f"{key}={float(value):.4f}" for key, value in (logs or {}).items())
        log.info(f"epoch {self.epoch + 1}/{self.epochs} step {done}/{self.steps} {values} "
                 f"{speed:.1f} images/s, epoch ends in {left:.0f} s")


def numeric(row: dict) -> dict:
    return {key: value for key, value in row.items() if isinstance(value, (int, float))}


class TensorBoardToStorage(keras.callbacks.TensorBoard):
    """Keras' TensorBoard logs, written locally and copied to the run's storage (maybe s3://)
    after every epoch, since TensorFlow itself no longer writes to object stores."""

    def __init__(self, target: str):
        self.local = tempfile.mkdtemp(prefix="tensorboard-")
        self.target = target
        super().__init__(log_dir=self.local, write_graph=False, profile_batch=0)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        for writer in self._writers.values():
            writer.flush()
        storage.upload_dir(self.local, self.target)
