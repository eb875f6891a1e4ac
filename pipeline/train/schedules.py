"""Learning-rate schedules as functions of the optimizer step.

A schedule is rebuilt from the config on every (re)start and reads only ``optimizer.iterations``,
which is saved in every checkpoint: a resumed run therefore continues at exactly the rate an
uninterrupted run would have had at that step.
"""

from __future__ import annotations

import math

import pipeline  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf
import tf_keras as keras

from pipeline.config import TrainConfig


class EpochSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """constant | step | cosine | onecycle, each with an optional linear warm-up from 0.

    * constant: ``peak`` throughout (the original recipe).
    * step:     ``peak x gamma^k`` after the k-th epoch listed in ``step_epochs``.
    * cosine:   half a cosine from ``peak`` to ``peak x final_fraction`` after warm-up.
    * onecycle: linear up to ``peak`` over the warm-up, then linear down to ``peak x final_fraction``
      (Smith & Topin's one-cycle policy, as used by fast CIFAR recipes).
    """

    def __init__(self, kind: str, peak: float, steps_per_epoch: int, epochs: int, warmup_epochs: float = 0.0,
                 step_epochs=(), gamma: float = 0.1, final_fraction: float = 0.0):
        self.kind, self.peak, self.steps_per_epoch, self.epochs = kind, float(peak), int(steps_per_epoch), int(epochs)
        self.warmup_epochs, self.step_epochs, self.gamma = float(warmup_epochs), list(step_epochs), float(gamma)
        self.final_fraction = float(final_fraction)

    def rate_at_epoch(self, epoch):
        """Rate at a fractional epoch (a float tensor or number)."""
        epoch = tf.cast(epoch, tf.float32)
        peak, final = self.peak, self.peak * self.final_fraction
        warmup = self.warmup_epochs
        # Progress through the part after warm-up, in [0, 1].
        progress = tf.clip_by_value((epoch - warmup) / max(self.epochs - warmup, 1e-9), 0.0, 1.0)
        if self.kind == "constant":
            rate = tf.constant(peak)
        elif self.kind == "step":
            drops = tf.add_n([tf.cast(epoch >= e, tf.float32) for e in self.step_epochs]) if self.step_epochs else 0.0
            rate = peak * tf.pow(self.gamma, drops)
        elif self.kind == "cosine":
            rate = final + (peak - final) * 0.5 * (1.0 + tf.cos(math.pi * progress))
        elif self.kind == "onecycle":
            rate = peak + (final - peak) * progress
        else:
            raise ValueError(f"unknown learning-rate schedule '{self.kind}'")
        if warmup > 0:
            rate = tf.where(epoch < warmup, peak * epoch / warmup, rate)
        return rate

    def __call__(self, step):
        # The rate for step s is taken at the middle of that step's epoch fraction.
        return self.rate_at_epoch((tf.cast(step, tf.float32) + 0.5) / self.steps_per_epoch)

    def get_config(self):
        return {"kind": self.kind, "peak": self.peak, "steps_per_epoch": self.steps_per_epoch, "epochs": self.epochs,
                "warmup_epochs": self.warmup_epochs, "step_epochs": self.step_epochs, "gamma": self.gamma,
                "final_fraction": self.final_fraction}


def schedule_from_config(train: TrainConfig, peak: float, steps_per_epoch: int) -> EpochSchedule:
    return EpochSchedule(train.lr_schedule, peak, steps_per_epoch, train.epochs, train.warmup_epochs,
                         train.step_epochs, train.step_gamma, train.final_lr_fraction)
