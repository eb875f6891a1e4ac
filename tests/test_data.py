"""The data stage: sources (CIFAR-10 format, image folders, archives, download) -> Parquet shards + manifest.

Every dataset here is built by the tests themselves and is tiny: an archive in the official
CIFAR-10 format with 20 rows per batch, image folders of a few dozen files. The Ray tests use the
session's local Ray (``conftest.local_ray``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import socket
import subprocess
import sys
import tarfile
import time
import zipfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from pipeline import storage
from pipeline.config import ConfigError, load_config, to_yaml
from pipeline.data import SourceError
from pipeline.data import cifar as cifar_format
from pipeline.data.archives import UnsafeArchive
from pipeline.data.images import decode_image
from pipeline.data.manifest import (ManifestError, collect_garbage, images_from_column, lease,
                                    open_manifest)
from pipeline.data.preprocess import PreprocessError, run_preprocess, shard_name, split_train_val
from pipeline.data.sources import Item, resolve_source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
ROWS_PER_BATCH = 20


# ---------------------------------------------------------------- fixtures and builders

def make_config(tmp_path, *overrides):
    return load_config(None, [f"data.cache_dir={tmp_path}/cache", f"data.output={tmp_path}/out", *overrides])


def write_cifar_folder(root) -> tuple[str, dict]:
    """``root/cifar-10-batches-py`` in the official format; returns (folder, {id: (HWC pixels, label)})."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    expected = {}
    for name in [f"data_batch_{n}" for n in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (ROWS_PER_BATCH, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, ROWS_PER_BATCH)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"{i}.png".encode() for i in range(ROWS_PER_BATCH)]}
        with open(os.path.join(folder, name), "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
        for row in range(ROWS_PER_BATCH):
            expected[f"{name}/{row:06d}"] = (data[row].reshape(3, 32, 32).transpose(1, 2, 0), labels[row])
    meta = {b"label_names": [name.encode() for name in CLASS_NAMES], b"num_cases_per_batch": ROWS_PER_BATCH}
    with open(os.path.join(folder, "batches.meta"), "wb") as handle:
        pickle.dump(meta, handle, protocol=2)
    return folder, expected


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """(archive path, extracted folder, expected pixels and labels by id)."""
    root = tmp_path_factory.mktemp("cifar")
    folder, expected = write_cifar_folder(str(root / "extracted"))
    archive = str(root / "cifar-10-python.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return archive, folder, expected


def save_image(path, image: Image.Image, format=None, **options):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, format=format, **options)


def make_image_folder(root, classes=("cat", "dog"), per_class=6, size=32, seed=0) -> str:
    rng = np.random.default_rng(seed)
    for name in classes:
        for index in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            save_image(os.path.join(root, name, f"{index:03d}.png"), Image.fromarray(pixels))
    return str(root)


def read_all_shards(manifest) -> dict[str, dict]:
    """{split: {id: (pixels, label)}} straight from the Parquet files the manifest lists."""
    result = {}
    for split in manifest.splits:
        rows = {}
        for path in manifest.shard_paths(split):
            table = pq.read_table(path)
            assert table.column_names == ["id", "label", "image"]
            images = images_from_column(table.column("image").to_pylist(), manifest.image_size)
            for id_, label, pixels in zip(table.column("id").to_pylist(), table.column("label").to_pylist(), images):
                rows[id_] = (pixels, label)
        result[split] = rows
    return result


def shard_folders(output) -> list[str]:
    return sorted(name for name in os.listdir(output) if name.startswith("shards-"))


# ---------------------------------------------------------------- CIFAR-10 format round trip

@pytest.mark.parametrize("form", ["archive", "folder"])
def test_cifar_round_trip_every_pixel_and_label(cifar, form, tmp_path, local_ray):
    archive, folder, expected = cifar
    source = archive if form == "archive" else os.path.dirname(folder)  # a folder containing the batches
    config = make_config(tmp_path, f"data.source={source}", "data.rows_per_shard=16", "data.val_fraction=0.2")
    manifest = run_preprocess(config)

    assert manifest.class_names == CLASS_NAMES
    assert manifest.raw["source"]["kind"] == "cifar10"
    assert manifest.image_size == 32 and manifest.raw["channels"] == 3
    shards = read_all_shards(manifest)
    assert set(shards) == {"train", "val", "test"}
    data_ids = {id_ for id_ in expected if id_.startswith("data_batch")}
    assert set(shards["train"]) | set(shards["val"]) == data_ids
    assert not set(shards["train"]) & set(shards["val"])
    assert set(shards["test"]) == {id_ for id_ in expected if id_.startswith("test_batch")}
    for split_rows in shards.values():
        for id_, (pixels, label) in split_rows.items():
            np.testing.assert_array_equal(pixels, expected[id_][0], err_msg=id_)
            assert label == expected[id_][1], id_
    # Stratified: exactly round(n_class * 0.2) of each class's data-batch rows went to val.
    per_class = np.bincount([expected[id_][1] for id_ in data_ids], minlength=10)
    val_rows = sum(round(n * 0.2) for n in per_class)
    assert manifest.rows("val") == val_rows and manifest.rows("train") == 100 - val_rows
    assert list(manifest.splits["val"]["class_counts"].values()) == [round(n * 0.2) for n in per_class]
    assert manifest.rows("test") == 20
    assert manifest.raw["counts"] == {"seen": 120, "written": 120, "rejected": 0}
    # Shards are whole, ordered batches of rows_per_shard; only the last one is shorter.
    train_rows = 100 - val_rows
    shard_rows = [shard["rows"] for shard in manifest.splits["train"]["shards"]]
    assert shard_rows == [16] * (train_rows // 16) + ([train_rows % 16] if train_rows % 16 else [])
    assert [os.path.basename(p) for p in manifest.shard_paths("train")] == [
        f"part-{n:05d}.parquet" for n in range(len(shard_rows))]
    # Normalization: the train split's per-channel statistics in 0-255 units.
    train_pixels = np.stack([pixels for pixels, _ in shards["train"].values()]).reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(manifest.mean, train_pixels.mean(axis=0), atol=1e-4)
    np.testing.assert_allclose(manifest.std, train_pixels.std(axis=0), atol=1e-4)
    counts = manifest.splits["train"]["class_counts"]
    assert sum(counts.values()) == train_rows and list(counts) == CLASS_NAMES
    assert os.path.isfile(os.path.join(manifest.root, "config.yaml"))

    if form == "folder":  # the Ray reader sees the same rows
        table = manifest.read_split("test").to_pandas()
        assert sorted(table["id"]) == sorted(shards["test"])
        pixels = images_from_column(table["image"].to_numpy(), 32)
        for id_, image in zip(table["id"], pixels):
            np.testing.assert_array_equal(image, expected[id_][0])
    # The first rows in shard order, across the shard boundary at 16, without Ray Data.
    head = manifest.head("train", 20)
    order = pq.read_table(manifest.shard_paths("train")[0]).column("id").to_pylist() + \
        pq.read_table(manifest.shard_paths("train")[1]).column("id").to_pylist()
    assert head.column("id").to_pylist() == order[:20]
    for id_, image in zip(head.column("id").to_pylist(), images_from_column(head.column("image"), 32)):
        np.testing.assert_array_equal(image, expected[id_][0])


def test_cifar_resized_rows_match_decode_image_resize(cifar, tmp_path, local_ray):
    _, folder, expected = cifar
    manifest = run_preprocess(make_config(tmp_path, f"data.source={folder}", "data.image_size=48",
                                          "data.val_fraction=0"))
    table = pq.read_table(manifest.shard_paths("test")[0])
    first_id = table.column("id")[0].as_py()
    image = images_from_column(table.column("image").to_pylist()[:1], 48)[0]
    buffer = io.BytesIO()
    Image.fromarray(expected[first_id][0]).save(buffer, format="PNG")
    np.testing.assert_array_equal(image, decode_image(buffer.getvalue(), 48))


# ---------------------------------------------------------------- image folders

def make_mixed_folder(root) -> tuple[str, dict]:
    """Every PIL format and mode we accept, plus three bad files and files to ignore."""
    rng = np.random.default_rng(1)

    def rgb(size):
        return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))

    lossless = {}
    cat = os.path.join(root, "cat")
    dog = os.path.join(root, "dog")
    image = rgb((32, 32))
    save_image(os.path.join(cat, "a.png"), image)
    lossless["cat/a.png"] = np.asarray(image)
    save_image(os.path.join(cat, "b.jpg"), rgb((40, 30)), quality=90)
    save_image(os.path.join(cat, "c.bmp"), rgb((32, 32)))
    save_image(os.path.join(cat, "nested", "deeper", "d.gif"), rgb((20, 20)).convert("P"))
    save_image(os.path.join(cat, "e.webp"), rgb((64, 64)))
    save_image(os.path.join(cat, "f.tiff"), rgb((16, 48)))
    save_image(os.path.join(dog, "g.png"), Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)))  # L
    save_image(os.path.join(dog, "h.png"), Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)))  # RGBA
    save_image(os.path.join(dog, "i.jpg"), rgb((32, 32)).convert("CMYK"))
    save_image(os.path.join(dog, "j.png"), Image.fromarray(rng.integers(0, 65536, (32, 32), dtype=np.uint16)))  # I;16
    save_image(os.path.join(dog, "k.png"), rgb((50, 50)).convert("P"))
    # Bad files: each must be rejected with a reason, none may fail the build.
    buffer = io.BytesIO()
    rgb((64, 64)).save(buffer, format="PNG")
    with open(os.path.join(dog, "truncated.png"), "wb") as handle:
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    open(os.path.join(dog, "empty.jpg"), "wb").close()
    with open(os.path.join(cat, "notes.jpg"), "w") as handle:
        handle.write("this is text, not a JPEG")
    # Ignored (not rejected): non-image extensions and hidden files.
    with open(os.path.join(cat, "README.txt"), "w") as handle:
        handle.write("ignored")
    open(os.path.join(root, ".DS_Store"), "wb").close()
    open(os.path.join(dog, "._g.png"), "wb").close()
    return str(root), lossless


