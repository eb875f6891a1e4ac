"""Where the images come from: ``config.data.source`` -> a ``Source`` that lists every item by split.

This module owns everything before decoding:
  * downloading the official CIFAR-10 archive into ``data.cache_dir`` (size + md5 checked),
  * extracting archives (.tar, .tar.gz/.tgz, .zip) safely into a cache folder keyed by content,
  * recognising the layout: pickled ``cifar-10-batches-py/`` batches, or an image folder
    ``root/<class>/**/*.jpg`` / ``root/train/<class>/...`` (+ optional ``root/test/<class>/...``),
  * the source fingerprint that tells the preprocess stage whether its shards are still current.

Nothing here decodes pixels. An ``Item`` only says where an image is (an image file, or a row of a
CIFAR pickle); ``pipeline.data.preprocess`` reads and decodes items in parallel with Ray Data.
Sources are local paths: on a multi-node cluster they are read on the driver's node.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pickle
import re
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional, Union

import numpy as np

from pipeline import storage
from pipeline.config import DataConfig, redact_url
from pipeline.data.images import IMAGE_EXTENSIONS, is_hidden, is_image_path

# The official archive, as published on the CIFAR page (and as keras.datasets.cifar10 downloads it).
CIFAR10_ARCHIVE_NAME = "cifar-10-python.tar.gz"
CIFAR10_ARCHIVE_BYTES = 170_498_071
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{n}" for n in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
CIFAR10_META = "batches.meta"
CIFAR10_IMAGE_SIZE = 32  # pixels; each pickle row is 3 x 32 x 32 = 3072 bytes, channel-major

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")

LOCAL_COPY_HINT = (
    "pass a local copy instead: --set data.source=/path/to/cifar-10-python.tar.gz "
    "(or an extracted cifar-10-batches-py/ folder, or an image folder of <class>/<image> files, "
    "or such a folder packed as .tar.gz / .zip)")


class SourceError(ValueError):
    """The configured source is missing, malformed or unsafe; the message says what to change."""


class UnsafeArchive(SourceError):
    """An archive member would escape the extraction folder (or is a device file)."""


@dataclass(frozen=True)
class Item:
    """One image of the source: ``path`` is an image file, or a CIFAR pickle when ``row >= 0``."""

    id: str     # stable: relative path of the file, or "<pickle name>/<row, 6 digits>"
    label: int  # index into Source.class_names
    path: str   # absolute local path
    row: int = -1

    @property
    def locator(self) -> Union[str, tuple[str, int]]:
        return (self.path, self.row) if self.row >= 0 else self.path


@dataclass
class Source:
    kind: str                    # "cifar10" (pickled batches) or "image_folder"
    spec: str                    # config.data.source as given
    root: str                    # folder the items live in (after download / extraction)
    fingerprint: str             # changes whenever the source content changes
    class_names: list[str]
    items_by_split: dict[str, list[Item]]  # "train", and "test" when the source has one
    archive: Optional[str] = None  # the archive the root was extracted from, if any

    def count(self) -> int:
        return sum(len(items) for items in self.items_by_split.values())

    def describe(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "root": self.root, "archive": self.archive}


def say(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------- entry point

def resolve_source(data: DataConfig) -> Source:
    """Turn ``data.source`` into a listed ``Source`` (downloading / extracting first if needed)."""
    spec = data.source
    if spec == "cifar10":
        archive = download_cifar10(data.download_url, data.cache_dir)
        # download_cifar10 just verified the md5; no need to hash 170 MB again.
        return _from_archive(archive, spec, data.cache_dir, ExtractLimits.of(data), known_md5=CIFAR10_ARCHIVE_MD5)
    if storage.is_uri(spec):
        raise SourceError(
            f"data.source={spec!r}: sources must be a local path (or 'cifar10'); copy the data to the "
            f"driver's disk first (preprocessed outputs may go to {spec.split('://')[0]}:// via data.output)")
    path = Path(spec).expanduser().resolve()
    if not path.exists():
        raise SourceError(f"data.source={spec!r}: no such file or folder ({path})")
    if path.is_dir():
        return _from_folder(path, spec, fingerprint=None, archive=None)
    if is_archive_path(path):
        return _from_archive(path, spec, data.cache_dir, ExtractLimits.of(data))
    raise SourceError(
        f"data.source={spec!r} is a file but not an archive ({', '.join(ARCHIVE_SUFFIXES)}); give "
        f"'cifar10', an archive, a cifar-10-batches-py/ folder or an image folder")


def is_archive_path(path: Union[str, Path]) -> bool:
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


# ---------------------------------------------------------------- download (source = cifar10)

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
            say(f"using cached {target} (md5 verified)")
            return target
        say(f"cached {target} is not the official archive ({problem}); downloading it again")
        target.unlink()

    part = folder / f"{CIFAR10_ARCHIVE_NAME}.{uuid.uuid4().hex[:8]}.part"
    say(f"downloading {redact_url(url)} -> {target}")
    try:
        _fetch(url, part)
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


def _fetch(url: str, destination: Path) -> None:
    started = time.monotonic()
    interactive = sys.stdout.isatty()
    with urllib.request.urlopen(url, timeout=60) as response, open(destination, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or CIFAR10_ARCHIVE_BYTES
        done, next_report = 0, 0.1
        while chunk := response.read(1 << 20):
            out.write(chunk)
            done += len(chunk)
            fraction = done / total
            # A carriage-return line on a terminal; every 10% in logs (ray job logs, CI).
            if interactive or fraction >= next_report:
                rate = done / max(time.monotonic() - started, 1e-6) / 2**20
                line = f"  {done / 2**20:7.1f} / {total / 2**20:.1f} MiB ({fraction:4.0%}) {rate:5.1f} MiB/s"
                print(f"\r{line}" if interactive else line, end="" if interactive else "\n", flush=True)
                next_report = (int(fraction * 10) + 1) / 10
        if interactive:
            print(flush=True)


def official_archive_problem(path: Path, md5: Optional[str] = None) -> Optional[str]:
    """None if ``path`` is the official CIFAR-10 archive, else 'expected ..., got ...'."""
    size = path.stat().st_size
    if size != CIFAR10_ARCHIVE_BYTES:
        return f"expected {CIFAR10_ARCHIVE_BYTES:,} bytes, got {size:,}"
    actual = md5 or file_md5(path)
    if actual != CIFAR10_ARCHIVE_MD5:
        return f"expected md5 {CIFAR10_ARCHIVE_MD5}, got {actual}"
    return None


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- archives

@dataclass(frozen=True)
class ExtractLimits:
    """Caps on what an archive may unpack to (``data.max_extract_bytes`` / ``max_extract_members``),
    checked from its headers before anything is written: an archive bomb is refused, not unpacked."""
    max_bytes: int
    max_members: int

    @classmethod
    def of(cls, data) -> "ExtractLimits":
        return cls(data.max_extract_bytes, data.max_extract_members)

    def check(self, archive: Path, sizes: list[int]) -> None:
        if len(sizes) > self.max_members:
            raise UnsafeArchive(f"refusing to extract {archive}: {len(sizes):,} members, more than "
                                f"data.max_extract_members={self.max_members:,} (raise it if the archive is trusted)")
        total = sum(sizes)
        if total > self.max_bytes:
            raise UnsafeArchive(f"refusing to extract {archive}: its members add up to {total:,} bytes, more than "
                                f"data.max_extract_bytes={self.max_bytes:,} (raise it if the archive is trusted)")


def _from_archive(archive: Path, spec: str, cache_dir: str, limits: ExtractLimits,
                  known_md5: Optional[str] = None) -> Source:
    size = archive.stat().st_size
    md5 = known_md5 or file_md5(archive)
    # Only a file of exactly the official size is held to the official md5: small archives in the
    # same format (tests, subsets) are legitimate sources.
    if archive.name == CIFAR10_ARCHIVE_NAME and size == CIFAR10_ARCHIVE_BYTES and md5 != CIFAR10_ARCHIVE_MD5:
        raise SourceError(f"{archive} is not the official CIFAR-10 archive: expected md5 "
                          f"{CIFAR10_ARCHIVE_MD5}, got {md5}; download it again, or {LOCAL_COPY_HINT}")
    fingerprint = f"archive-{size}-md5-{md5}"
    folder = extract_archive(archive, Path(cache_dir).expanduser() / "extracted", key=md5[:16], limits=limits)
    source = _from_folder(folder, spec, fingerprint=fingerprint, archive=str(archive))
    if source.kind == "cifar10" and size == CIFAR10_ARCHIVE_BYTES and md5 != CIFAR10_ARCHIVE_MD5:
        raise SourceError(f"{archive} has the official CIFAR-10 size but not its md5 (expected "
                          f"{CIFAR10_ARCHIVE_MD5}, got {md5}): the archive is damaged or modified")
    return source


def _archive_stem(name: str) -> str:
    lowered = name.lower()
    for suffix in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if lowered.endswith(suffix):
            return name[: -len(suffix)]
    return name


def extract_archive(archive: Path, cache: Path, key: str, limits: Optional[ExtractLimits] = None) -> Path:
    """Extract ``archive`` into ``cache/<stem>-<key>`` once; later calls reuse the folder.

    Extraction goes to a temporary sibling folder that is renamed when complete, so a crashed or
    interrupted extraction is never mistaken for a finished one (its temp folder is just ignored).
    """
    final = cache / f"{_archive_stem(archive.name)}-{key}"
    if final.is_dir():
        say(f"using extracted {archive.name} at {final}")
        return final
    cache.mkdir(parents=True, exist_ok=True)
    temporary = cache / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    say(f"extracting {archive} -> {final} ...")
    started = time.monotonic()
    try:
        temporary.mkdir()
        limits = limits or ExtractLimits.of(DataConfig())
        if archive.name.lower().endswith(".zip"):
            _extract_zip(archive, temporary, limits)
        else:
            _extract_tar(archive, temporary, limits)
        _check_links_inside(archive, temporary)
        try:
            os.rename(temporary, final)
        except OSError:
            if not final.is_dir():  # not "another process finished the same extraction first"
                raise
            shutil.rmtree(temporary, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    say(f"extracted in {time.monotonic() - started:.1f} s")
    return final


def _unsafe_name_reason(name: str) -> Optional[str]:
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or re.match(r"^[A-Za-z]:", normalized):
        return "has an absolute path"
    if ".." in PurePosixPath(normalized).parts:
        return "contains '..' (path traversal)"
    return None


def _escapes(link_target: str) -> bool:
    """True if a relative link target, already joined to its folder, leaves the archive root."""
    normalized = os.path.normpath(link_target.replace("\\", "/"))
    return normalized == ".." or normalized.startswith("../") or os.path.isabs(normalized)


def _extract_tar(archive: Path, target: Path, limits: ExtractLimits) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            limits.check(archive, [member.size for member in members if member.isfile()])
            for member in members:
                reason = _unsafe_tar_member_reason(member)
                if reason:
                    raise UnsafeArchive(f"refusing to extract {archive}: member {member.name!r} {reason}")
            try:
                if hasattr(tarfile, "data_filter"):
                    # The "data" filter re-checks every path against the real, partly extracted tree
                    # (it catches link chains our name checks cannot see) and drops odd permissions.
                    tar.extractall(target, members=members, filter="data")
                else:  # Python without the extraction filters: our checks above + _check_links_inside
                    tar.extractall(target, members=members)
            except tarfile.FilterError as error:
                name = getattr(getattr(error, "tarinfo", None), "name", "?")
                raise UnsafeArchive(f"refusing to extract {archive}: member {name!r}: {error}") from None
    except (tarfile.TarError, EOFError, OSError) as error:
        raise SourceError(f"cannot read archive {archive}: {error}") from None


def _unsafe_tar_member_reason(member: tarfile.TarInfo) -> Optional[str]:
    reason = _unsafe_name_reason(member.name)
    if reason:
        return reason
    if member.ischr() or member.isblk() or member.isfifo():
        return "is a device or fifo file"
    if member.issym():
        if os.path.isabs(member.linkname) or _escapes(os.path.join(os.path.dirname(member.name), member.linkname)):
            return f"is a symlink pointing outside the archive ({member.linkname!r})"
    elif member.islnk():
        if _escapes(member.linkname):  # hard-link targets are relative to the archive root
            return f"is a hard link pointing outside the archive ({member.linkname!r})"
    elif not (member.isfile() or member.isdir()):
        return "has an unsupported member type"
    return None


def _extract_zip(archive: Path, target: Path, limits: ExtractLimits) -> None:
    try:
        with zipfile.ZipFile(archive) as package:
            limits.check(archive, [info.file_size for info in package.infolist()])
            for info in package.infolist():
                reason = _unsafe_name_reason(info.filename)
                if reason:
                    raise UnsafeArchive(f"refusing to extract {archive}: member {info.filename!r} {reason}")
            # zipfile never creates symlinks or device files: such entries become regular files.
            package.extractall(target)
    except (zipfile.BadZipFile, OSError) as error:
        raise SourceError(f"cannot read archive {archive}: {error}") from None


def _check_links_inside(archive: Path, target: Path) -> None:
    """Last line of defence: every symlink in the extracted tree must resolve inside it."""
    root = target.resolve()
    for folder, dirnames, filenames in os.walk(target):
        for name in dirnames + filenames:
            path = Path(folder, name)
            if path.is_symlink():
                resolved = path.resolve()
                if resolved != root and root not in resolved.parents:
                    raise UnsafeArchive(f"refusing to extract {archive}: member "
                                        f"{str(path.relative_to(target))!r} is a symlink pointing outside the archive")


# ---------------------------------------------------------------- layouts



def _subfolders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not is_hidden(entry.name))


def _cifar_folder(folder: Path) -> Optional[Path]:
    if (folder / CIFAR10_META).is_file() and (folder / CIFAR10_TRAIN_BATCHES[0]).is_file():
        return folder
    if (folder / CIFAR10_FOLDER).is_dir():
        return folder / CIFAR10_FOLDER
    return None


def _from_folder(folder: Path, spec: str, fingerprint: Optional[str], archive: Optional[str]) -> Source:
    """Detect the layout of ``folder`` (descending through single wrapper folders) and list it."""
    say(f"listing files in {folder} ...")
    layout_root = folder
    for _ in range(4):
        cifar = _cifar_folder(layout_root)
        if cifar is not None:
            return _list_cifar(cifar, spec, fingerprint, archive)
        subfolders = _subfolders(layout_root)
        has_images = any(is_image_path(e.name) for e in os.scandir(layout_root) if e.is_file())
        # "data/" holding only "images/" holding the classes: common in archives and downloads.
        if len(subfolders) == 1 and subfolders[0] not in ("train", "test") and not has_images:
            layout_root = layout_root / subfolders[0]
            continue
        break
    return _list_image_folder(layout_root, spec, fingerprint, archive)


def _fingerprint_files(root: Path, paths: list[Path]) -> str:
    """Hash of sorted (relative path, size, mtime_ns): cheap, and changes when any file changes."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        info = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return f"files-{len(paths)}-sha256-{digest.hexdigest()[:32]}"


