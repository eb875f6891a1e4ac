"""Batch inference: classify an image, a folder, a glob, a file list or a bucket prefix with Ray Data.

Data flow, streaming end to end (the driver holds the list of paths, never pixels or predictions):

    list_inputs(input)               driver: file paths only (strings)
      -> ray.data.from_arrow         blocks of paths (+ the true class when the folders are labelled)
      -> map_batches(decode_batch)   tasks: read bytes through pyarrow.fs, ``decode_image`` per file;
                                     a file that cannot be read or decoded is written to an error part
                                     and dropped, so one corrupt file never fails the job
      -> map_batches(Predictor)      actor pool: each actor loads the model once, then classifies
      -> write_parquet(staging)      Parquet parts written as batches complete
    then the driver finalises: errors file, predictions (one file sorted by path, or the parts),
    accuracy + confusion matrix from the parts (read batch by batch), and ``summary.json`` last.

Outputs, by the form of ``infer.output``:

    predictions.csv / .parquet   one file sorted by path, written under a temporary name and renamed;
                                 beside it <stem>.errors.csv, <stem>.summary.json and, for labelled
                                 inputs, <stem>.confusion_matrix.png
    any other path (a folder)    predictions/*.parquet (parts, unsorted), errors.csv,
                                 confusion_matrix.png, summary.json

The summary file is written last: if it is there, everything it names is complete. Staging lives
in a hidden folder beside the output (``.<name>.staging-<id>`` or ``<dir>/.staging-<id>``) and is
deleted at the end.

Prediction columns (the same in CSV and Parquet, so a file can be swapped for the other):

    path                  string   absolute local path or URI of the image
    predicted_class       string   class name of the arg-max
    confidence            float32  probability of predicted_class
    top_k_classes         string   JSON list of the infer.top_k most probable class names, best first
    top_k_probabilities   string   JSON list of their probabilities (rounded to 6 decimals)
    true_class            string   labelled inputs only: the folder name
    true_class_rank       int32    labelled inputs only: 1 = top-1 correct, <= 5 = top-5 correct

Top-k is stored as JSON strings rather than list columns or top1..topK columns so that the schema
does not depend on the file format or on k: ``json.loads`` (or DuckDB's ``json``) reads it back.
Errors file columns: ``path``, ``reason``, sorted by path.

Labelled inputs: when every file sits in a folder named after one of the model's classes (the
first folder level below the input root, e.g. ``test/<class>/x.png``; for file lists and single
files, the file's parent folder) the summary also holds top-1/top-5 accuracy, per-class accuracy
and the confusion matrix over the classified files (failed files are counted apart).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import posixpath
import re
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

import pipeline  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)
from pipeline import PipelineError, storage
from pipeline.config import Config
from pipeline.data.images import IMAGE_EXTENSIONS, UnreadableImage, decode_image, is_hidden, is_image_path

__all__ = ["Predictor", "list_inputs", "decode_batch", "build_dataset", "run_inference", "predict_image",
           "main", "prediction_columns", "prediction_schema", "ERROR_SCHEMA"]

TOP5 = 5  # top-5 accuracy is reported whatever infer.top_k is (the original recipe's second metric)
GLOB_CHARACTERS = "*?["
# The driver puts the path list into the object store as at most this many blocks: enough for
# every decode task to get its own block, few enough that millions of paths stay cheap to track.
MAX_PATH_BLOCKS = 10_000
PROBABILITY_DECIMALS = 6
# Working memory reserved per decode task: a batch of files is decoded one at a time, and the
# largest photos decode to ~100 MB of pixels (6000 x 4000 RGBA) before the resize.
DECODE_TASK_MEMORY_BYTES = 256 * 1024**2

ERROR_SCHEMA = pa.schema([("path", pa.string()), ("reason", pa.string())])


def prediction_schema(labelled: bool) -> pa.Schema:
    fields = [
        ("path", pa.string()),
        ("predicted_class", pa.string()),
        ("confidence", pa.float32()),
        ("top_k_classes", pa.string()),
        ("top_k_probabilities", pa.string()),
    ]
    if labelled:
        fields += [("true_class", pa.string()), ("true_class_rank", pa.int32())]
    return pa.schema(fields)


# ---------------------------------------------------------------- inputs

def list_inputs(input: str) -> list[str]:
    """Image paths named by ``input``, sorted and unique.

    ``input`` may be an image file, a directory (walked recursively; image extensions only,
    case-insensitive; hidden files and folders skipped), a glob (``/x/**/*.png``; ``**`` spans
    folders; image extensions only), a ``.txt`` file list (one path per line; blank lines and
    ``#`` comments skipped; relative paths are relative to the list's folder; entries are kept
    as given, so a missing one is reported in the errors file), or an ``s3://``/``gs://`` prefix.
    Raises FileNotFoundError if ``input`` does not exist, ValueError if it holds no images.
    """
    paths, _root = _resolve_inputs(input)
    return paths


def _resolve_inputs(input: str) -> tuple[list[str], Optional[str]]:
    """(paths, label root): the root is the folder whose first level names the classes, or None
    when the parent folder of each file is used (file lists, single files)."""
    if input is None or not str(input).strip():
        raise ValueError("no input given: set --input (or infer.input) to an image, a directory, "
                         "a glob, a .txt file list or an s3:// prefix")
    input = str(input).strip()
    scheme = _scheme(input)
    if not storage.exists(input) and any(character in input for character in GLOB_CHARACTERS):
        paths, root = _glob(input, scheme)
    else:
        fs, inner = storage.filesystem(input)
        kind = fs.get_file_info(inner).type
        if kind == pafs.FileType.NotFound:
            raise FileNotFoundError(f"input not found: {input}")
        if kind == pafs.FileType.Directory:
            root = inner.rstrip("/") or "/"
            paths = [scheme + path for path in _walk(fs, root)]
        elif inner.lower().endswith(".txt"):
            root = None
            paths = _read_file_list(input)
        elif is_image_path(inner):
            root = None
            paths = [scheme + inner]
        else:
            raise ValueError(f"input {input} is not an image ({', '.join(IMAGE_EXTENSIONS)}), "
                             "a directory, a glob or a .txt file list")
    if not paths:
        raise ValueError(f"no images found in {input}: looked for files ending in "
                         f"{', '.join(IMAGE_EXTENSIONS)} (any case; hidden files skipped)")
    return sorted(set(paths)), root


def _scheme(path: str) -> str:
    """'s3://' for s3://bucket/key; '' for local paths (file:// URIs become local paths)."""
    if storage.is_uri(path) and not path.startswith("file://"):
        return path.split("://", 1)[0] + "://"
    return ""