def test_train_files_are_read_in_a_new_seeded_order_every_epoch(tmp_path, local_ray):
    # Training reads the shard files shuffled at read time, every epoch anew (no all-to-all
    # randomize_block_order). Order-preserving execution makes the file order visible.
    folder = make_image_folder(str(tmp_path / "images"), classes=("a", "b"), per_class=32)
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


def test_image_folder_train_test_layout_and_single_top_folder_archive(tmp_path, local_ray):
    packed = tmp_path / "packed" / "dataset"
    make_image_folder(str(packed / "train"), classes=("a", "b", "c"), per_class=5)
    make_image_folder(str(packed / "test"), classes=("a", "c"), per_class=2, seed=1)
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


# ---------------------------------------------------------------- idempotency and rebuilds

def test_rerun_reuses_and_config_change_or_force_rebuilds(tmp_path, local_ray, capsys):
    root = make_image_folder(tmp_path / "images", per_class=10)
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


def test_crashed_build_leftovers_are_removed_on_commit(tmp_path, local_ray):
    root = make_image_folder(tmp_path / "images", per_class=3)
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


def test_images_from_column_checks_row_length():
    pixels = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    column = np.array([pixels[0].tobytes(), pixels[1].tobytes()], dtype=object)
    np.testing.assert_array_equal(images_from_column(column, 4), pixels)
    with pytest.raises(ValueError, match="48 bytes per row"):
        images_from_column([b"\0" * 47], 4)


