"""pipeline.tune.search without a Ray cluster: taking over another trial's checkpoint under PBT."""

import json
import os

from ray import tune

from pipeline.tune.search import _checkpoint_origin, _settled_copy

PARTS = ("state.json", "metadata.json", "tf_checkpoint")
WEIGHTS = b"w" * 64


def make_checkpoint(folder, epoch, parts=PARTS, weights=WEIGHTS):
    """A checkpoint folder as ``write_checkpoint`` leaves it, or the ``parts`` of it that a copy
    under way (or failed) has written, with ``weights`` as the data file's bytes."""
    os.makedirs(folder)
    for part in parts:
        if part == "tf_checkpoint":
            os.makedirs(os.path.join(folder, part))
            with open(os.path.join(folder, part, "ckpt.data-00000-of-00001"), "wb") as handle:
                handle.write(weights)
        else:
            with open(os.path.join(folder, part), "w") as handle:
                json.dump({"run": "b1-trial", "epoch": epoch,
                           "files": {"tf_checkpoint/ckpt.data-00000-of-00001": len(WEIGHTS)}}, handle)


def test_a_handed_over_checkpoint_is_copied_whole(tmp_path):
    source = tmp_path / "tune" / "b1" / "checkpoint_000001"
    make_checkpoint(str(source), epoch=2)
    copy = _settled_copy(tune.Checkpoint(str(source)), str(tmp_path / "run" / "start_checkpoint"),
                         attempts=1, wait_seconds=0)
    assert sorted(os.listdir(copy.path)) == sorted(PARTS)
    assert _checkpoint_origin(copy) == {"trial": "b1", "run": "b1-trial", "epoch": 2}


def test_a_checkpoint_deleted_before_the_copy_continues_from_the_trials_newest(tmp_path, capsys):
    # PBT picked checkpoint_000001 of the better trial, which trained on while this trial restarted;
    # Tune's checkpoint manager deleted that folder. Its newest complete checkpoint is taken instead,
    # not one still being written.
    trial = tmp_path / "tune" / "b1"
    make_checkpoint(str(trial / "checkpoint_000003"), epoch=4)
    make_checkpoint(str(trial / "checkpoint_000004"), epoch=5, parts=("metadata.json",))  # being persisted
    make_checkpoint(str(trial / "checkpoint_000005"), epoch=6, weights=WEIGHTS[:10])  # an upload that failed
    handed = tune.Checkpoint(str(trial / "checkpoint_000001"))
    copy = _settled_copy(handed, str(tmp_path / "run" / "start_checkpoint"), attempts=1, wait_seconds=0)
    assert _checkpoint_origin(copy)["epoch"] == 4
    assert "checkpoint_000003" in capsys.readouterr().out


def test_a_checkpoint_that_never_completes_is_an_error(tmp_path):
    trial = tmp_path / "tune" / "b1"
    make_checkpoint(str(trial / "checkpoint_000001"), epoch=2, parts=("state.json",))
    try:
        _settled_copy(tune.Checkpoint(str(trial / "checkpoint_000001")), str(tmp_path / "start"),
                      attempts=2, wait_seconds=0)
    except Exception as error:
        assert "stayed incomplete" in str(error)
    else:
        raise AssertionError("an incomplete checkpoint was copied")
    assert not os.path.exists(tmp_path / "start")