# ---- CIFAR-10 pickles

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


def _list_cifar(folder: Path, spec: str, fingerprint: Optional[str], archive: Optional[str]) -> Source:
    meta_path = folder / CIFAR10_META
    if not meta_path.is_file():
        raise SourceError(f"{folder} looks like cifar-10-batches-py/ but has no {CIFAR10_META}")
    meta = load_cifar_pickle(meta_path)
    if b"label_names" not in meta:
        raise SourceError(f"{meta_path} lacks label_names (keys: {sorted(meta)})")
    class_names = [name.decode() if isinstance(name, bytes) else str(name) for name in meta[b"label_names"]]

    files = {"train": CIFAR10_TRAIN_BATCHES, "test": (CIFAR10_TEST_BATCH,)}
    items_by_split: dict[str, list[Item]] = {}
    used = [meta_path]
    for split, names in files.items():
        items = []
        for name in names:
            path = folder / name
            if not path.is_file():
                raise SourceError(f"{folder} is missing {name} (a CIFAR-10 folder holds "
                                  f"{', '.join(CIFAR10_TRAIN_BATCHES)}, {CIFAR10_TEST_BATCH}, {CIFAR10_META})")
            _, labels = load_cifar_batch(path)
            bad = [label for label in labels if not 0 <= label < len(class_names)]
            if bad:
                raise SourceError(f"{path}: label {bad[0]} is outside the {len(class_names)} label_names")
            items += [Item(f"{name}/{row:06d}", label, str(path), row) for row, label in enumerate(labels)]
            used.append(path)
        items_by_split[split] = items

    source = Source("cifar10", spec, str(folder), fingerprint or _fingerprint_files(folder, used),
                    class_names, items_by_split, archive)
    say(f"found CIFAR-10 batches in {folder}: {source.count()} images in {len(class_names)} classes "
        f"(train {len(items_by_split['train'])}, test {len(items_by_split['test'])})")
    return source


