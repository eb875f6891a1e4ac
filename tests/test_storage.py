"""pipeline.storage: the same calls on local disk and on s3:// (a local S3-compatible server), and
writes that are all or nothing: a writer that fails half-way leaves the target as it was."""

import os

import pyarrow as pa
import pytest

from pipeline import storage
from pipeline.infer import outputs
from s3_server import s3_server

BUCKET = "s3://storage-test"


@pytest.fixture(scope="module")
def s3_root():
    with s3_server(BUCKET.removeprefix("s3://")) as env:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            yield BUCKET


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    return str(tmp_path) if request.param == "local" else request.getfixturevalue("s3_root") + f"/{tmp_path.name}"


def leftovers(folder: str) -> list[str]:
    return [name for name in storage.list_dir(folder) if ".tmp-" in name]


def test_round_trip(root):
    path = storage.join(root, "a", "b.json")
    storage.write_json(path, {"x": 1})
    assert storage.read_json(path) == {"x": 1} and storage.exists(path)
    assert storage.list_dir(storage.join(root, "a")) == ["b.json"]
    storage.delete(storage.join(root, "a"))
    assert not storage.exists(path)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(root):
    path = storage.join(root, "manifest.json")
    storage.write_text(path, "old, complete")
    with pytest.raises(RuntimeError, match="disk full"):
        with storage.open_output(path) as stream:
            stream.write(b"new, half of it")
            raise RuntimeError("disk full")
    assert storage.read_text(path) == "old, complete"
    assert leftovers(root) == []


def test_a_failed_first_write_leaves_nothing(root):
    path = storage.join(root, "part.parquet")
    with pytest.raises(RuntimeError):
        with storage.open_output(path) as stream:
            stream.write(b"PAR1 and then")
            raise RuntimeError("killed mid-write")
    assert not storage.exists(path)
    assert leftovers(root) == []


def test_a_predictions_file_is_never_published_half_written(root, monkeypatch):
    # What a failure inside pyarrow's CSV writer did on s3://: the stream's close on the way out
    # completed the upload, and a file of a header and no rows stood under the final name.
    import pyarrow.csv as pacsv

    def write_header_then_fail(table, stream):
        stream.write(b'"path","predicted_class"\n')
        raise OSError("connection reset")

    monkeypatch.setattr(pacsv, "write_csv", write_header_then_fail)
    path = storage.join(root, "predictions.csv")
    with pytest.raises(OSError, match="connection reset"):
        outputs.write_table(pa.table({"path": ["x.png"], "predicted_class": ["cat"]}), path, "csv")
    assert not storage.exists(path)
    assert leftovers(root) == []


def test_local_paths_are_absolute_and_uris_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("runs") == os.path.join(str(tmp_path), "runs")
    assert storage.absolute("s3://bucket/runs/") == "s3://bucket/runs"
    assert storage.join("s3://bucket", "a", "b") == "s3://bucket/a/b"
