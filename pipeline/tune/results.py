"""What a finished search leaves behind: the results table, ``best.yaml``, plots and a summary.

The table is built from the trials' own run folders (``history.json``, ``summary.json``) and from
Tune's verdict on each trial (finished, stopped by the scheduler, or failed with an error), so it
is the same whether the search ran in one go or was resumed.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re

import yaml

import pipeline
from pipeline import reports, storage
from pipeline.config import TUNE_METRICS, Config

log = logging.getLogger(__name__)

COMPLETED, EARLY_STOPPED, FAILED = "completed", "early-stopped", "failed"


def _plain(value):
    """NumPy scalars (as some samplers return) as plain Python values, for JSON and YAML."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict, str)) else value


def trial_record_path(search_dir: str, trial_id: str) -> str:
    return storage.join(search_dir, "trials", f"{trial_id}.json")


def record_segment(search_dir: str, trial_id: str, segment: dict) -> None:
    """Append one training run of a trial (its first, or one started from a PBT checkpoint) to the
    trial's record; a resumed run of the same name is recorded once."""
    path = trial_record_path(search_dir, trial_id)
    record = storage.read_json(path) if storage.exists(path) else {"trial": trial_id, "segments": []}
    segment = {**segment, "params": {key: _plain(value) for key, value in segment["params"].items()}}
    if all(existing["run"] != segment["run"] for existing in record["segments"]):
        record["segments"].append(segment)
        storage.write_json(path, record)


def write_results(config: Config, dimensions, search_dir: str, result_grid, wall_seconds: float) -> dict:
    metric, mode = config.tune.metric, TUNE_METRICS[config.tune.metric]
    rows = [trial_row(config, dimensions, search_dir, result) for result in result_grid]
    rows.sort(key=lambda row: row["trial"])
    keys = [dimension.key for dimension in dimensions]

    columns = ["trial", *keys, "val_accuracy", "val_top5_accuracy", *([metric] if metric not in (
        "val_accuracy", "val_top5_accuracy") else []), "epochs", "wall_seconds", "status", "error"]
    if config.tune.scheduler == "pbt":
        columns.append("pbt_exploits")
    columns.append("run_dir")
    csv_path = storage.join(search_dir, "results.csv")
    storage.write_text(csv_path, to_csv(rows, columns))
    storage.write_json(storage.join(search_dir, "results.json"), rows)

    best = best_row(rows, metric, mode)
    best_yaml = None
    if best is not None:
        best_yaml = storage.join(search_dir, "best.yaml")
        storage.write_text(best_yaml, best_recipe(config, best, search_dir))

    plots_dir = storage.join(search_dir, "plots")
    curves = {row["trial"]: row["curve"] for row in rows if row["curve"]}
    plots = [reports.plot_trial_curves(curves, metric, storage.join(plots_dir, f"{metric}_per_epoch.png"))]
    plots.append(reports.plot_parameters(
        [{**{key: row[key] for key in keys}, metric: row["best_metric"]} for row in rows
         if row["best_metric"] is not None], dimensions, metric,
        storage.join(plots_dir, "parameters.png")))

    counts = {status: sum(row["status"] == status for row in rows) for status in (COMPLETED, EARLY_STOPPED, FAILED)}
    summary = {
        "search": config.tune.name or config.recipe, "search_dir": search_dir, "metric": metric, "mode": mode,
        "provenance": pipeline.provenance(),
        "trials": len(rows), **counts, "wall_seconds": round(wall_seconds, 1),
        "results_csv": csv_path, "best_yaml": best_yaml, "plots": [plot for plot in plots if plot],
        "best": None if best is None else {
            "trial": best["trial"], "params": {key: best[key] for key in keys}, metric: best["best_metric"],
            "val_accuracy": best["val_accuracy"], "val_top5_accuracy": best["val_top5_accuracy"],
            "status": best["status"], "run_dir": best["run_dir"], "checkpoint": best["checkpoint"],
            "export": best["export"], "evaluation": best["evaluation"]},
    }
    log.info("trials:\n" + format_table(rows, columns))
    storage.write_json(storage.join(search_dir, "summary.json"), summary)
    return summary


