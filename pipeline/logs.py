"""One way to log: the standard ``logging`` module, a logger per module
(``log = logging.getLogger(__name__)``), and one handler on the ``pipeline`` logger that writes
``[stage] message`` lines to standard output, the stage named after the package the module is in:

    [preprocess] found image folder /data/pets: 7,390 image files in 37 classes (train 7390)
    [train] epoch 3/30: loss 1.2041, accuracy 0.5712, val_accuracy 0.5980, 412 images/s
    [infer] writing s3://bucket/predictions/

Standard output, as ``print`` was: the lines are the job's progress (``ray job logs -f``), and
Ray's own warnings keep stderr. The handler is installed when ``pipeline`` is imported, so every
process that runs our code gets it: the driver, and the Ray workers, actors and Tune trials that
import the package to unpickle a function (their output reaches the driver's log through Ray).
``PIPELINE_LOG_LEVEL`` (e.g. ``WARNING``) quiets it; an application that embeds the package can
remove the handler: ``logging.getLogger("pipeline").handlers.clear()``.
"""

from __future__ import annotations

import logging
import os
import sys

# Package prefix -> the stage name a person reads in the log.
STAGES = (
    ("pipeline.data", "preprocess"),
    ("pipeline.train", "train"),
    ("pipeline.tune", "tune"),
    ("pipeline.infer", "infer"),
)


def stage_of(logger_name: str) -> str:
    for prefix, stage in STAGES:
        if logger_name == prefix or logger_name.startswith(prefix + "."):
            return stage
    return "pipeline"


class StageFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"[{stage_of(record.name)}] {level}{message}"


class _StandardOutput(logging.StreamHandler):
    """A handler on whatever ``sys.stdout`` is when a record is written, not when the handler was
    made: a test's captured output, a redirected stream, a replaced worker stdout."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def install(level: int | None = None) -> logging.Logger:
    """Give the ``pipeline`` logger its handler (once per process) and level."""
    logger = logging.getLogger("pipeline")
    if not any(isinstance(handler, _StandardOutput) for handler in logger.handlers):
        handler = _StandardOutput()
        handler.setFormatter(StageFormatter())
        logger.addHandler(handler)
        # Not the root logger's too: Ray configures the root logger in its workers, and a line
        # would then be written twice.
        logger.propagate = False
    if level is None:
        level = logging.getLevelName(os.environ.get("PIPELINE_LOG_LEVEL", "INFO").strip().upper())
        level = level if isinstance(level, int) else logging.INFO  # an unknown name: not worth a crash
    logger.setLevel(level)
    return logger
