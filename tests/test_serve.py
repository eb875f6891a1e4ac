"""pipeline.serve on a real Ray Serve: ``jobs/serve.py`` joins the test's Ray, answers on 127.0.0.1
exactly as ``pipeline predict`` does, refuses what is not an image without losing the replica,
batches concurrent requests, and is gone, proxies and controller included, after SIGTERM."""

import io
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import ray
import requests
from PIL import Image

import pipeline  # noqa: F401
from pipeline.infer import predict_image

from conftest import REPO
from infer_files import SERVED_CLASSES, export_served_model

pytestmark = pytest.mark.cluster


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_actors() -> list[str]:
    from ray.util.state import list_actors

    return [actor.class_name for actor in list_actors(address=ray.get_runtime_context().gcs_address,
                                                      filters=[("state", "=", "ALIVE")], limit=1000)
            if "Serve" in actor.class_name or "Proxy" in actor.class_name]


def test_the_served_model_answers_as_pipeline_predict_and_stops_cleanly(local_ray, tmp_path):
    export = export_served_model(str(tmp_path / "export"))
    rng = np.random.default_rng(0)
    images = {}
    for index in range(6):
        name = f"photo{index}.{'jpg' if index % 2 else 'png'}"
        Image.fromarray(rng.integers(0, 256, (24 + index, 20, 3), dtype=np.uint8)).save(tmp_path / name)
        images[name] = (tmp_path / name).read_bytes()
    expected = {name: predict_image(export, str(tmp_path / name), top_k=3) for name in images}

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "jobs/serve.py"), "--address", ray.get_runtime_context().gcs_address,
         "--model", export, "--set", f"serve.port={port}", "--set", "serve.max_batch_size=4",
         "--set", "serve.batch_wait_timeout_s=0.05", "--set", "serve.cpus_per_replica=0.5"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and server.poll() is None:
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or held until the routes exist
                pass
            time.sleep(1)
        assert server.poll() is None and requests.get(f"{url}/healthz", timeout=5).json() == {"status": "ok"}

        description = requests.get(f"{url}/", timeout=5).json()
        assert (description["classes"], description["image_size"], description["top_k"]) == (SERVED_CLASSES, 16, 3)
        # On a (declared) two-GPU node, a replica that asked for no GPU sees none.
        assert description["replica"]["cuda_visible_devices"] == "" and description["replica"]["gpus"] == []

        def same_as_predict(answer, name):
            want = expected[name]
            assert answer["predicted_class"] == want["predicted_class"] and answer["top_k_classes"] == want["top_k_classes"]
            np.testing.assert_allclose(answer["top_k_probabilities"], want["top_k_probabilities"], atol=1e-5)
            assert answer["confidence"] == pytest.approx(want["confidence"], abs=1e-5)

        for name, data in images.items():
            response = requests.post(f"{url}/predict", data=data, timeout=30)
            assert response.status_code == 200, response.text
            same_as_predict(response.json(), name)

        # A multipart batch, then many requests at once: classified in batches across requests.
        response = requests.post(f"{url}/predict", files={name: (name, data) for name, data in images.items()},
                                 timeout=30)
        assert response.status_code == 200, response.text
        for answer in response.json()["predictions"]:
            same_as_predict(answer, answer["name"])
        names = list(images) * 4
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda name: requests.post(f"{url}/predict", data=images[name], timeout=60), names))
        assert [answer.status_code for answer in answers] == [200] * len(names)
        for name, answer in zip(names, answers):
            same_as_predict(answer.json(), name)

        # Not an image: 400 with the reason, and the replica goes on serving.
        response = requests.post(f"{url}/predict", data=b"GIF89a, then nothing", timeout=30)
        assert response.status_code == 400 and "cannot decode image" in response.json()["error"]
        assert requests.post(f"{url}/predict", data=b"", timeout=30).status_code == 400
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), "red").save(buffer, format="JPEG")
        assert requests.post(f"{url}/predict", data=buffer.getvalue(), timeout=30).status_code == 200
        assert "ServeReplica:classifier:ImageClassifier" in serve_actors()
    finally:
        # As `ray job stop` ends the job: SIGTERM to the driver, which removes the application.
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=120)[0].decode()
    assert server.returncode == 143, output[-3000:]
    assert "stopped by SIGTERM: the application was removed from Ray Serve" in output
    deadline = time.time() + 60
    while serve_actors() and time.time() < deadline:
        time.sleep(1)
    assert serve_actors() == []
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/healthz", timeout=5)
