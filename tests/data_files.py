"""Data the data-stage tests build for themselves, in the official formats: a CIFAR-10 folder of
pickled batches (20 rows per batch), folders of images in many formats and states, and readers
for what preprocess wrote."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.config import load_config
from pipeline.data.encoding import decode_block
from pipeline.data.manifest import images_from_column

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
ROWS_PER_BATCH = 20


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


def cifar_archive(tmp_path_factory):
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


def make_noise_folder(root, classes=("cat", "dog"), per_class=6, size=32, seed=0) -> str:
    """``root/<class>/NNN.png`` of random pixels (flat classes, nothing to learn): for the data stage
    alone. Learnable folders with a test split: ``synthetic_data.make_image_folder``."""
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
            if manifest.encoding != "raw":
                table = decode_block(table, manifest.image_size)
            images = images_from_column(table.column("image").to_pylist(), manifest.image_size)
            for id_, label, pixels in zip(table.column("id").to_pylist(), table.column("label").to_pylist(), images):
                rows[id_] = (pixels, label)
        result[split] = rows
    return result


def shard_folders(output) -> list[str]:
    return sorted(name for name in os.listdir(output) if name.startswith("shards-"))


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


def write_synthetic_build(root: str, rows: int, rows_per_file: int = 10000, size: int = 32) -> str:
    """A manifest and Parquet shards of ``rows`` random images, in the preprocess build's format."""
    build = "shards-synthetic"
    shards, rng = [], np.random.default_rng(0)
    os.makedirs(os.path.join(root, build, "train"), exist_ok=True)
    for index, start in enumerate(range(0, rows, rows_per_file)):
        count = min(rows_per_file, rows - start)
        pixels = rng.integers(0, 256, (count, size * size * 3), dtype=np.uint8)
        table = pa.table({"id": [f"synthetic/{start + i}" for i in range(count)],
                          "label": rng.integers(0, 10, count),
                          "image": pa.array([row.tobytes() for row in pixels], pa.binary())})
        path = f"{build}/train/part-{index:05d}.parquet"
        pq.write_table(table, os.path.join(root, path))
        shards.append({"path": path, "rows": count})
    manifest = {"schema_version": 1, "class_names": [f"c{i}" for i in range(10)], "image_size": size,
                "normalization": {"mean": [127.5] * 3, "std": [73.9] * 3}, "build": build,
                "splits": {"train": {"rows": rows, "shards": shards}}}
    with open(os.path.join(root, "manifest.json"), "w") as handle:
        json.dump(manifest, handle)
    return root
