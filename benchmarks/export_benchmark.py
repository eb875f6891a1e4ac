"""Time to write an export (the end of every training run and trial): ``save_export`` against the
same export with the Keras model object handed to ``tf.saved_model.save``, as it was before (the
baseline, measured in the same process), for the smoke model and the fast recipe's ResNet-18.

    python benchmarks/export_benchmark.py [--repeats 3]

Prints one JSON line per model: the median seconds of each way and their ratio; the two SavedModels'
``serving_default`` answers are checked equal first.
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np

import pipeline  # noqa: F401  (tf-keras before TensorFlow)
import tensorflow as tf

from pipeline.config import load_config
from pipeline.models.registry import create_model
from pipeline.models.saving import _serving_module, model_metadata, save_export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def keras_object_export(model, local: str) -> None:
    """The baseline: model.keras, then the Keras model itself as the SavedModel's root object."""
    model.save(os.path.join(local, "model.keras"))
    serving = _serving_module(model, flip=True)
    tf.saved_model.save(model, os.path.join(local, "saved_model"), signatures=serving.serve)


def median_seconds(write, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as local:
            started = time.perf_counter()
            write(local)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def serve(path: str, images: np.ndarray) -> np.ndarray:
    signature = tf.saved_model.load(path).signatures["serving_default"]
    return signature(images=tf.constant(images))["probabilities"].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    for recipe in ("smoke", "fast"):
        config = load_config(os.path.join(REPO, "configs", f"{recipe}.yaml"), ["model.test_time_flip=true"])
        model = create_model(config.model, num_classes=10, image_size=32, mean=[125.0] * 3, std=[63.0] * 3)
        metadata = model_metadata(kind="export", class_names=[str(i) for i in range(10)], image_size=32,
                                  config={"model": vars(config.model)}, mean=[125.0] * 3, std=[63.0] * 3)
        with tempfile.TemporaryDirectory() as baseline, tempfile.TemporaryDirectory() as export:
            keras_object_export(model, baseline)
            save_export(model, metadata, export)
            np.testing.assert_allclose(serve(os.path.join(export, "saved_model"), images),
                                       serve(os.path.join(baseline, "saved_model"), images), atol=1e-6)
        before = median_seconds(lambda local: keras_object_export(model, local), args.repeats)
        after = median_seconds(lambda local: save_export(model, metadata, local), args.repeats)
        print(json.dumps({"recipe": recipe, "parameters": model.count_params(), "repeats": args.repeats,
                          "keras_object_seconds": round(before, 2), "save_export_seconds": round(after, 2),
                          "speedup": round(before / after, 1)}))


if __name__ == "__main__":
    main()
