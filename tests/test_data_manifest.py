"""Reading preprocessed data: a new seeded file order every epoch, leases that keep a build's shards
alive, and the image column's row check."""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray

from pipeline import storage
from pipeline.data.manifest import DatasetInfo, Manifest, collect_garbage, images_from_column, lease, open_manifest
from pipeline.data.preprocess import run_preprocess

from data_files import make_config, make_noise_folder, shard_folders, write_synthetic_build


def test_train_files_are_read_in_a_new_seeded_order_every_epoch(tmp_path, local_ray):
    # Training reads the shard files shuffled at read time, every epoch anew (no all-to-all
    # randomize_block_order). Order-preserving execution makes the file order visible.
    folder = make_noise_folder(str(tmp_path / "images"), classes=("a", "b"), per_class=32)
    manifest = run_preprocess(make_config(tmp_path, f"data.source={folder}", "data.rows_per_shard=4",
                                          "data.val_fraction=0"))
    assert len(manifest.shard_paths("train")) == 16
    context = ray.data.DataContext.get_current()
    preserve_order = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    try:
        def epochs(**read):
            shard = manifest.read_split("train", **read).streaming_split(1, equal=True)[0]
            return [tuple(row_id for block in shard.iter_batches(batch_size=None, batch_format="pyarrow")
                          for row_id in block.column("id").to_pylist()) for _ in range(3)]

        stored = epochs()
        assert len(set(stored)) == 1  # unshuffled: the manifest's file order every epoch
        shuffled = epochs(shuffle_files=True, seed=5)
        assert all(sorted(order) == sorted(stored[0]) for order in shuffled)  # every row once per epoch
        assert len(set(shuffled)) == 3 and stored[0] not in shuffled  # a new order every epoch
        assert epochs(shuffle_files=True, seed=5) == shuffled  # train.seed: the same sequence
        assert epochs(shuffle_files=True, seed=6) != shuffled
    finally:
        context.execution_options.preserve_order = preserve_order


def test_each_shard_file_is_read_as_one_block(tmp_path, local_ray):
    # Ray's default cuts a read into ~200 blocks of at least 1 MiB: CIFAR-10's five train files
    # arrived as 135 blocks of 371 rows, and the per-block hand-overs held a worker's input at a
    # quarter of the augmentation's speed. Two 4.6 MB files: 2 blocks, not 9.
    manifest = open_manifest(write_synthetic_build(str(tmp_path), rows=3000, rows_per_file=1500))
    for read in ({}, {"shuffle_files": True, "seed": 1}):
        shard = manifest.read_split("train", **read).streaming_split(1, equal=True)[0]
        assert [block.num_rows for block in shard.iter_batches(batch_size=None, batch_format="pyarrow")] == [1500, 1500]


def test_only_unexpired_leases_keep_a_build(tmp_path):
    output = str(tmp_path)
    for build in ("shards-old", "shards-crashed-run", "shards-writing", "shards-current"):
        storage.write_text(storage.join(output, build, "train", "part-00000.parquet"), "rows")
    # A holder that crashed an hour ago stopped renewing; a build still being written renews.
    storage.write_json(storage.join(output, "leases", "shards-crashed-run", "run-x.json"),
                       {"holder": "run-x", "expires": time.time() - 1})
    with lease(output, "shards-writing", "build"):
        assert sorted(collect_garbage(output, keep="shards-current")) == ["shards-crashed-run", "shards-old"]
        assert sorted(shard_folders(tmp_path)) == ["shards-current", "shards-writing"]
        assert storage.list_dir(storage.join(output, "leases")) == ["shards-writing"]
    assert storage.list_dir(storage.join(output, "leases", "shards-writing")) == []  # released


def test_images_from_column_checks_row_length():
    pixels = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    column = np.array([pixels[0].tobytes(), pixels[1].tobytes()], dtype=object)
    np.testing.assert_array_equal(images_from_column(column, 4), pixels)
    with pytest.raises(ValueError, match="48 bytes per row"):
        images_from_column([b"\0" * 47], 4)


def test_dataset_info_crosses_to_the_workers_as_a_plain_dict():
    manifest = Manifest("/data", {"class_names": ["cat", "dog"], "image_size": 32, "build": "shards-x",
                                  "normalization": {"mean": [1.0, 2.0, 3.0], "std": [4.0, 5.0, 6.0]},
                                  "splits": {"train": {"rows": 10, "shards": []}, "test": {"rows": 4, "shards": []}}})
    info = DatasetInfo.from_manifest(manifest, identity={"image_size": 32})
    wire = info.to_dict()
    assert wire == {"class_names": ["cat", "dog"], "image_size": 32, "mean": [1.0, 2.0, 3.0], "std": [4.0, 5.0, 6.0],
                    "rows": {"train": 10, "test": 4}, "identity": {"image_size": 32}, "resize": "squash"}
    assert DatasetInfo.from_dict(wire) == info
    cropped = Manifest("/data", {**manifest.raw, "image_size": 224, "resize": "crop"})
    assert DatasetInfo.from_dict(DatasetInfo.from_manifest(cropped, identity={}).to_dict()).resize == "crop"
    assert info.num_classes == 2 and info.has("test") and not info.has("val")
