"""Plots shared by train, tune and infer: learning curves, an image grid, a confusion matrix.

Figures are built with matplotlib's object-oriented API (``matplotlib.figure.Figure``) and
rendered to PNG by the Agg rasteriser; pyplot is never imported here, so nothing opens a window,
the caller's backend is left alone, and no figure lingers in pyplot's global registry. Every PNG
goes through ``write_png`` and therefore ``pipeline.storage``: output paths may be local or
s3:// / gs:// URIs.
"""

from __future__ import annotations

import io
import math
import sys
from typing import Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter

from pipeline import storage

# (file stem, history key of the training curve, plot title, y-axis label). Validation curves use
# Keras' "val_" prefix. The file names match the original write-up's three plots.
HISTORY_PLOTS = (
    ("loss", "loss", "Loss", "cross-entropy loss"),
    ("accuracy", "accuracy", "Top-1 accuracy", "accuracy"),
    ("top5_accuracy", "top5_accuracy", "Top-5 accuracy", "top-5 accuracy"),
)

GRID_IMAGES = 25  # the original checks loading with a 5x5 grid of the first 25 training images
ANNOTATE_MAX_CLASSES = 20  # beyond this, per-cell count labels overlap and become unreadable
TICK_LABELS_MAX_CLASSES = 50


def write_png(figure: Figure, path: str, *, dpi: int = 100) -> str:
    """Render ``figure`` to PNG at ``path`` (local or URI, written atomically) and close it."""
    try:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        _close(figure)
    storage.write_bytes(path, buffer.getvalue())
    return path


def plot_history(history: dict[str, list[float]], output_dir: str) -> list[str]:
    """Train vs validation curves per epoch: loss.png, accuracy.png, top5_accuracy.png.

    ``history`` is Keras' ``History.history`` (optionally with ``epoch`` and ``lr``). A curve whose
    key is absent is left out, and a plot with neither curve is not written. The x axis uses
    ``history["epoch"]`` as recorded when it has one entry per value, else 1, 2, 3, ...
    Returns the paths written.
    """
    written = []
    for file_stem, key, title, y_label in HISTORY_PLOTS:
        curves = [(label, history[name]) for label, name in (("train", key), ("validation", f"val_{key}"))
                  if history.get(name) is not None and len(history[name]) > 0]
        if not curves:
            continue
        figure = Figure(figsize=(6.4, 4.4))
        axes = figure.add_subplot()
        for label, values in curves:
            values = np.asarray(values, dtype=np.float64)
            axes.plot(_epochs(history, len(values)), values, marker="o" if len(values) <= 30 else None,
                      markersize=3, label=label)
        finite = np.concatenate([np.asarray(values, dtype=np.float64) for _, values in curves])
        finite = finite[np.isfinite(finite)]
        if file_stem == "loss" and finite.size and np.all(finite > 0):
            # Training loss falls by orders of magnitude when a model overfits (the original
            # ends at 3e-5 against 0.97 on validation); a linear axis would flatten it to zero.
            axes.set_yscale("log")
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.set_ylabel(y_label)
        axes.grid(True, alpha=0.3)
        axes.legend()
        written.append(write_png(figure, storage.join(output_dir, f"{file_stem}.png")))
    return written


