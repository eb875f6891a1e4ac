"""Time per training step of the fast recipe's model under the settings `auto` chooses between.

    python benchmarks/step_benchmark.py                      # fp32: XLA and steps_per_execution on/off
    python benchmarks/step_benchmark.py --precisions fp32 bf16

One process, one model per setting, the same in-memory batch of random pixels every step (no input
pipeline: this isolates what ``train.jit_compile``, ``train.steps_per_execution`` and
``train.precision`` do to the step itself). Each setting first runs ``--warmup`` steps (tracing,
XLA compilation, oneDNN primitive creation), then ``--steps`` timed steps; the baseline row is
the pipeline's CPU default (fp32, no XLA, one step per execution), measured in the same run.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import pipeline  # noqa: E402,F401  (tf-keras)
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.models.resnet import build_model  # noqa: E402
from pipeline.train.devices import PRECISION_POLICIES  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def time_setting(config, batch: int, precision: str, jit: bool, steps_per_execution: int, warmup: int,
                 steps: int) -> dict:
    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy(PRECISION_POLICIES[precision])
    model = build_model(config.model, num_classes=10, image_size=32, mean=[125.0] * 3, std=[63.0] * 3)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.1),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
                  jit_compile=jit, steps_per_execution=steps_per_execution)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8))
    labels = tf.one_hot(rng.integers(0, 10, batch), 10)
    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
    started = time.perf_counter()
    model.fit(dataset, steps_per_epoch=warmup, epochs=1, verbose=0)
    warmup_seconds = time.perf_counter() - started
    started = time.perf_counter()
    model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0)
    seconds = time.perf_counter() - started
    return {"precision": precision, "jit_compile": jit, "steps_per_execution": steps_per_execution,
            "warmup_seconds": round(warmup_seconds, 1), "ms_per_step": round(1000 * seconds / steps, 1),
            "images_per_second": round(batch * steps / seconds, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16, help="timed steps per setting (a multiple of 8)")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--precisions", nargs="+", default=["fp32"])
    parser.add_argument("--output", default="/tmp/step-benchmark.json")
    args = parser.parse_args()
    config = load_config(os.path.join(REPO, "configs/fast.yaml"))
    rows = []
    for precision in args.precisions:
        for jit, steps_per_execution in ((False, 1), (False, 8), (True, 1), (True, 8)):
            row = time_setting(config, args.batch, precision, jit, steps_per_execution, args.warmup, args.steps)
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = next(row for row in rows if row["precision"] == "fp32" and not row["jit_compile"]
                and row["steps_per_execution"] == 1) if "fp32" in args.precisions else rows[0]
    print(f"\n{'precision':<10} {'XLA':<6} {'steps/exec':<11} {'ms/step':>8} {'images/s':>9} {'vs base':>8}")
    for row in rows:
        print(f"{row['precision']:<10} {str(row['jit_compile']):<6} {row['steps_per_execution']:<11} "
              f"{row['ms_per_step']:>8} {row['images_per_second']:>9} "
              f"{row['images_per_second'] / base['images_per_second']:>7.2f}x")
    with open(args.output, "w") as handle:
        json.dump({"batch": args.batch, "steps": args.steps, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
