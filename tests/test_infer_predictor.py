"""pipeline.infer.predictor: an actor's record, reads tried again, and one image classified without Ray."""

import numpy as np
import pytest

from pipeline import infer

from infer_files import CLASS_NAMES, direct_predictions


def test_an_actor_writes_its_record_only_with_a_batch(local_ray, exported_model, tmp_path):
    # An actor that finished loading after the run ended (Ray Data does not wait for a late one)
    # wrote its record into the staging folder that run_inference had just removed, and left a
    # hidden ".predictions.csv.staging-*" behind (seen in CI). Its record now goes with its first
    # batch, whose write ends before the batch's results reach the run.
    from pipeline.infer.predictor import Predictor

    folder, _ = exported_model
    records_dir = tmp_path / "staging" / "actors"
    predictor = Predictor(model_path=folder, top_k=1, records_dir=str(records_dir))
    assert not (tmp_path / "staging").exists()
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    for _ in range(2):
        predictor({"path": np.array(["a.png", "b.png"]), "image": images})
    assert [path.name.startswith("actor-") for path in records_dir.iterdir()] == [True]


def test_single_image_mode(exported_model, mixed_folder, capsys, monkeypatch):
    folder, model = exported_model
    path = str(mixed_folder / "photos/photo.jpg")
    result = infer.predict_image(folder, path, top_k=2)
    expected = direct_predictions(model, [path])[0]
    assert result["predicted_class"] == CLASS_NAMES[expected.argmax()]
    assert result["confidence"] == pytest.approx(expected.max(), abs=1e-6)
    assert len(result["top_k_classes"]) == 2

    # The entry point chooses this mode for one image without --output: no Ray, no batch job.
    from pipeline.cli import main

    monkeypatch.setattr(infer, "run_inference", lambda *args, **kwargs: pytest.fail("batch mode for one image"))
    assert main(["predict", "--model", folder, "--input", path]) == 0
    out = capsys.readouterr().out
    assert f"{result['predicted_class']}  (confidence {result['confidence']:.4f})" in out


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
