"""Reading preprocessed data: ``manifest.json`` and the Parquet shards it lists.

The manifest is the commit point of a preprocess build (written last, atomically): a reader only
ever opens the shard files it lists, so a crashed or concurrent build's files are never read.
Every shard has the columns ``id`` (string), ``label`` (int64) and ``image`` (binary: raw uint8
pixels, height x width x 3 RGB, row-major, or that picture encoded as the manifest's ``encoding``
says, see ``encoding.py``). ``read_split`` and ``head`` return raw pixels either way, and
``images_from_column`` turns such a column into an array.

On a multi-node cluster ``data.output`` must be storage every node can read (s3://, gs://, NFS):
training workers read the shards on their own nodes.

Leases keep shards alive while they are used: a training run reads its build's files every epoch
for hours, while another recipe (or ``--force``) may rebuild ``data.output`` and replace the
manifest. Whoever uses a build (a training run, a build still writing) holds a lease, a small
file ``leases/<build>/<holder>.json`` with an expiry that a background thread keeps renewing.
A build deletes other builds' shard folders only when no unexpired lease names them
(``collect_garbage``), so a crashed holder blocks clean-up for at most ``LEASE_SECONDS``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import posixpath
import threading
import time
import uuid
from typing import Iterator, Sequence

import numpy as np

import pipeline
from pipeline import InputError, storage
from pipeline.config import saved_dict, to_yaml
from pipeline.data.encoding import decode_block, stored_encoding
from pipeline.data.images import DECODE_VERSION, resolved_resize

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
PIXEL_FORMAT = "uint8 HWC RGB, row-major, in the binary column 'image' (encoded as 'encoding' says)"


class ManifestError(InputError):
    """Preprocessed data is missing, unreadable or from an incompatible version."""


class Manifest:
    """The preprocessed dataset: class names, image size, normalization and shards per split."""

    def __init__(self, root: str, raw: dict):
        self.root = storage.absolute(root)  # the data.output folder (local path or URI)
        self.raw = raw
        self.class_names: list[str] = list(raw["class_names"])
        self.num_classes = len(self.class_names)
        self.image_size: int = int(raw["image_size"])
        self.resize: str = raw.get("resize", "squash")  # data.resize, resolved; builds without it squashed
        # Per-channel statistics of the train split, in 0-255 pixel units.
        self.mean: list[float] = [float(v) for v in raw["normalization"]["mean"]]
        self.std: list[float] = [float(v) for v in raw["normalization"]["std"]]
        self.splits: dict[str, dict] = raw["splits"]
        self.build: str = raw["build"]  # the shards-<id> folder this manifest's files are in
        self.encoding: str = (raw.get("encoding") or {"format": "raw"})["format"]  # older builds: raw

    def __repr__(self) -> str:
        rows = ", ".join(f"{name}={split['rows']}" for name, split in self.splits.items())
        return f"Manifest({self.root!r}, {self.num_classes} classes, {self.image_size}px, {rows})"

    def has_split(self, split: str) -> bool:
        return split in self.splits

    def _split(self, split: str) -> dict:
        if split not in self.splits:
            raise ManifestError(f"the preprocessed data at {self.root} has no '{split}' split "
                                f"(splits: {', '.join(self.splits)})")
        return self.splits[split]

    def rows(self, split: str) -> int:
        return int(self._split(split)["rows"])

    def shard_paths(self, split: str) -> list[str]:
        """Absolute local paths (or URIs) of the split's Parquet files, in manifest order."""
        return [storage.join(self.root, *shard["path"].split("/")) for shard in self._split(split)["shards"]]

    def head(self, split: str, count: int):
        """The split's first ``count`` rows as a pyarrow Table, read straight from its first
        shards: for a sample (the image grid of a run), where a Ray Data job would take seconds
        to plan and start."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables, remaining = [], count
        for path in self.shard_paths(split):
            filesystem, inner = storage.filesystem(path)
            with filesystem.open_input_file(inner) as handle:
                table = pq.read_table(handle, columns=["id", "label", "image"]).slice(0, remaining)
            tables.append(table if self.encoding == "raw" else decode_block(table, self.image_size))
            remaining -= table.num_rows
            if remaining <= 0:
                break
        return pa.concat_tables(tables)

    def read_split(self, split: str, *, shuffle_files: bool = False, seed: int | None = None):
        """The split as a ``ray.data.Dataset`` with columns id, label, image.

        ``shuffle_files``: read the shard files in a new random order every execution (every
        epoch), from ``seed`` when given. A streaming shuffle: unlike ``randomize_block_order``, an
        all-to-all step that holds the whole split in the object store before the first row goes
        out, it costs nothing at any dataset size. Rows within a file are in random order already
        (the build writes them so), and each worker's shuffle buffer mixes neighbouring files."""
        import ray.data
        from ray.data import FileShuffleConfig

        paths = self.shard_paths(split)
        if not paths:
            raise ManifestError(f"the '{split}' split at {self.root} has no shard files (0 rows)")
        filesystem, _ = storage.filesystem(self.root)
        inner_paths = [storage.filesystem(path)[1] for path in paths]
        context = ray.data.DataContext.get_current()
        # The v1 Parquet reader: v2, Ray's default, starts footer-reading actors on every call, for rows
        # the manifest already lists (see docs/design-notes.md, "Ray Data's Parquet reader"). The
        # reader is chosen when read_parquet is called, so the flag is switched for this call only.
        use_v2 = getattr(context, "use_datasource_v2", False)
        context.use_datasource_v2 = False
        try:
            shuffle = (FileShuffleConfig(seed=seed, reseed_after_execution=True) if seed is not None else "files") \
                if shuffle_files else None
            # One block per shard file (at most preprocess.MAX_SHARD_BYTES of pixels): left to itself Ray
            # aims at 200 blocks per read (DataContext.read_op_min_num_blocks), and every block's hand-over
            # through the streaming split slows a worker's input (see BENCHMARKS.md, "One worker's input
            # pipeline: whole files as blocks, augmentation in numpy").
            dataset = ray.data.read_parquet(inner_paths, filesystem=filesystem, columns=["id", "label", "image"],
                                            num_cpus=READ_TASK_CPUS, shuffle=shuffle, override_num_blocks=len(paths))
            if self.encoding != "raw":
                # The same resources as the read, so Ray Data fuses the two: each read task decodes its
                # own file, wherever in the cluster it runs, and hands on raw pixels.
                dataset = dataset.map_batches(decode_block, batch_size=None, batch_format="pyarrow",
                                              zero_copy_batch=True, num_cpus=READ_TASK_CPUS,
                                              fn_kwargs={"image_size": self.image_size})
            return dataset
        finally:
            if use_v2:
                context.use_datasource_v2 = use_v2


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a training worker knows of the preprocessed data, so that it never opens the manifest.
    It crosses to the workers in ``train_loop_config`` as the plain dict of ``to_dict``."""

    class_names: list[str]
    image_size: int
    resize: str  # how a picture became image_size x image_size: squash or crop (data.resize)
    mean: list[float]  # per channel, 0-255 pixel units, of the train split
    std: list[float]
    rows: dict[str, int]  # per split that was built: train, and val and test where present
    identity: dict  # what its checkpoints are only valid with (``train.run.training_identity``)

    @classmethod
    def from_manifest(cls, manifest: Manifest, identity: dict) -> DatasetInfo:
        rows = {split: manifest.rows(split) for split in ("train", "val", "test") if manifest.has_split(split)}
        return cls(class_names=manifest.class_names, image_size=manifest.image_size, resize=manifest.resize,
                   mean=manifest.mean, std=manifest.std, rows=rows, identity=identity)

    @classmethod
    def from_dict(cls, values: dict) -> DatasetInfo:
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def has(self, split: str) -> bool:
        return bool(self.rows.get(split))


def write_manifest(output: str, config, source, *, config_fingerprint: str, build: str, splits: dict,
                   mean: np.ndarray, std: np.ndarray, rejected: list[dict], seen: int, elapsed: float,
                   timings: dict[str, float]) -> Manifest:
    """Commit a preprocess build: ``config.yaml``, then (last, atomically) ``manifest.json``.
    ``splits``: {split: {"rows", "class_counts", "shards": [{"path", "rows"}]}} of the build's
    shards; ``mean``/``std``: per-channel statistics of the train split (0-255 units)."""
    data = config.data
    written = sum(split["rows"] for split in splits.values())
    raw = {
        "schema_version": SCHEMA_VERSION,
        "decode_version": DECODE_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source.describe(),
        "source_fingerprint": source.fingerprint,
        "config_fingerprint": config_fingerprint,
        "data_config": saved_dict(config)["data"],
        "class_names": source.class_names,
        "image_size": data.image_size,
        "resize": resolved_resize(data.resize, data.image_size),
        "encoding": stored_encoding(data),
        "channels": 3,
        "pixel_format": PIXEL_FORMAT,
        "normalization": {"mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std],
                          "units": "0-255 pixel values, per channel R, G, B, over the train split"},
        "splits": splits,
        "rejected": rejected,
        "counts": {"seen": seen, "written": written, "rejected": len(rejected)},
        "elapsed_seconds": round(elapsed, 3),
        "images_per_second": round(written / elapsed, 1),  # rows written: what the build produced
        "timings": {key: round(value, 3) for key, value in timings.items()},
        "build": build,
        "provenance": pipeline.provenance(),
    }
    storage.write_text(storage.join(output, "config.yaml"), to_yaml(config))
    storage.write_json(storage.join(output, MANIFEST_NAME), raw)  # the commit point
    return Manifest(output, raw)


# A read task only parses Parquet pages (pixels are unpacked in the consumer), so a quarter CPU is
# plenty. With Ray's default of one CPU, a read fits only on a node with a whole CPU free: on two
# 1-CPU nodes each running a 0.5-CPU training worker, the cluster had a CPU free in two halves,
# the read task never started and training waited for input forever (benchmarks/multinode_benchmark.py).
READ_TASK_CPUS = 0.25


LEASES = "leases"
LEASE_SECONDS = 3600.0   # a holder that stopped renewing (crashed) is ignored after this
RENEW_SECONDS = 300.0


@contextlib.contextmanager
def lease(output: str, build: str, holder: str) -> Iterator[str]:
    """Hold ``build`` (a ``shards-*`` folder of ``output``) for the ``with`` block: no other build
    deletes it meanwhile. Yields the lease file's path."""
    path = storage.join(output, LEASES, build, f"{holder}-{uuid.uuid4().hex[:8]}.json")
    storage.write_json(path, {"holder": holder, "expires": time.time() + LEASE_SECONDS})
    stop = threading.Event()

    def renew():
        while not stop.wait(RENEW_SECONDS):
            try:
                storage.write_json(path, {"holder": holder, "expires": time.time() + LEASE_SECONDS})
            except OSError:  # storage briefly unreachable: the lease has most of an hour left
                pass

    renewer = threading.Thread(target=renew, name=f"lease-{build}", daemon=True)
    renewer.start()
    try:
        yield path
    finally:
        stop.set()
        renewer.join()
        storage.delete(path)


