"""The preprocess stage: the failure budget, reuse and rebuilds, crashed builds, splits, shard names,
bad input at the job's entry point, a writer task's memory, and encoded shards read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError, load_config
from pipeline.data.manifest import lease, ManifestError, open_manifest
from pipeline.data import preprocess
from pipeline.data.preprocess import (PreprocessError, ensure_preprocessed, run_preprocess, shard_name,
                                         split_train_val)
from pipeline.data.sources import SourceError
from pipeline.data.sources import Item

from conftest import REPO
from data_files import make_config, make_noise_folder, make_mixed_folder, read_all_shards, shard_folders


def test_too_many_bad_files_fail_without_manifest(tmp_path, local_ray):
    root, _ = make_mixed_folder(tmp_path / "images")
    config = make_config(tmp_path, f"data.source={root}", "data.val_fraction=0", "data.max_failed_fraction=0.1")
    with pytest.raises(PreprocessError, match=r"3 of 14 images.*max_failed_fraction") as error:
        run_preprocess(config)
    assert "truncated.png" in str(error.value) or "empty.jpg" in str(error.value)
    output = tmp_path / "out"
    assert not (output / "manifest.json").exists()
    assert not os.path.isdir(output) or shard_folders(output) == []
    with pytest.raises(ManifestError, match="run `pipeline preprocess` first"):
        open_manifest(str(output))


# ---------------------------------------------------------------- idempotency and rebuilds

def test_rerun_reuses_and_config_change_or_force_rebuilds(tmp_path, local_ray, capsys):
    root = make_noise_folder(tmp_path / "images", per_class=10)
    output = tmp_path / "out"
    config = make_config(tmp_path, f"data.source={root}", "data.val_fraction=0", "data.rows_per_shard=8")
    first = run_preprocess(config)
    assert [shard["rows"] for shard in first.splits["train"]["shards"]] == [8, 8, 4]
    first_ids = read_all_shards(first)["train"].keys()
    folders = shard_folders(output)
    manifest_text = (output / "manifest.json").read_text()

    capsys.readouterr()
    again = run_preprocess(config)
    assert "reusing preprocessed data at" in capsys.readouterr().out
    assert shard_folders(output) == folders and (output / "manifest.json").read_text() == manifest_text
    assert again.raw == first.raw

    changed = run_preprocess(make_config(tmp_path, f"data.source={root}", "data.val_fraction=0",
                                         "data.rows_per_shard=16"))
    assert [shard["rows"] for shard in changed.splits["train"]["shards"]] == [16, 4]
    assert len(shard_folders(output)) == 1 and shard_folders(output) != folders

    rebuilt_folders = shard_folders(output)
    forced = run_preprocess(make_config(tmp_path, f"data.source={root}", "data.val_fraction=0",
                                        "data.rows_per_shard=16"), force=True)
    assert len(shard_folders(output)) == 1 and shard_folders(output) != rebuilt_folders
    assert read_all_shards(forced)["train"].keys() == first_ids

    # A changed source (a new file) is noticed by the fingerprint.
    Image.new("RGB", (32, 32), "red").save(os.path.join(root, "cat", "new.png"))
    grown = run_preprocess(make_config(tmp_path, f"data.source={root}", "data.val_fraction=0",
                                       "data.rows_per_shard=16"))
    assert grown.rows("train") == 21 and len(shard_folders(output)) == 1

    # A run still reading a build holds a lease on it: a rebuild with other settings (the user's
    # report: another val_fraction into the same data.output while training) replaces the
    # manifest but keeps the leased shards, which the run reads to the end.
    with lease(grown.root, grown.build, "run-still-training"):
        split_again = run_preprocess(make_config(tmp_path, f"data.source={root}", "data.val_fraction=0.3",
                                                 "data.rows_per_shard=16"))
        assert open_manifest(str(output)).build == split_again.build != grown.build
        assert sorted(shard_folders(output)) == sorted([grown.build, split_again.build])
        assert read_all_shards(grown)["train"].keys()  # every file the old manifest lists is there
    # Released: the next build collects it.
    run_preprocess(make_config(tmp_path, f"data.source={root}", "data.val_fraction=0.3",
                               "data.rows_per_shard=16"), force=True)
    assert len(shard_folders(output)) == 1 and grown.build not in shard_folders(output)


def test_training_stages_use_a_current_build_without_the_source(tmp_path, local_ray, monkeypatch, capsys):
    # Preprocessed on one node (or before the download host went away), trained elsewhere: the
    # manifest says what the shards hold, the source is never opened again.
    root = make_noise_folder(tmp_path / "images", per_class=6)
    config = make_config(tmp_path, f"data.source={root}", "data.val_fraction=0.25")
    built = run_preprocess(config)
    os.rename(root, tmp_path / "moved-away")

    def no_source(data):
        raise AssertionError(f"the source was opened: {data.source}")

    monkeypatch.setattr(preprocess, "resolve_source", no_source)
    capsys.readouterr()
    assert ensure_preprocessed(config).raw == built.raw
    assert "using the preprocessed data at" in capsys.readouterr().out
    monkeypatch.undo()

    # A data config the build does not match needs the source to rebuild: one line that says why.
    changed = make_config(tmp_path, f"data.source={root}", "data.val_fraction=0.5")
    with pytest.raises(SourceError) as error:
        ensure_preprocessed(changed)
    message = str(error.value)
    assert "must be rebuilt (changed data.val_fraction 0.25 -> 0.5), which needs the source" in message
    assert f"data.source='{root}': no such file or folder" in message and "\n" not in message
    assert open_manifest(str(tmp_path / "out")).raw == built.raw  # nothing lost

    # A build made by an older decode (no EXIF orientation) is stale for the training stages too.
    os.rename(tmp_path / "moved-away", root)
    old = dict(built.raw)
    del old["decode_version"]
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(old))
    capsys.readouterr()
    rebuilt = ensure_preprocessed(config)
    assert "decoded by an older version (decode version 1 -> 2" in capsys.readouterr().out
    assert rebuilt.raw["decode_version"] == 2 and rebuilt.build != built.build


def test_the_summary_counts_the_rows_a_subset_build_wrote(tmp_path, local_ray, capsys):
    # data.max_images_per_class: the figures are of the images read and rows written, not of the
    # whole source (a rate 2.7x too high before).
    root = make_noise_folder(tmp_path / "images", per_class=10)
    manifest = run_preprocess(make_config(tmp_path, f"data.source={root}", "data.val_fraction=0",
                                          "data.max_images_per_class=3"))
    raw = manifest.raw
    assert raw["counts"] == {"seen": 6, "written": 6, "rejected": 0}
    assert raw["images_per_second"] == pytest.approx(6 / raw["elapsed_seconds"], rel=0.01, abs=0.1)
    assert "done: 6 rows in " in capsys.readouterr().out


def test_crashed_build_leftovers_are_removed_on_commit(tmp_path, local_ray):
    root = make_noise_folder(tmp_path / "images", per_class=3)
    crashed = tmp_path / "out" / "shards-19700101-000000-dead00" / "train"
    crashed.mkdir(parents=True)
    (crashed / "part-00000.parquet").write_bytes(b"half a file")
    manifest = run_preprocess(make_config(tmp_path, f"data.source={root}", "data.val_fraction=0"))
    assert shard_folders(tmp_path / "out") == [manifest.raw["build"]]


# ---------------------------------------------------------------- splits (no Ray)

def items_of(labels):
    return [Item(f"{i:04d}", label, f"/x/{i:04d}.png") for i, label in enumerate(labels)]


def test_stratified_split_is_exact_per_class_and_deterministic():
    labels = [0] * 50 + [1] * 30 + [2] * 7
    items = items_of(labels)
    train, val = split_train_val(items, 0.1, "stratified", seed=3)
    counts = np.bincount([item.label for item in val], minlength=3)
    assert counts.tolist() == [round(50 * 0.1), round(30 * 0.1), round(7 * 0.1)]
    assert len(train) + len(val) == len(items) and not {i.id for i in train} & {i.id for i in val}
    assert [i.id for i in train] == sorted(i.id for i in train)  # source order kept
    again_train, again_val = split_train_val(items, 0.1, "stratified", seed=3)
    assert again_val == val and again_train == train
    _, other_val = split_train_val(items, 0.1, "stratified", seed=4)
    assert other_val != val


def test_tail_split_takes_the_last_items():
    items = items_of([0, 1] * 25)
    train, val = split_train_val(items, 0.1, "tail", seed=0)
    assert val == items[-5:] and train == items[:-5]
    assert split_train_val(items, 0.0, "tail", seed=0) == (items, [])


def test_shard_name_falls_back_when_a_batch_is_not_a_whole_shard():
    assert shard_name(np.arange(16, 32), 16, 100) == "part-00001.parquet"
    assert shard_name(np.arange(96, 100), 16, 100) == "part-00006.parquet"
    assert shard_name(np.arange(10, 26), 16, 100) == "part-from-row-00000010.parquet"


def test_unknown_config_key_is_rejected():
    with pytest.raises(ConfigError, match="unknown config key 'data.sauce'"):
        load_config(None, ["data.sauce=cifar10"])


def test_job_exits_2_with_a_message_on_bad_input(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "jobs", "preprocess.py"), "--set", "data.rows_per_shard=0"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "rows_per_shard" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_writer_task_needs_about_one_shard_of_memory_whatever_the_image_size():
    # 224-pixel images: 10,000 rows would be a 1.5 GB shard, and the writer held several copies.
    # A fresh process, so that its peak RSS is the writer's own (benchmarks/writer_memory.py).
    script = os.path.join(REPO, "benchmarks", "writer_memory.py")
    for image_size in (32, 224):
        result = subprocess.run([sys.executable, script, "--measure", str(image_size)], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        assert measured["shard_mib"] <= 256
        # Beyond the batch itself: Parquet's buffers for a few row groups, not copies of the shard.
        assert measured["writer_extra_peak_mib"] < 200, measured
    assert measured["rows_per_shard"] == 256 * 2**20 // (224 * 224 * 3)


def test_resize_is_in_the_fingerprint_only_where_it_crops():
    from pipeline.config import DataConfig

    def fingerprint(**data):
        return preprocess.data_config_fingerprint(DataConfig(source="/images", **data))

    # A 32-px build made before data.resize existed squashed: auto and squash find it current.
    assert fingerprint(resize="auto") == fingerprint(resize="squash") != fingerprint(resize="crop")
    assert fingerprint(image_size=224, resize="auto") == fingerprint(image_size=224, resize="crop")
    assert fingerprint(image_size=224, resize="auto") != fingerprint(image_size=224, resize="squash")


def test_shards_store_pixels_uncompressed(tmp_path):
    """Compression saves nothing on pixels and costs a worker's read task most of its time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pixels = np.random.default_rng(0).integers(0, 256, (6, 8 * 8 * 3), dtype=np.uint8)
    batch = pa.table({"id": [f"img-{i}" for i in range(6)], "label": pa.array([0, 1, 0, 1, 0, 1], pa.int64()),
                      "index": pa.array(range(6), pa.int64()), "image": [row.tobytes() for row in pixels],
                      "error": [""] * 6,
                      "pixel_sums": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(36, np.int64)), 6)})
    written = preprocess.write_shards(batch, str(tmp_path), "shards-x", "train", rows_per_shard=6, split_rows=6,
                                      num_classes=2)
    metadata = pq.ParquetFile(tmp_path / written["path"][0]).metadata
    codecs = {metadata.row_group(0).column(i).path_in_schema: metadata.row_group(0).column(i).compression
              for i in range(metadata.num_columns)}
    assert codecs == {"id": "SNAPPY", "label": "SNAPPY", "image": "UNCOMPRESSED"}
    assert pq.read_table(tmp_path / written["path"][0]).column("image").to_pylist() == [r.tobytes() for r in pixels]


