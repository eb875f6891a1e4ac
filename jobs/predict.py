"""Classify images: ``python jobs/predict.py --model M --input I [--output O] [--set infer.batch_size=512]``.

``--input`` is an image, a directory, a glob, a .txt file list or an s3:// prefix. One image without
``--output`` is classified in this process (no Ray) and its class and confidence printed; anything
else runs batch inference on Ray (``pipeline.infer.run_inference``): locally an embedded Ray, inside
``ray job submit --working-dir . -- python jobs/predict.py ...`` the cluster. ``--model``,
``--input`` and ``--output`` set ``infer.model``, ``infer.input`` and ``infer.output``. Bad arguments
print ``error: ...`` and exit with status 2.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