def _walk(fs: pafs.FileSystem, root: str, keep=None) -> Iterator[str]:
    """Image files below ``root`` (recursively), skipping anything hidden below it."""
    prefix = root.rstrip("/") + "/"
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type != pafs.FileType.File or not info.path.startswith(prefix):
            continue
        relative = info.path[len(prefix):]
        if any(is_hidden(part) for part in relative.split("/")):
            continue
        if is_image_path(info.path) and (keep is None or keep(info.path)):
            yield info.path


def _glob(pattern: str, scheme: str) -> tuple[list[str], str]:
    fs, inner = storage.filesystem(pattern)
    parts = inner.split("/")
    first_wildcard = next(index for index, part in enumerate(parts)
                          if any(character in part for character in GLOB_CHARACTERS))
    base = "/".join(parts[:first_wildcard]) or "/"
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"input not found: {pattern} (folder {scheme}{base} does not exist)")
    regex = _glob_regex(inner)
    return [scheme + path for path in _walk(fs, base, keep=regex.match)], base


def _glob_regex(pattern: str) -> re.Pattern:
    """Shell-style glob over whole paths: * and ? stay within one folder, ** spans any number."""
    parts = pattern.split("/")
    pieces = []
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        if part == "**":
            pieces.append(".*" if last else "(?:[^/]*/)*")
        else:
            pieces.append(_glob_component_regex(part) + ("" if last else "/"))
    return re.compile("".join(pieces) + r"\Z")


def _glob_component_regex(part: str) -> str:
    pieces, index = [], 0
    while index < len(part):
        character = part[index]
        index += 1
        if character == "*":
            pieces.append("[^/]*")
        elif character == "?":
            pieces.append("[^/]")
        elif character == "[":
            end = part.find("]", index + 1)  # "[]x]": a ']' first in the set is a member
            if end == -1:
                pieces.append(re.escape(character))
                continue
            members = part[index:end]
            index = end + 1
            if members.startswith("!"):
                members = "^" + members[1:]
            pieces.append("[" + members.replace("\\", "\\\\") + "]")
        else:
            pieces.append(re.escape(character))
    return "".join(pieces)


