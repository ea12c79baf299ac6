"""Helpers of the system tests: the Data.fs layout walked by hand, /status over mutual TLS, logs.

The layout is decoded here independently of ``replicator.fsformat``, so the
offsets the tests expect are not computed by the code under test.
"""

from __future__ import annotations

import http.client
import json
import shutil
import ssl
import struct
from dataclasses import dataclass
from pathlib import Path

from ZODB.FileStorage import FileStorage

MAGIC_LEN = 4
TXN_HDR = struct.Struct(">8sQcHHH")  # tid, tlen, status, ulen, dlen, elen: 23 bytes
DATA_HDR = struct.Struct(">8s8sQQHQ")  # oid, tid, prev, tloc, vlen, plen: 42 bytes
COMMITTED = (b" ", b"p", b"u")


@dataclass(frozen=True)
class TxnPos:
    pos: int
    tid: bytes
    tlen: int
    status: bytes
    header_end: int

    @property
    def end(self) -> int:
        """Offset of the next transaction (after the redundant length)."""
        return self.pos + self.tlen + 8


@dataclass(frozen=True)
class DataPos:
    pos: int
    oid: bytes
    plen: int

    @property
    def end(self) -> int:
        return self.pos + DATA_HDR.size + (self.plen if self.plen else 8)


def walk_transactions(raw: bytes) -> tuple[list[TxnPos], int]:
    """Committed, complete transactions of a Data.fs image, and the offset where they end.

    Stops at the first transaction that is not committed or not complete
    (what FileStorage itself would truncate on open); raises AssertionError on
    damage before that point.
    """
    assert raw[:MAGIC_LEN] in (b"FS21", b"FS30"), raw[:MAGIC_LEN]
    pos, txns, last_tid = MAGIC_LEN, [], b"\0" * 8
    while pos + TXN_HDR.size <= len(raw):
        tid, tlen, status, ulen, dlen, elen = TXN_HDR.unpack_from(raw, pos)
        if status not in COMMITTED or pos + tlen + 8 > len(raw):
            break
        assert tid > last_tid, f"tid order broken at {pos}"
        (redundant,) = struct.unpack_from(">Q", raw, pos + tlen)
        assert redundant == tlen, f"redundant length mismatch at {pos}"
        txns.append(TxnPos(pos, tid, tlen, status, pos + TXN_HDR.size + ulen + dlen + elen))
        last_tid, pos = tid, pos + tlen + 8
    return txns, pos


def data_records(raw: bytes, txn: TxnPos) -> list[DataPos]:
    records, pos = [], txn.header_end
    while pos < txn.pos + txn.tlen:
        oid, tid, prev, tloc, vlen, plen = DATA_HDR.unpack_from(raw, pos)
        assert tid == txn.tid and tloc == txn.pos, f"bad data record at {pos}"
        rec = DataPos(pos, oid, plen)
        records.append(rec)
        pos = rec.end
    assert pos == txn.pos + txn.tlen
    return records


def storage_tids(path: Path) -> list[bytes]:
    """TIDs of every transaction, through ZODB's own iterator (read-only)."""
    storage = FileStorage(str(path), read_only=True)
    try:
        return [t.tid for t in storage.iterator()]
    finally:
        storage.close()


def assert_opens_cleanly(path: Path, scratch: Path) -> list[bytes]:
    """The file is one FileStorage could have written, crash included; return its TIDs.

    Everything up to the last committed transaction must pass ZODB's
    ``fstest``; after it only an uncommitted tail may follow (a vote that
    never finished: status ``c``, or a header still being written), which
    FileStorage truncates when it opens the file for writing.  Then the file
    opens read-only and every record of every transaction loads, and a
    writable FileStorage opened on a copy recovers to the same history.
    """
    from ZODB.scripts.fstest import check

    from replicator.storage import open_file_storage

    raw = path.read_bytes()
    txns, committed_end = walk_transactions(raw)
    tail = raw[committed_end:]
    if tail:
        assert len(tail) < TXN_HDR.size or tail[16:17] == b"c", (
            f"{path}: {len(tail)} bytes after the last committed transaction are not an uncommitted vote")
    scratch.mkdir(parents=True, exist_ok=True)
    trimmed = scratch / "fstest.fs"
    trimmed.write_bytes(raw[:committed_end])
    check(str(trimmed))

    # Opened as the replicator opens it: ZODB alone would report the TID of
    # a vote cut short by the kill as the last one (see storage.py).
    storage = open_file_storage(str(path), read_only=True)
    try:
        tids = []
        for txn in storage.iterator():
            tids.append(txn.tid)
            for record in txn:
                if record.data is not None:
                    storage.loadSerial(record.oid, record.tid)
        assert storage.lastTransaction() == (tids[-1] if tids else b"\0" * 8)
    finally:
        storage.close()
    assert tids == [t.tid for t in txns]
    assert len(set(tids)) == len(tids)

    copy = scratch / "writable.fs"
    shutil.copyfile(path, copy)
    storage = FileStorage(str(copy))
    try:
        assert [t.tid for t in storage.iterator()] == tids
    finally:
        storage.close()
    for leftover in scratch.iterdir():
        if leftover.is_file():
            leftover.unlink()
    return tids


def get_status(port: int, tls_dir: Path, timeout: float = 5.0) -> dict:
    """GET /status of a primary or secondary over mutual TLS."""
    ctx = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
    ctx.load_cert_chain(str(tls_dir / "tertiary.pem"), str(tls_dir / "tertiary.key"))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=timeout)
    try:
        conn.request("GET", "/status")
        response = conn.getresponse()
        assert response.status == 200, response.status
        return json.loads(response.read())
    finally:
        conn.close()


def try_status(port: int, tls_dir: Path) -> dict | None:
    try:
        return get_status(port, tls_dir, timeout=2.0)
    except (OSError, http.client.HTTPException):
        return None


def dump_logs(workdir: Path) -> None:
    """Print every process log under ``workdir`` (pytest shows it when the test fails)."""
    for log in sorted(workdir.glob("*.log")):
        print(f"\n===== {log.name} =====")
        try:
            print(log.read_text(errors="replace")[-30000:])
        except OSError as exc:
            print(f"(cannot read: {exc})")
