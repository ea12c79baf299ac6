"""A secondary whose disk fills up: a clear error, nothing lost, backing off, and on again once there is room.

The secondary's storage lives on a real tmpfs of a few hundred kilobytes
(mounting needs root; the test says so and skips otherwise).
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from pathlib import Path

import pytest
from ZODB.utils import p64

from replicator import secondary as secondary_module
from replicator.applier import Applier
from replicator.errors import StorageError
from replicator.protocol.events import Record, TxnBegin, TxnEnd
from replicator.storage import last_identity, open_file_storage
from replicator.tid import Z64
from tests.helpers import until
from tests.integration.test_replication import (
    assert_equal,
    make_source,
    running_primary,
    running_secondary,
    wait_equal_tid,
)
from tests.integration.zodb_workload import seal


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 256 KiB tmpfs at ``tmp_path/"disk"``; ``grow()`` gives it room."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {done.stderr.strip()}")

    def grow() -> None:
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)

    try:
        yield mount, grow
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_on_a_secondary(tmp_path, tls_dir, small_disk, caplog, monkeypatch):
    mount, grow = small_disk
    db, work = make_source(tmp_path, 60)
    assert (tmp_path / "src.fs").stat().st_size > 1 << 20  # far more than the disk holds
    monkeypatch.setattr(secondary_module, "FREE_SPACE_LOOK", 0.05)
    monkeypatch.setattr(secondary_module, "FULL_DISK_RETRY", 0.3)  # at first: no waiting for room to speak of

    def failures() -> int:
        # The secondary's own lines (the primary's log says what the secondary told it, too).
        return sum(1 for r in caplog.records
                   if r.name == "replicator.secondary" and r.getMessage().startswith("local storage failed"))

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir) as primary:
            async with running_secondary(tmp_path, tls_dir, primary.port, name="disk/dst",
                                         reconnect_min=0.05, reconnect_max=1.0) as (secondary, task):
                await until(lambda: failures() >= 3, timeout=30, what="three failed attempts")
                assert "No space left on device" in (secondary.progress.last_error or "")
                assert not task.done() and primary.fatal is None  # both keep going
                stuck = secondary.progress.applied_tid
                assert stuck < db.storage.lastTransaction()
                assert stuck == secondary.storage.lastTransaction()  # status names what it holds

                # As by default: the failed transaction is not fetched again while there is no more room.
                monkeypatch.setattr(secondary_module, "FULL_DISK_RETRY", 600.0)
                await asyncio.sleep(1.5)  # an attempt under way when the wait grew ends first
                attempts, sent = failures(), primary.bytes_sent
                await asyncio.sleep(2.0)
                assert (failures(), primary.bytes_sent) == (attempts, sent), "fetched again into a full disk"

                grow()
                await wait_equal_tid(primary, secondary, target=db.storage.lastTransaction(), timeout=30)
                assert secondary.progress.last_error is None  # the trouble is over

    with caplog.at_level(logging.INFO, logger="replicator"):
        asyncio.run(scenario())
    work.close()
    db.close()
    assert "fetching the transaction again: more room on " in caplog.text
    assert "no more room after" in caplog.text  # the first attempts, after FULL_DISK_RETRY
    # A storage problem, not a link outage: no outage warnings, and the
    # recovery is said about the storage, once.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert not [w for w in warnings if "primary" in w and ("again after" in w or "connection" in w)], warnings
    back = [w for w in warnings if "takes transactions again" in w]
    assert len(back) == 1 and f"{failures()} failed attempt" in back[0], (back, failures())
    # The primary heard why the secondary left each time, from the secondary itself: a WARNING
    # the first time, then INFO within the minute (not a warning per retry).
    told = [r for r in caplog.records if r.name == "replicator.primary"
            and "it said goodbye (error): local storage failed: " in r.getMessage()]
    assert len(told) >= 2 and [r.levelno for r in told] == [logging.WARNING] + [logging.INFO] * (len(told) - 1), \
        [(r.levelname, r.getMessage()) for r in told]
    none_left = [r.levelno for r in caplog.records if r.getMessage().startswith("no secondary is connected now")]
    assert none_left[:1] == [logging.WARNING] and set(none_left[1:]) <= {logging.INFO}, none_left
    assert assert_equal(tmp_path, "disk/dst").transactions > 0


def _txn(tid: int, prev: int, sizes: list[int]) -> list:
    return seal([TxnBegin(p64(tid), p64(prev) if prev else Z64, " ", b"", b"", b""),
                 *(Record(p64(100 + i), os.urandom(n), None) for i, n in enumerate(sizes)),
                 TxnEnd(p64(tid), bytes(16))])


def _fill(mount: Path, leave: int) -> Path:
    """Take all the disk's space but ``leave`` bytes."""
    filler = mount / "filler"
    st = os.statvfs(mount)
    with open(filler, "wb") as f:
        f.write(b"x" * (st.f_bavail * st.f_frsize - leave))
    return filler


def test_a_vote_that_fills_the_disk_leaves_no_partial_transaction(small_disk):
    """FileStorage's own clean-up of a failed vote fails on a full disk; the applier's must not.

    Its buffered file flushes before it truncates, which fails again: the
    partial transaction stayed past the end of the file, and the storage
    could not even be iterated any more ("Can't find last transaction"), so
    a secondary could not resume even once the disk had room.
    """
    mount, _ = small_disk
    path = mount / "Data.fs"
    storage = open_file_storage(str(path))
    try:
        applier = Applier(storage)
        first = _txn(0x03FF000000000001, 0, [100_000])  # its temporary file keeps that room
        assert applier.apply(first) == [first[0].tid]
        end = path.stat().st_size
        filler = _fill(mount, 8192)
        # Small records, as most are: they go through the file's buffer.
        second = _txn(0x03FF000000000002, 0x03FF000000000001, [1920, 1436, 642, 941, 221, 350, 3072, 2820])
        with pytest.raises(StorageError, match="No space left on device"):
            applier.apply(second)
        assert path.stat().st_size == end, "the failed transaction left bytes past the end"
        assert last_identity(storage).tid == first[0].tid
        filler.unlink()
        assert path.stat().st_size == end  # nothing buffered was written late
        assert applier.apply(second) == [second[0].tid]
        assert last_identity(storage).tid == second[0].tid
    finally:
        storage.close()
    storage = open_file_storage(str(path))  # opens without truncating anything (no .tr file)
    try:
        assert last_identity(storage).tid == second[0].tid
        assert [r.data for r in second[1:-1]] == [storage.load(r.oid)[0] for r in second[1:-1]]
    finally:
        storage.close()
    assert not list(mount.glob("Data.fs.tr*"))
