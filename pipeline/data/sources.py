"""Where the images come from: ``config.data.source`` -> a ``Source`` that lists every item by split.

``resolve_source`` owns everything before decoding: the official CIFAR-10 archive downloaded into
``data.cache_dir`` (``pipeline.data.cifar``), archives extracted safely into a cache folder keyed
by content (``pipeline.data.archives``), the layout recognised (pickled ``cifar-10-batches-py/``
batches, or an image folder ``root/<class>/**/*.jpg`` / ``root/train/<class>/...`` + optional
``root/test/<class>/...``), and the source fingerprint that tells the preprocess stage whether
its shards are still current.

Nothing here decodes pixels. An ``Item`` only says where an image is (an image file, or a row of a
CIFAR pickle); ``pipeline.data.preprocess`` reads and decodes items in parallel with Ray Data.
Sources are local paths: on a multi-node cluster they are read on the driver's node.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from pipeline import storage
from pipeline.config import DataConfig
from pipeline.data import SourceError, cifar
from pipeline.data.archives import (ARCHIVE_SUFFIXES, ExtractLimits, UnsafeArchive, extract_archive, file_md5,
                                    is_archive_path)
from pipeline.data.images import IMAGE_EXTENSIONS, is_hidden, is_image_path

log = logging.getLogger(__name__)

__all__ = ["Item", "Source", "SourceError", "UnsafeArchive", "resolve_source"]


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
    seconds: float = 0.0         # what resolving it took: download, extraction, listing

    def count(self) -> int:
        return sum(len(items) for items in self.items_by_split.values())

    def describe(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "root": self.root, "archive": self.archive}


# ---------------------------------------------------------------- entry point

def resolve_source(data: DataConfig) -> Source:
    """Turn ``data.source`` into a listed ``Source`` (downloading / extracting first if needed)."""
    started = time.perf_counter()
    source = _resolve(data)
    source.seconds = time.perf_counter() - started
    return source


def _resolve(data: DataConfig) -> Source:
    spec = data.source
    if spec == "cifar10":
        archive = cifar.download_cifar10(data.download_url, data.cache_dir)
        # download_cifar10 just verified the md5; no need to hash 170 MB again.
        return _from_archive(archive, spec, data.cache_dir, ExtractLimits.of(data), known_md5=cifar.CIFAR10_ARCHIVE_MD5)
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


def _from_archive(archive: Path, spec: str, cache_dir: str, limits: ExtractLimits,
                  known_md5: Optional[str] = None) -> Source:
    size = archive.stat().st_size
    md5 = known_md5 or file_md5(archive)
    # Only a file of exactly the official size is held to the official md5: small archives in the
    # same format (tests, subsets) are legitimate sources.
    official_size = size == cifar.CIFAR10_ARCHIVE_BYTES
    if archive.name == cifar.CIFAR10_ARCHIVE_NAME and official_size and md5 != cifar.CIFAR10_ARCHIVE_MD5:
        raise SourceError(f"{archive} is not the official CIFAR-10 archive: expected md5 "
                          f"{cifar.CIFAR10_ARCHIVE_MD5}, got {md5}; download it again, or {cifar.LOCAL_COPY_HINT}")
    fingerprint = f"archive-{size}-md5-{md5}"
    folder = extract_archive(archive, Path(cache_dir).expanduser() / "extracted", key=md5[:16], limits=limits)
    try:
        source = _from_folder(folder, spec, fingerprint=fingerprint, archive=str(archive))
    except SourceError as error:  # name the archive the user gave, not our cache folder
        raise SourceError(str(error).replace(str(folder), f"{archive} (extracted)")) from None
    if source.kind == "cifar10" and official_size and md5 != cifar.CIFAR10_ARCHIVE_MD5:
        raise SourceError(f"{archive} has the official CIFAR-10 size but not its md5 (expected "
                          f"{cifar.CIFAR10_ARCHIVE_MD5}, got {md5}): the archive is damaged or modified")
    return source


# ---------------------------------------------------------------- layouts

def _subfolders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not is_hidden(entry.name))


def _holds_images(folder: Path) -> bool:
    return any(entry.is_file() and is_image_path(entry.name) and not is_hidden(entry.name)
               for entry in os.scandir(folder))


def _from_folder(folder: Path, spec: str, fingerprint: Optional[str], archive: Optional[str]) -> Source:
    """Detect the layout of ``folder`` (descending through single wrapper folders) and list it."""
    log.info(f"listing files in {folder} ...")
    layout_root = folder
    for _ in range(4):
        batches_folder = cifar.find_cifar_folder(layout_root)
        if batches_folder is not None:
            return _list_cifar(batches_folder, spec, fingerprint, archive)
        subfolders = _subfolders(layout_root)
        has_images = any(is_image_path(e.name) for e in os.scandir(layout_root) if e.is_file())
        # "data/" holding only "images/" holding the classes: common in archives and downloads. A
        # single folder with images of its own is one class, not a wrapper (refused below: a
        # classifier needs two).
        if len(subfolders) == 1 and subfolders[0] not in ("train", "test") and not has_images \
                and not _holds_images(layout_root / subfolders[0]):
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


def _list_cifar(folder: Path, spec: str, fingerprint: Optional[str], archive: Optional[str]) -> Source:
    class_names, batches, used = cifar.read_cifar_folder(folder)
    items_by_split = {split: [Item(f"{path.name}/{row:06d}", label, str(path), row)
                              for path, labels in files for row, label in enumerate(labels)]
                      for split, files in batches.items()}
    source = Source("cifar10", spec, str(folder), fingerprint or _fingerprint_files(folder, used),
                    class_names, items_by_split, archive)
    log.info(f"found CIFAR-10 batches in {folder}: {source.count()} images in {len(class_names)} classes "
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
    log.info(f"found image folder {root}: {source.count()} image files in {len(class_names)} classes ({counts})")
    return source
