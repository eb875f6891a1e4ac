"""Train a ResNet on Ray: ``python jobs/train.py --config configs/fast.yaml [--set key=value ...]``.

Locally it starts an embedded Ray; inside ``ray job submit --working-dir . -- python jobs/train.py``
it joins the cluster. Preprocesses the data first if its shards are missing.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