def _read_file_list(list_path: str) -> list[str]:
    absolute = storage.absolute(list_path)
    folder = posixpath.dirname(absolute)
    paths = []
    for line in storage.read_text(absolute).splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if storage.is_uri(entry):
            paths.append(entry[len("file://"):] if entry.startswith("file://") else entry)
        elif storage.is_uri(folder):
            paths.append(posixpath.join(folder, entry))
        else:
            paths.append(os.path.normpath(os.path.join(folder, os.path.expanduser(entry))))
    return paths


def _label_folder(path: str, root: Optional[str]) -> Optional[str]:
    """Folder name that would be the class of ``path``: the first level below ``root`` (None if
    the file sits directly in the root), or the parent folder when there is no root."""
    inner = path.split("://", 1)[1] if storage.is_uri(path) else path
    if root is None:
        return posixpath.basename(posixpath.dirname(inner)) or None
    prefix = root.rstrip("/") + "/"
    if not inner.startswith(prefix):
        return None
    relative = inner[len(prefix):].split("/")
    return relative[0] if len(relative) > 1 else None


def _labels(paths: list[str], root: Optional[str], class_names: list[str]) -> Optional[np.ndarray]:
    """Class index per path when every path's folder is a class name, else None (not labelled)."""
    index = {name: position for position, name in enumerate(class_names)}
    labels = np.empty(len(paths), dtype=np.int32)
    for position, path in enumerate(paths):
        label = index.get(_label_folder(path, root))
        if label is None:
            return None
        labels[position] = label
    return labels


# ---------------------------------------------------------------- decode (Ray Data tasks)

_LOCAL_FILESYSTEM = pafs.LocalFileSystem()


@lru_cache(maxsize=None)
def _bucket_filesystem(bucket_uri: str) -> pafs.FileSystem:
    # One filesystem per bucket and process: creating an S3 client per file costs a round trip.
    return pafs.FileSystem.from_uri(bucket_uri)[0]


def _read_file(path: str) -> bytes:
    scheme = _scheme(path)
    if scheme in ("s3://", "gs://", "gcs://"):
        inner = path[len(scheme):]
        fs = _bucket_filesystem(scheme + inner.split("/", 1)[0])
    elif scheme:
        fs, inner = storage.filesystem(path)
    else:
        fs, inner = _LOCAL_FILESYSTEM, path
    with fs.open_input_stream(inner) as stream:
        return stream.read()


def decode_batch(batch: dict[str, np.ndarray], *, image_size: int, errors_dir: str
                 ) -> Iterator[dict[str, np.ndarray]]:
    """Paths -> decoded images (uint8, image_size x image_size RGB) for the files that decode.

    Every other file is written with its reason to a Parquet part in ``errors_dir`` (any column
    besides ``path``, e.g. the true class, travels with the good rows). Nothing is yielded for a
    batch without a good file, so the model actors never see empty batches.
    """
    paths = batch["path"]
    images, good, errors = [], [], []
    for position, path in enumerate(paths):
        try:
            data = _read_file(path)
        except Exception as error:  # missing, permission denied, network: the file, not the job
            errors.append((path, f"cannot read file: {error}"))
            continue
        try:
            images.append(decode_image(data, image_size))
        except UnreadableImage as error:
            errors.append((path, str(error)))
            continue
        except Exception as error:  # decode_image wraps PIL's errors; anything else is still per file
            errors.append((path, f"cannot decode image: {type(error).__name__}: {error}"))
            continue
        good.append(position)
    if errors:
        _write_error_part(errors, errors_dir)
    if good:
        output = {column: values[good] for column, values in batch.items()}
        output["path"] = np.asarray(output["path"], dtype=str)
        output["image"] = np.stack(images)
        yield output


def _write_error_part(errors: list[tuple[str, str]], errors_dir: str) -> None:
    import pyarrow.parquet as pq

    table = pa.table({"path": [str(path) for path, _ in errors], "reason": [reason for _, reason in errors]},
                     schema=ERROR_SCHEMA)
    # A unique name per batch: a retried task adds a duplicate part, removed when combining.
    with storage.open_output(storage.join(errors_dir, f"{uuid.uuid4().hex}.parquet")) as stream:
        pq.write_table(table, stream)


# ---------------------------------------------------------------- the model (Ray Data actors)

class IncompleteOutput(PipelineError):
    """Fewer results than input files reached the driver; no final output was written."""


