"""pipeline.infer.run: settings checked before Ray starts, the Ray Data plan, GPU actors, file lists, the job script."""

import os
import subprocess
import sys

import pandas as pd
import pytest

from pipeline import infer, runtime
from pipeline.config import Config, load_config

from conftest import REPO
from infer_files import GOOD_FILES, IMAGE_SIZE, check_against_model, infer_config


def test_bad_settings_fail_before_ray_starts(exported_model, mixed_folder, tmp_path, monkeypatch):
    def connect(*args, **kwargs):
        raise AssertionError("Ray was started (or joined) before the settings were checked")

    monkeypatch.setattr(runtime, "connect", connect)
    folder, _ = exported_model
    with pytest.raises(ValueError, match="no output given"):
        infer.run_inference(infer_config(folder, mixed_folder, ""))
    with pytest.raises(FileNotFoundError, match="input not found"):
        infer.run_inference(infer_config(folder, tmp_path / "missing", tmp_path / "out.csv"))
    with pytest.raises(FileNotFoundError, match="model path does not exist"):
        infer.run_inference(infer_config(str(tmp_path / "no-model"), mixed_folder, tmp_path / "out.csv"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("keep me")
    with pytest.raises(ValueError, match="already holds other files"):
        infer.run_inference(infer_config(folder, mixed_folder, tmp_path / "busy"))


def test_decoding_stays_in_its_own_parallel_tasks(local_ray, exported_model, mixed_folder, capsys):
    # Ray Data fuses a task map into the next actor map when their resources match; decoding would
    # then run inside the model actors. The plan must keep a separate task-pool operator.
    folder, _ = exported_model
    dataset = infer.build_dataset([str(mixed_folder / "rgb.png")], None, folder, IMAGE_SIZE, "/unused",
                                  Config().infer)
    dataset.explain()
    optimized_plan = capsys.readouterr().out.split("Physical Plan (Optimized)")[-1]
    assert "TaskPoolMapOperator[MapBatches(decode_batch)]" in optimized_plan
    assert "ActorPoolMapOperator[MapBatches(Predictor)]" in optimized_plan


def test_gpu_actors_see_only_the_gpu_ray_gave_them(local_ray, exported_model, mixed_folder, tmp_path):
    # Half a GPU each: both actors fit on the two declared GPUs, each sees one device id.
    folder, _ = exported_model
    output = tmp_path / "predictions.csv"
    summary = infer.run_inference(infer_config(folder, mixed_folder, output, num_actors=2, cpus_per_actor=0.5,
                                               gpus_per_actor=0.5))
    assert summary["classified"] == len(GOOD_FILES)
    # Each actor that loaded its model saw exactly one device id (not the node's "0,1").
    visible = [actor["cuda_visible_devices"] for actor in summary["actors"]]
    assert 1 <= len(visible) <= 2 and set(visible) <= {"0", "1"}, visible


def test_file_list_with_a_missing_entry(local_ray, exported_model, labelled_folder, tmp_path):
    folder, model = exported_model
    listing = labelled_folder / "list.txt"
    listing.write_text("# two cats, a ship and a file that is not there\ncat/0.png\ncat/1.png\n\n"
                       f"{labelled_folder}/ship/3.png\ncat/404.png\n")
    output = tmp_path / "predictions.csv"
    summary = infer.run_inference(infer_config(folder, listing, output))

    predictions = pd.read_csv(output)
    assert list(predictions["path"]) == [str(labelled_folder / p) for p in ("cat/0.png", "cat/1.png", "ship/3.png")]
    assert list(predictions["true_class"]) == ["cat", "cat", "ship"]  # parent folders are class names
    check_against_model(predictions, model, top_k=5)
    errors = pd.read_csv(tmp_path / "predictions.errors.csv")
    assert errors["path"].tolist() == [str(labelled_folder / "cat/404.png")]
    assert errors["reason"][0].startswith("cannot read file")
    assert (summary["classified"], summary["failed"], summary["accuracy"]["images"]) == (3, 1, 3)


def test_predict_job_reports_usage_errors_without_traceback(exported_model, tmp_path, capsys):
    folder, _ = exported_model
    # The script itself, as `ray job submit -- python jobs/predict.py` runs it, from another folder.
    finished = subprocess.run(
        [sys.executable, os.path.join(REPO, "jobs", "predict.py"), "--model", folder,
         "--input", str(tmp_path / "missing"), "--output", "out.csv"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert finished.returncode == 2, finished.stderr
    assert finished.stderr.splitlines()[-1].startswith("error: input not found")
    assert "Traceback" not in finished.stderr

    # The same command line in-process (the script passes its arguments to `pipeline predict`).
    from pipeline.cli import main

    for arguments, message in [
        (["--model", folder, "--input", str(tmp_path)], "error: no output given"),
        (["--model", folder, "--input", str(tmp_path / "x.png")], "error: image not found"),
        (["--model", str(tmp_path / "no-model"), "--input", str(tmp_path), "--output", "out"],
         "error: model path does not exist"),
        (["--model", folder, "--input", str(tmp_path), "--set", "infer.batch_size=0"],
         "error: config key 'infer.batch_size'"),
    ]:
        assert main(["predict", *arguments]) == 2
        assert capsys.readouterr().err.splitlines()[-1].startswith(message)


def test_config_overrides_reach_infer_settings():
    config = load_config(None, ["infer.batch_size=512", "infer.top_k=3", "infer.rows_per_file=100"])
    assert (config.infer.batch_size, config.infer.top_k, config.infer.rows_per_file) == (512, 3, 100)
