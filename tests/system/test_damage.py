"""A damaged source Data.fs, with a real ``replicator primary`` and ``replicator secondary``.

The source is built with ZODB directly (50 transactions, blobs among them)
and closed; each test damages a copy.  Expected offsets are computed here by
walking the file format by hand (``sysutil``), not by the code under test.

What the replicator must do:

- damage inside the history: the primary ships every transaction before the
  damaged one and nothing of it, naming the file and the offset; the
  secondary keeps exactly that prefix, and its file opens cleanly.  Damage
  that stops the scan of the file's framing (a wrong redundant length)
  stops the primary with exit status 3: nothing after it can be served.
  Damage inside an old transaction's records, which the framing passes (NUL
  bytes over a data record header), leaves newer transactions to serve to
  the secondaries already past it: the primary refuses those that must read
  it, says so in its status, and goes on;
- a torn tail (the last transaction cut short): FileStorage itself treats an
  incomplete last transaction as never committed (it truncates it when the
  writer opens the file again), and a tailer cannot tell it from a vote still
  being written.  So the primary waits: it ships everything before it, nothing
  of it, does not exit, and ships what the writer appends there next;
- a secondary that already holds the whole history is never modified by a
  primary restarted on a file damaged in an old transaction.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.FileStorage import FileStorage

from replicator.verify import verify
from tests.helpers import (
    REPLICATOR,
    Proc,
    Workload,
    free_port,
    start_secondary,
    tls_args,
    wait_for_port,
    wait_until,
)
from tests.system.sysutil import (
    TxnPos,
    assert_opens_cleanly,
    data_records,
    dump_logs,
    storage_tids,
    try_status,
    walk_transactions,
)

N_TXNS = 50
DAMAGED = 30  # index (0-based) of the damaged transaction
SEED = 20240530


# -- the source -------------------------------------------------------------


def build_source(directory: Path) -> None:
    """50 committed transactions with blobs; transaction #DAMAGED has several records."""
    directory.mkdir(parents=True)
    (directory / "blobs").mkdir()
    db = ZODB.DB(FileStorage(str(directory / "Data.fs"), blob_dir=str(directory / "blobs")))
    try:
        work = Workload(db, seed=SEED)  # the root's creation, then "init"
        count = sum(1 for _ in db.storage.iterator())
        for _ in range(10 * N_TXNS):
            if count == N_TXNS:
                break
            before = db.lastTransaction()
            if count == DAMAGED:
                for j in range(4):
                    work.root["maps"][f"d{j}"] = PersistentMapping({"payload": "x" * 3000, "j": j})
                work.tm.get().note(f"txn {DAMAGED}: several records")
                work.tm.commit()
            elif count % 9 == 0:
                work.write_blob(f"b{count}", 50_000 + count * 1000)
                work.tm.get().note(f"blob {count}")
                work.tm.commit()
            elif count == N_TXNS - 1:
                for j in range(3):
                    work.root["tree"][f"last{j}"] = os.urandom(20_000)
                work.tm.get().note("the last transaction")
                work.tm.commit()
            else:
                work.commit_random(1)
            if db.lastTransaction() != before:
                count += 1
        assert count == N_TXNS, "the workload does not commit"
        work.close()
    finally:
        db.close()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("damage-source") / "orig"
    build_source(directory)
    raw = (directory / "Data.fs").read_bytes()
    txns, end = walk_transactions(raw)
    assert len(txns) == N_TXNS and end == len(raw)
    assert [t.tid for t in txns] == storage_tids(directory / "Data.fs")
    assert len(data_records(raw, txns[DAMAGED])) >= 2
    assert any(p.is_file() and p.suffix == ".blob" for p in (directory / "blobs").rglob("*"))
    return directory


def copy_source(source: Path, target: Path) -> tuple[Path, Path, bytes, list[TxnPos]]:
    shutil.copytree(source, target)
    fs = target / "Data.fs"
    for extra in target.glob("Data.fs.*"):  # index, lock: the copy is read afresh
        extra.unlink()
    raw = fs.read_bytes()
    txns, _ = walk_transactions(raw)
    return fs, target / "blobs", raw, txns


def prefix_copy(source: Path, target: Path, upto: int) -> Path:
    """A FileStorage holding the first ``upto`` transactions of ``source`` (same blobs)."""
    raw = (source / "Data.fs").read_bytes()
    txns, _ = walk_transactions(raw)
    target.mkdir(parents=True)
    path = target / "Data.fs"
    path.write_bytes(raw[:txns[upto].pos])
    return path


def pwrite(path: Path, pos: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, pos) == len(data)
    finally:
        os.close(fd)


