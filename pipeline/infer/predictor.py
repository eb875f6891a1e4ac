"""The two Ray Data stages of batch inference: ``decode_batch`` tasks read and decode files
(a file that fails is recorded, never the job), and ``Predictor`` actors load the model once and
turn pixels into the prediction columns (see ``pipeline.infer``). ``predict_image`` does the same
for one image without Ray."""

from __future__ import annotations

import json
import time
import uuid
from functools import lru_cache
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

import pipeline  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)
from pipeline import InputError, NotFound, storage
from pipeline.data.images import UnreadableImage, decode_image
from pipeline.infer.inputs import scheme_of

PROBABILITY_DECIMALS = 6

ERROR_SCHEMA = pa.schema([("path", pa.string()), ("reason", pa.string())])


def prediction_schema(labelled: bool) -> pa.Schema:
    fields = [
        ("path", pa.string()),
        ("predicted_class", pa.string()),
        ("confidence", pa.float32()),
        ("top_k_classes", pa.string()),
        ("top_k_probabilities", pa.string()),
    ]
    if labelled:
        fields += [("true_class", pa.string()), ("true_class_rank", pa.int32())]
    return pa.schema(fields)


def read_model_metadata(model_path: str) -> tuple[str, dict]:
    """(model folder, metadata) of a model whose files are whole, without loading TensorFlow: the
    driver only needs the class names and the image size; the model itself is loaded by the actors."""
    from pipeline.models.saving import checked_model

    return checked_model(model_path)


# ---------------------------------------------------------------- decode (Ray Data tasks)

_LOCAL_FILESYSTEM = pafs.LocalFileSystem()


@lru_cache(maxsize=None)
def _bucket_filesystem(bucket_uri: str) -> pafs.FileSystem:
    # One filesystem per bucket and process: creating an S3 client per file costs a round trip.
    return pafs.FileSystem.from_uri(bucket_uri)[0]


# A read that fails for a reason that may pass (object-store throttling, a connection reset) is
# tried again after these pauses (seconds); a missing file or a denied permission fails at once.
READ_RETRY_PAUSES = (0.5, 2.0, 5.0)


def read_with_retries(path: str, read=None, pauses=READ_RETRY_PAUSES) -> bytes:
    """``path``'s bytes, retrying transient failures (``pauses``), never a missing or forbidden file."""
    read = read or _read_file
    for pause in (*pauses, None):
        try:
            return read(path)
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            raise
        except OSError:
            if pause is None:
                raise
            time.sleep(pause)


def _read_file(path: str) -> bytes:
    scheme = scheme_of(path)
    if scheme in ("s3://", "gs://", "gcs://"):
        inner = path[len(scheme):]
        fs = _bucket_filesystem(scheme + inner.split("/", 1)[0])
    elif scheme:
        fs, inner = storage.filesystem(path)
    else:
        fs, inner = _LOCAL_FILESYSTEM, path
    with fs.open_input_stream(inner) as stream:
        return stream.read()


def decode_batch(batch: dict[str, np.ndarray], *, image_size: int, resize: str, errors_dir: str
                 ) -> Iterator[dict[str, np.ndarray]]:
    """Paths -> decoded images (uint8, image_size x image_size RGB, resized as the model's training
    pictures were: ``resize``) for the files that decode.

    Every other file is written with its reason to a Parquet part in ``errors_dir`` (any column
    besides ``path``, e.g. the true class, travels with the good rows). Nothing is yielded for a
    batch without a good file, so the model actors never see empty batches.
    """
    paths = batch["path"]
    images, good, errors = [], [], []
    for position, path in enumerate(paths):
        try:
            data = read_with_retries(path)
        except Exception as error:  # missing, permission denied, network: the file, not the job
            errors.append((path, f"cannot read file: {error}"))
            continue
        try:
            images.append(decode_image(data, image_size, resize=resize))
        except UnreadableImage as error:
            errors.append((path, str(error)))
            continue
        except Exception as error:  # decode_image wraps PIL's errors; anything else is still per file
            errors.append((path, f"cannot decode image: {type(error).__name__}: {error}"))
            continue
        good.append(position)
    if errors:
        _write_error_part(errors, errors_dir)
    if good:
        output = {column: values[good] for column, values in batch.items()}
        output["path"] = np.asarray(output["path"], dtype=str)
        output["image"] = np.stack(images)
        yield output


def _write_error_part(errors: list[tuple[str, str]], errors_dir: str) -> None:
    import pyarrow.parquet as pq

    table = pa.table({"path": [str(path) for path, _ in errors], "reason": [reason for _, reason in errors]},
                     schema=ERROR_SCHEMA)
    # A unique name per batch: a retried task adds a duplicate part, removed when combining.
    with storage.open_output(storage.join(errors_dir, f"{uuid.uuid4().hex}.parquet")) as stream:
        pq.write_table(table, stream)


# ---------------------------------------------------------------- the model (Ray Data actors)

