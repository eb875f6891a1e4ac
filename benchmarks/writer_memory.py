"""Peak memory of one preprocess writer task (``write_shards``) per image size.

Each size runs in a fresh process: it builds one shard's batch of random pixels the way the
decode tasks hand it over (an Arrow table with a binary ``image`` column), then calls
``write_shards`` on it, and reports the process's peak RSS growth during the call, beyond the
batch itself. The default config's ``rows_per_shard`` applies (10,000), capped by the shard's
pixel budget where the code has one.

    python benchmarks/writer_memory.py --image-size 32 224
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MIB = 2**20


def measure(image_size: int) -> dict:
    import numpy as np
    import pyarrow as pa

    from pipeline.config import load_config
    from pipeline.data import preprocess

    data = load_config(None, [f"data.image_size={image_size}"]).data
    rows = preprocess.shard_rows(data) if hasattr(preprocess, "shard_rows") else data.rows_per_shard
    row_bytes = image_size * image_size * 3
    pixels = np.random.default_rng(0).integers(0, 256, size=rows * row_bytes, dtype=np.uint8)
    offsets = np.arange(rows + 1, dtype=np.int32) * row_bytes
    images = pa.Array.from_buffers(pa.binary(), rows, [None, pa.py_buffer(offsets), pa.py_buffer(pixels)])
    batch = pa.table({
        "index": pa.array(np.arange(rows), pa.int64()),
        "id": pa.array([f"image-{i:06d}" for i in range(rows)], pa.string()),
        "label": pa.array(np.arange(rows) % 10, pa.int64()),
        "image": images,
        "error": pa.array([""] * rows, pa.string()),
        "pixel_sums": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(rows * 6, np.int64)), 6),
    })
    kwargs = {"rows_per_shard": rows, "split_rows": rows, "num_classes": 10}
    if "image_size" in inspect.signature(preprocess.write_shards).parameters:
        kwargs["image_size"] = image_size
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with tempfile.TemporaryDirectory() as output:
        summary = preprocess.write_shards(batch, output, "shards-bench", "train", **kwargs)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert int(summary["rows"][0]) == rows
    return {"image_size": image_size, "rows_per_shard": rows, "shard_mib": round(rows * row_bytes / MIB, 1),
            "writer_extra_peak_mib": round((peak - before) / MIB, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # one size, in this process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    print(f"{'image size':>10} {'rows/shard':>10} {'shard MiB':>10} {'writer peak beyond the batch, MiB':>34}")
    for size in args.image_size:
        result = subprocess.run([sys.executable, __file__, "--measure", str(size)], capture_output=True, text=True,
                                check=True)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"{row['image_size']:>10} {row['rows_per_shard']:>10} {row['shard_mib']:>10} "
              f"{row['writer_extra_peak_mib']:>34}")


if __name__ == "__main__":
    main()
