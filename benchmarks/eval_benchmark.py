"""Speed of the test evaluation at the end of training, against the model alone, in one run:

1. ``pipeline.train.loop.evaluate_split``, as one training worker runs it: the test split read
   from Parquet through Ray Data (``shard_batches``), ``predict_function`` per batch, Keras'
   loss / top-1 / top-5 sums, one all-reduce (its one trace of the forward pass included, as in
   a run);
2. the same float32 model's ``model.predict`` on the same images already in memory, at the same
   batch size: the ceiling for the model alone on this machine.

    python benchmarks/eval_benchmark.py --rows 10000          # the fast recipe's ResNet-18, 32x32

Untrained weights (speed does not depend on them), random pixels in the shard format; both are
``model.predict`` is warmed up (its predict function built) before the clock starts.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))

import pipeline  # noqa: E402,F401  (TF_USE_LEGACY_KERAS before TensorFlow)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--config", default=os.path.join(REPO_ROOT, "configs", "fast.yaml"))
    args = parser.parse_args()

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import tensorflow as tf

    from pipeline.config import batch_sizes, load_config
    from pipeline.models.registry import create_model
    from pipeline.train.loop import evaluate_split

    config = load_config(args.config, ["train.precision=fp32"])
    batch_size = batch_sizes(config)[0]
    size, classes = config.data.image_size, 10
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.rows, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, classes, args.rows)
    model = create_model(config.model, num_classes=classes, image_size=size, mean=[125.3, 123.0, 113.9],
                         std=[63.0, 62.1, 66.7])

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "part-00000.parquet")
        pq.write_table(pa.table({"id": [str(i) for i in range(args.rows)], "label": labels.astype(np.int64),
                                 "image": pa.array([row.tobytes() for row in images], pa.binary())}), path)
        dataset = ray.data.read_parquet(path)
        strategy = tf.distribute.get_strategy()

        model.predict(images[:batch_size].astype(np.float32), batch_size=batch_size, verbose=0)  # build predict's
        started = time.perf_counter()
        result = evaluate_split(model, dataset.iterator(), strategy, 0, 1, image_size=size, batch_size=batch_size)
        evaluate_seconds = time.perf_counter() - started
        assert result["rows"] == args.rows, result

        started = time.perf_counter()
        model.predict(images.astype(np.float32), batch_size=batch_size, verbose=0)
        predict_seconds = time.perf_counter() - started
    ray.shutdown()

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {config.model.name} width "
          f"{config.model.width}, {size}x{size}, batch {batch_size}, {args.rows:,} images, fp32")
    print(f"{'what':<46} {'seconds':>8} {'images/s':>9}")
    print(f"{'evaluate_split (Ray Data shard, sums)':<46} {evaluate_seconds:>8.1f} {args.rows / evaluate_seconds:>9.1f}")
    print(f"{'baseline: model.predict on in-memory arrays':<46} {predict_seconds:>8.1f} {args.rows / predict_seconds:>9.1f}")
    print(f"ratio: {predict_seconds / evaluate_seconds:.2f}x of model.predict")


if __name__ == "__main__":
    main()
