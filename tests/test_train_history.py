import csv
import io
import os

from pipeline.train.history import columns, to_csv, write_history


def test_columns_are_the_union_of_keys_in_first_seen_order():
    rows = [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5, "val_accuracy": 0.5}]
    assert columns(rows) == {"epoch": [1, 2], "loss": [2.0, 1.5], "val_accuracy": [None, 0.5]}


def test_csv_quotes_what_needs_quoting_and_reads_back(tmp_path):
    rows = [{"epoch": 1, "loss": 2.0, "note": "lr 0.1, warm-up"}, {"epoch": 2, "loss": float("nan"), "diverged": True}]
    text = to_csv(rows)
    back = list(csv.DictReader(io.StringIO(text)))
    assert back[0] == {"epoch": "1", "loss": "2.0", "note": "lr 0.1, warm-up", "diverged": ""}
    assert back[1]["diverged"] == "True" and back[1]["note"] == ""
    write_history(rows[:1], str(tmp_path))
    assert os.path.exists(tmp_path / "history.json") and (tmp_path / "history.csv").read_text().startswith("epoch,loss")
