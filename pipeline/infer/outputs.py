"""Where batch inference writes, and how a partial output is never taken for a complete one:
everything is staged in a hidden folder beside the output, checked against the files listed,
then moved or written whole (see ``pipeline.infer`` for the layouts); the accuracy report reads
the staged predictions batch by batch."""

from __future__ import annotations

import datetime
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from pipeline import InputError, PipelineError, storage
from pipeline.infer.predictor import ERROR_SCHEMA

TOP5 = 5  # top-5 accuracy is reported whatever infer.top_k is (the original recipe's second metric)


class IncompleteOutput(PipelineError):
    """Fewer results than input files reached the driver; no final output was written."""


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


def output_layout(output: str, resume_key: Optional[str] = None) -> OutputLayout:
    """Where the predictions, errors, summary and plot go for ``output``, and the staging folder the
    parts are written to first: named by ``resume_key`` (the same model, settings and input), so
    that the same command after a failure or a stop finds the parts it already wrote."""
    output = storage.absolute(output)
    run_id = resume_key or f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    lower = output.lower()
    # The staging folder and the outputs go beside a file output, into a folder output.
    folder = output if not lower.endswith(('.csv', '.parquet', '.pq')) else posixpath.dirname(output)
    storage.check_writable_folder(folder, f"output {output}")
    extension = posixpath.splitext(posixpath.basename(output))[1].lower()
    if extension in OTHER_FILE_EXTENSIONS and not storage.is_dir(output):
        raise InputError(f"output {output} names a {extension} file, which predictions cannot be written as: "
                         "name a .csv or .parquet file, or a directory (no extension) for Parquet parts")
    if lower.endswith((".csv", ".parquet", ".pq")):
        if storage.is_dir(output):
            raise InputError(f"output {output} is a directory; name a new .csv/.parquet file, "
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
        raise InputError(f"output {output} is an existing file; predictions go to a .csv, a .parquet "
                         "or a directory")
    ours = {"predictions", "errors.csv", "summary.json", "confusion_matrix.png"}
    others = [name for name in storage.list_dir(output) if name not in ours and not name.startswith(".staging-")]
    if others:
        # Never mix predictions into (or later replace parts of) a folder that holds something else.
        raise InputError(f"output directory {output} already holds other files ({', '.join(others[:5])}); "
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


def write_table(table: pa.Table, path: str, file_format: str) -> None:
    """Write ``table`` as CSV or Parquet at ``path``, all or nothing (``storage.open_output``)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    with storage.open_output(path) as stream:
        if file_format == "csv":
            pacsv.write_csv(table, stream)
        else:
            pq.write_table(table, stream)


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


def read_staged_errors(errors_dir: str) -> pa.Table:
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


def committed_paths(staging: str) -> set[str]:
    """The files a stopped or failed run of the same command already classified or failed: the
    ``path`` column of every whole Parquet part in ``staging``. A part cut short by the stop (no
    Parquet footer) is deleted: its files are classified again."""
    import pyarrow.parquet as pq

    done: set[str] = set()
    fs, inner = storage.filesystem(staging)
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        return done
    for info in fs.get_file_info(pafs.FileSelector(inner, recursive=True)):
        if info.type != pafs.FileType.File or not info.path.endswith(".parquet"):
            continue
        try:
            with fs.open_input_file(info.path) as handle:
                table = pq.read_table(handle, columns=["path"])
        except (OSError, ValueError, pa.ArrowException):
            fs.delete_file(info.path)
            continue
        done.update(table.column("path").to_pylist())
    return done


def other_stagings(layout: OutputLayout) -> list[str]:
    """Staging folders of this output left by runs with another model, settings or input."""
    parent, name = posixpath.split(layout.staging)
    prefix = name[: name.rindex("-") + 1]
    return [storage.join(parent, entry) for entry in storage.list_dir(parent)
            if entry.startswith(prefix) and entry != name]


def check_complete(files_seen: int, staged_predictions: str, errors: pa.Table) -> None:
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


def finish_predictions(staged: str, layout: OutputLayout, schema: pa.Schema, rows_per_file: int) -> int:
    """Write the final predictions; returns the number of classified files."""
    dataset = _parquet_dataset(staged)
    if layout.kind == "directory":
        if dataset is None:
            # Keep the layout (and the schema) even when nothing could be classified.
            write_table(schema.empty_table(), storage.join(staged, "part-empty.parquet"), "parquet")
        rows = dataset.count_rows() if dataset is not None else 0
        if dataset is not None and len(dataset.files) > max(1, -(-rows // rows_per_file)):
            staged = _compacted(dataset, schema, staged + "-compacted", rows_per_file)
        _move_parts(staged, layout.predictions)
        return rows
    # One file sorted by path, so that it can be joined or diffed. The sort needs the predictions
    # (not the pixels) in memory: roughly 200-300 bytes per image.
    table = dataset.to_table().select(schema.names).cast(schema) if dataset is not None else schema.empty_table()
    table = table.sort_by("path")
    write_table(table, layout.predictions, layout.kind)
    return table.num_rows


def _compacted(dataset, schema: pa.Schema, target: str, rows_per_file: int) -> str:
    """The staged parts (written a batch or so each, so that a stop keeps them) rewritten as parts
    of about ``rows_per_file`` rows: fewer, larger files for whoever reads the output."""
    pending, count, index = [], 0, 0

    def flush():
        nonlocal pending, count, index
        write_table(pa.Table.from_batches(pending, schema=schema), storage.join(target, f"part-{index:05d}.parquet"),
                    "parquet")
        pending, count, index = [], 0, index + 1

    for batch in dataset.to_batches(columns=schema.names):
        pending.append(pa.RecordBatch.from_arrays([batch.column(name).cast(field.type) for name, field in
                                                   zip(schema.names, schema)], schema=schema))
        count += batch.num_rows
        if count >= rows_per_file:
            flush()
    if pending:
        flush()
    return target


def accuracy_report(staged: str, class_names: list[str]) -> dict:
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
