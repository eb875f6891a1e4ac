"""One logging style: ``[stage] message`` on the standard output of whichever stream is current."""

import logging

import pytest

from pipeline import logs


@pytest.mark.parametrize("name, stage", [
    ("pipeline.data.preprocess", "preprocess"), ("pipeline.data", "preprocess"), ("pipeline.train.callbacks", "train"),
    ("pipeline.tune.search", "tune"), ("pipeline.infer.run", "infer"), ("pipeline.cli", "pipeline"),
    ("pipeline.database", "pipeline"),  # a prefix of a name is not its package
])
def test_stage_names(name, stage):
    assert logs.stage_of(name) == stage


def test_lines_name_the_stage_and_go_to_the_current_stdout(capsys):
    logging.getLogger("pipeline.infer.run").info("writing predictions.csv")
    logging.getLogger("pipeline.data.sources").warning("3 files skipped")
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["[infer] writing predictions.csv", "[preprocess] warning: 3 files skipped"]
    assert captured.err == ""


def test_installing_again_adds_no_second_handler(capsys):
    logs.install()
    logs.install()
    logging.getLogger("pipeline.train.run").info("once")
    assert capsys.readouterr().out == "[train] once\n"


@pytest.mark.parametrize("setting, shown", [("WARNING", False), ("debug", True), ("nonsense", True)])
def test_the_level_comes_from_the_environment(setting, shown, monkeypatch, capsys):
    monkeypatch.setenv("PIPELINE_LOG_LEVEL", setting)
    try:
        logs.install()
        logging.getLogger("pipeline.tune.search").info("search started")
        assert ("search started" in capsys.readouterr().out) is shown
    finally:
        monkeypatch.delenv("PIPELINE_LOG_LEVEL")
        logs.install()
