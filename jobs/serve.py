"""Serve a model over HTTP with Ray Serve: ``python jobs/serve.py --model artifacts/runs/fast``.

Inside ``ray job submit --working-dir . -- python jobs/serve.py --model s3://bucket/runs/fast
--set serve.host=0.0.0.0`` it deploys on the cluster and serves until ``ray job stop``, which
removes the application. For a deployment that outlives any job, use ``serve deploy`` with
``cluster/serve.yaml``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
