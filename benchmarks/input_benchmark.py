"""One training worker's input pipeline alone (no model), and how its start-up scales with data.

    python benchmarks/input_benchmark.py --source ../shared/data/cifar10-jpeg-train.tar.gz
    python benchmarks/input_benchmark.py --scale 50000 400000
    python benchmarks/input_benchmark.py --source <archive or folder> --image-size 224 --images-per-class 1200 \
        --cpus 1 --pipelines pipeline in-memory --data /tmp/input-224

Speed (``--source``): the train split of a preprocess build (made once, under ``--data``) read as a
Ray Train worker reads it: the dataset ``run_training`` builds, ``streaming_split(1)`` as Ray
Train's DataConfig does for one worker, then ``inputs.shard_to_dataset`` + ``augment`` +
``prefetch`` with the fast recipe's settings (batch 256, crop padding 4, flip, cutout 8, a
10,000-row shuffle buffer), iterated to the end of each epoch. Each measurement runs in a process of
its own pinned to 1 or 2 cores (``sched_setaffinity``; Ray's processes inherit it). Same-run
baselines: ``tf-augment``, the pipeline as it was before it augmented in numpy (the same Ray part,
then crop, flip and cutout as a tf.data map of vectorised TensorFlow ops; inlined below as
``tf_augment``), and ``in-memory``, the pipeline's augmentation over arrays already in memory
(the ceiling without Ray; ``in-memory-tf``: the same with the TensorFlow augmentation). With
``--pipelines shard-batches``: the Ray and numpy part of the input alone (``inputs.shard_batches``:
Ray's iterator, the pixel views, the shuffle buffer and the batches), without TensorFlow.
Figures: epoch 1 (from creating the dataset to its last batch: Ray Data's start-up included) and
steady state (the median of the later epochs: Ray starts the read tasks' worker processes over the
first one or two), in images/s; and "between batches", the median time between two batches after
the first as a rate: the pipeline's own speed without the shuffle buffer's fill at the start of
an epoch and the pauses while Ray Data opens the next file.

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
sys.path.insert(0, os.path.join(REPO, "tests"))

FAST = ["train.global_batch_size=256", "train.random_crop_padding=4", "train.horizontal_flip=true",
        "train.cutout=8", "train.shuffle_buffer_size=10000"]
# --augmentation photo: configs/folder224.yaml's (random resized crops of >= 25% of the area, flips).
PHOTO = ["train.random_crop_padding=0", "train.cutout=0", "train.random_resized_crop=0.25"]


# ----------------------------------------------------------------------------- one measurement

def measure(args) -> dict:
    """Runs in its own process: the pipeline ``args.pipeline`` on ``args.cpus`` cores."""
    os.sched_setaffinity(0, set(range(args.cpus)))
    import numpy as np
    import ray

    import pipeline  # noqa: F401
    import tensorflow as tf
    from pipeline import capacity, runtime
    from pipeline.config import load_config
    from pipeline.data.manifest import open_manifest
    from pipeline.train import inputs

    tf.config.threading.set_intra_op_parallelism_threads(args.cpus)
    tf.config.threading.set_inter_op_parallelism_threads(args.cpus)
    config = load_config(os.path.join(REPO, "configs/fast.yaml"), FAST + (PHOTO if args.augmentation == "photo" else []))
    train = config.train
    manifest = open_manifest(args.data)
    rows, size, batch = manifest.rows("train"), manifest.image_size, train.global_batch_size
    steps = rows // batch
    augmentation = inputs.Augmentation.from_config(train, manifest.mean)
    if args.pipeline.startswith("in-memory"):
        table = manifest.head("train", rows)
        from pipeline.data.manifest import images_from_column

        images = images_from_column(table.column("image"), size)[:steps * batch].reshape(steps, batch, size, size, 3)
        labels = table.column("label").to_numpy()[:steps * batch].reshape(steps, batch).astype(np.int32)
        in_numpy = args.pipeline == "in-memory"

        def make(epoch):
            rng = np.random.default_rng(epoch)

            def generate():
                for step in range(steps):
                    yield augmentation(images[step], labels[step], rng) if in_numpy else (images[step], labels[step])

            data = inputs.batches_to_dataset(generate, image_size=size, num_classes=manifest.num_classes,
                                             resized_crops=in_numpy and bool(augmentation.resized_crop))
            return inputs.prefetch(data if in_numpy else tf_augment(data, train, manifest.mean))
    else:
        runtime.connect(num_cpus=args.cpus + capacity.INGEST_CPUS)
        dataset = manifest.read_split("train", shuffle_files=True, seed=train.seed)
        shard = dataset.streaming_split(1, equal=True)[0]

        def make(epoch):
            seed = inputs.worker_seed(0, 0, epoch)
            if args.pipeline == "shard-batches":  # the Ray and numpy part alone: no TensorFlow
                return inputs.shard_batches(shard, image_size=size, batch_size=batch,
                                            shuffle_buffer_size=inputs.shuffle_buffer_rows(train, size),
                                            shuffle_seed=seed)
            data = inputs.shard_to_dataset(
                shard, image_size=size, num_classes=manifest.num_classes, batch_size=batch, steps=steps,
                shuffle_buffer_size=inputs.shuffle_buffer_rows(train, size), shuffle_seed=seed,
                augmentation=augmentation if args.pipeline == "pipeline" else None)
            if args.pipeline == "tf-augment":
                data = tf_augment(data, train, manifest.mean)
            return inputs.prefetch(data)

    epochs = []
    for epoch in range(args.epochs):
        started = time.perf_counter()
        first, count, arrivals = None, 0, []
        for images_batch, _ in make(epoch):
            count += int(images_batch.shape[0])  # numpy or tensor
            arrivals.append(time.perf_counter() - started)
            if first is None:
                first = arrivals[0]
        seconds = time.perf_counter() - started
        # The typical time between two batches once the first has come: the pipeline's own rate,
        # without the shuffle buffer's fill (no batch leaves it before it holds its rows) and the
        # pauses while Ray Data opens the next file, which an epoch's rate includes.
        between = float(np.median(np.diff(arrivals))) if len(arrivals) > 2 else seconds
        epochs.append({"images": count, "seconds": round(seconds, 2), "first_batch_seconds": round(first, 2),
                       "images_per_second": round(count / seconds),
                       "between_batches_images_per_second": round(count / len(arrivals) / between)})
    if ray.is_initialized():
        ray.shutdown()
    steady = sorted(e["images_per_second"] for e in epochs[1:])
    import resource

    return {"pipeline": args.pipeline, "cpus": args.cpus, "epochs": epochs, "image_size": size,
            "first_epoch_images_per_second": epochs[0]["images_per_second"],
            "steady_images_per_second": steady[len(steady) // 2] if steady else None,
            "between_batches_images_per_second": sorted(e["between_batches_images_per_second"] for e in epochs)[
                len(epochs) // 2],
            # The worker's process (the iterator, the shuffle buffer, the batches; not Ray's read tasks).
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def tf_augment(dataset, train, fill_value):
    """The augmentation before it moved to numpy (for the same-run baseline): a tf.data map of
    vectorised TensorFlow ops on whole uint8 batches."""
    import numpy as np
    import tensorflow as tf

    fill = tf.constant(np.round(fill_value).astype(np.uint8))
    padding = train.random_crop_padding

    def apply(images, labels):
        count, height, width = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]
        padded = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
        top = tf.random.uniform([count, 1], 0, 2 * padding + 1, dtype=tf.int32)
        left = tf.random.uniform([count, 1], 0, 2 * padding + 1, dtype=tf.int32)
        images = tf.gather(tf.gather(padded, top + tf.range(height)[tf.newaxis, :], axis=1, batch_dims=1),
                           left + tf.range(width)[tf.newaxis, :], axis=2, batch_dims=1)
        flip = tf.random.uniform([count, 1, 1, 1]) < 0.5
        images = tf.where(flip, tf.reverse(images, axis=[2]), images)
        centre_row = tf.random.uniform([count, 1, 1], 0, height, dtype=tf.int32)
        centre_column = tf.random.uniform([count, 1, 1], 0, width, dtype=tf.int32)
        rows = tf.range(height)[tf.newaxis, :, tf.newaxis]
        columns = tf.range(width)[tf.newaxis, tf.newaxis, :]
        inside = ((tf.abs(rows - centre_row) * 2 < train.cutout)
                  & (tf.abs(columns - centre_column) * 2 < train.cutout))[..., tf.newaxis]
        return tf.where(inside, tf.broadcast_to(fill, tf.shape(images)), images), labels

    return dataset.map(apply, num_parallel_calls=tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------- scale

def measure_scale(args) -> dict:
    """Runs in its own process: two epochs of a synthetic build, start-up and object-store peak."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    from pipeline import capacity, runtime
    from pipeline.data.manifest import open_manifest

    manifest = open_manifest(args.data)
    runtime.connect(num_cpus=1 + capacity.INGEST_CPUS)
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