# ---------------------------------------------------------------- source errors (no Ray)

def test_download_verifies_checksum_and_caches(cifar, tmp_path, monkeypatch):
    archive, _, _ = cifar
    config = make_config(tmp_path, "data.source=cifar10", f"data.download_url=file://{archive}")
    cache = tmp_path / "cache"
    # The real constants: the small archive is not the official one -> refused and deleted.
    with pytest.raises(SourceError, match=r"expected 170,498,071 bytes, got [\d,]+") as error:
        resolve_source(config.data)
    assert "data.source" in str(error.value)
    assert [name for name in os.listdir(cache) if "cifar-10-python" in name] == []

    with open(archive, "rb") as handle:
        md5 = hashlib.md5(handle.read()).hexdigest()
    monkeypatch.setattr(cifar_format, "CIFAR10_ARCHIVE_BYTES", os.path.getsize(archive))
    monkeypatch.setattr(cifar_format, "CIFAR10_ARCHIVE_MD5", "0" * 32)
    with pytest.raises(SourceError, match=f"expected md5 {'0' * 32}, got {md5}"):
        resolve_source(config.data)
    assert not (cache / "cifar-10-python.tar.gz").exists()

    monkeypatch.setattr(cifar_format, "CIFAR10_ARCHIVE_MD5", md5)
    source = resolve_source(config.data)
    assert source.kind == "cifar10" and source.class_names == CLASS_NAMES
    assert (cache / "cifar-10-python.tar.gz").is_file()
    assert len(source.items_by_split["train"]) == 100 and len(source.items_by_split["test"]) == 20
    # Cached now: an unreachable URL does not matter any more.
    offline = make_config(tmp_path, "data.source=cifar10", "data.download_url=http://127.0.0.1:9/none")
    assert resolve_source(offline.data).fingerprint == source.fingerprint