def plot_image_grid(images: np.ndarray, labels, class_names: Sequence[str], path: str,
                    columns: int = 5) -> str:
    """The first 25 images, ``columns`` per row, each titled with its class name.

    ``images`` is (N, H, W, 3) uint8; ``labels`` are integer class ids, shape (N,) or (N, 1)
    (as ``keras.datasets.cifar10.load_data`` returns them).
    """
    images = np.asarray(images)
    labels = np.asarray(labels).reshape(-1)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape (N, height, width, 3), got {images.shape}")
    if len(labels) != len(images):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    count = min(len(images), GRID_IMAGES)
    if count == 0:
        raise ValueError("no images to plot")
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(2.0 * columns, 2.2 * rows))
    for index in range(count):
        axes = figure.add_subplot(rows, columns, index + 1)
        axes.imshow(images[index])
        axes.set_title(_class_name(labels[index], class_names), fontsize=10)
        axes.set_xticks([])
        axes.set_yticks([])
    return write_png(figure, path)


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: str,
                          normalize: bool = True) -> str:
    """Rows are true classes, columns predicted ones.

    With ``normalize`` the colours show each row as fractions of that class's examples (so the
    diagonal is per-class recall, comparable across unbalanced classes); the cells are annotated
    with the raw counts when there are at most 20 classes.
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"matrix must be square (classes x classes), got shape {matrix.shape}")
    class_count = matrix.shape[0]
    if len(class_names) != class_count:
        raise ValueError(f"matrix has {class_count} classes but {len(class_names)} class names were given")
    if normalize:
        row_totals = matrix.sum(axis=1, keepdims=True)
        # A class absent from the evaluation set has an all-zero row: show zeros, not NaN.
        shown = np.divide(matrix, row_totals, out=np.zeros(matrix.shape, dtype=np.float64),
                          where=row_totals > 0)
    else:
        shown = matrix.astype(np.float64)

    side = max(5.0, 0.45 * class_count + 2.0)
    figure = Figure(figsize=(side + 1.0, side))
    axes = figure.add_subplot()
    image = axes.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04,
                    label="fraction of the true class" if normalize else "count")
    axes.set_title("Confusion matrix" + (" (rows normalised)" if normalize else ""))
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    if class_count <= TICK_LABELS_MAX_CLASSES:
        axes.set_xticks(range(class_count), labels=list(class_names), rotation=45, ha="right")
        axes.set_yticks(range(class_count), labels=list(class_names))
    if class_count <= ANNOTATE_MAX_CLASSES:
        threshold = (shown.max() if shown.size else 0.0) / 2.0
        for row in range(class_count):
            for column in range(class_count):
                axes.text(column, row, f"{int(matrix[row, column])}", ha="center", va="center", fontsize=8,
                          color="white" if shown[row, column] > threshold else "black")
    return write_png(figure, path)


def plot_trial_curves(curves: dict[str, list[tuple[int, float]]], metric: str, path: str) -> str:
    """One line per search trial: ``metric`` per epoch. Trials a scheduler stopped early end
    early on the chart; the legend is left out beyond 12 trials, where it would hide the lines."""
    figure = Figure(figsize=(7.2, 4.6))
    axes = figure.add_subplot()
    for trial, points in sorted(curves.items()):
        epochs, values = zip(*points) if points else ((), ())
        axes.plot(epochs, values, marker="o", markersize=3, linewidth=1.2, label=trial)
    axes.set_title(f"{metric} per epoch, every trial")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch")
    axes.set_ylabel(metric)
    axes.grid(True, alpha=0.3)
    if 0 < len(curves) <= 12:
        axes.legend(fontsize=7, loc="best")
    return write_png(figure, path)


def plot_parameters(points: list[dict], dimensions, metric: str, path: str) -> str:
    """One panel per searched key: each trial's value of it against its best ``metric``. A
    log-uniform key gets a log axis; choices and grids are placed at evenly spaced positions."""
    columns = min(3, max(1, len(dimensions)))
    rows = math.ceil(len(dimensions) / columns)
    figure = Figure(figsize=(4.4 * columns, 3.4 * rows), layout="constrained")
    for index, dimension in enumerate(dimensions):
        axes = figure.add_subplot(rows, columns, index + 1)
        values = [point[dimension.key] for point in points]
        scores = [point[metric] for point in points]
        if dimension.is_range:
            axes.scatter(values, scores, s=22)
            if dimension.log_scale:
                axes.set_xscale("log")
                axes.xaxis.set_minor_formatter(NullFormatter())  # labels on decades only
            low, high = dimension.values
            margin = (high / low) ** 0.05 if dimension.log_scale else None
            axes.set_xlim(*((low / margin, high * margin) if margin else (low - 0.05 * (high - low),
                                                                          high + 0.05 * (high - low))))
        else:
            labels = [str(value) for value in dimension.values]
            axes.scatter([labels.index(str(value)) if str(value) in labels else -1 for value in values], scores, s=22)
            axes.set_xticks(range(len(labels)), labels=labels, rotation=30 if len(labels) > 4 else 0)
        axes.set_xlabel(dimension.key)
        axes.set_ylabel(f"best {metric}")
        axes.grid(True, alpha=0.3)
    figure.suptitle(f"searched values against each trial's best {metric}")
    return write_png(figure, path)


# ---------------------------------------------------------------- helpers

def _epochs(history: dict, length: int) -> list:
    recorded: Optional[list] = history.get("epoch")
    if recorded is not None and len(recorded) == length:
        return list(recorded)
    return list(range(1, length + 1))


def _class_name(label, class_names: Sequence[str]) -> str:
    label = int(label)
    if not 0 <= label < len(class_names):
        raise ValueError(f"label {label} is outside the {len(class_names)} class names")
    return str(class_names[label])


def _close(figure) -> None:
    # Our figures are not registered with pyplot and are freed with their last reference; a
    # pyplot figure passed in by a caller must also be removed from pyplot's registry.
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(figure)
    figure.clear()
