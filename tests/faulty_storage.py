"""A local filesystem whose second checkpoint upload fails once, as a storage outage would (or,
with ``hang_seconds``, first hangs that long, as a black-holed connection does).

``PyFileSystem(FailSecondCheckpointUpload(markers))`` behaves as the local disk, except that the
first file written into the second ``checkpoint_*`` folder raises ``OSError``, once per
``markers`` folder. The state lives in marker files, so it holds across the Ray workers that
unpickle the filesystem from Ray Train's run config (``ray.cloudpickle.register_pickle_by_value``
on this module ships the class with it)."""

from __future__ import annotations

import os
import re
import time

import pyarrow.fs as pafs

CHECKPOINT = re.compile(r"/(checkpoint_[^/]+)/")


class FailSecondCheckpointUpload(pafs.FileSystemHandler):
    def __init__(self, markers: str, hang_seconds: float = 0.0):
        self.markers, self.hang_seconds = markers, hang_seconds
        self.local = pafs.LocalFileSystem()

    def failed(self) -> bool:
        return os.path.exists(os.path.join(self.markers, "failed"))

    def open_output_stream(self, path, metadata):
        found = CHECKPOINT.search(path)
        if found and not self.failed():
            os.makedirs(self.markers, exist_ok=True)
            seen = {name[len("seen-"):] for name in os.listdir(self.markers) if name.startswith("seen-")}
            if seen - {found.group(1)}:
                open(os.path.join(self.markers, "failed"), "w").close()
                if self.hang_seconds:  # a black-holed connection: the call never returns
                    time.sleep(self.hang_seconds)
                raise OSError(f"injected: storage unavailable while writing {path}")
            open(os.path.join(self.markers, f"seen-{found.group(1)}"), "w").close()
        return self.local.open_output_stream(path, metadata=metadata)

    # Everything else is the local disk's.
    def __eq__(self, other):
        return (isinstance(other, FailSecondCheckpointUpload) and other.markers == self.markers
                and other.hang_seconds == self.hang_seconds)

    def __ne__(self, other):
        return not self == other

    def get_type_name(self):
        return "fail-second-checkpoint-upload"

    def normalize_path(self, path):
        return self.local.normalize_path(path)

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.local.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("not on a test's disk")

    def delete_file(self, path):
        self.local.delete_file(path)

    def move(self, source, destination):
        self.local.move(source, destination)

    def copy_file(self, source, destination):
        self.local.copy_file(source, destination)

    def open_input_stream(self, path):
        return self.local.open_input_stream(path)

    def open_input_file(self, path):
        return self.local.open_input_file(path)

    def open_append_stream(self, path, metadata):
        return self.local.open_append_stream(path, metadata=metadata)
