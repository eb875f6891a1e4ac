"""A run's metric history: one row per epoch (``history.json``, ``history.csv``), and its columns.

Rows are dicts in epoch order (``ReportToRayTrain`` appends one per epoch); keys may differ between
rows (validation only when there is a val split, ``diverged`` only on the last), so the columns
are the union of the keys in first-seen order and a missing value is empty.
"""

from __future__ import annotations

import csv
import io

from pipeline import storage


def columns(history: list[dict]) -> dict[str, list]:
    """Rows -> {column: values per epoch} (None where a row lacks the key)."""
    keys = list(dict.fromkeys(key for row in history for key in row))
    return {key: [row.get(key) for row in history] for key in keys}


def to_csv(history: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns(history)), lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue()


def write_history(history: list[dict], run_dir: str) -> None:
    """``history.json`` and ``history.csv`` in ``run_dir``, each replaced whole."""
    storage.write_json(storage.join(run_dir, "history.json"), history)
    storage.write_text(storage.join(run_dir, "history.csv"), to_csv(history))
