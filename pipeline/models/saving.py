"""What a trained model looks like on disk, and the one way to load it back.

Two layouts, each with a ``metadata.json`` written last (its presence marks the folder complete):

* export (``<run>/export/``), for serving:
    ``model.keras``      tf-keras native format, float32 weights, no optimizer
    ``saved_model/``     TensorFlow SavedModel, signature ``serving_default``
    ``metadata.json``    ``kind: "export"`` + class names, image size, model config
* checkpoint (``<run>/checkpoint_*/``, reported to Ray Train every N epochs), for resuming:
    ``tf_checkpoint/``   ``tf.train.Checkpoint`` of model and optimizer (step counter included,
                         so the learning-rate schedule resumes at the right position)
    ``average.npz``      with ``train.ema_momentum``: the moving average of the weights (in
                         ``model.get_weights()`` order), what inference from the checkpoint uses
    ``state.json``       epoch counter, the metric history so far, and ``files``: the size of
                         every ``tf_checkpoint/`` file and of ``average.npz``
    ``metadata.json``    ``kind: "checkpoint"``, same fields as an export
  Ray Train copies a checkpoint's files into its folder in no set order, in parallel: an upload
  that failed part-way leaves any subset behind, metadata.json included. ``checkpoint_problem``
  tells a whole checkpoint from such a folder by the sizes ``state.json`` lists.

Both take raw RGB pixels, float32 (batch, size, size, 3) in [0, 255], and return float32 class
probabilities: normalisation is inside the model. ``load_model`` accepts an export folder, a
checkpoint folder or a run folder (whose ``export/`` it uses).
"""

from __future__ import annotations

import datetime
import os
import tempfile

import pipeline  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from pipeline import InputError, NotFound, storage

FORMAT_VERSION = 1
INPUT_SPEC = "float32 (batch, image_size, image_size, 3) RGB pixels in [0, 255]"
OUTPUT_SPEC = "float32 (batch, num_classes) class probabilities (softmax)"


def model_metadata(*, kind: str, class_names, image_size: int, config: dict, mean=None, std=None,
                   resize: str = "squash", **extra) -> dict:
    """``resize``: how the training pictures became image_size squares (data.resize, resolved);
    every path that classifies with the model decodes alike (``input_resize``)."""
    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "class_names": list(class_names),
        "image_size": int(image_size),
        "resize": resize,
        "input": INPUT_SPEC,
        "output": OUTPUT_SPEC,
        "normalization": {"mean": mean, "std": std},
        "model": config["model"],
        "config": config,
        "provenance": pipeline.provenance(),
        **extra,
    }


def save_export(model, metadata: dict, target: str) -> str:
    """Write ``model`` as an export folder at ``target`` (local or URI); returns ``target``."""
    import tensorflow as tf

    target = storage.absolute(target)
    storage.delete(storage.join(target, "metadata.json"))  # the folder is incomplete until the end
    with tempfile.TemporaryDirectory(prefix="export-") as local:
        model.save(os.path.join(local, "model.keras"))
        flip = bool((metadata.get("model") or {}).get("test_time_flip"))
        serving = _serving_module(model, flip)
        tf.saved_model.save(serving, os.path.join(local, "saved_model"), signatures=serving.serve)
        storage.upload_dir(local, target)
    storage.write_json(storage.join(target, "metadata.json"), {**metadata, "kind": "export"})
    return target


def input_resize(metadata: dict) -> str:
    """The ``decode_image`` resize a model's pictures get: the one its training data had. Models
    from before ``data.resize`` existed were trained on squashed pictures."""
    return metadata.get("resize", "squash")


def inference_function(model, metadata: dict):
    """The forward pass an export or checkpoint is to be used with: ``predict_function`` with the
    test-time flip its ``model.test_time_flip`` records. Batch inference, serving, one-image predict
    and the registered model all call this."""
    return predict_function(model, flip=bool((metadata.get("model") or {}).get("test_time_flip")))


def predict_function(model, flip: bool = False):
    """``model``'s forward pass for inference, as one TensorFlow function of float32 image batches
    of any size (traced once): what the model actors and the test evaluation call per batch.

    Not ``model.predict_on_batch``: beside a running Ray, tf-keras' predict function runs some
    batches on one thread at a time, twice as long; this function has not (see BENCHMARKS.md,
    "The two-speed batches traced to predict_on_batch beside Ray")."""
    import tensorflow as tf

    size = model.input_shape[1]

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="images")])
    def predict(images):
        if flip:  # test-time augmentation: the mean of the image's and its mirror image's probabilities
            return (model(images, training=False) + model(tf.reverse(images, axis=[2]), training=False)) / 2
        return model(images, training=False)

    return predict


