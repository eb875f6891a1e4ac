"""The CIFAR-10 format: every pixel and label through preprocess (archive and folder), resized rows,
the official archive's download and checks, and pickles that would run code."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import socket

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import to_yaml
from pipeline.data import SourceError
from pipeline.data import cifar as cifar_format
from pipeline.data.images import decode_image
from pipeline.data.manifest import images_from_column
from pipeline.data.preprocess import run_preprocess
from pipeline.data.sources import resolve_source

from data_files import CLASS_NAMES, cifar_archive, make_config, read_all_shards, write_cifar_folder


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """(archive path, extracted folder, expected pixels and labels by id)."""
    return cifar_archive(tmp_path_factory)


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


def test_cifar_pickle_with_code_is_refused(tmp_path):
    folder, _ = write_cifar_folder(str(tmp_path / "src"))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(os.path.join(folder, "batches.meta"), "wb") as handle:
        pickle.dump({b"label_names": [b"a"], b"x": Evil()}, handle, protocol=2)
    with pytest.raises(SourceError, match="refusing to load"):
        resolve_source(make_config(tmp_path, f"data.source={folder}").data)