def child(mode: str, pipeline_name: str, data: str, cpus: int, epochs: int, augmentation: str = "cifar") -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        command = [sys.executable, __file__, "--child", mode, "--pipeline", pipeline_name, "--data", data,
                   "--cpus", str(cpus), "--epochs", str(epochs), "--augmentation", augmentation, "--out", out.name]
        print("$", " ".join(command), flush=True)
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(f"measurement failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return json.load(open(out.name))


def shard_bytes(path: str) -> int:
    from pipeline import storage

    filesystem, inner = storage.filesystem(path)
    return filesystem.get_file_info(inner).size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help="CIFAR-10 archive or image folder (speed)")
    parser.add_argument("--image-size", type=int, default=None, help="data.image_size of the build (default: 32)")
    parser.add_argument("--images-per-class", type=int, default=None, help="data.max_images_per_class of the build")
    parser.add_argument("--data", default=os.path.join(REPO, "artifacts/benchmarks/input-data"))
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--pipelines", nargs="+", default=["pipeline", "tf-augment", "in-memory", "in-memory-tf"])
    parser.add_argument("--scale", type=int, nargs="+", help="synthetic row counts (scale)")
    parser.add_argument("--encoding", default="auto", choices=["auto", "raw", "jpeg", "webp", "png"],
                        help="data.encoding of the build (auto: raw below 96 px, jpeg from there)")
    parser.add_argument("--augmentation", choices=["cifar", "photo"], default="cifar",
                        help="cifar: the fast recipe's padded crop, flip and cutout; photo: configs/folder224.yaml's "
                             "random resized crops and flips")
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
            from data_files import write_synthetic_build

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
        # CIFAR's pictures are square, so crop and squash give the same pixels: squash at every size
        # keeps builds made before data.resize existed current.
        build = [f"data.source={args.source}", f"data.output={args.data}", "data.resize=squash",
                 f"data.encoding={args.encoding}"]
        if args.image_size:
            build.append(f"data.image_size={args.image_size}")
        if args.images_per_class:
            build.append(f"data.max_images_per_class={args.images_per_class}")
        manifest = ensure_preprocessed(load_config(os.path.join(REPO, "configs/fast.yaml"), build))
        stored = sum(shard_bytes(path) for path in manifest.shard_paths("train")) / manifest.rows("train")
        print(f"shards: {manifest.image_size} px stored {manifest.encoding}, {stored / 1024:,.1f} KiB an image "
              f"({manifest.image_size**2 * 3 / stored:.1f}x smaller than its pixels)", flush=True)
        import ray

        ray.shutdown()
        for cpus in args.cpus:
            for name in args.pipelines:
                result = child("speed", name, args.data, cpus, args.epochs, args.augmentation)
                results.append(result)
                print(f"{cpus} CPU  {name:<12} epoch 1 {result['first_epoch_images_per_second']:>7,} images/s  "
                      f"steady {result['steady_images_per_second'] or 0:>7,} images/s  "
                      f"({', '.join(str(e['images_per_second']) for e in result['epochs'])}), "
                      f"{result['image_size']} px, worker peak RSS {result['peak_rss_mib']:,} MiB, "
                      f"between batches {result['between_batches_images_per_second']:,} images/s", flush=True)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump(results, handle, indent=1)
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
