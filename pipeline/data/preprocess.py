"""The preprocess stage: source items -> train/val/test split -> Ray Data decode -> Parquet shards + manifest.

    run_preprocess(config)          build (or reuse) <data.output>/manifest.json and its shards
    ensure_preprocessed(config)     for stages that read the data: a current build as it is, without
                                    opening the source; built only when there is none

Layout of ``data.output`` (local path or s3://, gs://):
    manifest.json                          written LAST and atomically: the commit point
    config.yaml                            the fully resolved config of the build
    shards-<build id>/<split>/part-<n>.parquet   columns id, label, image (raw uint8 HWC RGB bytes)
A build writes its own ``shards-<build id>`` folder, commits the manifest, then deletes the other
``shards-*`` folders (older or crashed builds) that no lease holds: a training run still reading
an older build keeps it (``pipeline.data.manifest.lease``). Readers only open the files the
manifest lists.

Rebuilding is skipped when the manifest's source fingerprint and data-config fingerprint match:
a re-run costs a listing of the source, not a decode.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
import uuid
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import InputError, storage
from pipeline.config import Config, DataConfig, fingerprint
from pipeline.data.cifar import cifar_pixels
from pipeline.data.encoding import described, encode_pixels, resolved_encoding, stored_encoding
from pipeline.data.images import DECODE_CHANGES, DECODE_VERSION, UnreadableImage, decode_image, resolved_resize
from pipeline.data.manifest import (MANIFEST_NAME, SCHEMA_VERSION, Manifest, collect_garbage, lease,
                                    shard_relative_path, write_manifest)
from pipeline.data.sources import Item, Source, SourceError, resolve_source

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

# Rows per Ray Data block for the decode step: small enough that many tasks share the cores (and
# the progress bar moves), large enough that per-task overhead (~ms) stays below decode time.
ROWS_PER_DECODE_BLOCK = 500

# Pixels per shard at most (see shard_rows), and per Parquet row group: a writer task holds the
# batch (one shard) plus a few row groups of Parquet buffers.
MAX_SHARD_BYTES = 256 * 2**20
ROW_GROUP_BYTES = 32 * 2**20

# The data settings that change the shards' content or layout; fingerprinted to decide reuse.
# cache_dir and output are where things live, not what they hold; download_url only matters
# through the archive it yields, which the source fingerprint (md5) covers.
SHARD_AFFECTING_KEYS = ("image_size", "val_fraction", "split_method", "split_seed",
                        "rows_per_shard", "max_failed_fraction", "max_images_per_class")

class PreprocessError(InputError):
    """The build failed for a reason the user can act on (too many unreadable files, no images)."""


# ---------------------------------------------------------------- entry points

def ensure_preprocessed(config: Config, source: Optional[Source] = None) -> Manifest:
    """The preprocessed data for a stage that reads it (train, tune and each of its trials).

    A build in ``data.output`` made with the same data config is used as it is, without touching
    the source: on a cluster it may be on another node, a download away, or gone, and listing or
    hashing it at every start costs minutes at scale. Changes to the source itself are the
    preprocess stage's business (``pipeline preprocess`` compares its fingerprint). Without a
    current build, it is built here, which needs the source (``source``: already resolved)."""
    output = storage.absolute(config.data.output)
    existing = _read_manifest(output)
    if existing is not None and why_stale_for_config(existing, config.data) is None:
        log.info(f"using the preprocessed data at {output} (built {existing.get('created')} from "
                 f"{existing.get('source', {}).get('spec')}; `pipeline preprocess` picks up changes to the source)")
        return Manifest(output, existing)
    return run_preprocess(config, force=False, source=source)


def source_to_build(config: Config, stage: str, force: bool = False) -> Optional[Source]:
    """The listed source if ``stage`` will read it (preprocess always does, to compare it; train
    and tune only without a current build), else None. Called before Ray starts: a missing, empty
    or damaged source fails in a second, not after a cluster has been started or joined."""
    output = storage.absolute(config.data.output)
    existing = _read_manifest(output)
    stale = why_stale_for_config(existing, config.data) if existing is not None else None
    if stage != "preprocess" and existing is not None and stale is None and not force:
        return None
    try:
        return resolve_source(config.data)
    except SourceError as error:
        if existing is None or force:
            raise
        if stale is None:
            raise SourceError(f"{error}; the preprocessed data at {output} matches this data config, and the "
                              f"train and tune stages use it as it is without the source") from None
        raise SourceError(f"the preprocessed data at {output} must be rebuilt ({stale}), which needs the "
                          f"source: {error}") from None


def run_preprocess(config: Config, force: bool = False, source: Optional[Source] = None) -> Manifest:
    """Build ``config.data.output`` from ``config.data.source`` unless a matching build exists.
    ``source``: the source already resolved by ``source_to_build`` (else it is resolved here).
    Runs on the Ray the caller started or joined; without one, Ray Data starts a local Ray."""
    started = time.perf_counter()
    data = config.data
    output = storage.absolute(data.output)
    if source is None:
        source = source_to_build(config, "preprocess", force)
    else:
        started -= source.seconds  # resolved before Ray started: still part of this build's time
    existing = _read_manifest(output)
    stale = "--force" if force else (why_stale_for_config(existing, data) if existing is not None else None)
    timings = {"source_seconds": source.seconds}  # download, extraction, listing
    config_fingerprint = data_config_fingerprint(data)

    if existing is not None and not force:
        stale = stale or _why_source_changed(existing, source)
        if stale is None:
            log.info(f"reusing preprocessed data at {output} (same source and config; pass --force to rebuild)")
            return Manifest(output, existing)
        log.info(f"rebuilding preprocessed data at {output}: {stale}")
    elif existing is not None:
        log.info(f"rebuilding preprocessed data at {output} (--force)")

    splits = split_source(source, data)
    if not splits.get("train"):
        raise PreprocessError(f"no training images left in {source.root} after the split "
                              f"(data.val_fraction={data.val_fraction})")
    log.info("splits: " + ", ".join(f"{name} {len(items)}" for name, items in splits.items())
        + (f" ({data.split_method} split, val_fraction {data.val_fraction}, seed {data.split_seed})"
           if "val" in splits else ""))

    build = f"shards-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    try:
        # Leased while it is written: a concurrent build committing first must not delete it.
        with lease(output, build, "build"):
            writing = time.perf_counter()
            results = {name: _write_split(name, items, source, data, output, build)
                       for name, items in splits.items()}
            timings["decode_and_write_seconds"] = time.perf_counter() - writing
            # The images this build read: with data.max_images_per_class, fewer than the source holds.
            read = sum(len(items) for items in splits.values())
            manifest = _commit(config, source, config_fingerprint, output, build, results, started, timings, read)
    except BaseException:
        # Nothing of a failed build stays behind; the previous manifest (if any) stays valid.
        storage.delete(storage.join(output, build))
        raise
    # Older builds go, unless a training run (or another build) still holds them.
    removed = collect_garbage(output, keep=build)
    if removed:
        log.info(f"removed {len(removed)} older shard folder(s) that no run uses: {', '.join(removed)}")
    counts = manifest.raw["counts"]
    log.info(f"done: {counts['written']} rows in {manifest.raw['elapsed_seconds']:.1f} s = "
        f"{manifest.raw['images_per_second']:.0f} rows/s (source {timings['source_seconds']:.1f} s, "
        f"decode + write {timings['decode_and_write_seconds']:.1f} s), written to {output} "
        f"({counts['seen']} images read, {counts['rejected']} rejected)")
    return manifest


def data_config_fingerprint(data: DataConfig) -> str:
    """Fingerprint of the data settings that affect the shards (not where they live)."""
    identity = data.source if data.source == "cifar10" else storage.absolute(data.source)
    values = {"schema_version": SCHEMA_VERSION, "source": identity}
    values.update({key: getattr(data, key) for key in SHARD_AFFECTING_KEYS})
    resize = resolved_resize(data.resize, data.image_size)
    if resize != "squash":  # builds from before data.resize existed squashed: their fingerprint stands
        values["resize"] = resize
    encoding = stored_encoding(data)
    if encoding["format"] != "raw":  # likewise: builds from before data.encoding stored raw pixels
        values["encoding"] = encoding
    return fingerprint(values)


def _read_manifest(output: str) -> Optional[dict]:
    path = storage.join(output, MANIFEST_NAME)
    if not storage.exists(path):
        return None
    try:
        return storage.read_json(path)
    except ValueError:
        return None  # unreadable: treated as absent, the build below replaces it


def why_stale_for_config(existing: dict, data: DataConfig) -> Optional[str]:
    """None when the existing build holds what ``data`` asks for (read from the manifest and the
    shard listing alone, never the source), else the reason to rebuild."""
    if existing.get("schema_version") != SCHEMA_VERSION:
        return f"schema_version {existing.get('schema_version')} != {SCHEMA_VERSION}"
    if existing.get("decode_version", 1) != DECODE_VERSION:
        return (f"its images were decoded by an older version (decode version {existing.get('decode_version', 1)} "
                f"-> {DECODE_VERSION}: {DECODE_CHANGES[DECODE_VERSION]})")
    if existing.get("config_fingerprint") != data_config_fingerprint(data):
        before = existing.get("data_config") or {}
        changed = [f"{key} {before.get(key)!r} -> {getattr(data, key)!r}"
                   for key in ("source",) + SHARD_AFFECTING_KEYS if before.get(key) != getattr(data, key)]
        resize = resolved_resize(data.resize, data.image_size)
        if existing.get("resize", "squash") != resize:
            changed.append(f"resize {existing.get('resize', 'squash')!r} -> {resize!r}")
        stored, wanted = described(existing.get("encoding")), described(stored_encoding(data))
        if stored != wanted:
            changed.append(f"encoding {stored!r} -> {wanted!r}")
        return "changed data." + ", data.".join(changed) if changed else "the data config changed"
    output = storage.absolute(data.output)
    for split in existing.get("splits", {}).values():
        for shard in split["shards"]:
            if not storage.exists(storage.join(output, *shard["path"].split("/"))):
                return f"shard {shard['path']} is missing"
    return None


def _why_source_changed(existing: dict, source: Source) -> Optional[str]:
    return None if existing.get("source_fingerprint") == source.fingerprint else "the source changed"


# ---------------------------------------------------------------- split

def split_source(source: Source, data: DataConfig) -> dict[str, list[Item]]:
    """{"train", "val" (if val_fraction > 0), "test" (if the source has one)} -> items."""
    items = source.items_by_split["train"]
    if data.max_images_per_class is not None:
        # A quick-trial subset: the first N of each class in source order (deterministic).
        kept, taken = [], {}
        for item in items:
            if taken.get(item.label, 0) < data.max_images_per_class:
                taken[item.label] = taken.get(item.label, 0) + 1
                kept.append(item)
        items = kept
    train, val = split_train_val(items, data.val_fraction, data.split_method, data.split_seed)
    splits = {"train": train}
    if val:
        splits["val"] = val
    elif data.val_fraction > 0:
        log.info(f"note: val_fraction {data.val_fraction} of {len(source.items_by_split['train'])} images rounds "
            f"to 0: no val split")
    if source.items_by_split.get("test"):
        splits["test"] = source.items_by_split["test"]
    if data.split_method == "tail" and source.kind == "image_folder" and val:
        classes = {item.label for item in val}
        if len(classes) < len(source.class_names):
            log.info(f"note: split_method=tail took the last {len(val)} files in sorted path order, which covers "
                f"only {len(classes)} of {len(source.class_names)} classes; split_method=stratified "
                f"holds out every class equally")
    # Rows are written in a seeded random order so that every shard mixes all classes: training
    # streams shards through a bounded local shuffle buffer, and class-sorted shards would give
    # nearly single-class batches (BatchNorm then normalises the class signal away).
    return {name: [items[i] for i in np.random.default_rng([data.split_seed, index]).permutation(len(items))]
            for index, (name, items) in enumerate(splits.items())}


def split_train_val(items: list[Item], val_fraction: float, method: str, seed: int) -> tuple[list[Item], list[Item]]:
    """(train, val), both in source order.

    stratified: per class, a permutation seeded by (seed, label) picks exactly
        round(n_class * val_fraction) items for val; one class's split does not depend on the others.
    tail: the last round(n * val_fraction) items in source order, as Keras ``validation_split``.
    """
    if val_fraction <= 0:
        return list(items), []
    if method == "tail":
        count = round(len(items) * val_fraction)
        cut = len(items) - count
        return list(items[:cut]), list(items[cut:])
    if method != "stratified":
        raise ValueError(f"unknown data.split_method {method!r}; use 'stratified' or 'tail'")
    positions_by_label: dict[int, list[int]] = {}
    for position, item in enumerate(items):
        positions_by_label.setdefault(item.label, []).append(position)
    in_val = np.zeros(len(items), dtype=bool)
    for label, positions in positions_by_label.items():
        count = round(len(positions) * val_fraction)
        chosen = np.random.default_rng([seed, label]).permutation(len(positions))[:count]
        in_val[np.asarray(positions)[chosen]] = True
    return ([item for item, val in zip(items, in_val) if not val],
            [item for item, val in zip(items, in_val) if val])


# ---------------------------------------------------------------- Ray Data: decode

def decode_images(batch: dict[str, np.ndarray], image_size: int, resize: str, encoding: str = "raw",
                  quality: int = 90) -> pa.Table:
    """Items -> their pixels as the shards store them (``encoding``), with each image's per-channel
    sums and sums of squares (exact integers: the train split's mean and std add them up). A file
    that cannot be read or decoded becomes a row with an ``error`` reason (and empty image)
    instead of failing the dataset; the writer skips and reports it."""
    images, errors, sums = [], [], np.zeros((len(batch["path"]), 6), dtype=np.int64)
    for index, (path, row) in enumerate(zip(batch["path"], batch["row"])):
        try:
            if row >= 0:
                pixels = cifar_pixels(path, int(row), image_size)
            else:
                with open(path, "rb") as handle:
                    pixels = decode_image(handle.read(), image_size, resize=resize)
            images.append(encode_pixels(pixels, encoding, quality))
            errors.append("")
        except (UnreadableImage, OSError) as error:
            images.append(b"")
            errors.append(str(error) or type(error).__name__)
            continue
        values = pixels.reshape(-1, 3).astype(np.int64)
        sums[index, :3] = values.sum(axis=0)
        sums[index, 3:] = (values * values).sum(axis=0)
    return pa.table({
        "index": pa.array(batch["index"], pa.int64()),
        "id": pa.array(batch["id"], pa.string()),
        "label": pa.array(batch["label"], pa.int64()),
        "image": pa.array(images, pa.binary()),
        "error": pa.array(errors, pa.string()),
        "pixel_sums": pa.FixedSizeListArray.from_arrays(pa.array(sums.ravel(), pa.int64()), 6),
    })


# ---------------------------------------------------------------- Ray Data: write

def shard_name(index: np.ndarray, rows_per_shard: int, split_rows: int) -> str:
    """``part-<n>.parquet`` for the batch holding exactly rows [n*R, (n+1)*R) of the split.

    Blocks are aligned to shard boundaries and the order is preserved, so every batch should be a
    whole shard. Should Ray ever hand over a batch that is not, it is named after its first row
    instead (batches never share rows, so names stay unique): no batch can overwrite another's file.
    """
    first = int(index.min())
    shard = first // rows_per_shard
    whole = (first == shard * rows_per_shard
             and len(index) == min(rows_per_shard, split_rows - first)
             and int(index.max()) - first == len(index) - 1)
    return f"part-{shard:05d}.parquet" if whole else f"part-from-row-{first:08d}.parquet"


def write_shards(batch: pa.Table, output: str, build: str, split: str, rows_per_shard: int,
                 split_rows: int, num_classes: int) -> dict[str, np.ndarray]:
    """One batch -> one Parquet file of its good rows, and a one-row summary for the manifest.

    Memory beyond the batch itself stays within a few row groups (Parquet's page and compression
    buffers): the good rows are the batch itself when none failed (no filtered copy)."""
    errors = batch.column("error").to_numpy(zero_copy_only=False)
    good = errors == ""
    ids = batch.column("id")
    rejected = [{"id": ids[int(i)].as_py(), "split": split, "reason": str(errors[i])} for i in np.flatnonzero(~good)]
    labels = batch.column("label").to_numpy()[good]

    pixel_sum, pixel_sum_sq, relative_path = [0.0] * 3, [0.0] * 3, ""
    if good.any():
        table = batch if good.all() else batch.filter(pa.array(good))
        sums = np.asarray(table.column("pixel_sums").combine_chunks().flatten()).reshape(-1, 6).sum(axis=0)
        pixel_sum, pixel_sum_sq = [float(value) for value in sums[:3]], [float(value) for value in sums[3:]]
        table = table.select(["id", "label", "image"])
        row_bytes = max(1, table.column("image").nbytes // table.num_rows)  # encoded images are smaller
        relative_path = shard_relative_path(build, split, shard_name(batch.column("index").to_numpy(),
                                                                     rows_per_shard, split_rows))
        with storage.open_output(storage.join(output, *relative_path.split("/"))) as stream:
            # Row groups of at most ROW_GROUP_BYTES: Parquet buffers (and compresses) a whole row
            # group before writing it, a second copy of the shard if it were one group. No
            # dictionary for the pixels: every image is unique, the attempt only costs memory. And no
            # compression for them: Snappy saves 0.1% of CIFAR-10's pixels and triples the time a
            # worker's read task spends decoding them (BENCHMARKS.md, "A worker's input at 224 px").
            pq.write_table(table, stream, row_group_size=max(1, ROW_GROUP_BYTES // row_bytes),
                           use_dictionary=["id", "label"], compression={"id": "snappy", "label": "snappy", "image": "none"})
    return {
        "path": np.array([relative_path]),
        "rows": np.array([int(good.sum())], dtype=np.int64),
        "pixel_sum": np.array([json.dumps(pixel_sum)]),
        "pixel_sum_sq": np.array([json.dumps(pixel_sum_sq)]),
        "class_counts": np.array([json.dumps(np.bincount(labels, minlength=num_classes).tolist())]),
        "rejected": np.array([json.dumps(rejected)]),
    }


def shard_rows(data: DataConfig) -> int:
    """Rows per shard: ``data.rows_per_shard``, fewer when that many images would exceed
    ``MAX_SHARD_BYTES`` of pixels (224-pixel images: ~1,700 rows rather than 10,000, 1.5 GB), so
    that a writer task's memory stays bounded whatever the image size."""
    row_bytes = data.image_size**2 * 3
    return max(1, min(data.rows_per_shard, MAX_SHARD_BYTES // row_bytes))


def _item_blocks(items: list[Item], rows_per_shard: int) -> list[pa.Table]:
    """Items as Arrow blocks that never straddle a shard boundary, so that the writer's batches of
    rows_per_shard rows are whole shards (Ray bundles consecutive blocks up to the batch size)."""
    blocks = []
    for start in range(0, len(items), rows_per_shard):
        stop = min(len(items), start + rows_per_shard)
        pieces = -(-(stop - start) // ROWS_PER_DECODE_BLOCK)
        for chunk in np.array_split(np.arange(start, stop), pieces):
            chunk_items = [items[i] for i in chunk]
            blocks.append(pa.table({
                "index": pa.array(chunk, pa.int64()),
                "id": pa.array([item.id for item in chunk_items], pa.string()),
                "label": pa.array([item.label for item in chunk_items], pa.int64()),
                "path": pa.array([item.path for item in chunk_items], pa.string()),
                "row": pa.array([item.row for item in chunk_items], pa.int64()),
            }))
    return blocks


def _on_this_node() -> dict:
    """map_batches arguments that keep tasks on the driver's node, where a local source (or a local
    output folder) lives; harmless on a single node. A ``label_selector`` on the built-in node-id label
    where map_batches takes one, else a hard NodeAffinitySchedulingStrategy (see docs/design-notes.md,
    "Keeping preprocess tasks on the driver's node")."""
    import ray
    from ray.data import Dataset

    node_id = ray.get_runtime_context().get_node_id()
    if "label_selector" in inspect.signature(Dataset.map_batches).parameters:
        return {"label_selector": {"ray.io/node-id": node_id}}
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}


def _this_node_cpus() -> int:
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return max(1, int(node["Resources"].get("CPU", 1)))
    return 1


def _writer_memory(data: DataConfig) -> int:
    """Bytes reserved per writer task: a worker process with pyarrow loaded (~150 MiB), plus the
    batch (one shard) and Parquet's buffers (a few row groups, see write_shards). Reserving it also keeps Ray Data
    from fusing decode and write into one task per shard, which would cut the decode parallelism
    to the number of shards."""
    shard_bytes = shard_rows(data) * (data.image_size**2 * 3 + 64)
    return int(shard_bytes + 4 * ROW_GROUP_BYTES + 256 * 2**20)


def _write_split(split: str, items: list[Item], source: Source, data: DataConfig, output: str,
                 build: str) -> list[dict]:
    import ray.data

    rows_per_shard = shard_rows(data)
    log.info(f"writing split {split} ({len(items)} rows) to {storage.join(output, build, split)} ...")
    blocks = _item_blocks(items, rows_per_shard)
    dataset = ray.data.from_arrow(blocks)
    # In order: shard n holds rows [n*R, (n+1)*R) of the split, so a rebuild writes the same files.
    dataset.context.execution_options.preserve_order = True
    # Ray Data's per-operator resource reservation keeps a share of the CPUs for the writer, which
    # runs only once per shard, and leaves decode a fraction of the cores (see BENCHMARKS.md,
    # "Decode tasks under Ray Data's resource reservation").
    # Without it, decode tasks are capped explicitly below instead: 2 per CPU of this node keeps
    # every core busy (and the writer fed) without queueing the whole split at once.
    dataset.context.op_resource_reservation_enabled = False
    on_this_node = _on_this_node()
    dataset = dataset.map_batches(
        decode_images, batch_size=None, batch_format="numpy",
        fn_kwargs={"image_size": data.image_size, "resize": resolved_resize(data.resize, data.image_size),
                   "encoding": resolved_encoding(data.encoding, data.image_size), "quality": data.encoding_quality},
        compute=ray.data.TaskPoolStrategy(size=min(len(blocks), 2 * _this_node_cpus())), **on_this_node)
    dataset = dataset.map_batches(
        write_shards, batch_size=rows_per_shard, batch_format="pyarrow",
        fn_kwargs={"output": output, "build": build, "split": split, "rows_per_shard": rows_per_shard,
                   "split_rows": len(items), "num_classes": len(source.class_names)},
        memory=_writer_memory(data),
        # A local output folder must be the driver's disk too, or shards would scatter over nodes.
        **({} if storage.is_uri(output) else on_this_node))
    return dataset.take_all()


# ---------------------------------------------------------------- manifest

def _commit(config: Config, source: Source, config_fingerprint: str, output: str, build: str,
            results: dict[str, list[dict]], started: float, timings: dict[str, float], seen: int) -> Manifest:
    """Check the failure budget, add up the shard writers' summaries, then write the manifest."""
    data = config.data
    rejected = [entry for summaries in results.values() for row in summaries for entry in json.loads(row["rejected"])]
    if seen and len(rejected) / seen > data.max_failed_fraction:
        reasons = "; ".join(f"{entry['id']}: {entry['reason']}" for entry in rejected[:5])
        raise PreprocessError(
            f"{len(rejected)} of {seen} images ({len(rejected) / seen:.1%}) could not be read, more than "
            f"data.max_failed_fraction={data.max_failed_fraction}; first reasons: {reasons}. No manifest "
            f"was written; fix or remove those files, or raise data.max_failed_fraction")

    splits, sums = {}, {}
    for name, summaries in results.items():
        class_counts = np.sum([json.loads(row["class_counts"]) for row in summaries], axis=0).astype(int)
        shards = sorted(({"path": str(row["path"]), "rows": int(row["rows"])} for row in summaries if row["rows"]),
                        key=lambda shard: shard["path"])
        splits[name] = {"rows": sum(shard["rows"] for shard in shards),
                        "class_counts": dict(zip(source.class_names, class_counts.tolist())),
                        "shards": shards}
        sums[name] = (np.sum([json.loads(row["pixel_sum"]) for row in summaries], axis=0),
                      np.sum([json.loads(row["pixel_sum_sq"]) for row in summaries], axis=0))
    if splits["train"]["rows"] == 0:
        raise PreprocessError(f"no readable training images in {source.root}")
    splits = {name: splits[name] for name in SPLITS if name in splits and splits[name]["rows"]}

    pixels = splits["train"]["rows"] * data.image_size**2
    mean = sums["train"][0] / pixels
    std = np.sqrt(np.maximum(sums["train"][1] / pixels - mean**2, 0.0))
    return write_manifest(output, config, source, config_fingerprint=config_fingerprint, build=build, splits=splits,
                          mean=mean, std=std, rejected=rejected, seen=seen,
                          elapsed=time.perf_counter() - started, timings=timings)


def summarize(manifest: Manifest) -> str:
    """One paragraph for the end of a job: splits, rows, rejected, speed, where."""
    raw = manifest.raw
    splits = ", ".join(f"{name} {split['rows']} rows in {len(split['shards'])} shard(s)"
                       for name, split in manifest.splits.items())
    rejected = raw["counts"]["rejected"]
    reasons = ""
    if rejected:
        reasons = " (" + "; ".join(f"{e['id']}: {e['reason']}" for e in raw["rejected"][:3]) \
                  + ("; ..." if rejected > 3 else "") + ")"
    return (f"Preprocessed {raw['source']['spec']} ({raw['source']['kind']}, {manifest.num_classes} classes, "
            f"{manifest.image_size}x{manifest.image_size} RGB, stored {described(raw.get('encoding'))}) into {manifest.root}: {splits}; "
            f"{rejected} of {raw['counts']['seen']} files rejected{reasons}; "
            f"{raw['images_per_second']:.0f} rows/s over {raw['elapsed_seconds']:.1f} s (built {raw['created']}); "
            f"train mean {[round(v, 1) for v in manifest.mean]}, std {[round(v, 1) for v in manifest.std]}; "
            f"manifest: {storage.join(manifest.root, MANIFEST_NAME)}")
