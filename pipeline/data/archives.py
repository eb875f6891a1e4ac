"""Archives as a source: download with progress, checksums, and safe extraction into a cache.

An archive may come from anywhere, so extraction refuses what could escape its folder (absolute
paths, ``..``, links pointing out, device files) and what would fill the disk (more members or
bytes than ``data.max_extract_members`` / ``max_extract_bytes``), all checked from the headers
before anything is written. Extraction goes to a temporary folder renamed when complete: a crashed
extraction is never mistaken for a finished one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tarfile
import time
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional, Union

from pipeline.config import DataConfig
from pipeline.data import SourceError

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")


class UnsafeArchive(SourceError):
    """An archive member would escape the extraction folder (or is a device file)."""


def is_archive_path(path: Union[str, Path]) -> bool:
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def fetch(url: str, destination: Path, expected_bytes: int = 0) -> None:
    """Download ``url`` to ``destination``, logging progress every 10% (``expected_bytes`` when the
    server sends no length). Errors propagate; the caller owns the partial file."""
    started = time.monotonic()
    with urllib.request.urlopen(url, timeout=60) as response, open(destination, "wb") as out:
        total = max(int(response.headers.get("Content-Length") or 0) or expected_bytes, 1)
        done, next_report = 0, 0.1
        while chunk := response.read(1 << 20):
            out.write(chunk)
            done += len(chunk)
            fraction = done / total
            if fraction >= next_report:
                rate = done / max(time.monotonic() - started, 1e-6) / 2**20
                log.info(f"  {done / 2**20:7.1f} / {total / 2**20:.1f} MiB ({fraction:4.0%}) {rate:5.1f} MiB/s")
                next_report = (int(fraction * 10) + 1) / 10


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


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
        log.info(f"using extracted {archive.name} at {final}")
        return final
    created = [folder for folder in (cache, *cache.parents) if not folder.exists()]
    cache.mkdir(parents=True, exist_ok=True)
    temporary = cache / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    log.info(f"extracting {archive} -> {final} ...")
    started = time.monotonic()
    try:
        temporary.mkdir()
        limits = limits or ExtractLimits.of(DataConfig())
        if archive.name.lower().endswith(".zip"):
            _extract_zip(archive, temporary, limits)
        else:
            _extract_tar(archive, temporary, limits)
        _check_links_inside(archive, temporary)
        if not any(files for _, _, files in os.walk(temporary)):
            raise SourceError(f"{archive} is empty: it holds no files")
        try:
            os.rename(temporary, final)
        except OSError:
            if not final.is_dir():  # not "another process finished the same extraction first"
                raise
            shutil.rmtree(temporary, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        for folder in created:  # the cache folders this call made, innermost first, if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    log.info(f"extracted in {time.monotonic() - started:.1f} s")
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
            links = {member.name.rstrip("/") for member in members if member.issym() or member.islnk()}
            for member in members:
                reason = _unsafe_tar_member_reason(member) or _through_a_link(member.name, links)
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


def _through_a_link(name: str, links: set[str]) -> Optional[str]:
    """A member whose path passes through a link of the same archive is refused: a chain of links
    that each stay inside (``a -> ..``, then ``a/b -> ..``) can still lead a later member outside,
    and Python without tarfile's data filter would write it there before any check could see it."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    for depth in range(1, len(parts)):
        parent = "/".join(parts[:depth])
        if parent in links:
            return f"lies below the link {parent!r} (a path through a link may lead outside the archive)"
    return None


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
