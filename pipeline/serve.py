"""Online serving: a trained model behind an HTTP endpoint, as a Ray Serve application.

    POST <prefix>predict   an image as the request body (any format ``decode_image`` reads), or
                           multipart/form-data with one or more image files
                           -> one prediction, or {"predictions": [...]} for a multipart batch; each
                           as ``pipeline predict`` prints it: predicted_class, confidence,
                           top_k_classes, top_k_probabilities
    GET  <prefix>healthz   200 once the replica has loaded its model
    GET  <prefix>          the model: classes, image size, the run it came from, the replica's devices

A body that is not an image gets HTTP 400 with the reason (413 above ``serve.max_request_bytes``);
the replica goes on serving. Preprocessing is ``decode_image``, exactly as in training and batch
inference, and the forward pass is ``predict_function``, as in the batch-inference actors.

Requests are classified together (``@serve.batch``: up to ``serve.max_batch_size``, waiting at most
``serve.batch_wait_timeout_s`` for a batch to fill), and Ray Serve adds replicas between
``serve.min_replicas`` and ``serve.max_replicas`` to hold ``serve.target_ongoing_requests`` each.

    run_serve(config)          pipeline serve / jobs/serve.py: deploy, serve until stopped, then remove
    app_from_args(args)        ``serve deploy`` / ``serve run``: cluster/serve.yaml's import_path
"""


import asyncio
import logging
import time
from typing import Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from pipeline import InputError
from pipeline.config import Config, ServeConfig, check_value

log = logging.getLogger(__name__)

APPLICATION = "classifier"
app = FastAPI(title="ray-image-pipeline classifier")


@serve.deployment
@serve.ingress(app)
class ImageClassifier:
    """One model replica: loads the model once, decodes each request's images in threads and
    classifies them in batches gathered across requests."""

    def __init__(self, model_path: str, top_k: int, gpus: float, max_batch_size: int, batch_wait_timeout_s: float,
                 max_request_bytes: int):
        from pipeline import accelerators
        from pipeline.models.saving import inference_function, input_resize, load_model

        # As in the batch-inference actors: a replica that asked for no GPU sees none.
        accelerators.hide_unrequested_gpus(gpus)
        self.devices = accelerators.visible_gpus()
        self.model, self.metadata = load_model(model_path)
        self.predict = inference_function(self.model, self.metadata)
        self.model_path = model_path
        self.class_names = [str(name) for name in self.metadata["class_names"]]
        self.image_size = int(self.metadata["image_size"])
        self.resize = input_resize(self.metadata)
        self.top_k = min(int(top_k), len(self.class_names))
        self.max_request_bytes = max_request_bytes
        self.classify.set_max_batch_size(max_batch_size)
        self.classify.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.predict(np.zeros((1, self.image_size, self.image_size, 3), np.float32))  # traced before traffic

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def classify(self, images: list[np.ndarray]) -> list[np.ndarray]:
        # In a thread: the forward pass releases the GIL, and the replica's event loop keeps
        # accepting and decoding the requests of the next batch meanwhile.
        batch = np.stack(images).astype(np.float32)
        probabilities = await asyncio.to_thread(lambda: self.predict(batch).numpy())
        return list(probabilities)

    async def _prediction(self, data: bytes, name: str) -> dict:
        from pipeline.data.images import decode_image
        from pipeline.infer.predictor import prediction_records

        pixels = await asyncio.to_thread(decode_image, data, self.image_size, resize=self.resize)
        probabilities = await self.classify(pixels)
        record = prediction_records([name], probabilities[None], self.class_names, self.top_k)[0]
        del record["path"]
        return {"name": name, **record} if name else record

    @app.post("/predict")
    async def predict_endpoint(self, request: Request):
        from pipeline.data.images import UnreadableImage

        if int(request.headers.get("content-length") or 0) > self.max_request_bytes:
            return self.error(413, f"the request is larger than serve.max_request_bytes={self.max_request_bytes}")
        try:
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                form = await request.form()
                files = [(name, value) for name, value in form.multi_items() if hasattr(value, "read")]
                if not files:
                    return self.error(400, "the multipart request holds no files: send each image as a file part")
                contents = [(value.filename or name, await value.read()) for name, value in files]
                predictions = await asyncio.gather(*(self._prediction(data, name) for name, data in contents),
                                                   return_exceptions=True)
                failed = [(name, error) for (name, _), error in zip(contents, predictions)
                          if isinstance(error, Exception)]
                for _, error in failed:
                    if not isinstance(error, UnreadableImage):
                        raise error
                if failed:
                    return self.error(400, "; ".join(f"{name}: {error}" for name, error in failed))
                return {"predictions": predictions}
            body = await request.body()
            if not body:
                return self.error(400, "the request body is empty: POST an image, or multipart/form-data with "
                                       "image files")
            if len(body) > self.max_request_bytes:
                return self.error(413, f"the request is larger than serve.max_request_bytes={self.max_request_bytes}")
            return await self._prediction(body, "")
        except UnreadableImage as error:
            return self.error(400, str(error))

    @staticmethod
    def error(status: int, reason: str) -> JSONResponse:
        # A method, not a module function: Ray Serve's ingress rebuilds these methods in the
        # replica, where this module's other globals are not found.
        return JSONResponse({"error": reason}, status_code=status)

    @app.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @app.get("/")
    async def describe(self):
        from pipeline import accelerators

        config = self.metadata.get("config") or {}
        return {"model": self.model_path, "kind": self.metadata.get("kind"), "architecture": self.metadata.get("model"),
                "classes": self.class_names, "image_size": self.image_size, "resize": self.resize, "top_k": self.top_k,
                "run": {"name": (config.get("run") or {}).get("name") or config.get("recipe"),
                        "storage_path": (config.get("run") or {}).get("storage_path"),
                        "created": self.metadata.get("created"), "evaluation": self.metadata.get("evaluation")},
                "replica": accelerators.process_placement(self.devices)}


