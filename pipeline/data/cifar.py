"""The CIFAR-10 format: the official archive (download and verification), its pickled batch
files (``cifar-10-batches-py/``: ``data_batch_1..5``, ``test_batch``, ``batches.meta``), and the
pixels of one row. Pickles are loaded with an unpickler that accepts only what the official
files hold, since a pickle can run code on load."""

from __future__ import annotations

import functools
import http.client
import logging
import os
import pickle
import urllib.error
import uuid
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image

from pipeline.config import redact_url
from pipeline.data import SourceError
from pipeline.data.archives import fetch, file_md5

log = logging.getLogger(__name__)

# The official archive, as published on the CIFAR page (and as keras.datasets.cifar10 downloads it).
CIFAR10_ARCHIVE_NAME = "cifar-10-python.tar.gz"
CIFAR10_ARCHIVE_BYTES = 170_498_071
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{n}" for n in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
CIFAR10_META = "batches.meta"
CIFAR10_IMAGE_SIZE = 32  # pixels; each pickle row is 3 x 32 x 32 = 3072 bytes, channel-major

LOCAL_COPY_HINT = (
    "pass a local copy instead: --set data.source=/path/to/cifar-10-python.tar.gz "
    "(or an extracted cifar-10-batches-py/ folder, or an image folder of <class>/<image> files, "
    "or such a folder packed as .tar.gz / .zip)")


