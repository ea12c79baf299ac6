"""A sidecar primary started without --blob-dir, next to what looks like the storage's blob directory.

Without a blob directory the primary can ship everything but blob records,
and stops at the first one a secondary needs, maybe hours after it started.
When a directory holding ZODB's ``.layout`` sits beside the file (or beside
its directory, as in Zope's ``var/filestorage`` and ``var/blobstorage``),
the primary says so at start, and the error at the first blob names it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import transaction
import ZODB
from ZODB.blob import Blob
from ZODB.FileStorage import FileStorage

from replicator.errors import ConfigError
from replicator.storage import missing_blob_dir_hint, nearby_blob_dirs
from replicator.tailer import Tailer
from tests.helpers import REPLICATOR, Proc, free_port, tls_args, wait_for_port


def blob_storage(data_fs: Path, blob_dir: Path) -> None:
    """A FileStorage whose second transaction holds a blob (ZODB writes ``.layout`` in ``blob_dir``)."""
    db = ZODB.DB(FileStorage(str(data_fs), blob_dir=str(blob_dir)))
    try:
        with db.transaction() as conn:
            conn.root()["n"] = 1
        with db.transaction() as conn:
            blob = conn.root()["b"] = Blob()
            with blob.open("w") as f:
                f.write(b"blob bytes")
    finally:
        db.close()
        transaction.abort()


@pytest.mark.parametrize("layout", ["zope", "beside"])
def test_blob_directories_near_the_file_are_found(tmp_path, layout):
    if layout == "zope":  # var/filestorage/Data.fs and var/blobstorage
        data_fs, blob_dir = tmp_path / "var" / "filestorage" / "Data.fs", tmp_path / "var" / "blobstorage"
    else:
        data_fs, blob_dir = tmp_path / "Data.fs", tmp_path / "blobs"
    data_fs.parent.mkdir(parents=True, exist_ok=True)
    blob_storage(data_fs, blob_dir)
    (data_fs.parent / "not-blobs").mkdir()  # no .layout: not a blob directory
    assert nearby_blob_dirs(str(data_fs)) == [str(blob_dir)]
    assert missing_blob_dir_hint(str(data_fs)) == f"{blob_dir} looks like a blob directory (ZODB's .layout is there)"


def test_nothing_is_suggested_where_no_blob_directory_is_near(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "Data.fs").write_bytes(b"FS30")
    (tmp_path / "a" / "b" / "blobs").mkdir()  # empty: ZODB never used it
    assert nearby_blob_dirs(str(tmp_path / "a" / "b" / "Data.fs")) == []
    assert missing_blob_dir_hint(str(tmp_path / "a" / "b" / "Data.fs")) == ""


def test_the_first_blob_record_names_the_directory_nearby(tmp_path):
    blob_storage(tmp_path / "Data.fs", tmp_path / "blobs")
    tailer = Tailer(str(tmp_path / "Data.fs"), None).open()
    try:
        with pytest.raises(ConfigError) as raised:
            while tailer.read_events():
                pass
    finally:
        tailer.close()
    assert raised.value.problems == [f"{tmp_path / 'Data.fs'} has blob records: pass --blob-dir ({tmp_path / 'blobs'} "
                                     "looks like a blob directory (ZODB's .layout is there): this storage's?)"]
    assert "--blob-dir set to the directory the ZEO server" in raised.value.hint


@pytest.mark.parametrize("given", [False, True])
def test_a_sidecar_says_at_start_that_it_may_lack_its_blob_dir(tmp_path, tls_dir, given):
    blob_storage(tmp_path / "Data.fs", tmp_path / "blobs")
    port = free_port()
    blob_args = ["--blob-dir", str(tmp_path / "blobs")] if given else []
    proc = Proc([REPLICATOR, "primary", "--storage", str(tmp_path / "Data.fs"), *blob_args,
                 "--listen", f"127.0.0.1:{port}", *tls_args(tls_dir, "primary")], tmp_path / "p.log")
    try:
        wait_for_port(port, proc.proc)
    finally:
        proc.stop()
    warned = (f"no --blob-dir given, but {tmp_path / 'blobs'} looks like a blob directory (ZODB's .layout is "
              "there): if it is this storage's, pass --blob-dir") in proc.output()
    assert warned is not given, proc.output()
