"""The driver of batch inference. ``plan_inference`` checks the model, the inputs and the output
before Ray starts; ``run_inference`` builds the streaming Ray Data pipeline (paths -> decode tasks
-> model actor pool -> Parquet parts), then finishes the outputs and writes the summary last."""

from __future__ import annotations

import datetime
import logging
import math
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa

import pipeline
from pipeline import InputError, PipelineError, capacity, storage
from pipeline.config import Config, fingerprint
from pipeline.infer.inputs import folders_not_in_classes, labels_from_folders, resolve_inputs
from pipeline.infer.outputs import (OutputLayout, accuracy_report, check_complete, committed_paths, finish_predictions,
                                    other_stagings, output_layout, read_staged_errors, write_table)
from pipeline.infer.predictor import Predictor, decode_batch, prediction_schema, read_model_metadata
from pipeline.models.saving import input_resize

# The driver puts the path list into the object store as at most this many blocks: enough for
# every decode task to get its own block, few enough that millions of paths stay cheap to track.
MAX_PATH_BLOCKS = 10_000

# Working memory reserved per decode task: a batch of files is decoded one at a time, and the
# largest photos decode to ~100 MB of pixels (6000 x 4000 RGBA) before the resize.
DECODE_TASK_MEMORY_BYTES = 256 * 1024**2

log = logging.getLogger(__name__)


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
                  errors_dir: str, settings, records_dir: Optional[str] = None, resize: str = "squash"):
    """The lazy Ray Data pipeline: paths -> decode tasks -> model actor pool -> prediction rows.
    Each model actor records where it ran and which devices it saw in ``records_dir``."""
    import ray

    paths_dataset = ray.data.from_arrow(_path_blocks(paths, labels, settings.batch_size))
    decoded = paths_dataset.map_batches(
        decode_batch,
        batch_size=settings.batch_size,
        fn_kwargs={"image_size": image_size, "resize": resize, "errors_dir": errors_dir},
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
                               "records_dir": records_dir},
        batch_size=settings.batch_size,
        compute=ray.data.ActorPoolStrategy(size=settings.num_actors),
        num_cpus=settings.cpus_per_actor,
        num_gpus=settings.gpus_per_actor,
    )


def warn_if_no_cpu_left_for_decoding(settings, cpus: float) -> None:
    """Warn when the model actors leave less than one of the cluster's ``cpus`` to the decode tasks."""
    warning = capacity.decode_cpu_warning(settings, cpus)
    if warning:
        log.warning(warning)


@dataclass
class InferencePlan:
    """What ``run_inference`` classifies and where it writes, checked before Ray starts. Used once:
    ``run_inference`` takes its file list."""
    model_dir: str
    class_names: list[str]
    image_size: int
    resize: str  # how the model's training pictures became squares: its inputs are decoded alike
    layout: OutputLayout
    paths: Optional[list[str]]
    labels: Optional[np.ndarray]
    labelled: bool
    stage_seconds: dict
    started: float  # time.perf_counter() when the checks began: the summary's elapsed time counts from here
    checked: float  # ... and when they ended: until run_inference begins, Ray starts (or is joined)


def plan_inference(config: Config) -> InferencePlan:
    """The model, the input files and the output, checked and listed without Ray: each mistake
    fails in a second, not after a local Ray's 10-20 s start."""
    settings = config.infer
    started = time.perf_counter()
    if not settings.model:
        raise InputError("no model given: set --model (or infer.model) to an export, checkpoint or run folder")
    if not settings.output:
        raise InputError("no output given: set --output (or infer.output) to predictions.csv, "
                         "predictions.parquet or a directory (a single image without --output is "
                         "classified and printed instead)")
    model_dir, metadata = read_model_metadata(settings.model)
    class_names = [str(name) for name in metadata["class_names"]]
    image_size = int(metadata["image_size"])
    # The same command again (same model, input and top-k) continues from the parts it wrote.
    input_spec = settings.input if storage.is_uri(settings.input or "") else storage.absolute(settings.input or "")
    layout = output_layout(settings.output, fingerprint({"model": model_dir, "created": metadata.get("created"),
                                                         "input": input_spec, "top_k": settings.top_k}))

    stage_seconds = {}
    log.info(f"listing {settings.input}")
    clock = time.perf_counter()
    paths, root = resolve_inputs(settings.input)
    labels = labels_from_folders(paths, root, class_names)
    labelled = labels is not None
    stage_seconds["list_inputs"] = round(time.perf_counter() - clock, 3)
    labelled_note = ("labelled by folder: accuracy will be reported" if labelled
                     else "not labelled by class folders: no accuracy")
    log.info(f"{len(paths):,} files ({labelled_note}); model {model_dir}: {len(class_names)} classes, "
             f"{image_size}x{image_size} pixels")
    unknown = folders_not_in_classes(paths, root, class_names)
    if unknown:
        log.warning(f"the input's class folders {', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''} are "
                    f"not classes of this model ({', '.join(class_names[:10])}{', ...' if len(class_names) > 10 else ''}"
                    f"): every file is classified, but no accuracy can be reported")
    return InferencePlan(model_dir, class_names, image_size, input_resize(metadata), layout, paths, labels,
                         labelled, stage_seconds,
                         started=started, checked=time.perf_counter())


