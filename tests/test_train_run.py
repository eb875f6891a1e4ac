"""pipeline.train.run without Ray: which checkpoints a run may resume from, and a diverged history as its error."""

import pytest

from pipeline import storage
from pipeline.train.run import CheckpointMismatch, TrainingDiverged, check_finite, check_resumable


def test_resuming_needs_the_data_and_model_the_checkpoints_were_made_with(tmp_path):
    identity = {"data": {"source": "a1", "config": "c1"}, "class_names": ["cat", "dog"], "image_size": 32,
                "normalization": {"mean": [125.3, 123.0, 113.9], "std": [63.0, 62.1, 66.7]},
                "model": {"name": "resnet18", "width": 64}}
    run_dir = tmp_path / "run"
    checkpoint = run_dir / "checkpoint_2026-01-01_00-00-00"
    storage.write_json(str(checkpoint / "metadata.json"), {"identity": identity})
    storage.write_json(str(checkpoint / "state.json"), {"epoch": 1, "files": {"tf_checkpoint/ckpt.index": 0}})
    storage.write_bytes(str(checkpoint / "tf_checkpoint" / "ckpt.index"), b"")
    # A later upload that failed part-way: its metadata, without its weights, is not the run's.
    storage.write_json(str(run_dir / "checkpoint_2026-01-02_00-00-00" / "metadata.json"), {"identity": {}})
    check_resumable(str(run_dir), "run", identity)  # unchanged: resumes
    check_resumable(str(run_dir), "run", {**identity, "normalization": {"mean": [125.3 + 1e-12, 123.0, 113.9],
                                                                          "std": [63.0, 62.1, 66.7]}})
    moved_split = {**identity, "data": {"source": "a1", "config": "c2"}}
    with pytest.raises(CheckpointMismatch, match=r"other data \(source or split"):
        check_resumable(str(run_dir), "run", moved_split)
    renormalised = {**identity, "normalization": {"mean": [120.0, 123.0, 113.9], "std": [63.0, 62.1, 66.7]},
                    "class_names": ["cat", "dog", "ship"]}
    with pytest.raises(CheckpointMismatch, match="other class names; normalisation statistics"):
        check_resumable(str(run_dir), "run", renormalised)
    check_resumable(str(tmp_path / "no-checkpoint-yet"), "run", moved_split)


def test_a_diverged_history_is_the_runs_error():
    check_finite([{"epoch": 1, "loss": 2.3}], "fine")
    check_finite([{"epoch": 1, "loss": float("inf")}], "fp16 skipped a step")  # weights still finite
    diverged = [{"epoch": 1, "loss": 2.3}, {"epoch": 2, "loss": float("nan"), "lr": 1e30, "diverged": True}]
    with pytest.raises(TrainingDiverged, match="run 'lr' diverged in epoch 2: the weights became NaN .*; the last "
                                               "good checkpoint is /runs/lr/checkpoint_1. Lower"):
        check_finite(diverged, "lr", "/runs/lr/checkpoint_1")
    with pytest.raises(TrainingDiverged, match="no checkpoint was written before it"):
        check_finite(diverged[1:], "lr")
    diverged[1].update(diverged_step=7, steps=8)
    with pytest.raises(TrainingDiverged, match="diverged in epoch 2, its loss first NaN or infinite at step 7 of 8: "):
        check_finite(diverged, "lr")