def trial_row(config: Config, dimensions, search_dir: str, result) -> dict:
    # The trial's id, as its runs and record are named. Not its Tune folder's name: a trial that a
    # resumed search starts over gets a new folder (the id plus "_<hex>") when its old one exists.
    trial_id = (result.metrics or {}).get("trial_id") or storage.basename(result.path)
    record_path = trial_record_path(search_dir, trial_id)
    segments = storage.read_json(record_path)["segments"] if storage.exists(record_path) else []
    # The trial's values are those of its last segment (PBT may have perturbed them).
    params = segments[-1]["params"] if segments else {key: _plain(value) for key, value in (result.config or {}).items()}
    run_dir = storage.join(search_dir, "trials", segments[-1]["run"]) if segments else None
    history = _read(storage.join(run_dir, "history.json"), []) if run_dir else []
    summary = _read(storage.join(run_dir, "summary.json"), None) if run_dir else None
    metric, mode = config.tune.metric, TUNE_METRICS[config.tune.metric]

    if result.error is not None:
        status, error = FAILED, error_line(result.error)
    elif summary is not None and len(history) >= config.train.epochs:
        status, error = COMPLETED, ""
    else:
        status, error = EARLY_STOPPED, ""
    finite = [row for row in history if not row.get("diverged")]
    row = {
        "trial": trial_id, **{d.key: params.get(d.key) for d in dimensions},
        "val_accuracy": _best(finite, "val_accuracy", "max"),
        "val_top5_accuracy": _best(finite, "val_top5_accuracy", "max"),
        metric: _best(finite, metric, mode), "best_metric": _best(finite, metric, mode),
        "epochs": len(history),
        "wall_seconds": round(result.metrics.get("time_total_s", 0.0), 1) if result.metrics else None,
        "status": status, "error": error, "run_dir": run_dir,
        "checkpoint": summary.get("checkpoint") if summary else None,
        "export": summary.get("export") if summary else None,
        "evaluation": summary.get("evaluation") if summary else None,
        "curve": [(r["epoch"], r.get(metric)) for r in finite if r.get(metric) is not None],
    }
    row["pbt_exploits"] = "; ".join(
        f"epoch {s['from']['epoch']}: from trial {s['from']['trial']} with "
        + ", ".join(f"{key}={_format(value)}" for key, value in s["params"].items())
        # A restart from the trial's own checkpoint is not an exploit.
        for s in segments if s.get("from") and s["from"]["trial"] != trial_id)
    return row


def _read(path: str, default):
    return storage.read_json(path) if storage.exists(path) else default


def _best(history: list[dict], key: str, mode: str):
    values = [row[key] for row in history if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]
    if not values:
        return None
    return max(values) if mode == "max" else min(values)


def error_line(error) -> str:
    """One line for a trial's error: the innermost exception's type (without its module) and message."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    exception = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Diverged|Interrupt)\b.*", line)]
    line = exception[-1] if exception else (lines[-1] if lines else type(error).__name__)
    return re.sub(r"^(?:\w+\.)+(?=\w+(Error|Exception|Diverged))", "", line)[:500]


def best_row(rows: list[dict], metric: str, mode: str):
    """The best trial by its best epoch's metric, among those that ran to the end (they have an
    export); if none did, among all trials with a value."""
    for candidates in ([row for row in rows if row["status"] == COMPLETED], rows):
        scored = [row for row in candidates if row["best_metric"] is not None]
        if scored:
            return (max if mode == "max" else min)(scored, key=lambda row: row["best_metric"])
    return None


def best_recipe(config: Config, best: dict, search_dir: str) -> str:
    """The best trial's resolved config as a recipe for ``jobs/train.py``: same schema, no search
    settings, a run of its own (not the trial's folder)."""
    trial_config = yaml.safe_load(storage.read_text(storage.join(best["run_dir"], "config.yaml")))
    trial_config.pop("tune", None)
    trial_config.pop("recipe", None)
    trial_config["run"]["name"] = f"{config.tune.name or config.recipe}-best"
    trial_config["run"]["storage_path"] = config.run.storage_path
    values = ", ".join(f"{key}={_format(best[key])}" for key in best if "." in key)
    header = (f"# Best trial {best['trial']} of search '{config.tune.name or config.recipe}' ({search_dir}):\n"
              f"#   {values}\n"
              f"#   best {config.tune.metric} {_format(best['best_metric'])} in {best['epochs']} epochs ({best['status']})\n"
              f"# Train it: python jobs/train.py --config best.yaml\n")
    return header + yaml.safe_dump(trial_config, sort_keys=False)


def to_csv(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in columns})
    return buffer.getvalue()


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def format_table(rows: list[dict], columns: list[str]) -> str:
    shown = [column for column in columns if column not in ("run_dir",)]
    cells = [[_format(row.get(column)) for column in shown] for row in rows]
    widths = [max([len(column)] + [len(line[i]) for line in cells]) for i, column in enumerate(shown)]
    lines = ["  ".join(column.ljust(width) for column, width in zip(shown, widths))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in cells]
    return "\n".join(line.rstrip() for line in lines)