def check_serve(settings: ServeConfig) -> str:
    """The folder of the model to serve, refused (InputError) when missing or damaged: here, not by
    every replica that tries to load it."""
    if not settings.model:
        raise InputError("no model given: set --model (or serve.model) to an export, checkpoint or run folder")
    from pipeline.models.saving import checked_model

    return checked_model(settings.model)[0]


def build_app(settings: ServeConfig):
    """The Ray Serve application for ``settings`` (the ``serve`` section of a config)."""
    folder = check_serve(settings)
    autoscaling = None
    if settings.max_replicas > settings.min_replicas:
        autoscaling = {"min_replicas": settings.min_replicas, "max_replicas": settings.max_replicas,
                       "target_ongoing_requests": settings.target_ongoing_requests}
    deployment = ImageClassifier.options(
        num_replicas=None if autoscaling else settings.max_replicas,
        autoscaling_config=autoscaling,
        # Enough requests in flight per replica to fill a batch.
        max_ongoing_requests=max(settings.max_batch_size * 2, 2 * int(settings.target_ongoing_requests) + 1),
        ray_actor_options={"num_cpus": settings.cpus_per_replica, "num_gpus": settings.gpus_per_replica})
    return deployment.bind(folder, settings.top_k, settings.gpus_per_replica, settings.max_batch_size,
                           settings.batch_wait_timeout_s, settings.max_request_bytes)


def app_from_args(args: dict):
    """``serve deploy`` / ``serve run`` entry (``import_path: pipeline.serve:app_from_args``): ``args``
    are ``serve`` keys (``model``, ``max_replicas``, ...), checked as a recipe's would be."""
    settings = ServeConfig()
    for key, value in (args or {}).items():
        setattr(settings, key, check_value(f"serve.{key}", value))
    return build_app(settings)


def run_serve(config: Config) -> None:
    """``pipeline serve``: deploy on the connected cluster, serve until SIGINT/SIGTERM (the CLI's
    KeyboardInterrupt / Stopped), then remove the application."""
    start_serving(config.serve)
    try:
        while True:
            time.sleep(1)
    finally:
        stop_serving()


def start_serving(settings: ServeConfig) -> str:
    """Deploy the application and wait until its replicas are up; returns its base URL."""
    application = build_app(settings)
    started = time.perf_counter()
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(application, name=APPLICATION, route_prefix=settings.route_prefix, blocking=False)
    url = f"http://{settings.host}:{settings.port}{settings.route_prefix.rstrip('/')}"
    log.info(f"serving {settings.model} at {url}/predict ({time.perf_counter() - started:.1f} s to start); "
             f"try: curl --data-binary @photo.jpg {url}/predict; Ctrl-C stops it")
    return url


def stop_serving(name: Optional[str] = APPLICATION) -> None:
    """Remove the application (and Serve itself when nothing else is deployed)."""
    try:
        serve.delete(name)
        if not serve.status().applications:
            serve.shutdown()
    except Exception as error:  # noqa: BLE001 - Ray may already be going down with the driver
        log.warning(f"could not remove the Serve application cleanly: {error}")
