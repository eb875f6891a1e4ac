"""Archives from anywhere: members that would escape the folder, archive bombs and unsafe zip
entries are refused before anything is written."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile

import pytest

from pipeline.data.archives import UnsafeArchive
from pipeline.data.sources import resolve_source

from data_files import make_config


def tar_with(path, *members):
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return str(path)


def file_member(name, data=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def link_member(name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


@pytest.mark.parametrize("bad_member, match", [
    (file_member("data/../../evil.txt"), r"'data/../../evil.txt'.*path traversal"),
    (file_member("/tmp/absolute.txt"), r"'/tmp/absolute.txt'.*absolute"),
    (link_member("data/cat/link.png", "/etc/passwd"), r"'data/cat/link.png'.*symlink pointing outside"),
    (link_member("data/cat/up.png", "../../../outside.png"), r"'data/cat/up.png'.*symlink pointing outside"),
    (link_member("data/cat/hard.png", "../outside.png", tarfile.LNKTYPE), r"hard link pointing outside"),
])
def test_unsafe_tar_members_are_refused(tmp_path, bad_member, match):
    archive = tar_with(tmp_path / "bad.tar.gz", file_member("data/cat/ok.png"), bad_member)
    config = make_config(tmp_path, f"data.source={archive}")
    with pytest.raises(UnsafeArchive, match=match):
        resolve_source(config.data)
    extracted = tmp_path / "cache" / "extracted"
    assert not extracted.exists() or os.listdir(extracted) == []  # temp folder removed, nothing reusable
    assert not (tmp_path / "evil.txt").exists()


def test_archive_bombs_are_refused_before_anything_is_written(tmp_path):
    many = tar_with(tmp_path / "many.tar.gz", *[file_member(f"data/cat/{i}.png") for i in range(5)])
    with pytest.raises(UnsafeArchive, match=r"5 members, more than data.max_extract_members=4"):
        resolve_source(make_config(tmp_path, f"data.source={many}", "data.max_extract_members=4").data)
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w", compression=zipfile.ZIP_DEFLATED) as package:
        package.writestr("images/cat/a.png", b"\0" * 1_000_000)  # a megabyte of zeros: a few kB packed
    assert big.stat().st_size < 10_000
    with pytest.raises(UnsafeArchive, match=r"1,000,000 bytes, more than data.max_extract_bytes=100,000"):
        resolve_source(make_config(tmp_path, f"data.source={big}", "data.max_extract_bytes=100000").data)
    extracted = tmp_path / "cache" / "extracted"
    assert not extracted.exists() or os.listdir(extracted) == []


def test_unsafe_zip_member_is_refused(tmp_path):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as package:
        package.writestr("images/cat/a.png", b"x")
        package.writestr("../escape.png", b"x")
    with pytest.raises(UnsafeArchive, match=r"'\.\./escape\.png'"):
        resolve_source(make_config(tmp_path, f"data.source={archive}").data)


@pytest.mark.parametrize("data_filter", [True, False], ids=["with tarfile's data filter", "Python without it"])
def test_a_chain_of_links_that_leads_outside_is_refused(tmp_path, monkeypatch, data_filter):
    # Each link alone stays inside ("data/up" -> the archive root, "data/up/out" -> "data/up/.."
    # reads as "data"), but together they lead to the folder above the archive, and the last member
    # would be written there. pyproject allows Pythons whose tarfile has no data filter.
    if not data_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    archive = tar_with(tmp_path / "chain.tar.gz", file_member("data/cat/ok.png"), link_member("data/up", ".."),
                       link_member("data/up/out", ".."), file_member("data/up/out/evil.txt"))
    with pytest.raises(UnsafeArchive, match=r"'data/up/out'.* lies below the link 'data/up'"):
        resolve_source(make_config(tmp_path, f"data.source={archive}").data)
    assert not list(tmp_path.rglob("evil.txt"))
