"""Paths on local disk or object storage (s3://, gs://, ...) through ``pyarrow.fs``.

Every stage reads and writes through these helpers so that a run's data and outputs can live on
a laptop disk or in a bucket shared by a cluster without the stage knowing which. Local paths are
made absolute, because Ray workers (and ``ray job submit --working-dir``) run in other folders.

Every write is all-or-nothing (``open_output``): the bytes go to a temporary name beside the
target and are moved over it only when the writer finished without an exception. On object stores
this matters as much as locally: pyarrow's output stream completes its (multipart) upload when it
is closed, also when an exception is leaving the ``with`` block, which would publish a partial
object under the final name. A reader therefore never sees half a manifest, shard or predictions file.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

from pipeline import InputError


def is_uri(path: str) -> bool:
    return "://" in str(path)


def absolute(path: str) -> str:
    """URIs are returned unchanged; local paths are expanded (~) and made absolute."""
    path = str(path)
    if is_uri(path):
        return path.rstrip("/")
    return str(Path(path).expanduser().resolve())


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path within it) for a local path or a URI."""
    path = absolute(path)
    if is_uri(path):
        if path.startswith("file://"):
            return pafs.LocalFileSystem(), path[len("file://"):]
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def join(base: str, *parts: str) -> str:
    base = absolute(base)
    return posixpath.join(base, *parts) if is_uri(base) else os.path.join(base, *parts)


def basename(path: str) -> str:
    return posixpath.basename(str(path).rstrip("/"))


def exists(path: str) -> bool:
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type == pafs.FileType.Directory


def check_writable_folder(path: str, named: str) -> None:
    """Refuse, before any work, a local ``path`` that cannot become a folder this process writes
    into: an existing file, a path below a file, or a place where no file can be made (``/proc``,
    a read-only mount). ``named`` is how the message names it (``data.output=...``). A URI is
    left to its store, which answers only when written to."""
    if is_uri(path):
        return
    path = absolute(path)
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise InputError(f"{named}: {existing} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=existing))
    except OSError as error:
        raise InputError(f"{named}: nothing can be written in {existing} ({error.strerror or error})") from None


def makedirs(path: str) -> None:
    fs, inner = filesystem(path)
    fs.create_dir(inner, recursive=True)


def list_dir(path: str) -> list[str]:
    """Base names directly inside ``path`` (empty if it does not exist)."""
    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        return []
    return sorted(posixpath.basename(info.path) for info in fs.get_file_info(pafs.FileSelector(inner)))


def delete(path: str) -> None:
    """Delete a file or a directory tree; a missing path is not an error."""
    fs, inner = filesystem(path)
    kind = fs.get_file_info(inner).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(inner)
    elif kind == pafs.FileType.File:
        fs.delete_file(inner)


def read_bytes(path: str) -> bytes:
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as stream:
        return stream.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def read_json(path: str):
    return json.loads(read_text(path))


@contextlib.contextmanager
def open_output(path: str) -> Iterator:
    """A pyarrow output stream whose bytes appear at ``path`` only if the ``with`` block finishes:
    written under a temporary name in the same folder, then renamed (local disk: atomic) or moved
    (object stores: a server-side copy, then the temporary is deleted). On an exception the
    target is left as it was and the temporary is removed."""
    fs, inner = filesystem(path)
    parent, name = posixpath.split(inner) if is_uri(path) else os.path.split(inner)
    fs.create_dir(parent, recursive=True)
    temporary = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(temporary) as stream:
            yield stream
        if isinstance(fs, pafs.LocalFileSystem):
            with open(temporary, "rb+") as handle:  # on disk before the rename makes it visible
                os.fsync(handle.fileno())
        fs.move(temporary, inner)
    finally:
        if fs.get_file_info(temporary).type != pafs.FileType.NotFound:
            fs.delete_file(temporary)


def write_bytes(path: str, data: bytes) -> None:
    """Atomic write: readers see the old file or the whole new one, never a part."""
    with open_output(path) as stream:
        stream.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, value) -> None:
    write_text(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


def upload_dir(local_dir: str, target: str) -> None:
    """Copy a local directory tree to ``target`` (local or URI), replacing files of the same name."""
    fs, inner = filesystem(target)
    if isinstance(fs, pafs.LocalFileSystem):
        if os.path.abspath(local_dir) != inner:
            shutil.copytree(local_dir, inner, dirs_exist_ok=True)
        return
    pafs.copy_files(local_dir, inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(source: str, local_dir: str) -> str:
    """Make ``source`` available as a local directory; local sources are used in place."""
    fs, inner = filesystem(source)
    if isinstance(fs, pafs.LocalFileSystem):
        return inner
    os.makedirs(local_dir, exist_ok=True)
    pafs.copy_files(inner, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local_dir
