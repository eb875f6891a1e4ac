"""Batch inference (pipeline.infer): input resolution, per-file decode errors, predictions equal to
a direct ``model.predict`` on the same pixels, CSV / Parquet / directory outputs, labelled-folder
accuracy, the single-image mode and the ``jobs/predict.py`` entry point.

A tiny exported model (8x8 pixels, 3 classes) and tiny images made here keep this under a minute;
the Ray tests use the session's local Ray (``conftest.local_ray``, a node with two GPUs).
"""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

import pipeline  # noqa: F401  (before TensorFlow: tf-keras)
from pipeline import infer, runtime
from pipeline.config import Config, load_config, to_dict
from pipeline.data.images import decode_image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 8
CLASS_NAMES = ["cat", "dog", "ship"]
PREDICTION_COLUMNS = ["path", "predicted_class", "confidence", "top_k_classes", "top_k_probabilities"]


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def exported_model(tmp_path_factory):
    """(export folder, in-memory model) of a small tf-keras model with the export contract:
    float32 (N, 8, 8, 3) pixels in [0, 255] -> float32 probabilities over CLASS_NAMES."""
    import tf_keras as keras

    from pipeline.models.saving import model_metadata, save_export

    keras.utils.set_random_seed(0)
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    # Large weights: confident, varied predictions, so that some labelled images are right and some wrong.
    x = keras.layers.Dense(3, kernel_initializer=keras.initializers.RandomNormal(stddev=8.0))(x)
    outputs = keras.layers.Activation("softmax", dtype="float32")(x)
    model = keras.Model(inputs, outputs)
    metadata = model_metadata(kind="export", class_names=CLASS_NAMES, image_size=IMAGE_SIZE,
                              config=to_dict(Config()))
    folder = str(tmp_path_factory.mktemp("model") / "export")
    save_export(model, metadata, folder)
    return folder, model


def _random_image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    if mode == "RGB":
        return rgb
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (size[1], size[0]), dtype=np.uint16))
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8), "L")
        rgba = rgb.convert("RGBA")
        rgba.putalpha(alpha)
        return rgba
    return rgb.convert(mode)


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# relative path -> (mode, size): every format and mode decode_image promises to handle
GOOD_FILES = {
    "rgb.png": ("RGB", (8, 8)),
    "gray.PNG": ("L", (13, 7)),                 # upper-case extension
    "alpha.png": ("RGBA", (20, 20)),
    "deep.png": ("I;16", (9, 11)),              # 16-bit grayscale
    "palette.gif": ("P", (16, 10)),
    "photos/photo.jpg": ("RGB", (40, 30)),
    "photos/cmyk.jpeg": ("CMYK", (12, 12)),
    "photos/bitmap.bmp": ("RGB", (5, 9)),
    "photos/modern.webp": ("RGB", (33, 17)),
    "scans/deeper/scan.tiff": ("RGB", (64, 48)),
    "scans/gray.tif": ("L", (8, 8)),
}
BROKEN_FILES = ["broken/truncated.jpg", "broken/empty.png", "broken/text.png"]
SKIPPED_FILES = [".hidden.png", ".cache/x.png", "photos/._photo.jpg", "notes.txt", "readme.md"]


