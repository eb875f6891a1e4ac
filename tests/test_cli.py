"""pipeline.cli without Ray: how an interrupted stage ends, and which errors are the user's."""

import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline import NotFound, cli, runtime
from pipeline.config import load_config

from conftest import REPO


@pytest.mark.parametrize("command, kept", [
    ("train", "run 'smoke' keeps its committed checkpoints; the same command resumes it from the latest "
              "(what was trained after it is trained again)"),
    ("tune", "search 'smoke' keeps its finished trials and checkpoints; the same command resumes it"),
    ("preprocess", "nothing was committed (the manifest is written last); the same command builds again"),
    ("predict", "the files classified so far are kept (outputs appear only when complete); the same command "
                "continues with the rest"),
])
def test_sigterm_mid_stage_says_what_was_kept_and_exits_143(command, kept, monkeypatch, capsys):
    # As `ray job stop` ends a job: SIGTERM to the driver, after Ray has installed its own handler
    # (sys.exit(15), which runtime.connect replaces).
    def stage(args):
        args.loaded_config = load_config(os.path.join(REPO, "configs/smoke.yaml"), [])
        signal.signal(signal.SIGTERM, lambda signum, frame: exit(signum))  # what ray.init leaves
        runtime.stop_on_sigterm()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        raise AssertionError("SIGTERM did not stop the stage")

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "run", stage)
    try:
        assert cli.main([command]) == 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert capsys.readouterr().err.strip() == f"stopped by SIGTERM: {kept}"


def test_ctrl_c_before_the_config_is_read_exits_130(monkeypatch, capsys):
    def stage(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run", stage)
    assert cli.main(["train"]) == 130
    assert capsys.readouterr().err.strip() == "stopped by Ctrl-C (SIGINT): nothing had started"


def test_only_the_projects_input_errors_are_usage_errors(monkeypatch, capsys):
    # A ValueError from deep inside TensorFlow or Ray is a bug to report with its traceback, not
    # "error: ..." and exit 2 as if the user had typed something wrong.
    def broken_machinery(args):
        raise ValueError("Shapes (None, 10) and (None, 12) are incompatible")

    monkeypatch.setattr(cli, "run", broken_machinery)
    with pytest.raises(ValueError, match="are incompatible"):
        cli.main(["train"])

    def bad_input(args):
        raise NotFound("model path does not exist: /nowhere")

    monkeypatch.setattr(cli, "run", bad_input)
    assert cli.main(["predict"]) == 2
    assert capsys.readouterr().err.strip() == "error: model path does not exist: /nowhere"


def test_cli_rejects_bad_config_before_work(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO, "jobs/train.py"), "--config",
                             os.path.join(REPO, "configs/smoke.yaml"), "--set", "train.epoch=3"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "did you mean 'train.epochs'" in result.stderr and "Traceback" not in result.stderr
