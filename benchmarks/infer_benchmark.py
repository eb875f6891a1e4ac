"""Batch-inference throughput on the 50,000 CIFAR-10 training JPEGs, three ways, in one run:

1. ``pipeline.infer.run_inference`` end to end: list files, decode in Ray Data tasks, classify in the
   model actor pool, write predictions (Parquet) + errors + summary;
2. the same model's ``model.predict`` on the same images already decoded in memory, at the same
   batch size: the ceiling for the model alone on this machine (the baseline), and the same arrays
   through ``pipeline.models.saving.predict_function``, the forward pass the model actors run;
3. one image at a time, as the original tutorial predicted: PIL open, resize to 32x32, ``predict``
   on a batch of one (timed on a sample, ``--single-sample`` images).

    python benchmarks/infer_benchmark.py                          # all 50,000 images, ~minutes on 2 CPUs
    python benchmarks/infer_benchmark.py --limit 2000 --json-out /tmp/infer_benchmark.json
    python benchmarks/infer_benchmark.py --photos 400 --single-sample 0   # 12 MP phone photos instead

``--photos N`` classifies N generated 12-megapixel JPEGs (4032x3024, quality 90, about 3 MB each,
in two class folders) instead of CIFAR-10, and times ``decode_image`` on a sample of them with and
without the reduction while decoding (the same run's baseline for the decode alone).

Without ``--model`` an untrained ResNet-18 (``pipeline.config.ModelConfig`` defaults) is built and
exported: throughput does not depend on the weights. The archive is extracted to a temporary folder
first (its extraction time is reported apart, not counted as inference).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tarfile
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
# A local Ray's workers start from this environment: let them import the same checkout.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))

import pipeline  # noqa: E402,F401  (TF_USE_LEGACY_KERAS before TensorFlow)

DEFAULT_ARCHIVE = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "cifar10-jpeg-train.tar.gz")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Per-channel statistics of the CIFAR-10 training images in 0-255 units, for the standardizing
# first layer of an untrained model (any plausible values give the same speed).
CIFAR10_MEAN = [125.3, 123.0, 113.9]
CIFAR10_STD = [63.0, 62.1, 66.7]


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="export folder (default: build and export an untrained resnet18)")
    parser.add_argument("--archive", default=DEFAULT_ARCHIVE, help="cifar10-jpeg-train.tar.gz")
    parser.add_argument("--limit", type=int, default=None, help="classify only this many images (evenly spread)")
    parser.add_argument("--num-actors", type=int, default=None, help="model actors (default: infer.num_actors)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per model call (default: infer.batch_size)")
    parser.add_argument("--cpus-per-actor", type=float, default=None, help="default: infer.cpus_per_actor")
    parser.add_argument("--single-sample", type=int, default=500, help="images timed one at a time (0: skip)")
    parser.add_argument("--photos", type=int, default=None,
                        help="classify this many generated 12 MP JPEG photos instead of the CIFAR-10 archive")
    parser.add_argument("--json-out", help="write the results here as JSON")
    return parser.parse_args(argv)


def extract(archive: str, target: str) -> str:
    if not os.path.isfile(archive):
        raise FileNotFoundError(f"archive not found: {archive}")
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    return target


def write_photos(count: int, target: str) -> str:
    """``count`` phone-sized JPEGs (4032x3024, quality 90) in ``target/{indoor,outdoor}/``: smooth
    gradients, a few hard-edged shapes and sensor noise, about 3 MB each, like a 12 MP photo."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    height, width = 3024, 4032
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)
    for index in range(count):
        tint = rng.uniform(0.3, 1.0, 3).astype(np.float32)
        pixels = np.stack([columns / width, rows / height, (columns + rows) / (width + height)], -1) * 255 * tint
        pixels += rng.normal(0, 6, (height, width, 1)).astype(np.float32)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x, y, size = rng.integers(0, width - 800), rng.integers(0, height - 800), rng.integers(100, 800)
            draw.ellipse([x, y, x + size, y + size], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        folder = os.path.join(target, ("indoor", "outdoor")[index % 2])
        os.makedirs(folder, exist_ok=True)
        image.save(os.path.join(folder, f"IMG_{index:04d}.jpg"), quality=90)
    return target


def time_decode(paths: list[str], image_size: int) -> dict:
    """``decode_image`` per file, in this process: the full decode (the baseline) and the one that
    reduces while decoding, the same files read from memory, alternated."""
    import numpy as np

    from pipeline.data.images import decode_image

    seconds = {"full": 0.0, "reduced": 0.0}
    difference = []
    for path in paths:
        data = open(path, "rb").read()
        pixels = {}
        for name, reduce in (("full", False), ("reduced", True)):
            started = time.perf_counter()
            pixels[name] = decode_image(data, image_size, reduce=reduce).astype(int)
            seconds[name] += time.perf_counter() - started
        difference.append(np.abs(pixels["reduced"] - pixels["full"]).mean())
    return {"images": len(paths), **{f"{name}_ms_per_image": round(value / len(paths) * 1000, 1)
                                     for name, value in seconds.items()},
            "speedup": round(seconds["full"] / seconds["reduced"], 2),
            "mean_abs_pixel_difference": round(float(np.mean(difference)), 3)}


def export_untrained_resnet18(target: str) -> str:
    from pipeline.config import Config, ModelConfig, to_dict
    from pipeline.models import build_model
    from pipeline.models.saving import model_metadata, save_export

    config = Config()
    model = build_model(ModelConfig(), num_classes=len(CIFAR10_CLASSES), image_size=32,
                        mean=CIFAR10_MEAN, std=CIFAR10_STD)
    metadata = model_metadata(kind="export", class_names=CIFAR10_CLASSES, image_size=32, config=to_dict(config),
                              mean=CIFAR10_MEAN, std=CIFAR10_STD)
    return save_export(model, metadata, target)


def time_batch_inference(config) -> dict:
    from pipeline import runtime
    from pipeline.infer import run_inference

    runtime.connect()
    summary = run_inference(config)
    classify_seconds = summary["stage_seconds"]["decode_and_classify"]
    return {
        "files": summary["files_seen"],
        "classified": summary["classified"],
        "failed": summary["failed"],
        "elapsed_seconds": summary["elapsed_seconds"],
        "images_per_second": summary["images_per_second"],
        "decode_and_classify_seconds": classify_seconds,
        "decode_and_classify_images_per_second": round(summary["files_seen"] / classify_seconds, 2),
        "stage_seconds": summary["stage_seconds"],
        # Per model actor, TensorFlow's import and the model's load before its first batch.
        "actor_model_load_seconds": [actor["model_load_seconds"] for actor in summary["actors"]],
        "top1_accuracy": (summary["accuracy"] or {}).get("top1"),
    }


def time_model_predict(model, paths: list[str], image_size: int, batch_size: int) -> dict:
    import numpy as np

    from pipeline.data.images import decode_image

    pixels = np.stack([decode_image(open(path, "rb").read(), image_size) for path in paths]).astype(np.float32)
    model.predict(pixels[:batch_size], batch_size=batch_size, verbose=0)  # build the predict function first
    started = time.perf_counter()
    model.predict(pixels, batch_size=batch_size, verbose=0)
    seconds = time.perf_counter() - started
    return {"images": len(paths), "seconds": round(seconds, 3), "images_per_second": round(len(paths) / seconds, 2),
            "compiled_forward_pass": time_compiled_forward_pass(model, pixels, batch_size)}


def time_compiled_forward_pass(model, pixels, batch_size: int) -> dict:
    """The same arrays through ``predict_function`` (what the model actors call), batch by batch."""
    from pipeline.models.saving import predict_function

    predict = predict_function(model)
    predict(pixels[:batch_size])  # trace first
    started = time.perf_counter()
    for start in range(0, len(pixels), batch_size):
        predict(pixels[start:start + batch_size]).numpy()
    seconds = time.perf_counter() - started
    return {"images": len(pixels), "seconds": round(seconds, 3), "images_per_second": round(len(pixels) / seconds, 2)}


def time_one_at_a_time(model, paths: list[str], image_size: int) -> dict:
    """The tutorial's loop: PIL open, resize, predict a batch of one. (It also divided by 255;
    our models take raw 0-255 pixels and normalise inside, so that step is left out.)"""
    import numpy as np
    from PIL import Image

    def classify(path):
        image = Image.open(path).convert("RGB").resize((image_size, image_size))
        return model.predict(np.asarray(image, dtype=np.float32)[None], verbose=0).argmax()

    classify(paths[0])  # warm-up: the first predict builds the predict function
    started = time.perf_counter()
    for path in paths:
        classify(path)
    seconds = time.perf_counter() - started
    return {"images": len(paths), "seconds": round(seconds, 3), "images_per_second": round(len(paths) / seconds, 2)}


def main(argv=None) -> dict:
    arguments = parse_arguments(argv)
    from pipeline.config import Config
    from pipeline.infer import list_inputs

    config = Config()
    for key, value in (("num_actors", arguments.num_actors), ("batch_size", arguments.batch_size),
                       ("cpus_per_actor", arguments.cpus_per_actor)):
        if value is not None:
            setattr(config.infer, key, value)

    with tempfile.TemporaryDirectory(prefix="infer-benchmark-") as scratch:
        started = time.perf_counter()
        if arguments.photos:
            images_dir = write_photos(arguments.photos, os.path.join(scratch, "images"))
        else:
            images_dir = extract(arguments.archive, os.path.join(scratch, "images"))
        extract_seconds = time.perf_counter() - started
        paths = list_inputs(images_dir)
        if arguments.limit is not None and arguments.limit < len(paths):
            step = len(paths) / arguments.limit  # evenly spread: every class is represented
            paths = [paths[int(index * step)] for index in range(arguments.limit)]
            listing = os.path.join(images_dir, "train", "benchmark-files.txt")
            with open(listing, "w") as handle:
                handle.write("\n".join(paths) + "\n")
            config.infer.input = listing
        else:
            config.infer.input = images_dir
        print(f"[benchmark] {len(paths):,} images {'written' if arguments.photos else 'extracted'} in "
              f"{extract_seconds:.1f} s", flush=True)

        config.infer.model = arguments.model or export_untrained_resnet18(os.path.join(scratch, "model"))
        config.infer.output = os.path.join(scratch, "predictions.parquet")

        print(f"[benchmark] 1/3 run_inference (batch {config.infer.batch_size}, {config.infer.num_actors} actor(s) "
              f"x {config.infer.cpus_per_actor:g} CPU)", flush=True)
        batch = time_batch_inference(config)

        import ray

        ray.shutdown()  # the in-process measurements below get the whole machine, as run_inference had
        from pipeline.models.saving import load_model

        model, metadata = load_model(config.infer.model)
        image_size = int(metadata["image_size"])
        decode = None
        if arguments.photos:
            print("[benchmark] decode_image on 20 photos, full and reduced while decoding", flush=True)
            decode = time_decode(paths[:20], image_size)
        print(f"[benchmark] 2/3 model.predict on {len(paths):,} decoded images in memory", flush=True)
        in_memory = time_model_predict(model, paths, image_size, config.infer.batch_size)
        single = None
        if arguments.single_sample > 0:
            sample = paths[:: max(1, len(paths) // arguments.single_sample)][: arguments.single_sample]
            print(f"[benchmark] 3/3 one image at a time on {len(sample):,} images", flush=True)
            single = time_one_at_a_time(model, sample, image_size)

    results = {
        "benchmark": "infer",
        "model": arguments.model or "untrained resnet18 (ModelConfig defaults)",
        "images": len(paths),
        "batch_size": config.infer.batch_size,
        "num_actors": config.infer.num_actors,
        "cpus_per_actor": config.infer.cpus_per_actor,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "extract_seconds": round(extract_seconds, 3),
        "run_inference": batch,
        "model_predict_in_memory": in_memory,
        "one_image_at_a_time": single,
        "decode_image": decode,
    }
    print("\n[benchmark] images/s")
    print(f"  run_inference end to end        {batch['images_per_second']:>10,.1f}"
          f"   ({batch['files']:,} files in {batch['elapsed_seconds']:.1f} s; decode+classify stage "
          f"{batch['decode_and_classify_images_per_second']:,.1f})")
    print(f"  model.predict, arrays in memory {in_memory['images_per_second']:>10,.1f}")
    print(f"  predict_function, in memory     {in_memory['compiled_forward_pass']['images_per_second']:>10,.1f}")
    if single:
        print(f"  one image at a time (tutorial)  {single['images_per_second']:>10,.1f}   ({single['images']} images)")
    if decode:
        print(f"  decode_image, full (baseline)   {1000 / decode['full_ms_per_image']:>10,.1f}   "
              f"({decode['full_ms_per_image']} ms per photo)")
        print(f"  decode_image, reduced           {1000 / decode['reduced_ms_per_image']:>10,.1f}   "
              f"({decode['reduced_ms_per_image']} ms per photo, {decode['speedup']}x; pixels differ by "
              f"{decode['mean_abs_pixel_difference']} of 255 on average)")
    if arguments.json_out:
        with open(arguments.json_out, "w") as handle:
            json.dump(results, handle, indent=2)
        print(f"  results: {arguments.json_out}")
    return results


if __name__ == "__main__":
    main()
