"""A real MLflow tracking server on 127.0.0.1 (SQLite store, artifacts served by the server), for
the tracking tests; stopped with its whole process group."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

from ray_nodes import free_port, wait_until_answering


@contextlib.contextmanager
def mlflow_server(folder: str):
    """Yields the server's URL."""
    port = free_port()
    os.makedirs(folder, exist_ok=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--artifacts-destination", f"{folder}/artifacts",
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(f"{url}/health", server, "the MLflow server", timeout=120)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
