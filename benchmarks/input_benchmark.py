"""One training worker's input pipeline alone (no model), and how its start-up scales with data.

    python benchmarks/input_benchmark.py --source ../shared/data/cifar10-jpeg-train.tar.gz
    python benchmarks/input_benchmark.py --scale 50000 400000

Speed (``--source``): the train split of a preprocess build (made once, under ``--data``) read as a
Ray Train worker reads it: the dataset ``run_training`` builds, ``streaming_split(1)`` as Ray
Train's DataConfig does for one worker, then ``inputs.shard_to_dataset`` + ``augment`` +
``prefetch`` with the fast recipe's settings (batch 256, crop padding 4, flip, cutout 8, a
10,000-row shuffle buffer), iterated to the end of each epoch. Each measurement runs in a process of
its own pinned to 1 or 2 cores (``sched_setaffinity``; Ray's processes inherit it). Same-run
baselines: the pipeline as it was before it read whole Arrow blocks (Ray's ``iter_batches`` with
Ray's local shuffle buffer and a numpy object column; inlined below as ``ray_batches_dataset``), and
the same tf.data augmentation over in-memory arrays (the ceiling of the TensorFlow side). With
``--pipelines shard-batches``: the Ray and numpy part of the input alone (``inputs.shard_batches``:
Ray's iterator, the pixel views, the shuffle buffer and the batches), without TensorFlow.
Figures: epoch 1 (from creating the dataset to its last batch: Ray Data's start-up included) and
steady state (the median of the later epochs: Ray starts the read tasks' worker processes over the
first one or two), in images/s.

Scale (``--scale``): synthetic Parquet builds of the given row counts (random pixels, 10,000 rows
per file), read for two epochs with the file order shuffled at read time (what training does) and
with ``randomize_block_order()`` (what it did); per epoch the time to the first batch and the
object store's peak use, sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FAST = ["train.global_batch_size=256", "train.random_crop_padding=4", "train.horizontal_flip=true",
        "train.cutout=8", "train.shuffle_buffer_size=10000"]


# ----------------------------------------------------------------------------- one measurement

def measure(args) -> dict:
    """Runs in its own process: the pipeline ``args.pipeline`` on ``args.cpus`` cores."""
    os.sched_setaffinity(0, set(range(args.cpus)))
    import numpy as np
    import ray

    import pipeline  # noqa: F401
    import tensorflow as tf
    from pipeline import runtime
    from pipeline.config import load_config
    from pipeline.data.manifest import open_manifest
    from pipeline.train import inputs

    tf.config.threading.set_intra_op_parallelism_threads(args.cpus)
    tf.config.threading.set_inter_op_parallelism_threads(args.cpus)
    config = load_config(os.path.join(REPO, "configs/fast.yaml"), FAST)
    train = config.train
    manifest = open_manifest(args.data)
    rows, size, batch = manifest.rows("train"), manifest.image_size, train.global_batch_size
    steps = rows // batch
    if args.pipeline == "in-memory":
        table = manifest.head("train", rows)
        from pipeline.data.manifest import images_from_column

        images = images_from_column(table.column("image"), size)[:steps * batch].reshape(steps, batch, size, size, 3)
        labels = table.column("label").to_numpy()[:steps * batch].reshape(steps, batch).astype(np.int32)

        def make(epoch):
            data = tf.data.Dataset.from_tensor_slices((images, labels)).map(
                lambda x, y: (x, tf.one_hot(y, manifest.num_classes)))
            return inputs.prefetch(inputs.augment(data, train, manifest.mean))
    else:
        runtime.connect(num_cpus=args.cpus + runtime.INGEST_CPUS)
        if args.pipeline in ("pipeline", "shard-batches"):
            dataset = manifest.read_split("train", shuffle_files=True, seed=train.seed)
        else:
            dataset = manifest.read_split("train").randomize_block_order()
        shard = dataset.streaming_split(1, equal=True)[0]

        def make(epoch):
            seed = inputs.worker_seed(0, 0, epoch)
            if args.pipeline == "shard-batches":  # the Ray and numpy part alone: no TensorFlow
                return inputs.shard_batches(shard, image_size=size, batch_size=batch,
                                            shuffle_buffer_size=train.shuffle_buffer_size, shuffle_seed=seed)
            build = inputs.shard_to_dataset if args.pipeline == "pipeline" else ray_batches_dataset
            data = build(shard, image_size=size, num_classes=manifest.num_classes, batch_size=batch, steps=steps,
                         shuffle_buffer_size=train.shuffle_buffer_size, shuffle_seed=seed)
            return inputs.prefetch(inputs.augment(data, train, manifest.mean))

    epochs = []
    for epoch in range(args.epochs):
        started = time.perf_counter()
        first, count = None, 0
        for images_batch, _ in make(epoch):
            count += int(images_batch.shape[0])  # numpy or tensor
            if first is None:
                first = time.perf_counter() - started
        seconds = time.perf_counter() - started
        epochs.append({"images": count, "seconds": round(seconds, 2), "first_batch_seconds": round(first, 2),
                       "images_per_second": round(count / seconds)})
    if ray.is_initialized():
        ray.shutdown()
    steady = sorted(e["images_per_second"] for e in epochs[1:])
    return {"pipeline": args.pipeline, "cpus": args.cpus, "epochs": epochs,
            "first_epoch_images_per_second": epochs[0]["images_per_second"],
            "steady_images_per_second": steady[len(steady) // 2] if steady else None}


def ray_batches_dataset(shard, *, image_size, num_classes, batch_size, steps, shuffle_buffer_size, shuffle_seed):
    """The worker input before whole-block reading (for the same-run baseline): Ray's batches in
    numpy format through Ray's local shuffle buffer, the pixel column as Python bytes objects."""
    import numpy as np
    import tensorflow as tf
    from pipeline.data.manifest import images_from_column

    def generate():
        produced = 0
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                        local_shuffle_buffer_size=shuffle_buffer_size or None,
                                        local_shuffle_seed=shuffle_seed, prefetch_batches=2):
            if produced < steps:
                produced += 1
                yield images_from_column(list(batch["image"]), image_size), batch["label"].astype(np.int32)

    dataset = tf.data.Dataset.from_generator(generate, output_signature=(
        tf.TensorSpec((None, image_size, image_size, 3), tf.uint8), tf.TensorSpec((None,), tf.int32)))
    return dataset.map(lambda images, labels: (images, tf.one_hot(labels, num_classes)))


