"""Preprocess images into Parquet shards + manifest.json: the entry point for ``ray job submit``.

    python jobs/preprocess.py --set data.source=/data/cifar-10-python.tar.gz
    ray job submit --working-dir . -- python jobs/preprocess.py --config configs/fast.yaml --force

Locally it starts an embedded Ray; inside ``ray job submit`` it joins the cluster. A matching
build is reused unless ``--force``. Bad configuration or input prints ``error: ...`` and exits 2.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
