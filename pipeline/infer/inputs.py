"""Which files a batch inference run classifies: ``list_inputs`` resolves an image, a folder, a
glob, a ``.txt`` file list or a bucket prefix to sorted paths (strings only, never pixels), and
``labels_from_folders`` finds their true classes when the folders name them."""

from __future__ import annotations

import os
import posixpath
import re
from typing import Iterator, Optional

import numpy as np
import pyarrow.fs as pafs

from pipeline import InputError, NotFound, storage
from pipeline.data.images import IMAGE_EXTENSIONS, is_hidden, is_image_path

GLOB_CHARACTERS = "*?["


def list_inputs(input: str) -> list[str]:
    """Image paths named by ``input``, sorted and unique.

    ``input`` may be an image file, a directory (walked recursively; image extensions only,
    case-insensitive; hidden files and folders skipped), a glob (``/x/**/*.png``; ``**`` spans
    folders; image extensions only), a ``.txt`` file list (one path per line; blank lines and
    ``#`` comments skipped; relative paths are relative to the list's folder; entries are kept
    as given, so a missing one is reported in the errors file), or an ``s3://``/``gs://`` prefix.
    Raises FileNotFoundError if ``input`` does not exist, ValueError if it holds no images.
    """
    paths, _root = resolve_inputs(input)
    return paths


def resolve_inputs(input: str) -> tuple[list[str], Optional[str]]:
    """(paths, label root): the root is the folder whose first level names the classes, or None
    when the parent folder of each file is used (file lists, single files)."""
    if input is None or not str(input).strip():
        raise InputError("no input given: set --input (or infer.input) to an image, a directory, "
                         "a glob, a .txt file list or an s3:// prefix")
    input = str(input).strip()
    scheme = scheme_of(input)
    if not storage.exists(input) and any(character in input for character in GLOB_CHARACTERS):
        paths, root = _glob(input, scheme)
    else:
        fs, inner = storage.filesystem(input)
        kind = fs.get_file_info(inner).type
        if kind == pafs.FileType.NotFound:
            raise NotFound(f"input not found: {input}")
        if kind == pafs.FileType.Directory:
            root = inner.rstrip("/") or "/"
            paths = [scheme + path for path in _walk(fs, root)]
        elif inner.lower().endswith(".txt"):
            root = None
            paths = _read_file_list(input)
        elif is_image_path(inner):
            root = None
            paths = [scheme + inner]
        else:
            raise InputError(f"input {input} is not an image ({', '.join(IMAGE_EXTENSIONS)}), "
                             "a directory, a glob or a .txt file list")
    if not paths:
        raise InputError(f"no images found in {input}: looked for files ending in "
                         f"{', '.join(IMAGE_EXTENSIONS)} (any case; hidden files skipped)")
    return sorted(set(paths)), root


def scheme_of(path: str) -> str:
    """'s3://' for s3://bucket/key; '' for local paths (file:// URIs become local paths)."""
    if storage.is_uri(path) and not path.startswith("file://"):
        return path.split("://", 1)[0] + "://"
    return ""


def _walk(fs: pafs.FileSystem, root: str, keep=None) -> Iterator[str]:
    """Image files below ``root`` (recursively), skipping anything hidden below it."""
    prefix = root.rstrip("/") + "/"
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type != pafs.FileType.File or not info.path.startswith(prefix):
            continue
        relative = info.path[len(prefix):]
        if any(is_hidden(part) for part in relative.split("/")):
            continue
        if is_image_path(info.path) and (keep is None or keep(info.path)):
            yield info.path


def _glob(pattern: str, scheme: str) -> tuple[list[str], str]:
    fs, inner = storage.filesystem(pattern)
    parts = inner.split("/")
    first_wildcard = next(index for index, part in enumerate(parts)
                          if any(character in part for character in GLOB_CHARACTERS))
    base = "/".join(parts[:first_wildcard]) or "/"
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        raise NotFound(f"input not found: {pattern} (folder {scheme}{base} does not exist)")
    regex = _glob_regex(inner)
    return [scheme + path for path in _walk(fs, base, keep=regex.match)], base


def _glob_regex(pattern: str) -> re.Pattern:
    """Shell-style glob over whole paths: * and ? stay within one folder, ** spans any number."""
    parts = pattern.split("/")
    pieces = []
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        if part == "**":
            pieces.append(".*" if last else "(?:[^/]*/)*")
        else:
            pieces.append(_glob_component_regex(part) + ("" if last else "/"))
    return re.compile("".join(pieces) + r"\Z")


def _glob_component_regex(part: str) -> str:
    pieces, index = [], 0
    while index < len(part):
        character = part[index]
        index += 1
        if character == "*":
            pieces.append("[^/]*")
        elif character == "?":
            pieces.append("[^/]")
        elif character == "[":
            end = part.find("]", index + 1)  # "[]x]": a ']' first in the set is a member
            if end == -1:
                pieces.append(re.escape(character))
                continue
            members = part[index:end]
            index = end + 1
            if members.startswith("!"):
                members = "^" + members[1:]
            pieces.append("[" + members.replace("\\", "\\\\") + "]")
        else:
            pieces.append(re.escape(character))
    return "".join(pieces)


def _read_file_list(list_path: str) -> list[str]:
    absolute = storage.absolute(list_path)
    folder = posixpath.dirname(absolute)
    paths = []
    for line in storage.read_text(absolute).splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if storage.is_uri(entry):
            paths.append(entry[len("file://"):] if entry.startswith("file://") else entry)
        elif storage.is_uri(folder):
            paths.append(posixpath.join(folder, entry))
        else:
            paths.append(os.path.normpath(os.path.join(folder, os.path.expanduser(entry))))
    return paths


def _label_folder(path: str, root: Optional[str]) -> Optional[str]:
    """Folder name that would be the class of ``path``: the first level below ``root`` (None if
    the file sits directly in the root), or the parent folder when there is no root."""
    inner = path.split("://", 1)[1] if storage.is_uri(path) else path
    if root is None:
        return posixpath.basename(posixpath.dirname(inner)) or None
    prefix = root.rstrip("/") + "/"
    if not inner.startswith(prefix):
        return None
    relative = inner[len(prefix):].split("/")
    return relative[0] if len(relative) > 1 else None


def labels_from_folders(paths: list[str], root: Optional[str], class_names: list[str]) -> Optional[np.ndarray]:
    """Class index per path when every path's folder is a class name, else None (not labelled)."""
    index = {name: position for position, name in enumerate(class_names)}
    labels = np.empty(len(paths), dtype=np.int32)
    for position, path in enumerate(paths):
        label = index.get(_label_folder(path, root))
        if label is None:
            return None
        labels[position] = label
    return labels


def folders_not_in_classes(paths: list[str], root: Optional[str], class_names: list[str]) -> list[str]:
    """Class folders of a labelled-looking input that the model does not know (sorted): when every
    file sits in a class-level folder and some of those folders are the model's classes, the
    others are classes the model was not trained on (or misspelt ones). Empty otherwise."""
    folders = {_label_folder(path, root) for path in paths}
    if None in folders or not folders & set(class_names):
        return []
    return sorted(folders - set(class_names))


def is_single_image(input: Optional[str]) -> bool:
    if not input:
        return False
    input = str(input).strip()
    return is_image_path(input) and (storage.exists(input) or not any(c in input for c in GLOB_CHARACTERS))
