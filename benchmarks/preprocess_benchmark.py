"""Preprocess throughput: the Ray Data pipeline vs a plain single-process PIL loop, same files.

    python benchmarks/preprocess_benchmark.py                       # 50,000 CIFAR-10 JPEGs, all cores
    python benchmarks/preprocess_benchmark.py --limit 2000          # quick run on a subset

Steps, each timed on its own:
  1. extract the archive (``--source``, default ../shared/data/cifar10-jpeg-train.tar.gz) with the
     pipeline's safe extraction into ``--output``/extracted (skipped when --source is a folder);
  2. baseline: one Python process, for every file: read, ``PIL.Image.open(...).convert("RGB")``,
     ``np.asarray`` into one preallocated uint8 array (no Ray, no Parquet);
  3. pipeline: ``run_preprocess(force=True)`` on a local Ray with all cores: listing, split, Ray Data
     decode, Parquet shards, manifest (Ray start-up reported separately); then the same build
     again with warm worker processes (the first one pays their start-up and imports);
  4. reuse: ``run_preprocess`` again, which only lists and fingerprints the source.
Peak memory is sampled every 0.1 s as the sum of PSS (proportional set size: shared pages such as
Ray's object store are split between the processes mapping them, not counted twice) over this
process and all its descendants (Ray's GCS, raylet and workers), per phase; ``getrusage`` max-RSS
of this process is reported too. Results: printed, and written to ``--output``/result.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import pipeline  # noqa: E402,F401
from pipeline import runtime  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import sources  # noqa: E402
from pipeline.data.images import is_image_path  # noqa: E402
from pipeline.data.preprocess import run_preprocess  # noqa: E402

DEFAULT_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                              "cifar10-jpeg-train.tar.gz")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- memory of this process tree

def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                # The command name may hold spaces and parentheses: fields start after the last ')'.
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack += children.get(pid, [])
    return found


def _process_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # no smaps_rollup (old kernel): resident set size
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * PAGE_BYTES
    except OSError:
        return 0


class PeakMemory:
    """Samples the PSS sum of this process tree in a thread; ``peak_mb`` of the current phase."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            total = sum(_process_bytes(pid) for pid in _descendants(os.getpid()))
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def reset(self) -> None:
        self.peak = 0

    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------- steps

def image_files(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file() and is_image_path(path.name)
                  and not path.name.startswith("."))


def make_subset(folder: Path, target: Path, limit: int) -> Path:
    """Hard links to the first files of every class, ``limit`` in all (classes kept balanced)."""
    files = image_files(folder)
    by_class: dict[Path, list[Path]] = {}
    for path in files:
        by_class.setdefault(path.parent, []).append(path)
    per_class = -(-limit // len(by_class))
    if target.exists():
        shutil.rmtree(target)
    for class_folder, paths in by_class.items():
        for path in paths[:per_class]:
            link = target / path.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, link)
    return target