def _serving_module(model, flip: bool = False):
    """What the SavedModel holds: the serving signature and the variables it reads. Not the Keras
    model itself: for that, tf-keras traces every layer's call functions too, seconds per training
    run (see BENCHMARKS.md, "Writing the export at the end of a run"); ``model.keras`` is the Keras
    file."""
    import tensorflow as tf

    predict = predict_function(model, flip)

    @tf.function(input_signature=predict.input_signature)
    def serve(images):
        return {"probabilities": predict(images)}

    module = tf.Module()
    module.variables_read = list(model.variables)
    module.serve = serve
    return module


AVERAGE_FILE = "average.npz"


def write_checkpoint(directory: str, *, model, optimizer, state: dict, metadata: dict,
                     average: list | None = None) -> None:
    """Write a resumable checkpoint into a local ``directory`` (Ray Train then persists it);
    ``average``: the moving average of the weights, if the run keeps one."""
    import numpy as np
    import tensorflow as tf

    tf.train.Checkpoint(model=model, optimizer=optimizer).write(os.path.join(directory, "tf_checkpoint", "ckpt"))
    if average is not None:
        np.savez(os.path.join(directory, AVERAGE_FILE), *average)
    files = {}
    for folder, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(folder, name)
            files[os.path.relpath(path, directory).replace(os.sep, "/")] = os.path.getsize(path)
    storage.write_json(os.path.join(directory, "state.json"), {**state, "files": files})
    storage.write_json(os.path.join(directory, "metadata.json"), {**metadata, "kind": "checkpoint"})


def checkpoint_problem(filesystem, path: str) -> str | None:
    """None when the checkpoint folder ``path`` on the pyarrow ``filesystem`` is whole, else what
    is missing or short (a copy that failed part-way, or one still being written)."""
    import json

    from pyarrow.fs import FileType

    state_path = f"{path.rstrip('/')}/state.json"
    try:
        with filesystem.open_input_stream(state_path) as stream:
            state = json.loads(stream.read())
    except (OSError, ValueError):
        return "state.json is missing or unreadable"
    expected = {"metadata.json": None, **state.get("files", {"tf_checkpoint": None})}
    infos = filesystem.get_file_info([f"{path.rstrip('/')}/{name}" for name in expected])
    for (name, size), info in zip(expected.items(), infos):
        if info.type == FileType.NotFound:
            return f"{name} is missing"
        if size is not None and info.size != size:
            return f"{name} has {info.size} of its {size} bytes"
    return None


def restore_checkpoint(directory: str, *, model, optimizer=None) -> dict:
    """From a local checkpoint folder: to resume (``optimizer`` given), the trained weights,
    optimizer slots and step, and the moving average as ``state["average"]`` (None without one);
    for inference (no optimizer), the weights the run evaluates and exports: the moving average
    where there is one. Returns the checkpoint's state."""
    import numpy as np
    import tensorflow as tf

    objects = {"model": model} if optimizer is None else {"model": model, "optimizer": optimizer}
    status = tf.train.Checkpoint(**objects).read(os.path.join(directory, "tf_checkpoint", "ckpt"))
    if optimizer is None:
        status.expect_partial()  # optimizer slots are in the file but not wanted for inference
    else:
        status.assert_existing_objects_matched()
    state = storage.read_json(os.path.join(directory, "state.json"))
    state["average"] = None
    if os.path.exists(os.path.join(directory, AVERAGE_FILE)):
        with np.load(os.path.join(directory, AVERAGE_FILE)) as arrays:
            state["average"] = [arrays[f"arr_{index}"] for index in range(len(arrays.files))]
        if optimizer is None:
            model.set_weights(state["average"])
    return state


