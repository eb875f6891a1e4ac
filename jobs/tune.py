"""Hyperparameter search: ``python jobs/tune.py --config configs/search.yaml [--set key=value ...]``.

Locally it starts an embedded Ray; inside ``ray job submit --working-dir . -- python jobs/tune.py``
it joins the cluster. Preprocesses the data once for all trials; the same command again resumes
an interrupted search.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