class Predictor:
    """Callable class for ``Dataset.map_batches``: loads the model once per actor, then maps
    {"path", "image" uint8 (N, H, W, 3)[, "label" int]} -> the prediction columns above."""

    def __init__(self, model_path: str, top_k: int, gpus: float = 0.0, facts_dir: Optional[str] = None):
        from pipeline import accelerators
        from pipeline.models.saving import load_model

        # Before the model touches a device: none if the actor holds no GPU (Ray no longer hides
        # the node's GPUs from it), memory growth where fractional actors share one.
        accelerators.hide_unrequested_gpus(gpus)
        devices = accelerators.visible_gpus()
        self.model, metadata = load_model(model_path)
        self.class_names = np.asarray(metadata["class_names"], dtype=str)
        self.image_size = int(metadata["image_size"])
        self.top_k = min(int(top_k), len(self.class_names))
        if facts_dir:
            facts = accelerators.process_facts(devices)
            storage.write_json(storage.join(facts_dir, f"actor-{facts['node_id'][:12]}-{facts['pid']}.json"), facts)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch["image"]
        expected = (self.image_size, self.image_size, 3)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must have shape (batch, {', '.join(map(str, expected))}) for this model, "
                             f"got {images.shape}")
        if len(images):
            # predict_on_batch runs the model's compiled predict function on exactly this batch,
            # without model.predict's per-call dataset and callback set-up.
            probabilities = np.asarray(self.model.predict_on_batch(images.astype(np.float32)))
        else:
            probabilities = np.zeros((0, len(self.class_names)), dtype=np.float32)
        return prediction_columns(batch["path"], probabilities, self.class_names, self.top_k,
                                  batch.get("label"))


