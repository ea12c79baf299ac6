"""Which process has a FileStorage open for writing, read from the kernel's table of file locks."""

from __future__ import annotations

import os

from replicator.storage import storage_writer, writers_visible


def _table(tmp_path, lock, pid: int) -> str:
    st = os.stat(lock)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    table = tmp_path / "locks"
    table.write_text(f"1: POSIX  ADVISORY  WRITE 77 00:00:1 0 EOF\n"
                     f"2: FLOCK  ADVISORY  WRITE {pid} {device} 0 EOF\n")
    return str(table)


def test_the_holder_of_the_lock_is_named(tmp_path):
    lock = tmp_path / "Data.fs.lock"
    lock.write_text("")
    assert storage_writer(str(tmp_path / "Data.fs"), _table(tmp_path, lock, 1)).startswith("process 1")
    # This process's own lock (a fenced sidecar holds it) is no writer.
    assert storage_writer(str(tmp_path / "Data.fs"), _table(tmp_path, lock, os.getpid())) is None
    # The kernel shows a holder in another PID namespace (the ZEO server's container) as pid 0.
    assert storage_writer(str(tmp_path / "Data.fs"), _table(tmp_path, lock, 0)) == \
        "a process outside this one's PID namespace (another container's)"


def test_no_lock_file_or_no_table_means_no_writer_known(tmp_path):
    lock = tmp_path / "Data.fs.lock"
    lock.write_text("")
    table = _table(tmp_path, lock, 1)
    assert storage_writer(str(tmp_path / "Other.fs"), table) is None  # never opened for writing
    assert storage_writer(str(tmp_path / "Data.fs"), str(tmp_path / "no-such-table")) is None
    assert writers_visible(table) and not writers_visible(str(tmp_path / "no-such-table"))
