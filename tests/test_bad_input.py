"""Bad input, as a user would type it: every case stops with one clear line (no traceback), the
exit status of its kind (2: the command or its input is wrong), before Ray starts, and loses
nothing (an earlier predictions file stays as it was). Archive safety, downloads, checksums and
damaged images have their own detailed tests in test_data_archives.py, test_data_cifar.py,
test_data_sources.py and test_infer.py; the data-stage cases here call the check the stage runs
first (``resolve_source``)."""

import json
import os
import shutil
import tarfile
import zipfile

import pytest

from pipeline import cli, runtime
from pipeline.config import load_config
from pipeline.data.sources import resolve_source

from conftest import REPO
FAST = os.path.join(REPO, "configs/fast.yaml")
PREVIOUS = "path,predicted_class\n/old/a.png,cat\n"


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """Inputs of every kind: good ones to combine with a bad one, and bad ones."""
    root = tmp_path_factory.mktemp("bad-input")
    (root / "broken.yaml").write_text("train:\n  epochs: [1, 2\n")
    (root / "list.yaml").write_text("- train\n- epochs\n")
    (root / "empty").mkdir()
    (root / "text.txt").write_text("not an image\n")
    for name in ("cat", "dog"):
        (root / "no-images" / name).mkdir(parents=True)
        (root / "texts" / name).mkdir(parents=True)
        (root / "texts" / name / "notes.txt").write_text("x")
    (root / "not-an-export").mkdir()
    (root / "not-an-export" / "weights.h5").write_bytes(b"\x89HDF")
    with tarfile.open(root / "truncated.tar.gz", "w:gz") as tar:
        tar.add(root / "text.txt", arcname="data/cat/a.png")
    (root / "truncated.tar.gz").write_bytes((root / "truncated.tar.gz").read_bytes()[:20])
    (root / "not-a-zip.zip").write_bytes(b"PK\x03\x04 but no more")
    with zipfile.ZipFile(root / "dotdot.zip", "w") as package:
        package.writestr("../../escape.png", b"x")
    export = root / "export"
    _tiny_export(str(export))
    (root / "previous.csv").write_text(PREVIOUS)
    (root / "images" / "cat").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(root / "images" / "cat" / "a.png")
    (root / "not-really.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing of a picture")
    # One class is no classifier (it used to be taken for a wrapper folder and stepped into).
    (root / "one-class" / "airplane").mkdir(parents=True)
    Image.new("RGB", (8, 8), "blue").save(root / "one-class" / "airplane" / "a.png")
    with tarfile.open(root / "empty.tar.gz", "w:gz"):
        pass
    # A copy of the export cut short, as an interrupted download leaves it.
    shutil.copytree(export, root / "truncated-export")
    model_file = root / "truncated-export" / "model.keras"
    model_file.write_bytes(model_file.read_bytes()[:2000])
    # A checkpoint whose weights file is shorter than its state.json says (an upload cut short).
    checkpoint = root / "cut-checkpoint"
    (checkpoint / "tf_checkpoint").mkdir(parents=True)
    (checkpoint / "tf_checkpoint" / "ckpt.index").write_bytes(b"x" * 100)
    (checkpoint / "state.json").write_text(json.dumps({"epoch": 1, "files": {"tf_checkpoint/ckpt.index": 4000}}))
    metadata = json.loads((export / "metadata.json").read_text())
    (checkpoint / "metadata.json").write_text(json.dumps({**metadata, "kind": "checkpoint"}))
    return root


def _tiny_export(folder: str) -> None:
    import tf_keras as keras

    from pipeline.config import Config, to_dict
    from pipeline.models.saving import model_metadata, save_export

    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(inputs))
    save_export(keras.Model(inputs, outputs), model_metadata(kind="export", class_names=["cat", "dog"], image_size=8,
                                                             config=to_dict(Config())), folder)