def prediction_columns(paths, probabilities: np.ndarray, class_names: np.ndarray, top_k: int,
                       labels: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Probabilities (N, classes) -> the prediction columns (see the module docstring)."""
    class_names = np.asarray(class_names, dtype=str)
    # A stable sort breaks ties towards the lower class index, as np.argmax does.
    order = np.argsort(-probabilities, axis=1, kind="stable")
    top = order[:, :top_k]
    top_probabilities = np.take_along_axis(probabilities, top, axis=1)
    columns = {
        "path": np.asarray(paths, dtype=str),
        "predicted_class": class_names[order[:, 0]] if len(order) else np.asarray([], dtype=str),
        "confidence": top_probabilities[:, 0].astype(np.float32) if len(order) else np.zeros(0, np.float32),
        "top_k_classes": np.asarray([json.dumps(class_names[row].tolist()) for row in top], dtype=str),
        "top_k_probabilities": np.asarray(
            [json.dumps([round(float(value), PROBABILITY_DECIMALS) for value in row]) for row in top_probabilities],
            dtype=str),
    }
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        columns["true_class"] = class_names[labels]
        columns["true_class_rank"] = (np.argmax(order == labels[:, None], axis=1) + 1).astype(np.int32)
    return columns


# ---------------------------------------------------------------- outputs

@dataclass
class OutputLayout:
    kind: str           # "csv", "parquet" or "directory"
    predictions: str    # the file, or the folder of parts
    errors: str
    summary: str
    confusion_matrix: str
    staging: str


# Output names that mean a file of another format: refused rather than made into a folder of that
# name (a dotted folder name such as results.v2 stays a folder).
OTHER_FILE_EXTENSIONS = (".json", ".jsonl", ".ndjson", ".txt", ".tsv", ".xls", ".xlsx", ".feather", ".arrow",
                         ".orc", ".avro", ".npy", ".npz", ".pkl", ".h5", ".hdf5", ".db", ".sqlite")


def _output_layout(output: str) -> OutputLayout:
    output = storage.absolute(output)
    run_id = f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    lower = output.lower()
    _check_parents_are_folders(output)
    extension = posixpath.splitext(posixpath.basename(output))[1].lower()
    if extension in OTHER_FILE_EXTENSIONS and not storage.is_dir(output):
        raise ValueError(f"output {output} names a {extension} file, which predictions cannot be written as: "
                         "name a .csv or .parquet file, or a directory (no extension) for Parquet parts")
    if lower.endswith((".csv", ".parquet", ".pq")):
        if storage.is_dir(output):
            raise ValueError(f"output {output} is a directory; name a new .csv/.parquet file, "
                             "or a path without those extensions for a directory of Parquet parts")
        stem = output[: output.rfind(".")]
        return OutputLayout(
            kind="csv" if lower.endswith(".csv") else "parquet",
            predictions=output,
            errors=f"{stem}.errors.csv",
            summary=f"{stem}.summary.json",
            confusion_matrix=f"{stem}.confusion_matrix.png",
            staging=storage.join(posixpath.dirname(output), f".{posixpath.basename(output)}.staging-{run_id}"),
        )
    if storage.exists(output) and not storage.is_dir(output):
        raise ValueError(f"output {output} is an existing file; predictions go to a .csv, a .parquet "
                         "or a directory")
    ours = {"predictions", "errors.csv", "summary.json", "confusion_matrix.png"}
    others = [name for name in storage.list_dir(output) if name not in ours and not name.startswith(".staging-")]
    if others:
        # Never mix predictions into (or later replace parts of) a folder that holds something else.
        raise ValueError(f"output directory {output} already holds other files ({', '.join(others[:5])}); "
                         "pass a new or empty directory, or a .csv/.parquet file")
    return OutputLayout(
        kind="directory",
        predictions=storage.join(output, "predictions"),
        errors=storage.join(output, "errors.csv"),
        summary=storage.join(output, "summary.json"),
        confusion_matrix=storage.join(output, "confusion_matrix.png"),
        staging=storage.join(output, f".staging-{run_id}"),
    )


def _parquet_dataset(folder: str, schema: Optional[pa.Schema] = None):
    """pyarrow dataset over the Parquet parts in ``folder`` (None when there are none)."""
    import pyarrow.dataset as pads

    fs, inner = storage.filesystem(folder)
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        return None
    parts = [info.path for info in fs.get_file_info(pafs.FileSelector(inner, recursive=True))
             if info.type == pafs.FileType.File and info.path.endswith(".parquet")]
    if not parts:
        return None
    return pads.dataset(parts, filesystem=fs, format="parquet", schema=schema)


def _write_table(table: pa.Table, path: str, file_format: str) -> None:
    """Write ``table`` as CSV or Parquet at ``path``, all or nothing (``storage.open_output``)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    with storage.open_output(path) as stream:
        if file_format == "csv":
            pacsv.write_csv(table, stream)
        else:
            pq.write_table(table, stream)


def _check_parents_are_folders(output: str) -> None:
    """Refuse an output below an existing file (``notes.txt/predictions.csv``) before any work,
    rather than when the first part is written."""
    if storage.is_uri(output):
        return
    parent = os.path.dirname(output)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise ValueError(f"output {output} is below {parent}, which is a file, not a folder")


def _move_parts(source: str, target: str) -> None:
    """Put the staged Parquet parts at ``target`` (replacing an older run's parts)."""
    storage.delete(target)
    fs, source_inner = storage.filesystem(source)
    _, target_inner = storage.filesystem(target)
    if isinstance(fs, pafs.LocalFileSystem):
        os.replace(source_inner, target_inner)  # one rename: the folder appears whole
        return
    for info in fs.get_file_info(pafs.FileSelector(source_inner, recursive=True)):
        if info.type == pafs.FileType.File:
            fs.move(info.path, target_inner + info.path[len(source_inner):])


def _staged_errors(errors_dir: str) -> pa.Table:
    """The error parts as one table sorted by path, one row per failed file."""
    dataset = _parquet_dataset(errors_dir, ERROR_SCHEMA)
    table = dataset.to_table() if dataset is not None else ERROR_SCHEMA.empty_table()
    if table.num_rows:
        table = table.sort_by("path")
        # A retried decode task writes its error part again: keep one row per path.
        paths = table.column("path").to_numpy(zero_copy_only=False)
        first = np.ones(len(paths), dtype=bool)
        first[1:] = paths[1:] != paths[:-1]
        table = table.filter(pa.array(first))
    return table.cast(ERROR_SCHEMA)


def _check_complete(files_seen: int, staged_predictions: str, errors: pa.Table) -> None:
    """Every listed file must be either classified or failed before any final output is written.
    A shortfall means parts were written where this driver cannot read them, for example to a
    local --output on another node of a multi-node cluster."""
    dataset = _parquet_dataset(staged_predictions)
    classified = dataset.count_rows() if dataset is not None else 0
    if classified + errors.num_rows != files_seen:
        raise IncompleteOutput(
            f"{files_seen:,} files listed but {classified:,} classified + {errors.num_rows:,} failed are "
            f"visible to this driver: the rest went where it cannot read them (a local path on another "
            f"node of the cluster?). Nothing was written to the output; use s3:// or gs:// (or a mount "
            f"every node shares) for infer.input and infer.output")


def _finish_predictions(staged: str, layout: OutputLayout, schema: pa.Schema) -> int:
    """Write the final predictions; returns the number of classified files."""
    dataset = _parquet_dataset(staged)
    if layout.kind == "directory":
        if dataset is None:
            # Keep the layout (and the schema) even when nothing could be classified.
            _write_table(schema.empty_table(), storage.join(staged, "part-empty.parquet"), "parquet")
        rows = dataset.count_rows() if dataset is not None else 0
        _move_parts(staged, layout.predictions)
        return rows
    # One file sorted by path, so that it can be joined or diffed. The sort needs the predictions
    # (not the pixels) in memory: roughly 200-300 bytes per image.
    table = dataset.to_table().select(schema.names).cast(schema) if dataset is not None else schema.empty_table()
    table = table.sort_by("path")
    _write_table(table, layout.predictions, layout.kind)
    return table.num_rows


def _accuracy(staged: str, class_names: list[str]) -> dict:
    """Top-1/top-5 accuracy, per-class accuracy and confusion matrix, reading the prediction parts
    batch by batch (three small columns), so memory does not grow with the number of images."""
    import pyarrow.compute as pc

    classes = len(class_names)
    matrix = np.zeros((classes, classes), dtype=np.int64)
    top1 = top5 = total = 0
    names = pa.array(class_names, type=pa.string())
    dataset = _parquet_dataset(staged)
    batches = dataset.to_batches(columns=["true_class", "predicted_class", "true_class_rank"]) if dataset else []
    for batch in batches:
        true = pc.index_in(batch.column("true_class"), value_set=names).to_numpy(zero_copy_only=False)
        predicted = pc.index_in(batch.column("predicted_class"), value_set=names).to_numpy(zero_copy_only=False)
        rank = batch.column("true_class_rank").to_numpy(zero_copy_only=False)
        np.add.at(matrix, (true.astype(np.int64), predicted.astype(np.int64)), 1)
        top1 += int((rank == 1).sum())
        top5 += int((rank <= TOP5).sum())
        total += len(rank)
    per_class = {}
    for index, name in enumerate(class_names):
        count = int(matrix[index].sum())
        correct = int(matrix[index, index])
        per_class[name] = {"count": count, "correct": correct,
                           "accuracy": round(correct / count, 6) if count else None}
    return {
        "images": total,
        "top1": round(top1 / total, 6) if total else None,
        "top5": round(top5 / total, 6) if total else None,
        "per_class": per_class,
        "class_names": list(class_names),
        "confusion_matrix": matrix.tolist(),  # rows: true class, columns: predicted class
    }


# ---------------------------------------------------------------- driver

def _read_model_metadata(model_path: str) -> tuple[str, dict]:
    """(model folder, metadata) without loading TensorFlow: the driver only needs the class names
    and the image size; the model itself is loaded by the actors."""
    from pipeline.models.saving import find_model_dir

    folder = find_model_dir(model_path)
    return folder, storage.read_json(storage.join(folder, "metadata.json"))


def _path_blocks(paths: list[str], labels: Optional[np.ndarray], batch_size: int) -> list[pa.Table]:
    rows_per_block = max(batch_size, math.ceil(len(paths) / MAX_PATH_BLOCKS))
    blocks = []
    for start in range(0, len(paths), rows_per_block):
        columns = {"path": pa.array(paths[start:start + rows_per_block], type=pa.string())}
        if labels is not None:
            columns["label"] = pa.array(labels[start:start + rows_per_block], type=pa.int32())
        blocks.append(pa.table(columns))
    return blocks


def build_dataset(paths: list[str], labels: Optional[np.ndarray], model_dir: str, image_size: int,
                  errors_dir: str, settings, facts_dir: Optional[str] = None):
    """The lazy Ray Data pipeline: paths -> decode tasks -> model actor pool -> prediction rows.
    Each model actor records where it ran and which devices it saw in ``facts_dir``."""
    import ray

    paths_dataset = ray.data.from_arrow(_path_blocks(paths, labels, settings.batch_size))
    decoded = paths_dataset.map_batches(
        decode_batch,
        batch_size=settings.batch_size,
        fn_kwargs={"image_size": image_size, "errors_dir": errors_dir},
        num_cpus=1,
        # Reserving memory (a scheduling hint) also keeps decoding in its own parallel tasks: Ray
        # Data fuses a task map into the next actor map when their resource requests are equal,
        # and would then decode inside the model actors, one batch at a time per actor (on GPU
        # actors, with the GPU idle meanwhile). Differing resources is Ray's own advice for
        # keeping stages apart (ray-project/ray#54433); tests/test_infer.py checks the plan.
        memory=DECODE_TASK_MEMORY_BYTES,
    )
    return decoded.map_batches(
        Predictor,
        fn_constructor_kwargs={"model_path": model_dir, "top_k": settings.top_k, "gpus": settings.gpus_per_actor,
                               "facts_dir": facts_dir},
        batch_size=settings.batch_size,
        compute=ray.data.ActorPoolStrategy(size=settings.num_actors),
        num_cpus=settings.cpus_per_actor,
        num_gpus=settings.gpus_per_actor,
    )


def _warn_if_no_cpu_left_for_decoding(settings) -> None:
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    reserved = settings.num_actors * settings.cpus_per_actor
    # A warning, not an error: an autoscaling cluster may be about to grow.
    if cpus - reserved < 1:
        _progress(f"warning: the model actors reserve {reserved:g} of the cluster's {cpus:g} CPUs "
                  "(infer.num_actors x infer.cpus_per_actor), leaving less than one for the decode "
                  "tasks: the job waits until more CPUs join; lower one of them (e.g. "
                  "--set infer.cpus_per_actor=0.5)")


def _progress(message: str) -> None:
    print(f"[infer] {message}", flush=True)


def run_inference(config: Config, address: Optional[str] = None) -> dict:
    """Classify every image named by ``config.infer.input`` and write the outputs; returns the
    summary (also written as the summary JSON, last). Inputs, model and output are checked before
    Ray starts; Ray is started (or joined at ``address``) with ``pipeline.runtime.connect`` if the
    caller has not done so already."""
    settings = config.infer
    started = time.perf_counter()
    if not settings.model:
        raise ValueError("no model given: set --model (or infer.model) to an export, checkpoint or run folder")
    if not settings.output:
        raise ValueError("no output given: set --output (or infer.output) to predictions.csv, "
                         "predictions.parquet or a directory (a single image without --output is "
                         "classified and printed instead)")
    layout = _output_layout(settings.output)
    model_dir, metadata = _read_model_metadata(settings.model)
    class_names = [str(name) for name in metadata["class_names"]]
    image_size = int(metadata["image_size"])

    stage_seconds = {}
    _progress(f"listing {settings.input}")
    clock = time.perf_counter()
    paths, root = _resolve_inputs(settings.input)
    labels = _labels(paths, root, class_names)
    labelled = labels is not None
    stage_seconds["list_inputs"] = round(time.perf_counter() - clock, 3)
    labelled_note = ("labelled by folder: accuracy will be reported" if labelled
                     else "not labelled by class folders: no accuracy")
    _progress(f"{len(paths):,} files ({labelled_note}); model {model_dir}: {len(class_names)} classes, "
              f"{image_size}x{image_size} pixels")

    from pipeline import preflight, runtime

    clock = time.perf_counter()
    runtime.connect(address)
    preflight.check(config, "predict", preflight.cluster_facts())
    stage_seconds["connect_ray"] = round(time.perf_counter() - clock, 3)
    _warn_if_no_cpu_left_for_decoding(settings)
    storage.delete(layout.summary)  # an older summary would vouch for the new, still partial output
    storage.delete(layout.confusion_matrix)  # and an older plot would outlive an unlabelled run
    staged_predictions = storage.join(layout.staging, "predictions")
    staged_errors = storage.join(layout.staging, "errors")
    storage.makedirs(staged_errors)
    try:
        _progress(f"decoding and classifying: batch {settings.batch_size}, {settings.num_actors} model "
                  f"actor(s) x {settings.cpus_per_actor:g} CPU / {settings.gpus_per_actor:g} GPU")
        clock = time.perf_counter()
        files_seen = len(paths)
        staged_actors = storage.join(layout.staging, "actors")
        predictions = build_dataset(paths, labels, model_dir, image_size, staged_errors, settings, staged_actors)
        del paths, labels  # the object store holds the path blocks now; the driver needs neither list
        predictions.write_parquet(staged_predictions, min_rows_per_file=settings.rows_per_file)
        stage_seconds["decode_and_classify"] = round(time.perf_counter() - clock, 3)

        _progress(f"writing {layout.predictions}")
        clock = time.perf_counter()
        errors = _staged_errors(staged_errors)
        _check_complete(files_seen, staged_predictions, errors)
        _write_table(errors, layout.errors, "csv")
        failed = errors.num_rows
        accuracy = _accuracy(staged_predictions, class_names) if labelled else None
        classified = _finish_predictions(staged_predictions, layout, prediction_schema(labelled))
        outputs = {"predictions": layout.predictions, "errors": layout.errors}
        if accuracy is not None:
            from pipeline import reports

            reports.plot_confusion_matrix(np.asarray(accuracy["confusion_matrix"]), class_names,
                                          layout.confusion_matrix)
            outputs["confusion_matrix"] = layout.confusion_matrix
        outputs["summary"] = layout.summary
        actors = [storage.read_json(storage.join(staged_actors, name)) for name in storage.list_dir(staged_actors)
                  if name.endswith(".json")]
        stage_seconds["write_outputs"] = round(time.perf_counter() - clock, 3)
    finally:
        storage.delete(layout.staging)

    elapsed = time.perf_counter() - started
    summary = {
        "model": model_dir,
        "input": settings.input,
        "output": storage.absolute(settings.output),
        "files_seen": files_seen,
        "classified": classified,
        "failed": failed,
        "labelled": accuracy is not None,
        "accuracy": accuracy,
        "images_per_second": round(files_seen / elapsed, 2) if elapsed > 0 else None,
        "elapsed_seconds": round(elapsed, 3),
        "stage_seconds": stage_seconds,
        "settings": {key: getattr(settings, key) for key in
                     ("batch_size", "num_actors", "cpus_per_actor", "gpus_per_actor", "top_k", "rows_per_file")},
        "actors": actors,
        "outputs": outputs,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "provenance": pipeline.provenance(),
    }
    storage.write_json(layout.summary, summary)  # last: its presence marks the outputs complete
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    failed = summary["failed"]
    print(f"\n[infer] {summary['files_seen']:,} files: {summary['classified']:,} classified, {failed:,} failed"
          f"{' (see ' + summary['outputs']['errors'] + ')' if failed else ''}, "
          f"{summary['elapsed_seconds']:.1f} s, {summary['images_per_second']:.1f} images/s end to end")
    accuracy = summary["accuracy"]
    if accuracy is not None and accuracy["images"]:
        print(f"  accuracy over {accuracy['images']:,} labelled images: top-1 {accuracy['top1']:.4f}, "
              f"top-5 {accuracy['top5']:.4f}")
        worst = sorted((values["accuracy"], name) for name, values in accuracy["per_class"].items()
                       if values["accuracy"] is not None)[:3]
        print("  lowest per-class accuracy: " + ", ".join(f"{name} {value:.4f}" for value, name in worst))
    for name, path in summary["outputs"].items():
        print(f"  {name}: {path}")


# ---------------------------------------------------------------- single image

def predict_image(model_path: str, image_path: str, top_k: int = 5) -> dict:
    """Classify one image without Ray, as the original tutorial did (but with the exact training
    preprocessing); prints the class of the arg-max, its confidence and the top-k."""
    from pipeline.models.saving import load_model

    if not storage.exists(image_path):
        raise FileNotFoundError(f"image not found: {image_path}")
    _, metadata = _read_model_metadata(model_path)
    try:
        pixels = decode_image(storage.read_bytes(image_path), int(metadata["image_size"]))
    except UnreadableImage as error:
        raise UnreadableImage(f"{image_path}: {error}") from None
    model, metadata = load_model(model_path)
    class_names = np.asarray(metadata["class_names"], dtype=str)
    probabilities = np.asarray(model.predict_on_batch(pixels[None].astype(np.float32)))
    top_k = min(int(top_k), len(class_names))
    columns = prediction_columns([storage.absolute(image_path)], probabilities, class_names, top_k)
    result = {
        "path": str(columns["path"][0]),
        "predicted_class": str(columns["predicted_class"][0]),
        "confidence": float(columns["confidence"][0]),
        "top_k_classes": json.loads(columns["top_k_classes"][0]),
        "top_k_probabilities": json.loads(columns["top_k_probabilities"][0]),
    }
    print(f"{result['predicted_class']}  (confidence {result['confidence']:.4f})  {result['path']}")
    for rank, (name, probability) in enumerate(zip(result["top_k_classes"], result["top_k_probabilities"]), 1):
        print(f"  {rank}. {name:<20} {probability:.4f}")
    return result


def _is_single_image(input: Optional[str]) -> bool:
    if not input:
        return False
    input = str(input).strip()
    return is_image_path(input) and (storage.exists(input) or not any(c in input for c in GLOB_CHARACTERS))


def main(config: Config, address: Optional[str] = None) -> int:
    """``pipeline predict`` / ``jobs/predict.py``: one image without an output is classified and
    printed; anything else runs batch inference on Ray."""
    settings = config.infer
    if settings.output is None and _is_single_image(settings.input):
        if not settings.model:
            raise ValueError("no model given: set --model (or infer.model) to an export, checkpoint or run folder")
        predict_image(settings.model, settings.input, settings.top_k)
        return 0
    run_inference(config, address)
    return 0
