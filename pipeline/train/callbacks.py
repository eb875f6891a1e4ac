"""Keras callbacks of the worker loop: each epoch's report to Ray Train (metrics, checkpoint,
divergence), progress lines inside long epochs, and TensorBoard logs copied to the run's storage.

All declare ``_supports_tf_logs``: they read no value on a step unless they need it, so Keras
passes its logs as tensors and the steps stay asynchronous on GPUs.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import numpy as np

import pipeline  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import ray.train
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

    def __init__(self, *, config, metadata, history, run_dir, rank, images_per_epoch, precision):
        super().__init__()
        # Batch hooks read no values, so Keras may pass its logs as tensors: without this flag it
        # converts them to numpy after every step, a host sync that serialises GPU execution.
        self._supports_tf_logs = True
        self.config, self.metadata, self.history, self.run_dir = config, metadata, history, run_dir
        self.rank, self.images_per_epoch, self.precision = rank, images_per_epoch, precision

    diverged = False

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start, self.train_seconds = time.perf_counter(), None
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
        per_batch = self.images_per_epoch / self.batches
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
               "images_per_second": round(self.images_per_epoch / train_seconds, 2),
               "steady_images_per_second": self.steady_images_per_second(),
               "precision": self.precision}
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
        with tempfile.TemporaryDirectory(prefix="checkpoint-") as directory:
            # Every worker writes (a MirroredStrategy save may involve all replicas); only rank 0's
            # copy is handed to Ray Train, which uploads it to the run's storage before returning.
            write_checkpoint(directory, model=self.model, optimizer=self.model.optimizer,
                             state={"epoch": epoch + 1, "history": self.history,
                                    "run": os.path.basename(self.run_dir.rstrip("/"))},
                             metadata=self.metadata)
            checkpoint = ray.train.Checkpoint.from_directory(directory) if self.rank == 0 else None
            ray.train.report(numeric(row), checkpoint=checkpoint)


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

    def on_train_batch_end(self, batch, logs=None):
        now = self.clock()
        if now - self.last_line < self.interval or batch + 1 >= self.steps:
            return
        self.last_line = now
        done, elapsed = batch + 1, now - self.epoch_start
        speed = done * self.global_batch / elapsed
        left = (self.steps - done) * elapsed / done
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