def digest_tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` with the hash of its bytes."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# -- processes --------------------------------------------------------------


def launch_primary(workdir: Path, storage: Path, blob_dir: Path, port: int, tls_dir: Path) -> Proc:
    """Start ``replicator primary`` without waiting: on a damaged file it may exit at once."""
    argv = [REPLICATOR, "primary", "--storage", str(storage), "--blob-dir", str(blob_dir),
            "--listen", f"127.0.0.1:{port}", "--node", "primary", *tls_args(tls_dir, "primary")]
    return Proc(argv, workdir / "primary.log")


def wait_exit(proc: Proc, timeout: float) -> int | None:
    try:
        return proc.proc.wait(timeout)
    except Exception:
        return None


def secondary_tid(port: int, tls_dir: Path) -> str | None:
    status = try_status(port, tls_dir)
    return status["last_tid"] if status else None


@dataclass
class Scene:
    """A copy of the source (to damage) and a fresh secondary's paths and ports; the processes once started."""

    tmp: Path
    tls_dir: Path
    fs: Path
    blobs: Path
    raw: bytes
    txns: list[TxnPos]
    sec_fs: Path
    sec_blobs: Path
    port: int
    status_port: int
    primary: Proc | None = None
    secondary: Proc | None = None

    @property
    def tids(self) -> list[bytes]:
        return [t.tid for t in self.txns]

    def start_primary(self, wait: bool = False) -> Proc:
        self.primary = launch_primary(self.tmp, self.fs, self.blobs, self.port, self.tls_dir)
        if wait:
            wait_for_port(self.port, self.primary.proc)
        return self.primary

    def start_secondary(self) -> Proc:
        self.secondary = start_secondary(self.tmp, self.sec_fs, self.sec_blobs, self.port, self.tls_dir,
                                         status_port=self.status_port)
        return self.secondary

    def secondary_tid(self) -> str | None:
        return secondary_tid(self.status_port, self.tls_dir)


@contextlib.contextmanager
def scene(tmp_path: Path, tls_dir: Path, source: Path):
    """The scene of one test; on failure every process log is printed, and the processes always stop."""
    fs, blobs, raw, txns = copy_source(source, tmp_path / "src")
    (tmp_path / "sec").mkdir()
    s = Scene(tmp_path, tls_dir, fs, blobs, raw, txns, tmp_path / "sec" / "Data.fs", tmp_path / "sec" / "blobs",
              free_port(), free_port())
    try:
        yield s
    except BaseException:
        dump_logs(tmp_path)
        raise
    finally:
        for proc in (s.secondary, s.primary):
            if proc is not None:
                proc.stop()


# -- damage inside the history -----------------------------------------------


def damage_nul_record(fs: Path, raw: bytes, txns: list[TxnPos]) -> set[int]:
    """NUL bytes from the middle of record 0's pickle to the middle of record 1's.

    Record 1's header is zeroed, which the framing check sees; the offsets an
    operator may be given are the transaction's or that record's.
    """
    txn = txns[DAMAGED]
    r0, r1 = data_records(raw, txn)[:2]
    start = r0.pos + 42 + max(1, r0.plen // 2)
    end = r1.pos + 42 + max(1, r1.plen // 2)
    pwrite(fs, start, b"\0" * (end - start))
    return {txn.pos, r1.pos}


def damage_redundant_length(fs: Path, raw: bytes, txns: list[TxnPos]) -> set[int]:
    txn = txns[DAMAGED]
    pwrite(fs, txn.pos + txn.tlen, struct.pack(">Q", txn.tlen + 4096))
    return {txn.pos}


class KnownBug(AssertionError):
    """A check that once failed because of a bug since fixed (its message says which behaviour):
    a failure like any other, named so that a return of the bug reads as one."""


@pytest.mark.parametrize("damage", [
    pytest.param(damage_nul_record, id="nul-over-records"),
    pytest.param(damage_redundant_length, id="redundant-length"),
])
def test_damage_in_history_is_named_and_the_secondary_keeps_the_prefix(tmp_path, tls_dir, source, damage):
    with scene(tmp_path, tls_dir, source) as sc:
        tids, sec_fs, sec_blobs = sc.tids, sc.sec_fs, sc.sec_blobs
        expected_offsets = damage(sc.fs, sc.raw, sc.txns)
        primary = sc.start_primary()
        secondary = sc.start_secondary()
        if damage is damage_redundant_length:  # the framing breaks: nothing after it can be served
            rc = wait_exit(primary, 30)
            assert rc == 3, f"primary exit status {rc}"
        else:  # an old transaction's records: the newer ones still go to secondaries past it
            wait_until(lambda: "cannot get past it" in primary.output() or not primary.alive(), timeout=30,
                       what="the primary refusing the secondary at the damage")
            assert primary.alive(), primary.output()[-2000:]
            status = try_status(sc.port, tls_dir)
            assert status and f"{sc.fs}: damaged at offset" in (status["error"] or ""), status
            assert status["refusals"].get("corrupted", 0) >= 1, status
        output = primary.output()
        named = [off for off in expected_offsets if f"{sc.fs}: damaged at offset {off}" in output]
        assert named, f"the primary's output names neither {sc.fs} nor offsets {sorted(expected_offsets)}"

        # The secondary keeps retrying and never touches what it holds.
        want = tids[DAMAGED - 1].hex()
        try:
            wait_until(lambda: sc.secondary_tid() == want, timeout=5, what="secondary holding the prefix")
        except TimeoutError:
            pass  # asserted on the file below
        before = sec_fs.read_bytes()
        time.sleep(1.0)
        assert secondary.alive(), "the secondary must keep retrying, not exit"
        assert sec_fs.read_bytes() == before
        assert secondary.stop() == 0
        assert sec_fs.read_bytes() == before

        # Nothing of the damaged transaction or after it, and what it holds is the original's.
        got = assert_opens_cleanly(sec_fs, tmp_path / "scratch")
        assert got == tids[:len(got)] and len(got) <= DAMAGED, "the secondary holds a transaction it must not"
        if got:
            prefix = prefix_copy(source, tmp_path / "prefix-got", len(got))
            result = verify(str(prefix), str(sec_fs), str(source / "blobs"), str(sec_blobs))
            assert result.equal, result

        # ... and it is the whole prefix.
        if len(got) != DAMAGED:
            raise KnownBug(f"the secondary holds {len(got)} transactions, not the {DAMAGED} before the damage")
        prefix = prefix_copy(source, tmp_path / "prefix", DAMAGED)
        result = verify(str(prefix), str(sec_fs), str(source / "blobs"), str(sec_blobs))
        assert result.equal, result
        result = verify(str(source / "Data.fs"), str(sec_fs), str(source / "blobs"), str(sec_blobs))
        assert (result.kind, result.missing_in, result.missing) == ("missing", "B", N_TXNS - DAMAGED), result
        assert result.last_common_tid == tids[DAMAGED - 1]


# -- a torn tail ---------------------------------------------------------------


def staged_last(raw: bytes, last: TxnPos) -> bytes:
    """The file with the last transaction's status back at 'c', as FileStorage writes it at vote."""
    staged = bytearray(raw)
    staged[last.pos + 16:last.pos + 17] = b"c"
    return bytes(staged)


@pytest.mark.parametrize("cut", ["in-header", "vote-in-progress"])
def test_uncommitted_tail_waits_then_ships_the_finished_commit(tmp_path, tls_dir, source, cut):
    """The last transaction still being written (status 'c', or its header cut): wait, then ship it."""
    with scene(tmp_path, tls_dir, source) as sc:
        fs, tids, last = sc.fs, sc.tids, sc.txns[-1]
        offset = last.pos + 10 if cut == "in-header" else last.pos + last.tlen // 2
        staged = staged_last(sc.raw, last)
        fs.write_bytes(staged[:offset])
        primary = sc.start_primary(wait=True)
        secondary = sc.start_secondary()
        wait_until(lambda: sc.secondary_tid() == tids[-2].hex(), timeout=20,
                   what="secondary holding everything before the tail")
        time.sleep(1.0)
        assert primary.alive(), "the primary must wait at an uncommitted tail"
        pstatus = try_status(sc.port, tls_dir)
        assert pstatus["last_tid"] == tids[-2].hex() and pstatus["transactions"] == N_TXNS - 1, pstatus
        assert sc.secondary_tid() == tids[-2].hex()

        # The writer finishes: the rest of the transaction (voted, status 'c': still not to be
        # shipped, whole as it is), then the status flip.
        with open(fs, "ab") as fh:
            fh.write(staged[offset:])
        time.sleep(1.0)
        pstatus = try_status(sc.port, tls_dir)
        assert pstatus["last_tid"] == tids[-2].hex(), pstatus
        assert sc.secondary_tid() == tids[-2].hex(), "a voted, unfinished transaction was shipped"
        pwrite(fs, last.pos + 16, b" ")
        assert fs.read_bytes() == sc.raw
        wait_until(lambda: sc.secondary_tid() == tids[-1].hex(), timeout=20,
                   what="secondary holding the finished transaction")
        assert secondary.stop() == 0
        assert primary.stop() == 0
        assert assert_opens_cleanly(sc.sec_fs, tmp_path / "scratch") == tids
        result = verify(str(source / "Data.fs"), str(sc.sec_fs), str(source / "blobs"), str(sc.sec_blobs))
        assert result.equal, result


def test_torn_committed_tail_waits_and_ships_nothing_of_it(tmp_path, tls_dir, source):
    """The file cut in the middle of its last transaction, status byte still ' '.

    A power loss can leave this; the writer's FileStorage truncates it when
    it opens the file and writes its next commit there.  The tailer must not
    ship it, must not stop, and must ship that next commit.
    """
    with scene(tmp_path, tls_dir, source) as sc:
        fs, blobs, tids, last = sc.fs, sc.blobs, sc.tids, sc.txns[-1]
        assert sc.raw[last.pos + 16:last.pos + 17] == b" "
        with open(fs, "r+b") as fh:
            fh.truncate(last.pos + last.tlen // 2)
        primary = sc.start_primary()
        secondary = sc.start_secondary()
        try:
            wait_until(lambda: sc.secondary_tid() == tids[-2].hex() or not primary.alive(),
                       timeout=15, what="secondary holding everything before the torn tail")
            time.sleep(1.0)
        except TimeoutError:
            pass
        if not primary.alive():
            raise KnownBug(f"the primary stopped at a torn tail (exit status {primary.proc.returncode}); "
                           f"the secondary holds up to {sc.secondary_tid()}")
        assert sc.secondary_tid() == tids[-2].hex()

        # The writer opens the file again (FileStorage truncates the torn
        # transaction) and commits a new one in its place.
        db = ZODB.DB(FileStorage(str(fs), blob_dir=str(blobs)))
        try:
            conn = db.open()
            conn.root()["after-repair"] = "yes"
            transaction.commit()
            conn.close()
            new_tid = db.lastTransaction()
        finally:
            db.close()
        assert new_tid > tids[-2]
        wait_until(lambda: sc.secondary_tid() == new_tid.hex(), timeout=20,
                   what="secondary holding the commit after the repair")
        assert secondary.stop() == 0
        assert primary.stop() == 0
        got = assert_opens_cleanly(sc.sec_fs, tmp_path / "scratch")
        assert got == tids[:-1] + [new_tid]
        result = verify(str(fs), str(sc.sec_fs), str(blobs), str(sc.sec_blobs))
        assert result.equal, result


# -- an up-to-date secondary meets a damaged primary ---------------------------


@pytest.mark.parametrize("damage", [
    pytest.param(damage_nul_record, id="nul-over-records"),
    pytest.param(damage_redundant_length, id="redundant-length"),
])
def test_up_to_date_secondary_is_untouched_by_damaged_primary(tmp_path, tls_dir, source, damage):
    with scene(tmp_path, tls_dir, source) as sc:
        tids, sec_fs, sec_blobs = sc.tids, sc.sec_fs, sc.sec_blobs
        primary = sc.start_primary(wait=True)
        secondary = sc.start_secondary()
        wait_until(lambda: sc.secondary_tid() == tids[-1].hex(), timeout=30,
                   what="secondary holding the whole history")
        # kill -9: the primary dies as it would in a crash, with the session open
        primary.kill9()
        before_fs, before_blobs = sec_fs.read_bytes(), digest_tree(sec_blobs)

        # The same file, now damaged in an old transaction, served again.
        damage(sc.fs, sc.raw, sc.txns)
        primary = sc.start_primary()
        rc = wait_exit(primary, 3.0)
        if rc is None:  # it serves: let the secondary connect and idle a while
            wait_until(lambda: (try_status(sc.status_port, tls_dir) or {}).get("connected"), timeout=20,
                       what="secondary reconnected to the restarted primary")
            time.sleep(1.5)
            rc = primary.proc.poll()
        else:
            time.sleep(1.0)  # the secondary retries against a closed port meanwhile
        assert rc in (None, 3), f"primary exit status {rc}"
        assert secondary.alive(), "the secondary must not stop"
        status = try_status(sc.status_port, tls_dir)
        assert status["last_tid"] == tids[-1].hex(), status
        assert sec_fs.read_bytes() == before_fs
        assert secondary.stop() == 0
        assert sec_fs.read_bytes() == before_fs, "the secondary's Data.fs changed"
        assert digest_tree(sec_blobs) == before_blobs, "the secondary's blobs changed"
        assert assert_opens_cleanly(sec_fs, tmp_path / "scratch") == tids
        result = verify(str(source / "Data.fs"), str(sec_fs), str(source / "blobs"), str(sec_blobs))
        assert result.equal, result