# ---- image folders

def _list_image_files(class_folder: Path) -> list[Path]:
    """Image files anywhere under ``class_folder`` in sorted relative-path order; other files ignored."""
    found = []
    for folder, dirnames, filenames in os.walk(class_folder):
        dirnames[:] = sorted(name for name in dirnames if not is_hidden(name))
        found += [Path(folder, name) for name in filenames if not is_hidden(name) and is_image_path(name)]
    return sorted(found, key=lambda path: path.relative_to(class_folder).as_posix())


def _list_classes(split_folder: Path, description: str) -> dict[str, list[Path]]:
    classes = _subfolders(split_folder)
    if not classes:
        raise SourceError(
            f"{split_folder} has no class folders: an image folder is root/<class>/<images> or "
            f"root/train/<class>/<images> (+ optional root/test/<class>/...)")
    files = {name: _list_image_files(split_folder / name) for name in classes}
    empty = [name for name, paths in files.items() if not paths]
    if empty:
        raise SourceError(
            f"empty class '{empty[0]}' in the {description} folder: {split_folder / empty[0]} holds no image "
            f"files ({' '.join(IMAGE_EXTENSIONS)}); remove the folder or add images"
            + (f" (also empty: {', '.join(empty[1:])})" if len(empty) > 1 else ""))
    return files