def leased_builds(output: str, now: float | None = None) -> set[str]:
    """Builds of ``output`` with at least one unexpired lease."""
    now = time.time() if now is None else now
    held = set()
    for build in storage.list_dir(storage.join(output, LEASES)):
        for name in storage.list_dir(storage.join(output, LEASES, build)):
            try:
                expires = storage.read_json(storage.join(output, LEASES, build, name))["expires"]
            except (OSError, ValueError, KeyError):  # vanished or unreadable meanwhile: not held
                continue
            if expires > now:
                held.add(build)
                break
    return held


def collect_garbage(output: str, keep: str) -> list[str]:
    """Delete the shard folders of ``output`` that neither the committed manifest (``keep``) nor an
    unexpired lease names, with their expired leases; returns the deleted folder names."""
    held = leased_builds(output) | {keep}
    stale = [name for name in storage.list_dir(output) if name.startswith("shards-") and name not in held]
    for name in stale:
        storage.delete(storage.join(output, name))
    for build in storage.list_dir(storage.join(output, LEASES)):
        if build not in held:
            storage.delete(storage.join(output, LEASES, build))
    return stale


def open_manifest(output: str) -> Manifest:
    """The manifest of the preprocessed data in ``output`` (``data.output``)."""
    root = storage.absolute(output)
    path = storage.join(root, MANIFEST_NAME)
    if not storage.exists(path):
        raise ManifestError(
            f"no preprocessed data at {root} ({MANIFEST_NAME} missing — the output is absent or a build "
            f"did not finish); run `pipeline preprocess` first")
    try:
        raw = storage.read_json(path)
    except ValueError as error:
        raise ManifestError(f"{path} is not valid JSON ({error}); rebuild with `pipeline preprocess --force`") from None
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(f"{path} has schema_version {raw.get('schema_version')!r}, this code reads "
                            f"{SCHEMA_VERSION}; rebuild with `pipeline preprocess --force`")
    return Manifest(root, raw)