def test_unreachable_download_says_how_to_pass_a_local_copy(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = make_config(tmp_path, "data.source=cifar10", f"data.download_url=http://127.0.0.1:{port}/c.tar.gz")
    with pytest.raises(SourceError, match=r"cannot download.*--set data.source=/path/to/cifar-10-python.tar.gz"):
        resolve_source(config.data)
    assert not [name for name in os.listdir(tmp_path / "cache") if name.endswith(".part")]


def test_download_credentials_are_never_printed_or_saved(tmp_path, capsys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://alice:s3cret-token@127.0.0.1:{port}/c.tar.gz?signature=also-secret"
    config = make_config(tmp_path, "data.source=cifar10", f"data.download_url={url}")
    with pytest.raises(SourceError) as error:
        resolve_source(config.data)
    printed = capsys.readouterr()
    for text in (str(error.value), printed.out, printed.err, to_yaml(config)):
        assert "s3cret-token" not in text and "also-secret" not in text
    assert f"http://***@127.0.0.1:{port}/c.tar.gz?***" in str(error.value)
    assert config.data.download_url == url  # the run itself still downloads with them


def tar_with(path, *members):
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return str(path)


def file_member(name, data=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def link_member(name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


@pytest.mark.parametrize("bad_member, match", [
    (file_member("data/../../evil.txt"), r"'data/../../evil.txt'.*path traversal"),
    (file_member("/tmp/absolute.txt"), r"'/tmp/absolute.txt'.*absolute"),
    (link_member("data/cat/link.png", "/etc/passwd"), r"'data/cat/link.png'.*symlink pointing outside"),
    (link_member("data/cat/up.png", "../../../outside.png"), r"'data/cat/up.png'.*symlink pointing outside"),
    (link_member("data/cat/hard.png", "../outside.png", tarfile.LNKTYPE), r"hard link pointing outside"),
])
def test_unsafe_tar_members_are_refused(tmp_path, bad_member, match):
    archive = tar_with(tmp_path / "bad.tar.gz", file_member("data/cat/ok.png"), bad_member)
    config = make_config(tmp_path, f"data.source={archive}")
    with pytest.raises(UnsafeArchive, match=match):
        resolve_source(config.data)
    extracted = tmp_path / "cache" / "extracted"
    assert not extracted.exists() or os.listdir(extracted) == []  # temp folder removed, nothing reusable
    assert not (tmp_path / "evil.txt").exists()


def test_archive_bombs_are_refused_before_anything_is_written(tmp_path):
    many = tar_with(tmp_path / "many.tar.gz", *[file_member(f"data/cat/{i}.png") for i in range(5)])
    with pytest.raises(UnsafeArchive, match=r"5 members, more than data.max_extract_members=4"):
        resolve_source(make_config(tmp_path, f"data.source={many}", "data.max_extract_members=4").data)
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w", compression=zipfile.ZIP_DEFLATED) as package:
        package.writestr("images/cat/a.png", b"\0" * 1_000_000)  # a megabyte of zeros: a few kB packed
    assert big.stat().st_size < 10_000
    with pytest.raises(UnsafeArchive, match=r"1,000,000 bytes, more than data.max_extract_bytes=100,000"):
        resolve_source(make_config(tmp_path, f"data.source={big}", "data.max_extract_bytes=100000").data)
    extracted = tmp_path / "cache" / "extracted"
    assert not extracted.exists() or os.listdir(extracted) == []


def test_unsafe_zip_member_is_refused(tmp_path):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as package:
        package.writestr("images/cat/a.png", b"x")
        package.writestr("../escape.png", b"x")
    with pytest.raises(UnsafeArchive, match=r"'\.\./escape\.png'"):
        resolve_source(make_config(tmp_path, f"data.source={archive}").data)


def test_layout_errors_are_clear(tmp_path):
    empty = make_image_folder(tmp_path / "empty", per_class=2)
    os.makedirs(os.path.join(empty, "zebra", "sub"))
    with open(os.path.join(empty, "zebra", "sub", "notes.txt"), "w") as handle:
        handle.write("not an image")
    with pytest.raises(SourceError, match="empty class 'zebra'"):
        resolve_source(make_config(tmp_path, f"data.source={empty}").data)

    with pytest.raises(SourceError, match="no such file or folder"):
        resolve_source(make_config(tmp_path, f"data.source={tmp_path}/missing").data)

    split = tmp_path / "split"
    make_image_folder(str(split / "train"), classes=("a", "b"), per_class=2)
    make_image_folder(str(split / "test"), classes=("a", "z"), per_class=1)
    with pytest.raises(SourceError, match="classes that train/ lacks: z"):
        resolve_source(make_config(tmp_path, f"data.source={split}").data)

    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(SourceError, match="not an archive"):
        resolve_source(make_config(tmp_path, f"data.source={text}").data)


def test_cifar_pickle_with_code_is_refused(tmp_path):
    folder, _ = write_cifar_folder(str(tmp_path / "src"))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(os.path.join(folder, "batches.meta"), "wb") as handle:
        pickle.dump({b"label_names": [b"a"], b"x": Evil()}, handle, protocol=2)
    with pytest.raises(SourceError, match="refusing to load"):
        resolve_source(make_config(tmp_path, f"data.source={folder}").data)


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


def test_a_writer_task_needs_about_one_shard_of_memory_whatever_the_image_size():
    # 224-pixel images: 10,000 rows would be a 1.5 GB shard, and the writer held several copies.
    # A fresh process, so that its peak RSS is the writer's own (benchmarks/writer_memory.py).
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "writer_memory.py")
    for image_size in (32, 224):
        result = subprocess.run([sys.executable, script, "--measure", str(image_size)], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        assert measured["shard_mib"] <= 256
        # Beyond the batch itself: Parquet's buffers for a few row groups, not copies of the shard.
        assert measured["writer_extra_peak_mib"] < 200, measured
    assert measured["rows_per_shard"] == 256 * 2**20 // (224 * 224 * 3)