def find_model_dir(path: str) -> str:
    """Resolve an export, checkpoint or run folder to the folder holding ``metadata.json``."""
    path = storage.absolute(path)
    if not storage.exists(path):
        raise NotFound(f"model path does not exist: {path}")
    if storage.exists(storage.join(path, "metadata.json")):
        return path
    if storage.exists(storage.join(path, "export", "metadata.json")):
        return storage.join(path, "export")
    checkpoints = [name for name in storage.list_dir(path) if name.startswith("checkpoint_")]
    hint = (f"; it has checkpoints ({', '.join(checkpoints[-3:])}): pass one of them" if checkpoints
            else "; pass an export folder (<run>/export), a checkpoint folder or a finished run folder")
    raise NotFound(f"no model at {path}: no metadata.json and no export/ inside{hint}")


def load_model(path: str):
    """(tf-keras model, metadata) from an export, checkpoint or run folder (local or URI)."""
    from pipeline.config import ModelConfig
    from pipeline.models.registry import create_model

    folder, metadata = checked_model(path)
    if metadata["kind"] == "export":
        return load_keras_archive(storage.join(folder, "model.keras")), metadata
    model = create_model(
        ModelConfig(**metadata["model"]),
        num_classes=len(metadata["class_names"]),
        image_size=metadata["image_size"],
        mean=metadata["normalization"]["mean"],
        std=metadata["normalization"]["std"],
    )
    with tempfile.TemporaryDirectory(prefix="model-") as local:
        restore_checkpoint(storage.download_dir(folder, local), model=model)
    return model, metadata


def checked_model(path: str) -> tuple[str, dict]:
    """(model folder, metadata) of an export, checkpoint or run folder whose files are whole, read
    without TensorFlow: a damaged model is refused (InputError, naming the folder and what is
    wrong) before a job starts Ray and its actors, not by every actor that tries to load it."""
    folder = find_model_dir(path)
    try:
        metadata = storage.read_json(storage.join(folder, "metadata.json"))
    except ValueError as error:
        raise InputError(f"{storage.join(folder, 'metadata.json')} is not valid JSON ({error}): the model "
                         f"folder is damaged; copy or export it again") from None
    if metadata.get("kind") == "export":
        problem = keras_archive_problem(storage.join(folder, "model.keras"))
        if problem:
            raise InputError(f"export {folder} is damaged ({problem}): copy it again, or export it again by "
                             f"running the training command of its run once more")
    else:
        problem = checkpoint_problem(*storage.filesystem(folder))
        if problem:
            raise InputError(f"checkpoint {folder} is incomplete ({problem}): its upload failed part-way or is "
                             f"still running; use another checkpoint of the run, or the run's export")
    return folder, metadata


def keras_archive_problem(path: str) -> str | None:
    """None when ``path`` is a whole ``.keras`` archive holding what ``load_keras_archive`` reads;
    reads only the zip's directory (at its end: a truncated copy has none)."""
    import zipfile

    fs, inner = storage.filesystem(path)
    try:
        with fs.open_input_file(inner) as stream, zipfile.ZipFile(stream) as archive:
            names = set(archive.namelist())
    except FileNotFoundError:
        return "model.keras is missing"
    except (OSError, zipfile.BadZipFile, ValueError) as error:
        return f"model.keras is not a whole .keras archive: {error}"
    missing = sorted({"config.json", "model.weights.h5"} - names)
    return f"model.keras lacks {', '.join(missing)}" if missing else None


def load_keras_archive(path: str):
    """``keras.models.load_model(path, compile=False)`` for a ``.keras`` file (local or URI), with
    its weights read from a plain file instead of from inside the zip.

    tf-keras hands h5py the weights member of the zip as a file object; h5py seeks in it hundreds
    of times, and Python's zipfile serves each backward seek by reading the member again from its
    start: most of a model actor's load before its first batch (see BENCHMARKS.md, "A model actor's
    cold start, and loading an export 3x faster"). Only the archive is fetched, not the export's
    SavedModel beside it. (save_export writes the weights as ``model.weights.h5`` and no assets: a
    ResNet has none.)"""
    import io
    import json
    import zipfile

    import tf_keras as keras

    with zipfile.ZipFile(io.BytesIO(storage.read_bytes(path))) as archive, \
            tempfile.TemporaryDirectory(prefix="model-") as local:
        config = json.loads(archive.read("config.json"))
        config["compile_config"] = None  # compile=False: inference needs no optimizer or loss
        model = keras.saving.deserialize_keras_object(config)
        model.load_weights(archive.extract("model.weights.h5", local))
    return model
