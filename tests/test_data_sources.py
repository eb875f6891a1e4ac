"""Image-folder sources: mixed formats and broken files, the train/test layout, an archive with one
top folder, and the layout errors a user can make."""

from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest

from pipeline.data import SourceError
from pipeline.data.preprocess import run_preprocess
from pipeline.data.sources import resolve_source

from data_files import make_config, make_noise_folder, make_mixed_folder, read_all_shards


def test_image_folder_mixed_formats_and_bad_files(tmp_path, local_ray):
    root, lossless = make_mixed_folder(tmp_path / "images")
    config = make_config(tmp_path, f"data.source={root}", "data.val_fraction=0", "data.max_failed_fraction=0.5")
    manifest = run_preprocess(config)

    assert manifest.class_names == ["cat", "dog"]
    assert manifest.raw["counts"] == {"seen": 14, "written": 11, "rejected": 3}
    assert manifest.splits["train"]["class_counts"] == {"cat": 6, "dog": 5}
    reasons = {entry["id"]: entry["reason"] for entry in manifest.raw["rejected"]}
    assert set(reasons) == {"dog/truncated.png", "dog/empty.jpg", "cat/notes.jpg"}
    assert "empty" in reasons["dog/empty.jpg"] and all(reasons.values())
    rows = read_all_shards(manifest)["train"]
    assert "cat/nested/deeper/d.gif" in rows and "cat/README.txt" not in rows
    np.testing.assert_array_equal(rows["cat/a.png"][0], lossless["cat/a.png"])
    assert all(pixels.shape == (32, 32, 3) for pixels, _ in rows.values())


def test_image_folder_train_test_layout_and_single_top_folder_archive(tmp_path, local_ray):
    packed = tmp_path / "packed" / "dataset"
    make_noise_folder(str(packed / "train"), classes=("a", "b", "c"), per_class=5)
    make_noise_folder(str(packed / "test"), classes=("a", "c"), per_class=2, seed=1)
    archive = tmp_path / "dataset.zip"
    with zipfile.ZipFile(archive, "w") as package:
        for folder, _, files in os.walk(packed):
            for name in files:
                path = os.path.join(folder, name)
                package.write(path, os.path.relpath(path, tmp_path / "packed"))  # single top folder "dataset/"
    manifest = run_preprocess(make_config(tmp_path, f"data.source={archive}", "data.val_fraction=0.2"))
    assert manifest.class_names == ["a", "b", "c"]
    assert manifest.rows("train") == 12 and manifest.rows("val") == 3 and manifest.rows("test") == 4
    assert manifest.splits["test"]["class_counts"] == {"a": 2, "b": 0, "c": 2}
    assert manifest.splits["val"]["class_counts"] == {"a": 1, "b": 1, "c": 1}
    test_ids = set(read_all_shards(manifest)["test"])
    assert test_ids == {"test/a/000.png", "test/a/001.png", "test/c/000.png", "test/c/001.png"}


def test_layout_errors_are_clear(tmp_path):
    empty = make_noise_folder(tmp_path / "empty", per_class=2)
    os.makedirs(os.path.join(empty, "zebra", "sub"))
    with open(os.path.join(empty, "zebra", "sub", "notes.txt"), "w") as handle:
        handle.write("not an image")
    with pytest.raises(SourceError, match="empty class 'zebra'"):
        resolve_source(make_config(tmp_path, f"data.source={empty}").data)

    with pytest.raises(SourceError, match="no such file or folder"):
        resolve_source(make_config(tmp_path, f"data.source={tmp_path}/missing").data)

    split = tmp_path / "split"
    make_noise_folder(str(split / "train"), classes=("a", "b"), per_class=2)
    make_noise_folder(str(split / "test"), classes=("a", "z"), per_class=1)
    with pytest.raises(SourceError, match="classes that train/ lacks: z"):
        resolve_source(make_config(tmp_path, f"data.source={split}").data)

    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(SourceError, match="not an archive"):
        resolve_source(make_config(tmp_path, f"data.source={text}").data)