def run_inference(config: Config, plan: Optional[InferencePlan] = None) -> dict:
    """Classify every image named by ``config.infer.input`` and write the outputs; returns the
    summary (also written as the summary JSON, last). ``plan``: from ``plan_inference``, made
    before Ray started (else made here). Runs on the Ray the caller started or joined; without
    one, Ray Data starts a local Ray."""
    settings = config.infer
    plan = plan or plan_inference(config)
    model_dir, class_names, image_size, layout = plan.model_dir, plan.class_names, plan.image_size, plan.layout
    labelled, started, stage_seconds = plan.labelled, plan.started, dict(plan.stage_seconds)
    paths, labels = plan.paths, plan.labels
    plan.paths = plan.labels = None  # held here alone, so that the driver can let them go once they are in Ray
    stage_seconds["connect_ray"] = round(time.perf_counter() - plan.checked, 3)
    storage.delete(layout.summary)  # an older summary would vouch for the new, still partial output
    storage.delete(layout.confusion_matrix)  # and an older plot would outlive an unlabelled run
    for stale in other_stagings(layout):
        log.info(f"removing {stale}: parts of a run with another model, input or top-k")
        storage.delete(stale)
    staged_predictions = storage.join(layout.staging, "predictions")
    staged_errors = storage.join(layout.staging, "errors")
    staged_actors = storage.join(layout.staging, "actors")
    files_seen = len(paths)
    done = committed_paths(layout.staging)
    if done:
        keep = np.fromiter((path not in done for path in paths), dtype=bool, count=len(paths))
        paths = [path for path, todo in zip(paths, keep) if todo]
        labels = labels[keep] if labels is not None else None
        log.info(f"continuing: {files_seen - len(paths):,} of {files_seen:,} files were classified (or failed) by "
                 f"an earlier run of this command and are kept; {len(paths):,} to go")
    storage.makedirs(staged_errors)
    classified_before = files_seen - len(paths)
    try:
        log.info(f"decoding and classifying: batch {settings.batch_size}, {settings.num_actors} model "
                 f"actor(s) x {settings.cpus_per_actor:g} CPU / {settings.gpus_per_actor:g} GPU")
        clock = time.perf_counter()
        if paths:
            predictions = build_dataset(paths, labels, model_dir, image_size, staged_errors, settings, staged_actors,
                                        resize=plan.resize)
            del paths, labels  # the object store holds the path blocks now; the driver needs neither list
            # A part per batch or so: what a stop leaves committed, and the next run keeps.
            predictions.write_parquet(staged_predictions, min_rows_per_file=settings.batch_size)
        stage_seconds["decode_and_classify"] = round(time.perf_counter() - clock, 3)

        log.info(f"writing {layout.predictions}")
        clock = time.perf_counter()
        errors = read_staged_errors(staged_errors)
        check_complete(files_seen, staged_predictions, errors)
        write_table(errors, layout.errors, "csv")
        failed = errors.num_rows
        accuracy = accuracy_report(staged_predictions, class_names) if labelled else None
        classified = finish_predictions(staged_predictions, layout, prediction_schema(labelled), settings.rows_per_file)
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
    except BaseException:
        kept = len(committed_paths(layout.staging))
        log.warning(f"{kept:,} of {files_seen:,} files are classified (or failed) and kept in {layout.staging}; "
                    f"the same command continues with the rest")
        raise
    storage.delete(layout.staging)

    elapsed = time.perf_counter() - started
    summary = {
        "model": model_dir,
        "input": settings.input,
        "output": storage.absolute(settings.output),
        "files_seen": files_seen,
        "classified": classified,
        "failed": failed,
        # Files an earlier, stopped run of the same command had done: not classified again.
        "done_before": classified_before,
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
    if files_seen and failed / files_seen > settings.max_failed_fraction:
        raise PipelineError(f"{failed:,} of {files_seen:,} files ({failed / files_seen:.1%}) could not be read or "
                            f"decoded, more than infer.max_failed_fraction={settings.max_failed_fraction}; the "
                            f"outputs are complete, the reasons are in {layout.errors}")
    return summary