# (id, command line after `pipeline` with {root} for the fixture folder, status, message pattern)
COMMANDS = [
    ("malformed YAML", "train --config {root}/broken.yaml", 2, r"broken.yaml is not valid YAML"),
    ("recipe not a mapping", "train --config {root}/list.yaml", 2, r"must hold a mapping of sections"),
    ("recipe missing", "train --config {root}/nope.yaml", 2, r"config file not found: .*nope.yaml"),
    ("unknown key", "train --set train.epoch=3", 2, r"unknown config key 'train.epoch'; did you mean 'train.epochs'"),
    ("unknown section", "train --set trian.epochs=3", 2, r"unknown config section 'trian'; did you mean 'train'"),
    ("override without =", "train --set train.epochs", 2, r"section.key=value"),
    ("wrong type", "train --set train.epochs=ten", 2, r"'train.epochs' must be an integer, got 'ten'"),
    ("bool for int", "train --set train.epochs=true", 2, r"'train.epochs' must be an integer, got True"),
    ("zero epochs", "train --set train.epochs=0", 2, r"'train.epochs' must be >= 1, got 0"),
    ("negative epochs", "train --set train.epochs=-3", 2, r"'train.epochs' must be >= 1, got -3"),
    ("zero batch", "train --set train.global_batch_size=0", 2, r"'train.global_batch_size' must be >= 1"),
    ("zero workers", "train --set scaling.num_workers=0", 2, r"'scaling.num_workers' must be >= 1"),
    ("batch not divisible", "train --config " + FAST + " --set scaling.num_workers=3", 2,
     r"global_batch_size=256 is not divisible by scaling.num_workers=3"),
    ("val fraction 1", "train --set data.val_fraction=1", 2, r"'data.val_fraction' must be <= 0.9, got 1"),
    ("negative val fraction", "train --set data.val_fraction=-0.1", 2, r"'data.val_fraction' must be >= 0.0"),
    ("image size too small for any model", "train --set data.image_size=4", 2, r"'data.image_size' must be >= 8"),
    ("image size the model cannot take", "train --set model.stem=imagenet --set data.image_size=16", 2,
     r"data.image_size=16 is too small for resnet18 with the 'imagenet' stem.*at least 32x32"),
    ("unknown model", "train --set model.name=resnet19", 2, r"'model.name' must be one of .*did you mean 'resnet18'"),
    ("unknown precision", "train --set train.precision=bf61", 2, r"did you mean 'bf16'"),
    ("step schedule without steps", "train --set train.lr_schedule=step", 2, r"needs train.step_epochs"),
    ("warm-up longer than training", "train --set train.lr_schedule=cosine --set train.epochs=2 "
     "--set train.warmup_epochs=3", 2, r"warmup_epochs=3.0 must be below train.epochs=2"),
    ("NCCL without GPUs", "train --set scaling.collective=nccl", 2, r"needs scaling.use_gpu=true"),
    ("two GPUs per model actor", "predict --set infer.gpus_per_actor=2", 2, r"'infer.gpus_per_actor' must be <= 1"),
    ("a data key in a search space", "tune --set tune.space={data.image_size: {grid: [32, 64]}}", 2,
     r"tune.space.data.image_size"),
    ("unknown distribution", "tune --set tune.space={train.learning_rate: {lognormal: [0.1, 1]}}", 2,
     r"unknown distribution 'lognormal'"),
    ("predict without a model", "predict --input {root}/images --output {root}/previous.csv", 2, r"no model given"),
    ("a model path that is not an export", "predict --model {root}/not-an-export --input {root}/images "
     "--output {root}/previous.csv", 2, r"no model at .*not-an-export: no metadata.json"),
    ("a model path that does not exist", "predict --model {root}/nope --input {root}/images "
     "--output {root}/previous.csv", 2, r"model path does not exist"),
    ("an empty input folder", "predict --model {root}/export --input {root}/empty --output {root}/previous.csv", 2,
     r"no images found in .*empty"),
    ("an input that does not exist", "predict --model {root}/export --input {root}/nope "
     "--output {root}/previous.csv", 2, r"not found"),
    ("an output format it cannot write", "predict --model {root}/export --input {root}/images "
     "--output {root}/predictions.json", 2, r"names a \.json file.*\.csv or \.parquet file"),
    ("an output under a file", "predict --model {root}/export --input {root}/images "
     "--output {root}/text.txt/predictions.csv", 2, r"text.txt"),
    # Issue 27: each of these used to start Ray, end in a traceback, or name the wrong thing.
    ("data.output is a file", "train --set data.source={root}/images --set data.output={root}/text.txt", 2,
     r"data.output=.*text.txt: .*text.txt is a file, not a folder"),
    ("data.output below a file", "preprocess --set data.source={root}/images --set data.output={root}/text.txt/data",
     2, r"data.output=.*text.txt/data: .*text.txt is a file, not a folder"),
    ("run.storage_path is a file", "train --set data.source={root}/one-class --set data.output={root}/out "
     "--set run.storage_path={root}/text.txt", 2, r"run.storage_path=.*text.txt: .*is a file, not a folder"),
    ("a truncated model.keras, one image", "predict --model {root}/truncated-export --input {root}/images/cat/a.png",
     2, r"export .*truncated-export is damaged \(model.keras is not a whole .keras archive"),
    ("a truncated model.keras, a folder", "predict --model {root}/truncated-export --input {root}/images "
     "--output {root}/out.csv", 2, r"export .*truncated-export is damaged"),
    ("a checkpoint cut short, one image", "predict --model {root}/cut-checkpoint --input {root}/images/cat/a.png", 2,
     r"checkpoint .*cut-checkpoint is incomplete \(tf_checkpoint/ckpt.index has 100 of its 4000 bytes\)"),
    ("a checkpoint cut short, a folder", "predict --model {root}/cut-checkpoint --input {root}/images "
     "--output {root}/out.csv", 2, r"checkpoint .*cut-checkpoint is incomplete"),
    ("an output where nothing can be written", "predict --model {root}/export --input {root}/images "
     "--output /proc/x.csv", 2, r"^error: output /proc/x.csv: nothing can be written in /proc"),
    ("a folder as the recipe", "train --config {root}/empty", 2, r"--config .*empty is a folder"),
    ("a recipe name with a typo", "train --config " + FAST.replace(".yaml", ".yml"), 2,
     r"config file not found: .*fast.yml; did you mean '.*configs/fast.yaml'"),
    ("an empty data.source", "train --set data.source= --set data.output={root}/out", 2,
     r"'data.source' is empty: give a path \(or 'cifar10'"),
    ("a one-class source", "preprocess --set data.source={root}/one-class --set data.output={root}/out", 2,
     r"one-class has only one class folder \('airplane'\); a classifier needs at least two"),
    ("an empty archive", "train --set data.source={root}/empty.tar.gz --set data.output={root}/out "
     "--set data.cache_dir={root}/cache", 2, r"empty.tar.gz is empty: it holds no files"),
    ("a missing source", "train --set data.source={root}/nope --set data.output={root}/out", 2,
     r"data.source=.*nope': no such file or folder"),
    ("a text file as the source", "preprocess --set data.source={root}/text.txt --set data.output={root}/out", 2,
     r"is a file but not an archive"),
    ("a truncated archive", "train --set data.source={root}/truncated.tar.gz --set data.output={root}/out "
     "--set data.cache_dir={root}/cache", 2, r"truncated.tar.gz"),
    ("a cluster address where nothing listens", "train --address 127.0.0.1:1 --set data.source={root}/images", 2,
     r"--address 127.0.0.1:1: no Ray cluster answers at .*:1"),
    ("the dashboard's URL as the cluster address", "train --address http://127.0.0.1:8265", 2,
     r"--address http://127.0.0.1:8265 is not a Ray cluster address.*host:port"),
    ("epochs not a whole number", "train --set train.epochs=5.5", 2, r"'train.epochs' must be an integer, got 5.5"),
    ("a run name with a slash", "train --set run.name=exp/1", 2, r"'run.name' must be one folder name"),
    ("an image that is not one", "predict --model {root}/export --input {root}/not-really.png", 2,
     r"cannot decode image"),
]