def _list_image_folder(root: Path, spec: str, fingerprint: Optional[str], archive: Optional[str]) -> Source:
    subfolders = _subfolders(root)
    if "train" in subfolders or "test" in subfolders:
        # root/train/<class>/..., root/test/<class>/...: anything else next to them is ambiguous
        # (a "val/" folder would otherwise silently become a class).
        extra = [name for name in subfolders if name not in ("train", "test")]
        if "train" not in subfolders or extra:
            raise SourceError(
                f"{root}: expected either class folders (root/<class>/...) or train/ with an optional test/ "
                f"(root/train/<class>/...), found folders {subfolders}; the validation split is drawn from "
                f"train by data.val_fraction")
        split_folders = {split: root / split for split in ("train", "test") if split in subfolders}
    else:
        split_folders = {"train": root}

    files = {split: _list_classes(folder, split) for split, folder in split_folders.items()}
    class_names = sorted(files["train"])
    if len(class_names) < 2:
        raise SourceError(f"{split_folders['train']} has only one class folder ({class_names[0]!r}); a classifier "
                          f"needs at least two: root/<class>/<images>, one folder per class")
    if "test" in files:
        unknown = sorted(set(files["test"]) - set(class_names))
        if unknown:
            raise SourceError(f"{split_folders['test']} has classes that train/ lacks: {', '.join(unknown)}; "
                              f"test classes must be a subset of the train classes {class_names}")

    label_of = {name: index for index, name in enumerate(class_names)}
    items_by_split = {}
    used = []
    for split, classes in files.items():
        # Source order: classes in sorted order, files in sorted path order within each class.
        items = []
        for class_name in sorted(classes):
            for path in classes[class_name]:
                items.append(Item(path.relative_to(root).as_posix(), label_of[class_name], str(path)))
                used.append(path)
        items_by_split[split] = items

    source = Source("image_folder", spec, str(root), fingerprint or _fingerprint_files(root, used),
                    class_names, items_by_split, archive)
    counts = ", ".join(f"{split} {len(items)}" for split, items in items_by_split.items())
    say(f"found image folder {root}: {source.count()} image files in {len(class_names)} classes ({counts})")
    return source