# ----------------------------------------------------------------------------- scale

def write_synthetic_build(root: str, rows: int, rows_per_file: int = 10000, size: int = 32) -> str:
    """A manifest and Parquet shards of ``rows`` random images, in the preprocess build's format."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    build = "shards-synthetic"
    shards, rng = [], np.random.default_rng(0)
    os.makedirs(os.path.join(root, build, "train"), exist_ok=True)
    for index, start in enumerate(range(0, rows, rows_per_file)):
        count = min(rows_per_file, rows - start)
        pixels = rng.integers(0, 256, (count, size * size * 3), dtype=np.uint8)
        table = pa.table({"id": [f"synthetic/{start + i}" for i in range(count)],
                          "label": rng.integers(0, 10, count),
                          "image": pa.array([row.tobytes() for row in pixels], pa.binary())})
        path = f"{build}/train/part-{index:05d}.parquet"
        pq.write_table(table, os.path.join(root, path))
        shards.append({"path": path, "rows": count})
    manifest = {"schema_version": 1, "class_names": [f"c{i}" for i in range(10)], "image_size": size,
                "normalization": {"mean": [127.5] * 3, "std": [73.9] * 3}, "build": build,
                "splits": {"train": {"rows": rows, "shards": shards}}}
    with open(os.path.join(root, "manifest.json"), "w") as handle:
        json.dump(manifest, handle)
    return root


def measure_scale(args) -> dict:
    """Runs in its own process: two epochs of a synthetic build, start-up and object-store peak."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    from pipeline import runtime
    from pipeline.data.manifest import open_manifest

    manifest = open_manifest(args.data)
    runtime.connect(num_cpus=1 + runtime.INGEST_CPUS)
    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    if args.pipeline == "pipeline":
        dataset = manifest.read_split("train", shuffle_files=True, seed=0)
    else:
        dataset = manifest.read_split("train").randomize_block_order()
    shard = dataset.streaming_split(1, equal=True)[0]
    epochs = []
    for _ in range(2):
        peak, done = [0], threading.Event()

        def sample():
            while not done.is_set():
                stats = get_memory_info_reply(state).store_stats
                peak[0] = max(peak[0], stats.object_store_bytes_used)
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started, first, count = time.perf_counter(), None, 0
        for block in shard.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            count += block.num_rows
            if first is None:
                first = time.perf_counter() - started
        done.set()
        sampler.join()
        epochs.append({"rows": count, "seconds": round(time.perf_counter() - started, 1),
                       "first_batch_seconds": round(first, 2), "object_store_peak_mib": round(peak[0] / 2**20)})
    spilled = get_memory_info_reply(state).store_stats.spilled_bytes_total
    ray.shutdown()
    return {"pipeline": args.pipeline, "rows": manifest.rows("train"), "epochs": epochs,
            "spilled_mib": round(spilled / 2**20)}