@pytest.mark.parametrize("command, status, message", [case[1:] for case in COMMANDS], ids=[case[0] for case in COMMANDS])
def test_a_bad_command_line_stops_with_one_clear_line(place, command, status, message, capsys, monkeypatch):
    arguments = [part.replace("{root}", str(place)) for part in command.split(" ")]
    if arguments[0] == "tune":  # a search space is one argument with spaces
        key = next(i for i, part in enumerate(arguments) if part.startswith("tune.space="))
        arguments = arguments[:key] + [" ".join(arguments[key:])]
    before = _snapshot(place)

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started (or joined) before the bad input was refused")

    monkeypatch.setattr(runtime, "connect", no_ray)
    assert cli.main(arguments) == status
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    import re

    assert re.search(message, last), last
    assert _snapshot(place) == before  # nothing written, nothing lost
    assert (place / "previous.csv").read_text() == PREVIOUS


SOURCES = [
    ("a missing source", "{root}/nope", r"no such file or folder"),
    ("an empty folder", "{root}/empty", r"has no class folders"),
    ("a file that is not an archive", "{root}/text.txt", r"is a file but not an archive"),
    ("classes with no images", "{root}/no-images", r"empty class 'cat'.*also empty: dog"),
    ("a folder of non-image files", "{root}/texts", r"holds no image files"),
    ("a truncated archive", "{root}/truncated.tar.gz", r"truncated.tar.gz"),
    ("a damaged zip", "{root}/not-a-zip.zip", r"cannot read archive .*not-a-zip.zip"),
    ("a zip member escaping the folder", "{root}/dotdot.zip", r"path traversal"),
    ("an empty archive", "{root}/empty.tar.gz", r"empty.tar.gz is empty: it holds no files"),
    ("one class folder", "{root}/one-class", r"only one class folder \('airplane'\)"),
]


@pytest.mark.parametrize("source, message", [case[1:] for case in SOURCES], ids=[case[0] for case in SOURCES])
def test_a_bad_data_source_is_refused_before_any_work(place, tmp_path, source, message):
    config = load_config(None, [f"data.source={source.replace('{root}', str(place))}",
                                f"data.cache_dir={tmp_path}/cache", f"data.output={tmp_path}/data"])
    with pytest.raises(cli.USAGE_ERRORS, match=message):  # exit status 2 from the command
        resolve_source(config.data)
    assert not (tmp_path / "data").exists()
    assert not (tmp_path / "cache").exists()  # no empty cache folders left behind either


def _snapshot(root):
    return sorted((str(path.relative_to(root)), path.stat().st_size) for path in root.rglob("*") if path.is_file())


def test_the_table_has_the_cases_we_promise():
    assert len(COMMANDS) + len(SOURCES) >= 30