def test_an_encoded_build_reads_back_as_the_pixels_of_a_raw_one(tmp_path, local_ray, capsys):
    # data.encoding=png (lossless): the read tasks decode, and Ray Data hands on the very pixels a
    # raw build stores; the statistics are the same; the change of encoding is a rebuild, named.
    from pipeline.data.manifest import images_from_column

    root = make_noise_folder(tmp_path / "images", per_class=10)
    raw = run_preprocess(make_config(tmp_path, f"data.source={root}", "data.val_fraction=0", "data.rows_per_shard=8"))
    raw_rows = read_all_shards(raw)["train"]
    capsys.readouterr()
    png = run_preprocess(make_config(tmp_path, f"data.source={root}", "data.val_fraction=0", "data.rows_per_shard=8",
                                     "data.encoding=png"))
    assert "changed data.encoding 'raw' -> 'png'" in capsys.readouterr().out
    assert png.raw["encoding"] == {"format": "png"} and png.encoding == "png" and raw.encoding == "raw"
    assert png.mean == raw.mean and png.std == raw.std

    rows, dataset = {}, png.read_split("train")
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        for id_, pixels in zip(batch.column("id").to_pylist(), images_from_column(batch.column("image"), 32)):
            rows[id_] = pixels
    assert rows.keys() == raw_rows.keys()
    for id_, pixels in rows.items():
        np.testing.assert_array_equal(pixels, raw_rows[id_][0])
    # Each read task decoded its own file: one fused operator, no extra hand-over.
    # Each read task decoded its own file: one fused operator, no hand-over of encoded blocks.
    assert "Operator 1 ReadParquet->MapBatches(decode_block):" in dataset.stats()
    head = png.head("train", 3)
    np.testing.assert_array_equal(images_from_column(head.column("image"), 32)[0], raw_rows[head["id"][0].as_py()][0])
