"""A local S3-compatible server (moto's server mode) on 127.0.0.1 for the s3:// tests, with a
bucket, and the standard AWS environment variables that point clients (pyarrow, Ray) at it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import pyarrow.fs as pafs

from ray_nodes import free_port, wait_until_answering


@contextlib.contextmanager
def s3_server(bucket: str):
    """Yields the environment variables (endpoint and dummy credentials) a client needs."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(endpoint, server, "moto server", timeout=60)
        pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True).create_dir(bucket)
        yield {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
