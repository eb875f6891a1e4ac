"""Online serving under load: the Ray Serve application of ``pipeline.serve`` on 127.0.0.1, against
the same model's ``model.predict`` on the same images in memory (the same run's baseline).

    python benchmarks/serve_benchmark.py                       # 5,000 CIFAR-10 JPEGs, concurrency 1, 8, 32
    python benchmarks/serve_benchmark.py --images 1000 --concurrency 1 32 --json-out /tmp/serve.json

A load generator (asyncio + aiohttp, in this process) keeps ``concurrency`` requests in flight, each
one JPEG as the request body, until every image was sent once or ``--seconds`` passed (bounded in
count and time); it reports requests/s and the latency percentiles. Baselines, measured in the same
run after Serve is shut down: ``model.predict`` over the decoded images (batch 256), and the model's
own single-image call (``predict_function`` on one image) whose median sets the latency target.
Without ``--model`` an untrained ResNet-18 at 32 px is exported: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tarfile
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))

import numpy as np  # noqa: E402

import pipeline  # noqa: E402,F401  (TF_USE_LEGACY_KERAS before TensorFlow)

DEFAULT_ARCHIVE = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "cifar10-jpeg-train.tar.gz")


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="export folder (default: an untrained resnet18 at 32 px)")
    parser.add_argument("--archive", default=DEFAULT_ARCHIVE, help="cifar10-jpeg-train.tar.gz")
    parser.add_argument("--images", type=int, default=5000, help="JPEGs sent at each concurrency (each once)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="requests in flight")
    parser.add_argument("--seconds", type=float, default=300.0, help="stop a level after this long")
    parser.add_argument("--max-batch-size", type=int, default=32, help="serve.max_batch_size")
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.005, help="serve.batch_wait_timeout_s")
    parser.add_argument("--json-out", help="write the results here as JSON")
    return parser.parse_args(argv)


def read_jpegs(archive: str, count: int) -> list[bytes]:
    """``count`` JPEGs spread over the archive's classes, as bytes."""
    with tarfile.open(archive) as tar:
        members = [member for member in tar.getmembers() if member.isfile() and member.name.endswith(".jpg")]
        step = max(1, len(members) // count)
        return [tar.extractfile(member).read() for member in members[::step][:count]]


async def load(url: str, bodies: list[bytes], concurrency: int, seconds: float) -> dict:
    import aiohttp

    latencies, failures, queue = [], 0, list(reversed(bodies))
    deadline = time.perf_counter() + seconds

    async def client(session):
        nonlocal failures
        while queue and time.perf_counter() < deadline:
            body = queue.pop()
            started = time.perf_counter()
            async with session.post(url, data=body, headers={"content-type": "image/jpeg"}) as response:
                await response.read()
                if response.status != 200:
                    failures += 1
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    milliseconds = np.asarray(latencies) * 1000
    return {"concurrency": concurrency, "requests": len(latencies), "failed": failures,
            "seconds": round(elapsed, 3), "requests_per_second": round(len(latencies) / elapsed, 1),
            "p50_ms": round(float(np.percentile(milliseconds, 50)), 2),
            "p99_ms": round(float(np.percentile(milliseconds, 99)), 2)}


def baselines(model_path: str, bodies: list[bytes]) -> dict:
    from pipeline.data.images import decode_image
    from pipeline.models.saving import load_model, predict_function

    model, metadata = load_model(model_path)
    size = int(metadata["image_size"])
    pixels = np.stack([decode_image(body, size) for body in bodies]).astype(np.float32)
    model.predict(pixels[:256], batch_size=256, verbose=0)
    started = time.perf_counter()
    model.predict(pixels, batch_size=256, verbose=0)
    predict_rate = len(pixels) / (time.perf_counter() - started)
    predict = predict_function(model)
    predict(pixels[:1])
    single = []
    for index in range(200):
        started = time.perf_counter()
        predict(pixels[index:index + 1]).numpy()
        single.append(time.perf_counter() - started)
    return {"model_predict_images_per_second": round(predict_rate, 1),
            "single_image_call_p50_ms": round(float(np.median(single)) * 1000, 2)}


def main(argv=None) -> dict:
    arguments = parse_arguments(argv)
    import ray

    from pipeline import runtime
    from pipeline.config import ServeConfig
    from pipeline.serve import start_serving, stop_serving

    bodies = read_jpegs(arguments.archive, arguments.images)
    with tempfile.TemporaryDirectory(prefix="serve-benchmark-") as scratch:
        model_path = arguments.model
        if model_path is None:
            sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))
            from infer_benchmark import export_untrained_resnet18

            model_path = export_untrained_resnet18(os.path.join(scratch, "model"))
        runtime.connect()
        settings = ServeConfig(model=model_path, port=8765, max_batch_size=arguments.max_batch_size,
                               batch_wait_timeout_s=arguments.batch_wait_timeout_s)
        url = start_serving(settings) + "/predict"
        levels = []
        try:
            asyncio.run(load(url, bodies[:50], 4, 60))  # warm-up: proxy routes, replica's first batches
            for concurrency in arguments.concurrency:
                print(f"[benchmark] {len(bodies):,} requests at concurrency {concurrency}", flush=True)
                levels.append(asyncio.run(load(url, bodies, concurrency, arguments.seconds)))
                print(f"[benchmark]   {levels[-1]}", flush=True)
        finally:
            stop_serving()
            ray.shutdown()
        print("[benchmark] baselines: model.predict in memory, and one image through the model", flush=True)
        base = baselines(model_path, bodies)

    target_latency = 2 * base["single_image_call_p50_ms"] + 10
    results = {"benchmark": "serve", "images": len(bodies), "max_batch_size": arguments.max_batch_size,
               "batch_wait_timeout_s": arguments.batch_wait_timeout_s,
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
               "levels": levels, "baselines": base, "latency_target_ms": round(target_latency, 2)}
    print(f"\n[benchmark] model.predict in memory: {base['model_predict_images_per_second']:.1f} images/s; "
          f"one image through the model: {base['single_image_call_p50_ms']:.1f} ms")
    for level in levels:
        ratio = level["requests_per_second"] / base["model_predict_images_per_second"]
        print(f"  concurrency {level['concurrency']:>3}: {level['requests_per_second']:>7.1f} requests/s "
              f"({ratio:.2f}x model.predict), p50 {level['p50_ms']:.1f} ms, p99 {level['p99_ms']:.1f} ms, "
              f"{level['failed']} failed")
    print(f"  latency target at concurrency 1: p50 <= {target_latency:.1f} ms")
    if arguments.json_out:
        with open(arguments.json_out, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
