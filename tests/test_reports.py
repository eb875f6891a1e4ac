"""Plots: each function writes a non-empty, valid PNG; missing history keys are tolerated."""

import os

import numpy as np
import pytest
from PIL import Image

from pipeline import reports

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def assert_valid_png(path: str) -> None:
    assert os.path.getsize(path) > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()  # raises on a truncated or corrupt file


def test_plot_history_writes_the_three_plots(tmp_path):
    epochs = 4
    history = {
        "loss": [2.0, 1.2, 0.6, 0.1], "accuracy": [0.3, 0.5, 0.7, 0.9],
        "top5_accuracy": [0.7, 0.85, 0.95, 0.99],
        "val_loss": [1.8, 1.3, 1.0, 1.1], "val_accuracy": [0.35, 0.5, 0.6, 0.62],
        "val_top5_accuracy": [0.75, 0.85, 0.9, 0.91],
        "lr": [0.005] * epochs, "epoch": list(range(1, epochs + 1)),
    }
    paths = reports.plot_history(history, str(tmp_path / "plots"))

    assert [os.path.basename(path) for path in paths] == ["loss.png", "accuracy.png", "top5_accuracy.png"]
    for path in paths:
        assert_valid_png(path)


def test_plot_history_tolerates_missing_validation_and_metrics(tmp_path):
    # No validation split and no top-5 metric: train curves only, no top5_accuracy.png.
    paths = reports.plot_history({"loss": [1.0, 0.5, 0.2], "accuracy": [0.4, 0.6, 0.8]}, str(tmp_path))

    assert sorted(os.listdir(tmp_path)) == ["accuracy.png", "loss.png"]
    for path in paths:
        assert_valid_png(path)


def test_plot_history_with_only_validation_keys_and_nan(tmp_path):
    paths = reports.plot_history({"val_loss": [1.0, float("nan"), 0.4]}, str(tmp_path))
    assert [os.path.basename(path) for path in paths] == ["loss.png"]
    assert_valid_png(paths[0])


def test_plot_image_grid_writes_png(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(30).reshape(-1, 1) % 10  # (N, 1), as keras.datasets.cifar10 returns them
    path = reports.plot_image_grid(images, labels, CIFAR10_CLASSES, str(tmp_path / "grid" / "samples.png"))
    assert_valid_png(path)


def test_plot_image_grid_rejects_labels_outside_the_class_names(tmp_path):
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="outside the 10 class names"):
        reports.plot_image_grid(images, [0, 10], CIFAR10_CLASSES, str(tmp_path / "grid.png"))


@pytest.mark.parametrize("normalize", [True, False])
def test_plot_confusion_matrix_writes_png(tmp_path, normalize):
    matrix = np.random.default_rng(0).integers(0, 50, (10, 10))
    matrix[3] = 0  # a class with no examples must not produce NaN
    path = reports.plot_confusion_matrix(matrix, CIFAR10_CLASSES, str(tmp_path / "confusion.png"),
                                         normalize=normalize)
    assert_valid_png(path)


def test_plot_confusion_matrix_many_classes_without_annotations(tmp_path):
    class_count = 60
    matrix = np.eye(class_count, dtype=int) * 5
    names = [f"class_{index}" for index in range(class_count)]
    path = reports.plot_confusion_matrix(matrix, names, str(tmp_path / "confusion.png"))
    assert_valid_png(path)


def test_write_png_closes_pyplot_figures(tmp_path):
    import matplotlib

    matplotlib.use("Agg")  # this test imports pyplot itself; keep it headless
    import matplotlib.pyplot as plt

    figure = plt.figure()
    figure.add_subplot().plot([0, 1], [1, 0])
    path = reports.write_png(figure, str(tmp_path / "line.png"))

    assert_valid_png(path)
    assert not plt.fignum_exists(figure.number)


def test_write_png_accepts_uris(tmp_path):
    # file:// goes through the same pyarrow filesystem path as s3:// and gs://.
    output_dir = f"file://{tmp_path}/remote"
    paths = reports.plot_history({"loss": [1.0, 0.5]}, output_dir)
    assert paths == [f"{output_dir}/loss.png"]
    assert_valid_png(str(tmp_path / "remote" / "loss.png"))