def images_from_column(column, image_size: int) -> np.ndarray:
    """The binary ``image`` column (pyarrow Array or ChunkedArray, numpy object array of bytes, or
    list) as uint8 pixels of shape (N, image_size, image_size, 3). From Arrow the array is a view
    of the column's value buffer when it is one contiguous chunk (read-only; no copy at all),
    otherwise one join + one frombuffer: never a copy per row."""
    row_bytes = image_size * image_size * 3
    if hasattr(column, "buffers") or hasattr(column, "chunks"):  # pyarrow Array / ChunkedArray
        chunks = column.chunks if hasattr(column, "chunks") else [column]
        arrays = [arrow_pixels(chunk, row_bytes) for chunk in chunks]
        if any(array is None for array in arrays):
            return images_from_column(column.to_pylist(), image_size)  # lengths differ: the check below
        pixels = arrays[0] if len(arrays) == 1 else np.concatenate(arrays) if arrays else np.empty(0, np.uint8)
        return pixels.reshape(-1, image_size, image_size, 3)
    values: Sequence[bytes] = column
    joined = b"".join(values)
    if len(joined) != len(values) * row_bytes:
        lengths = sorted({len(value) for value in values})
        raise ValueError(f"image column does not hold {image_size}x{image_size}x3 uint8 images: expected "
                         f"{row_bytes} bytes per row, found row lengths {lengths[:5]}")
    return np.frombuffer(joined, dtype=np.uint8).reshape(len(values), image_size, image_size, 3)


def arrow_pixels(chunk, row_bytes: int) -> np.ndarray | None:
    """A (large_)binary Arrow array whose values are all ``row_bytes`` long, as a flat uint8 view of
    its value buffer; None when they are not (or nulls are present)."""
    if chunk.null_count:
        return None
    _, offsets, data = chunk.buffers()[:3]
    offset_type = np.int64 if str(chunk.type) == "large_binary" else np.int32
    ends = np.frombuffer(offsets, dtype=offset_type, count=len(chunk) + 1, offset=chunk.offset * np.dtype(offset_type).itemsize)
    if not len(chunk):
        return np.empty(0, np.uint8)
    if not np.array_equal(np.diff(ends), np.full(len(chunk), row_bytes, dtype=offset_type)):
        return None
    return np.frombuffer(data, dtype=np.uint8, count=len(chunk) * row_bytes, offset=int(ends[0]))


def shard_relative_path(build: str, split: str, name: str) -> str:
    """Shard path as the manifest records it: relative to data.output, '/'-separated."""
    return posixpath.join(build, split, name)