# ----------------------------------------------------------------------------- driver

def child(mode: str, pipeline_name: str, data: str, cpus: int, epochs: int) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        command = [sys.executable, __file__, "--child", mode, "--pipeline", pipeline_name, "--data", data,
                   "--cpus", str(cpus), "--epochs", str(epochs), "--out", out.name]
        print("$", " ".join(command), flush=True)
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(f"measurement failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return json.load(open(out.name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help="CIFAR-10 archive or image folder (speed)")
    parser.add_argument("--data", default=os.path.join(REPO, "artifacts/benchmarks/input-data"))
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--pipelines", nargs="+", default=["pipeline", "ray-batches", "in-memory"])
    parser.add_argument("--scale", type=int, nargs="+", help="synthetic row counts (scale)")
    parser.add_argument("--json", default=os.path.join(REPO, "artifacts/benchmarks/input.json"))
    parser.add_argument("--child", choices=["speed", "scale"], help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        args.cpus = args.cpus[0]
        result = measure(args) if args.child == "speed" else measure_scale(args)
        with open(args.out, "w") as handle:
            json.dump(result, handle)
        return

    results = []
    if args.scale:
        for rows in args.scale:
            data = write_synthetic_build(tempfile.mkdtemp(prefix=f"input-scale-{rows}-"), rows)
            for name in ("pipeline", "randomize-block-order"):
                result = child("scale", name, data, 1, 2)
                results.append(result)
                print(f"{rows:>7} rows  {name:<22} " + "  ".join(
                    f"epoch {i + 1}: first batch {e['first_batch_seconds']:6.2f} s, store peak "
                    f"{e['object_store_peak_mib']:5d} MiB" for i, e in enumerate(result["epochs"])) +
                    f"  spilled {result['spilled_mib']} MiB", flush=True)
    else:
        if not args.source:
            parser.error("--source (speed) or --scale (start-up at scale)")
        from pipeline.config import load_config
        from pipeline.data.preprocess import ensure_preprocessed
        from pipeline import runtime

        runtime.connect(num_cpus=2)
        ensure_preprocessed(load_config(os.path.join(REPO, "configs/fast.yaml"),
                                        [f"data.source={args.source}", f"data.output={args.data}"]))
        import ray

        ray.shutdown()
        for cpus in args.cpus:
            for name in args.pipelines:
                result = child("speed", name, args.data, cpus, args.epochs)
                results.append(result)
                print(f"{cpus} CPU  {name:<12} epoch 1 {result['first_epoch_images_per_second']:>7,} images/s  "
                      f"steady {result['steady_images_per_second'] or 0:>7,} images/s  "
                      f"({', '.join(str(e['images_per_second']) for e in result['epochs'])})", flush=True)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump(results, handle, indent=1)
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