class Predictor:
    """Callable class for ``Dataset.map_batches``: loads the model once per actor, then maps
    {"path", "image" uint8 (N, H, W, 3)[, "label" int]} -> the prediction columns above."""

    def __init__(self, model_path: str, top_k: int, gpus: float = 0.0, records_dir: Optional[str] = None):
        started = time.perf_counter()
        from pipeline import accelerators
        from pipeline.models.saving import inference_function, load_model

        # Before the model touches a device: none if the actor holds no GPU (Ray leaves the node's
        # GPUs visible to it, see pipeline/accelerators.py), memory growth where fractional actors
        # share one.
        accelerators.hide_unrequested_gpus(gpus)
        devices = accelerators.visible_gpus()
        self.model, metadata = load_model(model_path)
        self.predict = inference_function(self.model, metadata)
        self.class_names = np.asarray(metadata["class_names"], dtype=str)
        self.image_size = int(metadata["image_size"])
        self.top_k = min(int(top_k), len(self.class_names))
        # Recorded with the first batch, not here: Ray Data starts using the pool before every
        # actor is up and ends the run without waiting for a late one, whose write would then
        # recreate the staging folder after run_inference removed it. A batch's write is done
        # before its results are, so before the run can finish.
        self.records_dir, self.devices = records_dir, devices
        # TensorFlow's import and the model's load: what every actor pays before its first batch.
        self.load_seconds = round(time.perf_counter() - started, 3)

    def write_record(self) -> None:
        from pipeline import accelerators

        record = {**accelerators.process_placement(self.devices), "model_load_seconds": self.load_seconds}
        storage.write_json(storage.join(self.records_dir, f"actor-{record['node_id'][:12]}-{record['pid']}.json"), record)
        self.records_dir = None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.records_dir:
            self.write_record()
        images = batch["image"]
        expected = (self.image_size, self.image_size, 3)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise InputError(f"images must have shape (batch, {', '.join(map(str, expected))}) for this model, "
                             f"got {images.shape}")
        if len(images):
            # One compiled forward pass on exactly this batch: no per-call dataset or callbacks as
            # in model.predict, and none of predict_on_batch's single-threaded batches (see
            # predict_function).
            probabilities = self.predict(images.astype(np.float32)).numpy()
        else:
            probabilities = np.zeros((0, len(self.class_names)), dtype=np.float32)
        return prediction_columns(batch["path"], probabilities, self.class_names, self.top_k,
                                  batch.get("label"))


def prediction_columns(paths, probabilities: np.ndarray, class_names: np.ndarray, top_k: int,
                       labels: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Probabilities (N, classes) -> the prediction columns (see the module docstring)."""
    class_names = np.asarray(class_names, dtype=str)
    # A stable sort breaks ties towards the lower class index, as np.argmax does.
    order = np.argsort(-probabilities, axis=1, kind="stable")
    top = order[:, :top_k]
    top_probabilities = np.take_along_axis(probabilities, top, axis=1)
    columns = {
        "path": np.asarray(paths, dtype=str),
        "predicted_class": class_names[order[:, 0]] if len(order) else np.asarray([], dtype=str),
        "confidence": top_probabilities[:, 0].astype(np.float32) if len(order) else np.zeros(0, np.float32),
        "top_k_classes": np.asarray([json.dumps(class_names[row].tolist()) for row in top], dtype=str),
        "top_k_probabilities": np.asarray(
            [json.dumps([round(float(value), PROBABILITY_DECIMALS) for value in row]) for row in top_probabilities],
            dtype=str),
    }
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        columns["true_class"] = class_names[labels]
        columns["true_class_rank"] = (np.argmax(order == labels[:, None], axis=1) + 1).astype(np.int32)
    return columns


# ---------------------------------------------------------------- one image, no Ray

def predict_image(model_path: str, image_path: str, top_k: int = 5) -> dict:
    """Classify one image without Ray, as the original tutorial did (but with the exact training
    preprocessing): the class of the arg-max, its confidence and the top-k."""
    from pipeline.models.saving import inference_function, input_resize, load_model

    if not storage.exists(image_path):
        raise NotFound(f"image not found: {image_path}")
    _, metadata = read_model_metadata(model_path)
    try:
        pixels = decode_image(storage.read_bytes(image_path), int(metadata["image_size"]),
                              resize=input_resize(metadata))
    except UnreadableImage as error:
        raise UnreadableImage(f"{image_path}: {error}") from None
    model, metadata = load_model(model_path)
    class_names = np.asarray(metadata["class_names"], dtype=str)
    probabilities = inference_function(model, metadata)(pixels[None].astype(np.float32)).numpy()
    top_k = min(int(top_k), len(class_names))
    return prediction_records([storage.absolute(image_path)], probabilities, class_names, top_k)[0]


def prediction_records(paths, probabilities: np.ndarray, class_names, top_k: int) -> list[dict]:
    """The prediction columns as one JSON-ready dict per image (``pipeline predict`` for one image,
    and the serving endpoint): the same names, rounding and tie-breaking as the files."""
    columns = prediction_columns(paths, probabilities, np.asarray(class_names, dtype=str), top_k)
    return [{"path": str(columns["path"][row]),
             "predicted_class": str(columns["predicted_class"][row]),
             "confidence": float(columns["confidence"][row]),
             "top_k_classes": json.loads(columns["top_k_classes"][row]),
             "top_k_probabilities": json.loads(columns["top_k_probabilities"][row])}
            for row in range(len(paths))]
