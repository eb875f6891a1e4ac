"""pipeline.tune.results without Ray: one trial's row of the results table."""

import types

from pipeline import storage
from pipeline.config import load_config
from pipeline.tune import results
from pipeline.tune.space import parse_space


def test_a_trial_restarted_by_a_resumed_search_is_found_by_its_id(tmp_path):
    # Tune gave the restarted trial the folder "<id>_fc1b" (its first one existed); its runs and
    # record keep the trial's id.
    config = load_config(None, ["train.epochs=1", "tune.space={train.learning_rate: {grid: [0.02]}}"])
    search = str(tmp_path)
    results.record_segment(search, "3ab69_00001", {"run": "3ab69_00001", "from": None,
                                                   "params": {"train.learning_rate": 0.02}})
    run_dir = tmp_path / "trials" / "3ab69_00001"
    storage.write_json(str(run_dir / "history.json"), [{"epoch": 1, "val_accuracy": 0.75, "loss": 0.9}])
    storage.write_json(str(run_dir / "summary.json"), {"checkpoint": "c", "export": "e", "evaluation": {}})
    result = types.SimpleNamespace(path=f"{search}/tune/3ab69_00001_fc1b", error=None, config={},
                                   metrics={"trial_id": "3ab69_00001", "time_total_s": 20.8})
    row = results.trial_row(config, parse_space(config), search, result)
    assert (row["trial"], row["status"], row["epochs"], row["val_accuracy"]) == ("3ab69_00001", "completed", 1, 0.75)
    assert row["run_dir"] == str(run_dir)