def baseline_loop(files: list[Path]) -> tuple[float, np.ndarray]:
    """The plain way: one process decodes every file into one array."""
    started = time.perf_counter()
    first = np.asarray(Image.open(files[0]).convert("RGB"))
    pixels = np.empty((len(files),) + first.shape, dtype=np.uint8)
    for index, path in enumerate(files):
        with Image.open(path) as image:
            pixels[index] = np.asarray(image.convert("RGB"))
    return time.perf_counter() - started, pixels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=os.path.normpath(DEFAULT_SOURCE),
                        help="image-folder archive (.tar.gz/.zip) or an extracted image folder")
    parser.add_argument("--output", default="/tmp/preprocess-benchmark",
                        help="work folder: extracted/, data/ (shards), cache/, result.json")
    parser.add_argument("--limit", type=int, default=None, help="use only this many images (quick run)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    args = parser.parse_args()

    work = Path(args.output).resolve()
    work.mkdir(parents=True, exist_ok=True)
    memory = PeakMemory()
    result: dict = {"source": os.path.abspath(args.source), "cpus": args.num_cpus, "limit": args.limit,
                    "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                                "platform": platform.platform()},
                    # Other work on the machine skews both figures: the 1/5/15-minute load averages.
                    "load_average_at_start": [round(v, 2) for v in os.getloadavg()]}

    # 1. extraction (its own figure, outside the pipeline timing)
    source = Path(args.source).resolve()
    if source.is_dir():
        folder = source
    else:
        shutil.rmtree(work / "extracted", ignore_errors=True)
        started = time.perf_counter()
        folder = sources.extract_archive(source, work / "extracted", key="benchmark")
        result["extract_seconds"] = round(time.perf_counter() - started, 2)
    if args.limit:
        folder = make_subset(folder, work / "subset", args.limit)
    files = image_files(folder)
    result["images"] = len(files)
    print(f"{len(files)} images in {folder}", flush=True)

    # 2. baseline: one process, plain PIL
    memory.reset()
    seconds, pixels = baseline_loop(files)
    result["baseline"] = {"seconds": round(seconds, 2), "images_per_second": round(len(files) / seconds, 1),
                          "peak_memory_mb": memory.peak_mb(), "array_mb": round(pixels.nbytes / 2**20, 1)}
    del pixels
    print(f"baseline (1 process, PIL): {len(files)} images in {seconds:.1f} s = "
          f"{len(files) / seconds:.0f} images/s", flush=True)

    # 3. the pipeline on a local Ray with all cores
    memory.reset()
    started = time.perf_counter()
    runtime.connect(num_cpus=args.num_cpus)
    ray_start = time.perf_counter() - started
    config = load_config(None, [f"data.source={folder}", f"data.output={work / 'data'}",
                                f"data.cache_dir={work / 'cache'}"])
    started = time.perf_counter()
    manifest = run_preprocess(config, force=True)
    seconds = time.perf_counter() - started
    result["pipeline"] = {
        "seconds": round(seconds, 2), "images_per_second": round(len(files) / seconds, 1),
        "ray_start_seconds": round(ray_start, 2), "peak_memory_mb": memory.peak_mb(),
        "rows": {name: split["rows"] for name, split in manifest.splits.items()},
        "rejected": manifest.raw["counts"]["rejected"],
        "shard_mb": round(sum(os.path.getsize(path) for name in manifest.splits
                              for path in manifest.shard_paths(name)) / 2**20, 1),
    }
    print(f"pipeline (Ray Data, {args.num_cpus} CPUs): {len(files)} images in {seconds:.1f} s = "
          f"{len(files) / seconds:.0f} images/s (+ {ray_start:.1f} s Ray start-up)", flush=True)

    # 3b. the same build again: Ray's worker processes now exist and have imported the pipeline
    #     (the first build pays their start-up), i.e. the steady state of a long-running cluster.
    memory.reset()
    started = time.perf_counter()
    run_preprocess(config, force=True)
    seconds = time.perf_counter() - started
    result["pipeline_warm"] = {"seconds": round(seconds, 2), "images_per_second": round(len(files) / seconds, 1),
                               "peak_memory_mb": memory.peak_mb()}
    print(f"pipeline, warm workers: {len(files)} images in {seconds:.1f} s = {len(files) / seconds:.0f} images/s",
          flush=True)

    # 4. an idempotent re-run: listing + fingerprint only
    started = time.perf_counter()
    run_preprocess(config)
    result["reuse_seconds"] = round(time.perf_counter() - started, 2)

    memory.stop()
    result["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    result["speedup"] = {
        phase: round(result[phase]["images_per_second"] / result["baseline"]["images_per_second"], 2)
        for phase in ("pipeline", "pipeline_warm")}
    result["getrusage_max_rss_mb"] = {
        "self": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        # Only children that have exited and been waited for count here: Ray's processes are still up.
        "children_exited": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }
    result["memory_note"] = ("peak_memory_mb: max over 0.1 s samples of the PSS sum of this process and all its "
                             "descendants during that phase")
    (work / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written {work / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
