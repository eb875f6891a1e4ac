"""What reducing while decoding costs in accuracy: a split's images enlarged into photo-sized JPEGs,
classified after the full decode (the baseline) and after ``decode_image``'s reduction, same model.

    python benchmarks/decode_benchmark.py --model /tmp/runs/fast/export --data artifacts/data --size 1024
    python benchmarks/decode_benchmark.py --model /tmp/runs/fast/export --data artifacts/data --size 512 --format png

Each image of the split (``--split``, default val) is enlarged to ``--size`` pixels square (bicubic)
and stored as a JPEG of quality 90, as a camera would hand it over; both decodes then bring it back
to the model's size. Reported: top-1 of each, the images whose class changes, the mean absolute
pixel difference, and the milliseconds per image of each decode. CIFAR-10 at its own 32 px is not a
case: a picture less than twice the target size is never reduced, so its pixels are identical.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

import pipeline  # noqa: E402,F401


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="export, checkpoint or run folder")
    parser.add_argument("--data", required=True, help="data.output of a preprocess build")
    parser.add_argument("--split", default="val")
    parser.add_argument("--size", type=int, default=1024, help="side of the enlarged JPEGs (pixels)")
    parser.add_argument("--limit", type=int, default=None, help="use only this many images")
    parser.add_argument("--format", choices=["jpeg", "png"], default="jpeg",
                        help="how the enlarged images are stored (png: reduced by box averaging, not by the decoder)")
    arguments = parser.parse_args(argv)

    from pipeline.data.images import decode_image
    from pipeline.data.manifest import images_from_column, open_manifest
    from pipeline.models.saving import inference_function, load_model

    manifest = open_manifest(arguments.data)
    table = pa.concat_tables([pq.read_table(path) for path in manifest.shard_paths(arguments.split)])
    if arguments.limit:
        table = table.slice(0, arguments.limit)
    images = images_from_column(table.column("image"), manifest.image_size)
    labels = table.column("label").to_numpy()
    model, metadata = load_model(arguments.model)
    predict = inference_function(model, metadata)
    size = int(metadata["image_size"])

    decoded = {"full": [], "reduced": []}
    seconds = {"full": 0.0, "reduced": 0.0}
    for pixels in images:
        buffer = io.BytesIO()
        enlarged = Image.fromarray(pixels).resize((arguments.size, arguments.size), Image.Resampling.BICUBIC)
        if arguments.format == "jpeg":
            enlarged.save(buffer, format="JPEG", quality=90)
        else:
            enlarged.save(buffer, format="PNG", compress_level=1)
        data = buffer.getvalue()
        for name, reduce in (("full", False), ("reduced", True)):
            started = time.perf_counter()
            decoded[name].append(decode_image(data, size, reduce=reduce))
            seconds[name] += time.perf_counter() - started

    classes = {}
    for name, batch in decoded.items():
        batch = np.stack(batch).astype(np.float32)
        classes[name] = np.concatenate([predict(batch[start:start + 256]).numpy().argmax(1)
                                        for start in range(0, len(batch), 256)])
    difference = np.abs(np.stack(decoded["full"]).astype(int) - np.stack(decoded["reduced"]).astype(int))
    results = {"images": len(labels), "size": arguments.size, "format": arguments.format, "model_image_size": size,
               "top1_full": round(float((classes["full"] == labels).mean()), 4),
               "top1_reduced": round(float((classes["reduced"] == labels).mean()), 4),
               "class_changed": int((classes["full"] != classes["reduced"]).sum()),
               "mean_abs_pixel_difference": round(float(difference.mean()), 3),
               **{f"{name}_ms_per_image": round(value / len(labels) * 1000, 2) for name, value in seconds.items()}}
    print(f"{len(labels):,} {arguments.split} images enlarged to {arguments.size} px {arguments.format}, classified at "
          f"{size} px:")
    print(f"  full decode (baseline): top-1 {results['top1_full']:.4f}, {results['full_ms_per_image']} ms per image")
    print(f"  reduced while decoding: top-1 {results['top1_reduced']:.4f}, {results['reduced_ms_per_image']} ms per "
          f"image; {results['class_changed']} images change class; pixels differ by "
          f"{results['mean_abs_pixel_difference']} of 255 on average")
    return results


if __name__ == "__main__":
    main()
