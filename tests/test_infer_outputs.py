"""pipeline.infer.outputs on a local Ray: CSV, Parquet and folder outputs, errors, accuracy, never a partial output."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

import pipeline
from pipeline import infer
from pipeline.config import Config, to_dict

from conftest import REPO
from infer_files import (BROKEN_FILES, CLASS_NAMES, GOOD_FILES, PREDICTION_COLUMNS, check_against_model,
                         direct_predictions, infer_config, no_staging_left)


def test_csv_output_matches_model_predict_and_lists_broken_files(local_ray, exported_model, mixed_folder, tmp_path):
    folder, model = exported_model
    output = tmp_path / "out" / "predictions.csv"
    # 3 of 14 files broken: more than infer.max_failed_fraction (5%) is an error, once every output
    # is written (the predictions of the good files are kept), then the same files within the limit.
    with pytest.raises(pipeline.PipelineError, match=r"3 of 14 files \(21.4%\) could not be read or decoded, more "
                                                     r"than infer.max_failed_fraction=0.05; the outputs are complete"):
        infer.run_inference(infer_config(folder, mixed_folder, output, num_actors=2, cpus_per_actor=0.5, top_k=5,
                                         max_failed_fraction=0.05))
    assert len(pd.read_csv(output)) == len(GOOD_FILES)
    summary = infer.run_inference(infer_config(folder, mixed_folder, output, num_actors=2, cpus_per_actor=0.5,
                                               top_k=5, max_failed_fraction=0.25))

    predictions = pd.read_csv(output)
    assert list(predictions.columns) == PREDICTION_COLUMNS  # no true_class: files sit at the root too
    assert sorted(predictions["path"]) == sorted(str(mixed_folder / relative) for relative in GOOD_FILES)
    check_against_model(predictions, model, top_k=5)

    errors = pd.read_csv(tmp_path / "out" / "predictions.errors.csv")
    assert list(errors.columns) == ["path", "reason"]
    assert list(errors["path"]) == sorted(str(mixed_folder / relative) for relative in BROKEN_FILES)
    reasons = dict(zip(errors["path"], errors["reason"]))
    assert reasons[str(mixed_folder / "broken/empty.png")] == "empty file (0 bytes)"
    assert "truncated" in reasons[str(mixed_folder / "broken/truncated.jpg")]
    assert "cannot identify image" in reasons[str(mixed_folder / "broken/text.png")]

    assert summary["files_seen"] == len(GOOD_FILES) + len(BROKEN_FILES)
    assert (summary["classified"], summary["failed"]) == (len(GOOD_FILES), len(BROKEN_FILES))
    assert summary["labelled"] is False and summary["accuracy"] is None
    assert summary["images_per_second"] > 0
    assert summary["provenance"]["pipeline"] == pipeline.__version__
    # On a GPU node, the CPU model actors (gpus_per_actor 0) saw no GPU. Each actor writes its
    # record with its first batch; Ray Data does not wait for the whole pool before it starts
    # (wait_for_min_actors_s is off), so on a few batches the second actor may never get one.
    assert 1 <= len(summary["actors"]) <= 2
    assert all(actor["cuda_visible_devices"] == "" and actor["gpus"] == [] for actor in summary["actors"])
    assert all(actor["model_load_seconds"] > 0 for actor in summary["actors"])
    assert json.loads((tmp_path / "out" / "predictions.summary.json").read_text()) == summary
    no_staging_left(tmp_path / "out")


def test_labelled_folder_parquet_reports_accuracy(local_ray, exported_model, labelled_folder, tmp_path):
    folder, model = exported_model
    output = tmp_path / "predictions.parquet"
    summary = infer.run_inference(infer_config(folder, labelled_folder, output, top_k=2))

    predictions = pq.read_table(output).to_pandas()
    assert list(predictions.columns) == PREDICTION_COLUMNS + ["true_class", "true_class_rank"]
    assert len(predictions) == 3 * 7
    check_against_model(predictions, model, top_k=2)
    assert list(predictions["true_class"]) == [os.path.basename(os.path.dirname(path)) for path in predictions["path"]]

    # Hand count from the direct predictions.
    probabilities = direct_predictions(model, list(predictions["path"]))
    true = np.array([CLASS_NAMES.index(name) for name in predictions["true_class"]])
    predicted = probabilities.argmax(axis=1)
    rank = np.array([1 + int((row > row[label]).sum()) for row, label in zip(probabilities, true)])
    np.testing.assert_array_equal(predictions["true_class_rank"], rank)
    accuracy = summary["accuracy"]
    assert 0 < (predicted == true).sum() < len(true), "the test wants some right and some wrong"
    assert len(set(predicted)) >= 2, "the test wants more than one predicted class"
    assert accuracy["top1"] == pytest.approx((predicted == true).mean(), abs=1e-6)
    assert accuracy["top5"] == 1.0  # 3 classes
    matrix = np.zeros((3, 3), dtype=int)
    np.add.at(matrix, (true, predicted), 1)
    assert accuracy["confusion_matrix"] == matrix.tolist()
    for index, name in enumerate(CLASS_NAMES):
        mine = predicted[true == index] == index
        assert accuracy["per_class"][name] == {"count": 7, "correct": int(mine.sum()),
                                               "accuracy": pytest.approx(mine.mean(), abs=1e-6)}
    assert summary["failed"] == 1
    assert pd.read_csv(tmp_path / "predictions.errors.csv")["path"].tolist() == [str(labelled_folder / "dog/broken.jpg")]
    png = tmp_path / "predictions.confusion_matrix.png"
    assert summary["outputs"]["confusion_matrix"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    no_staging_left(tmp_path)


def test_glob_into_directory_output(local_ray, exported_model, mixed_folder, tmp_path):
    folder, model = exported_model
    output = tmp_path / "run"
    summary = infer.run_inference(infer_config(folder, f"{mixed_folder}/photos/*", output, rows_per_file=2))

    assert sorted(os.listdir(output)) == ["errors.csv", "predictions", "summary.json"]
    parts = sorted(os.listdir(output / "predictions"))
    assert parts and all(part.endswith(".parquet") for part in parts)
    predictions = pq.read_table(output / "predictions").to_pandas().sort_values("path", ignore_index=True)
    assert list(predictions.columns) == PREDICTION_COLUMNS
    assert list(predictions["path"]) == sorted(str(mixed_folder / p) for p in GOOD_FILES if p.startswith("photos/"))
    check_against_model(predictions, model, top_k=5)
    assert pd.read_csv(output / "errors.csv").empty
    assert json.loads((output / "summary.json").read_text())["classified"] == summary["classified"] == 4


def test_results_that_never_reach_the_driver_fail_without_an_output(local_ray, exported_model, mixed_folder,
                                                                       tmp_path, monkeypatch):
    # Stands in for parts written to another node's local disk: one result never arrives.
    folder, _ = exported_model
    build = infer.build_dataset
    monkeypatch.setattr(infer.run, "build_dataset", lambda *args, **kwargs: build(*args, **kwargs).limit(3))
    output = tmp_path / "predictions.csv"
    with pytest.raises(infer.IncompleteOutput, match="files listed but 3 classified"):
        infer.run_inference(infer_config(folder, f"{mixed_folder}/photos/*", output))
    # No predictions, errors or summary to mistake for a result; the parts that did arrive stay in
    # the hidden staging folder for the same command to continue from.
    assert [name for name in os.listdir(tmp_path) if not name.startswith(".predictions.csv.staging-")] == []


def test_only_broken_files_still_finish(local_ray, exported_model, mixed_folder, tmp_path):
    folder, _ = exported_model
    output = tmp_path / "run"
    summary = infer.run_inference(infer_config(folder, mixed_folder / "broken", output))
    assert (summary["classified"], summary["failed"]) == (0, len(BROKEN_FILES))
    predictions = pq.read_table(output / "predictions")
    assert predictions.num_rows == 0 and predictions.column_names == PREDICTION_COLUMNS
    assert len(pd.read_csv(output / "errors.csv")) == len(BROKEN_FILES)
    assert (output / "summary.json").exists()


def test_a_stopped_job_continues_with_the_files_that_remain(local_ray, tmp_path):
    """``ray job stop`` (SIGTERM to the driver) half-way through 2,000 images, then the same
    command: every file once in the output, and the files done before the stop not again."""
    import signal
    import time

    from pipeline.config import ModelConfig
    from pipeline.models import build_model
    from pipeline.models.saving import model_metadata, save_export

    rng = np.random.default_rng(0)
    for index in range(2000):
        folder = tmp_path / "images" / CLASS_NAMES[index % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{index:04d}.png")
    # A full-width ResNet-18: slow enough on 2 CPUs (tens of seconds) to be stopped half-way.
    model = build_model(ModelConfig(), num_classes=2, image_size=32, mean=[127.0] * 3, std=[70.0] * 3)
    export = save_export(model, model_metadata(kind="export", class_names=CLASS_NAMES[:2], image_size=32,
                                               config=to_dict(Config()), mean=[127.0] * 3, std=[70.0] * 3),
                         str(tmp_path / "export"))
    output = tmp_path / "out" / "predictions.csv"
    command = [sys.executable, os.path.join(REPO, "jobs/predict.py"), "--address",
               local_ray_address(), "--model", export, "--input", str(tmp_path / "images"), "--output", str(output),
               "--set", "infer.batch_size=50"]
    first = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)

    def committed_parts():
        return sorted((tmp_path / "out").glob(".predictions.csv.staging-*/predictions/*.parquet"))

    deadline = time.time() + 300
    while len(committed_parts()) < 4 and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert first.poll() is None, first.stdout.read().decode()[-3000:]
    first.send_signal(signal.SIGTERM)
    stopped = first.communicate(timeout=120)[0].decode()
    assert first.returncode == 143, stopped[-3000:]
    assert "the files classified so far are kept" in stopped
    assert not output.exists()  # nothing to mistake for a result
    done = set()
    for part in committed_parts():
        try:
            done.update(pq.read_table(part, columns=["path"]).column("path").to_pylist())
        except Exception:  # a part the stop cut short: the next run deletes it and redoes its files
            pass
    assert 0 < len(done) < 2000

    second = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "predictions.summary.json").read_text())
    assert summary["done_before"] == len(done)  # not classified again
    assert f"continuing: {len(done):,} of 2,000 files" in second.stdout
    predictions = pd.read_csv(output)
    assert len(predictions) == predictions["path"].nunique() == summary["classified"] == 2000
    assert summary["accuracy"]["images"] == 2000
    no_staging_left(tmp_path / "out")


def local_ray_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address