def download_cifar10(url: str, cache_dir: str) -> Path:
    """The verified official archive in ``cache_dir``: reused if it verifies, else downloaded.

    The download goes to a uniquely named ``.part`` file that is checked and only then renamed, so
    an interrupted or corrupt download never sits under the final name.
    """
    folder = Path(cache_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / CIFAR10_ARCHIVE_NAME
    if target.is_file():
        problem = official_archive_problem(target)
        if problem is None:
            log.info(f"using cached {target} (md5 verified)")
            return target
        log.info(f"cached {target} is not the official archive ({problem}); downloading it again")
        target.unlink()

    part = folder / f"{CIFAR10_ARCHIVE_NAME}.{uuid.uuid4().hex[:8]}.part"
    log.info(f"downloading {redact_url(url)} -> {target}")
    try:
        fetch(url, part, CIFAR10_ARCHIVE_BYTES)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
        part.unlink(missing_ok=True)
        reason = getattr(error, "reason", None) or error
        raise SourceError(f"cannot download CIFAR-10 from {redact_url(url)} ({reason}). Without internet access, "
                          f"{LOCAL_COPY_HINT}") from None
    problem = official_archive_problem(part)
    if problem is not None:
        # Delete it so that the next attempt downloads again instead of failing on the same file.
        part.unlink(missing_ok=True)
        raise SourceError(f"the file downloaded from {redact_url(url)} is not the official CIFAR-10 archive: {problem}; "
                          f"it was deleted, retry the download, or {LOCAL_COPY_HINT}")
    os.replace(part, target)
    return target


def official_archive_problem(path: Path, md5: Optional[str] = None) -> Optional[str]:
    """None if ``path`` is the official CIFAR-10 archive, else 'expected ..., got ...'."""
    size = path.stat().st_size
    if size != CIFAR10_ARCHIVE_BYTES:
        return f"expected {CIFAR10_ARCHIVE_BYTES:,} bytes, got {size:,}"
    actual = md5 or file_md5(path)
    if actual != CIFAR10_ARCHIVE_MD5:
        return f"expected md5 {CIFAR10_ARCHIVE_MD5}, got {actual}"
    return None


def find_cifar_folder(folder: Path) -> Optional[Path]:
    """``folder`` itself or its ``cifar-10-batches-py/`` when it holds the batch files, else None."""
    if (folder / CIFAR10_META).is_file() and (folder / CIFAR10_TRAIN_BATCHES[0]).is_file():
        return folder
    if (folder / CIFAR10_FOLDER).is_dir():
        return folder / CIFAR10_FOLDER
    return None


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches only: numpy arrays, lists, dicts, bytes. A pickle can run arbitrary
    code on load, and a source archive may come from anywhere; the official files need no more."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 protocol-2 pickles store bytes
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")
        if module == "numpy.core.multiarray" and hasattr(np, "_core"):
            module = "numpy._core.multiarray"  # numpy >= 2 renamed it; avoids a deprecation warning
        return super().find_class(module, name)


def load_cifar_pickle(path: Union[str, Path]) -> dict:
    """A CIFAR batch or meta file as a dict with bytes keys (the files were pickled by Python 2)."""
    try:
        with open(path, "rb") as handle:
            loaded = _CifarUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise SourceError(f"{path} is not a CIFAR-10 batch file: {error}") from None
    if not isinstance(loaded, dict):
        raise SourceError(f"{path} is not a CIFAR-10 batch file: it holds a {type(loaded).__name__}, not a dict")
    # Pickles written by Python 3 with str keys load the same way as the official bytes keys.
    return {key.encode() if isinstance(key, str) else key: value for key, value in loaded.items()}


def load_cifar_batch(path: Union[str, Path]) -> tuple[np.ndarray, list[int]]:
    """(data (N, 3072) uint8, labels) of one batch file, shape-checked."""
    batch = load_cifar_pickle(path)
    if b"data" not in batch or b"labels" not in batch:
        raise SourceError(f"{path} is not a CIFAR-10 batch file: it lacks 'data' or 'labels' "
                          f"(keys: {sorted(batch)}); CIFAR-100 (fine_labels) is not supported")
    data = np.asarray(batch[b"data"])
    labels = [int(label) for label in batch[b"labels"]]
    expected_width = 3 * CIFAR10_IMAGE_SIZE * CIFAR10_IMAGE_SIZE
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != expected_width or len(data) != len(labels):
        raise SourceError(f"{path}: expected data of shape (N, {expected_width}) uint8 and N labels, got "
                          f"{data.shape} {data.dtype} and {len(labels)} labels")
    return data, labels


def read_cifar_folder(folder: Path) -> tuple[list[str], dict[str, list[tuple[Path, list[int]]]], list[Path]]:
    """(class names, {split: [(batch file, its labels)]}, every file read) of a
    ``cifar-10-batches-py/`` folder, every label checked against the class names."""
    meta_path = folder / CIFAR10_META
    if not meta_path.is_file():
        raise SourceError(f"{folder} looks like cifar-10-batches-py/ but has no {CIFAR10_META}")
    meta = load_cifar_pickle(meta_path)
    if b"label_names" not in meta:
        raise SourceError(f"{meta_path} lacks label_names (keys: {sorted(meta)})")
    class_names = [name.decode() if isinstance(name, bytes) else str(name) for name in meta[b"label_names"]]

    files = {"train": CIFAR10_TRAIN_BATCHES, "test": (CIFAR10_TEST_BATCH,)}
    batches: dict[str, list[tuple[Path, list[int]]]] = {}
    used = [meta_path]
    for split, names in files.items():
        batches[split] = []
        for name in names:
            path = folder / name
            if not path.is_file():
                raise SourceError(f"{folder} is missing {name} (a CIFAR-10 folder holds "
                                  f"{', '.join(CIFAR10_TRAIN_BATCHES)}, {CIFAR10_TEST_BATCH}, {CIFAR10_META})")
            _, labels = load_cifar_batch(path)
            bad = [label for label in labels if not 0 <= label < len(class_names)]
            if bad:
                raise SourceError(f"{path}: label {bad[0]} is outside the {len(class_names)} label_names")
            batches[split].append((path, labels))
            used.append(path)
    return class_names, batches, used


# ---------------------------------------------------------------- pixels (Ray Data decode tasks)

@functools.lru_cache(maxsize=6)
def _cached_batch_data(path: str, size: int, mtime_ns: int) -> np.ndarray:
    """One unpickle per batch file per worker process; size/mtime make a changed file a cache miss.
    All six files (~180 MB) fit: rows arrive in shuffled order (see preprocess.split_source), so a
    block of rows touches every file."""
    data, _ = load_cifar_batch(path)
    return data


def cifar_pixels(path: str, row: int, image_size: int) -> np.ndarray:
    """Row ``row`` of a batch file as uint8 HWC RGB, resized to ``image_size`` if it differs."""
    info = os.stat(path)
    side = CIFAR10_IMAGE_SIZE
    # A row is channel-major (R plane, G plane, B plane, each 32x32 row-major): CHW -> HWC.
    pixels = _cached_batch_data(path, info.st_size, info.st_mtime_ns)[row].reshape(3, side, side).transpose(1, 2, 0)
    if image_size != side:
        # The same resize decode_image applies to files, so both kinds of source agree.
        pixels = np.asarray(Image.fromarray(pixels).resize((image_size, image_size), Image.Resampling.BICUBIC))
    return pixels