def _write_mixed_folder(root) -> None:
    for seed, (relative, (mode, size)) in enumerate(GOOD_FILES.items()):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        _random_image(mode, size, seed).save(path)
    (root / "broken").mkdir()
    whole = _jpeg_bytes(_random_image("RGB", (64, 64), 99))
    (root / "broken/truncated.jpg").write_bytes(whole[: len(whole) * 6 // 10])
    (root / "broken/empty.png").write_bytes(b"")
    (root / "broken/text.png").write_text("this is not an image\n")
    for relative in SKIPPED_FILES:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        _random_image("RGB", (8, 8), 7).save(path, format="PNG")


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    _write_mixed_folder(root)
    return root.resolve()


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory):
    """root/<class>/*.png, 7 images per class, plus one broken file in a class folder."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(1)
    for name in CLASS_NAMES:
        (root / name).mkdir()
        for image_index in range(7):
            # Noise over two tints that the untrained test model tells apart: the predictions then
            # differ within each class folder, so the confusion matrix has more than one column.
            tint = (30, 230, 60) if image_index % 3 == 0 else (200, 150, 120)
            pixels = 0.3 * rng.integers(0, 256, (10, 10, 3)) + 0.7 * np.array(tint)
            Image.fromarray(pixels.astype(np.uint8), "RGB").save(root / name / f"{image_index}.png")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root.resolve()


def _direct_predictions(model, paths: list[str]) -> np.ndarray:
    """What the model says about these files when called directly on the decoded pixels."""
    pixels = np.stack([decode_image(open(path, "rb").read(), IMAGE_SIZE) for path in paths])
    return model.predict(pixels.astype(np.float32), verbose=0)


def _config(model: str, input: str, output: str, **infer_settings) -> Config:
    config = Config()
    config.infer.model, config.infer.input, config.infer.output = model, str(input), str(output)
    config.infer.batch_size = 4  # several batches and actors' worth of work even with 20 files
    config.infer.max_failed_fraction = 1.0  # the folders hold broken files on purpose
    for key, value in infer_settings.items():
        setattr(config.infer, key, value)
    return config


def _check_against_model(predictions: pd.DataFrame, model, top_k: int) -> None:
    paths = list(predictions["path"])
    assert paths == sorted(paths)
    expected = _direct_predictions(model, paths)
    order = np.argsort(-expected, axis=1, kind="stable")
    np.testing.assert_allclose(predictions["confidence"], expected.max(axis=1), rtol=1e-5, atol=1e-6)
    assert list(predictions["predicted_class"]) == [CLASS_NAMES[index] for index in expected.argmax(axis=1)]
    for row, expected_row, expected_order in zip(predictions.itertuples(), expected, order):
        classes = json.loads(row.top_k_classes)
        probabilities = json.loads(row.top_k_probabilities)
        assert len(classes) == len(probabilities) == min(top_k, len(CLASS_NAMES))
        assert classes == [CLASS_NAMES[index] for index in expected_order[: len(classes)]]
        np.testing.assert_allclose(probabilities, expected_row[expected_order[: len(classes)]], atol=2e-6)


def _no_staging_left(folder) -> None:
    leftovers = [name for name in os.listdir(folder) if ".staging-" in name or ".tmp-" in name]
    assert leftovers == []


# ---------------------------------------------------------------- inputs (no Ray)

def test_list_inputs_walks_a_directory(mixed_folder):
    expected = sorted(str(mixed_folder / relative) for relative in [*GOOD_FILES, *BROKEN_FILES])
    assert infer.list_inputs(str(mixed_folder)) == expected


def test_class_folders_the_model_does_not_know_are_named():
    from pipeline.infer.inputs import folders_not_in_classes

    classes = ["cat", "dog"]
    paths = ["/in/cat/1.png", "/in/dog/2.png", "/in/zebra/3.png", "/in/Dog/4.png"]
    assert folders_not_in_classes(paths, "/in", classes) == ["Dog", "zebra"]
    assert folders_not_in_classes(paths[:2], "/in", classes) == []  # all known: labelled
    assert folders_not_in_classes(["/in/2024/1.png", "/in/2025/2.png"], "/in", classes) == []  # not class folders
    assert folders_not_in_classes(["/in/cat/1.png", "/in/3.png"], "/in", classes) == []  # files at the root too
    assert folders_not_in_classes(["/a/cat/1.png", "/b/horse/2.png"], None, classes) == ["horse"]  # a file list


def test_list_inputs_skips_what_the_data_stage_skips(tmp_path):
    # The same rule as preprocessing (pipeline.data.images.is_hidden): a macOS zip's __MACOSX/
    # resource forks are not images to classify, nor are dot-files.
    for relative in ("cat/a.png", "__MACOSX/cat/._a.png", "__MACOSX/cat/b.png", ".cache/c.png", "cat/.d.png"):
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        _random_image("RGB", (8, 8), 0).save(path, format="PNG")
    assert infer.list_inputs(str(tmp_path)) == [str(tmp_path / "cat/a.png")]


def test_list_inputs_single_file_glob_and_file_list(mixed_folder, tmp_path):
    one = str(mixed_folder / "photos/photo.jpg")
    assert infer.list_inputs(one) == [one]

    recursive = infer.list_inputs(f"{mixed_folder}/**/*.png")
    assert recursive == sorted(str(mixed_folder / relative) for relative in [*GOOD_FILES, *BROKEN_FILES]
                               if relative.endswith(".png"))  # case-sensitive like a shell; hidden skipped
    assert infer.list_inputs(f"{mixed_folder}/photos/*") == sorted(
        str(mixed_folder / relative) for relative in GOOD_FILES if relative.startswith("photos/"))

    listing = tmp_path / "lists" / "files.txt"
    listing.parent.mkdir()
    listing.write_text(f"# a comment\n\n{one}\n  ../elsewhere/missing.png  \n# {mixed_folder}/rgb.png\n")
    assert infer.list_inputs(str(listing)) == sorted([one, str(tmp_path / "elsewhere/missing.png")])


def test_list_inputs_errors_name_the_input(tmp_path, mixed_folder):
    with pytest.raises(FileNotFoundError, match="input not found: .*nowhere"):
        infer.list_inputs(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="input not found"):
        infer.list_inputs(str(tmp_path / "nowhere" / "*.png"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("no images here")
    with pytest.raises(ValueError, match=f"no images found in {tmp_path / 'empty'}"):
        infer.list_inputs(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no images found"):
        infer.list_inputs(f"{mixed_folder}/**/*.png.nothing")
    with pytest.raises(ValueError, match="is not an image"):
        infer.list_inputs(str(mixed_folder / "readme.md"))


def test_bad_settings_fail_before_ray_starts(exported_model, mixed_folder, tmp_path, monkeypatch):
    def connect(*args, **kwargs):
        raise AssertionError("Ray was started (or joined) before the settings were checked")

    monkeypatch.setattr(runtime, "connect", connect)
    folder, _ = exported_model
    with pytest.raises(ValueError, match="no output given"):
        infer.run_inference(_config(folder, mixed_folder, ""))
    with pytest.raises(FileNotFoundError, match="input not found"):
        infer.run_inference(_config(folder, tmp_path / "missing", tmp_path / "out.csv"))
    with pytest.raises(FileNotFoundError, match="model path does not exist"):
        infer.run_inference(_config(str(tmp_path / "no-model"), mixed_folder, tmp_path / "out.csv"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("keep me")
    with pytest.raises(ValueError, match="already holds other files"):
        infer.run_inference(_config(folder, mixed_folder, tmp_path / "busy"))


# ---------------------------------------------------------------- batch inference on Ray

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


def test_csv_output_matches_model_predict_and_lists_broken_files(local_ray, exported_model, mixed_folder, tmp_path):
    folder, model = exported_model
    output = tmp_path / "out" / "predictions.csv"
    # 3 of 14 files broken: more than infer.max_failed_fraction (5%) is an error, once every output
    # is written (the predictions of the good files are kept), then the same files within the limit.
    with pytest.raises(pipeline.PipelineError, match=r"3 of 14 files \(21.4%\) could not be read or decoded, more "
                                                     r"than infer.max_failed_fraction=0.05; the outputs are complete"):
        infer.run_inference(_config(folder, mixed_folder, output, num_actors=2, cpus_per_actor=0.5, top_k=5,
                                    max_failed_fraction=0.05))
    assert len(pd.read_csv(output)) == len(GOOD_FILES)
    summary = infer.run_inference(_config(folder, mixed_folder, output, num_actors=2, cpus_per_actor=0.5, top_k=5,
                                          max_failed_fraction=0.25))

    predictions = pd.read_csv(output)
    assert list(predictions.columns) == PREDICTION_COLUMNS  # no true_class: files sit at the root too
    assert sorted(predictions["path"]) == sorted(str(mixed_folder / relative) for relative in GOOD_FILES)
    _check_against_model(predictions, model, top_k=5)

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
    # On a GPU node, the CPU model actors (gpus_per_actor 0) saw no GPU. Each actor records its
    # facts with its first batch; Ray Data does not wait for the whole pool before it starts
    # (wait_for_min_actors_s is off), so on a few batches the second actor may never get one.
    assert 1 <= len(summary["actors"]) <= 2
    assert all(actor["cuda_visible_devices"] == "" and actor["gpus"] == [] for actor in summary["actors"])
    assert all(actor["model_load_seconds"] > 0 for actor in summary["actors"])
    assert json.loads((tmp_path / "out" / "predictions.summary.json").read_text()) == summary
    _no_staging_left(tmp_path / "out")


def test_an_actor_records_its_facts_only_with_a_batch(local_ray, exported_model, tmp_path):
    # An actor that finished loading after the run ended (Ray Data does not wait for a late one)
    # wrote its facts into the staging folder that run_inference had just removed, and left a
    # hidden ".predictions.csv.staging-*" behind (seen in CI). Its facts now go with its first
    # batch, whose write ends before the batch's results reach the run.
    from pipeline.infer.predictor import Predictor

    folder, _ = exported_model
    facts_dir = tmp_path / "staging" / "actors"
    predictor = Predictor(model_path=folder, top_k=1, facts_dir=str(facts_dir))
    assert not (tmp_path / "staging").exists()
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    for _ in range(2):
        predictor({"path": np.array(["a.png", "b.png"]), "image": images})
    assert [path.name.startswith("actor-") for path in facts_dir.iterdir()] == [True]


def test_gpu_actors_see_only_the_gpu_ray_gave_them(local_ray, exported_model, mixed_folder, tmp_path):
    # Half a GPU each: both actors fit on the two declared GPUs, each sees one device id.
    folder, _ = exported_model
    output = tmp_path / "predictions.csv"
    summary = infer.run_inference(_config(folder, mixed_folder, output, num_actors=2, cpus_per_actor=0.5,
                                          gpus_per_actor=0.5))
    assert summary["classified"] == len(GOOD_FILES)
    # Each actor that loaded its model saw exactly one device id (not the node's "0,1").
    visible = [actor["cuda_visible_devices"] for actor in summary["actors"]]
    assert 1 <= len(visible) <= 2 and set(visible) <= {"0", "1"}, visible


def test_labelled_folder_parquet_reports_accuracy(local_ray, exported_model, labelled_folder, tmp_path):
    folder, model = exported_model
    output = tmp_path / "predictions.parquet"
    summary = infer.run_inference(_config(folder, labelled_folder, output, top_k=2))

    predictions = pq.read_table(output).to_pandas()
    assert list(predictions.columns) == PREDICTION_COLUMNS + ["true_class", "true_class_rank"]
    assert len(predictions) == 3 * 7
    _check_against_model(predictions, model, top_k=2)
    assert list(predictions["true_class"]) == [os.path.basename(os.path.dirname(path)) for path in predictions["path"]]

    # Hand count from the direct predictions.
    probabilities = _direct_predictions(model, list(predictions["path"]))
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
    _no_staging_left(tmp_path)


def test_glob_into_directory_output(local_ray, exported_model, mixed_folder, tmp_path):
    folder, model = exported_model
    output = tmp_path / "run"
    summary = infer.run_inference(_config(folder, f"{mixed_folder}/photos/*", output, rows_per_file=2))

    assert sorted(os.listdir(output)) == ["errors.csv", "predictions", "summary.json"]
    parts = sorted(os.listdir(output / "predictions"))
    assert parts and all(part.endswith(".parquet") for part in parts)
    predictions = pq.read_table(output / "predictions").to_pandas().sort_values("path", ignore_index=True)
    assert list(predictions.columns) == PREDICTION_COLUMNS
    assert list(predictions["path"]) == sorted(str(mixed_folder / p) for p in GOOD_FILES if p.startswith("photos/"))
    _check_against_model(predictions, model, top_k=5)
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
        infer.run_inference(_config(folder, f"{mixed_folder}/photos/*", output))
    # No predictions, errors or summary to mistake for a result; the parts that did arrive stay in
    # the hidden staging folder for the same command to continue from.
    assert [name for name in os.listdir(tmp_path) if not name.startswith(".predictions.csv.staging-")] == []


def test_file_list_with_a_missing_entry(local_ray, exported_model, labelled_folder, tmp_path):
    folder, model = exported_model
    listing = labelled_folder / "list.txt"
    listing.write_text("# two cats, a ship and a file that is not there\ncat/0.png\ncat/1.png\n\n"
                       f"{labelled_folder}/ship/3.png\ncat/404.png\n")
    output = tmp_path / "predictions.csv"
    summary = infer.run_inference(_config(folder, listing, output))

    predictions = pd.read_csv(output)
    assert list(predictions["path"]) == [str(labelled_folder / p) for p in ("cat/0.png", "cat/1.png", "ship/3.png")]
    assert list(predictions["true_class"]) == ["cat", "cat", "ship"]  # parent folders are class names
    _check_against_model(predictions, model, top_k=5)
    errors = pd.read_csv(tmp_path / "predictions.errors.csv")
    assert errors["path"].tolist() == [str(labelled_folder / "cat/404.png")]
    assert errors["reason"][0].startswith("cannot read file")
    assert (summary["classified"], summary["failed"], summary["accuracy"]["images"]) == (3, 1, 3)


def test_only_broken_files_still_finish(local_ray, exported_model, mixed_folder, tmp_path):
    folder, _ = exported_model
    output = tmp_path / "run"
    summary = infer.run_inference(_config(folder, mixed_folder / "broken", output))
    assert (summary["classified"], summary["failed"]) == (0, len(BROKEN_FILES))
    predictions = pq.read_table(output / "predictions")
    assert predictions.num_rows == 0 and predictions.column_names == PREDICTION_COLUMNS
    assert len(pd.read_csv(output / "errors.csv")) == len(BROKEN_FILES)
    assert (output / "summary.json").exists()


# ---------------------------------------------------------------- one image, and the entry point

def test_single_image_mode(exported_model, mixed_folder, capsys, monkeypatch):
    folder, model = exported_model
    path = str(mixed_folder / "photos/photo.jpg")
    result = infer.predict_image(folder, path, top_k=2)
    expected = _direct_predictions(model, [path])[0]
    assert result["predicted_class"] == CLASS_NAMES[expected.argmax()]
    assert result["confidence"] == pytest.approx(expected.max(), abs=1e-6)
    assert len(result["top_k_classes"]) == 2

    # The entry point chooses this mode for one image without --output: no Ray, no batch job.
    from pipeline.cli import main

    monkeypatch.setattr(infer, "run_inference", lambda *args, **kwargs: pytest.fail("batch mode for one image"))
    assert main(["predict", "--model", folder, "--input", path]) == 0
    out = capsys.readouterr().out
    assert f"{result['predicted_class']}  (confidence {result['confidence']:.4f})" in out


def test_predict_job_reports_usage_errors_without_traceback(exported_model, tmp_path, capsys):
    folder, _ = exported_model
    # The script itself, as `ray job submit -- python jobs/predict.py` runs it, from another folder.
    finished = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "jobs", "predict.py"), "--model", folder,
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
    command = [sys.executable, os.path.join(REPO_ROOT, "jobs/predict.py"), "--address",
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
    _no_staging_left(tmp_path / "out")


def local_ray_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def test_a_read_that_may_pass_is_tried_again_and_a_missing_file_is_not():
    from pipeline.infer.predictor import read_with_retries

    calls = []

    def flaky(path):
        calls.append(path)
        if len(calls) < 3:
            raise OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate.")
        return b"bytes"

    assert read_with_retries("s3://bucket/a.jpg", flaky, pauses=(0, 0, 0)) == b"bytes" and len(calls) == 3

    def missing(path):
        calls.append(path)
        raise FileNotFoundError(path)

    calls.clear()
    with pytest.raises(FileNotFoundError):
        read_with_retries("gone.jpg", missing, pauses=(0, 0, 0))
    assert len(calls) == 1

    def down(path):
        calls.append(path)
        raise OSError("connection reset")

    calls.clear()
    with pytest.raises(OSError, match="connection reset"):
        read_with_retries("s3://bucket/b.jpg", down, pauses=(0, 0))
    assert len(calls) == 3
