"""Test helpers: random ZODB workloads and a reference event stream read from a storage.

The reference stream is built straight from ZODB's FileStorage iterator, with
no code of ``replicator.storage``, so that it checks the applier and the
digest helpers instead of agreeing with them by construction.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable, Iterable

import transaction
from persistent.mapping import PersistentMapping
from ZODB import DB
from ZODB.blob import Blob, is_blob_record
from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileStorage
from ZODB.POSException import UndoError
from ZODB.utils import z64

from replicator.integrity import TxnCheck, TxnDigest, TxnHash
from replicator.protocol.events import BlobChunk, Event, Record, TxnBegin, TxnEnd

Z64 = b"\0" * 8

#: Raw transactions committed through the storage API: bytes ZODB's own
#: ``transaction`` package could not produce (not UTF-8, not a pickle).
RAW_USER = b"\xff\xfe r\xe9mi \x00"
RAW_DESCRIPTION = b"\x80\x81 not utf-8 \xc3("
RAW_EXTENSION = b"\x00\x01 arbitrary, not a pickle \xff"


def build_source(path: str, blob_dir: str | None, *, seed: int, commits: int = 40,
                 pack_at: int | None = None) -> None:
    """Commit a random workload: objects, blobs, deletions, undo, odd metadata.

    With ``pack_at``, the storage is packed after that many commits (status
    ``'p'``, back pointers into packed history) and the workload goes on.
    """
    rng = random.Random(seed)
    storage = FileStorage(path, blob_dir=blob_dir)
    db = DB(storage)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    root = conn.root()
    try:
        for i in range(commits):
            if i == pack_at:
                db.pack()
            choice = rng.random()
            if choice < 0.1:
                _raw_commit(storage, rng)
                conn.sync()  # keep the connection's view of the storage current
                continue
            txn = tm.begin()
            txn.user = rng.choice(["", "alice", "Jürgen Ødegård", "山田"])
            if rng.random() < 0.5:
                txn.note(rng.choice(["plain", "déjà vu ✓", "line one\nline two"]))
            if rng.random() < 0.5:
                txn.setExtendedInfo("seq", i)
                txn.setExtendedInfo("tags", ["x", "ÿ"])
            if choice < 0.25 and blob_dir is not None:
                key = f"blob{rng.randrange(4)}"
                if key in root and rng.random() < 0.5:
                    with root[key].open("w") as f:
                        f.write(rng.randbytes(rng.randrange(0, 5000)))
                else:
                    blob = Blob()
                    with blob.open("w") as f:
                        f.write(rng.randbytes(rng.choice([0, 1, 999, 1000, 1001, 4321])))
                    root[key] = blob
            elif choice < 0.4 and i > 3:
                undoable = [d for d in storage.undoLog(0, 20) if d.get("id")]
                if undoable:
                    db.undo(rng.choice(undoable)["id"], txn)
                    try:
                        tm.commit()
                    except UndoError:
                        tm.abort()
                    continue
            elif choice < 0.5 and len(root) > 1:
                del root[rng.choice(sorted(root.keys()))]
            else:
                key = f"obj{rng.randrange(8)}"
                if key not in root:
                    root[key] = PersistentMapping()
                root[key][f"k{rng.randrange(20)}"] = rng.randbytes(rng.randrange(1, 200))
            tm.commit()
        _fixed_undos(db, storage, tm, root, blobs=blob_dir is not None)
    finally:
        conn.close()
        db.close()


def _raw_commit(storage: FileStorage, rng: random.Random) -> None:
    meta = TransactionMetaData(RAW_USER, RAW_DESCRIPTION, RAW_EXTENSION)
    storage.tpc_begin(meta)
    oid = storage.new_oid()
    storage.store(oid, z64, b"not even a pickle " + rng.randbytes(8), "", meta)
    storage.tpc_vote(meta)
    storage.tpc_finish(meta)


def reference_stream(path: str, blob_dir: str | None, chunk: int = 1000) -> list[list[Event]]:
    """The events of every transaction of a storage, one list per transaction."""
    storage = FileStorage(path, blob_dir=blob_dir, read_only=True)
    txns = []
    try:
        prev = Z64
        for txn in storage.iterator():
            events: list[Event] = [TxnBegin(txn.tid, prev, txn.status, txn.user, txn.description,
                                            txn.extension_bytes)]
            for rec in txn:
                blob = None
                if blob_dir is not None and is_blob_record(rec.data):
                    with open(storage.loadBlob(rec.oid, rec.tid), "rb") as f:
                        blob = f.read()
                events.append(Record(rec.oid, rec.data, rec.data_txn, None if blob is None else len(blob)))
                if blob:
                    events.extend(BlobChunk(blob[i:i + chunk]) for i in range(0, len(blob), chunk))
            events.append(TxnEnd(txn.tid, b"\0" * 16))
            txns.append(seal(events))
            prev = txn.tid
    finally:
        storage.close()
    return txns


def _txn_hash(hasher: type[TxnHash], events: list[Event]) -> bytes:
    begin = events[0]
    assert isinstance(begin, TxnBegin)
    digest = hasher(begin)
    for event in events[1:-1]:
        if isinstance(event, Record):
            digest.add_record(event)
        elif isinstance(event, BlobChunk):
            digest.add_chunk(event)
    return digest.digest()


def seal(events: list[Event]) -> list[Event]:
    """Return ``events`` with its ``TxnEnd`` carrying the stream check of the events before it."""
    end = events[-1]
    assert isinstance(end, TxnEnd)
    return [*events[:-1], TxnEnd(end.tid, _txn_hash(TxnCheck, events))]


def identity_of(events: list[Event]) -> bytes:
    """The SHA-256 identity (``TxnDigest``) of one transaction's whole events, as nodes compare it."""
    return _txn_hash(TxnDigest, events)


def flatten(txns: Iterable[list[Event]]) -> list[Event]:
    return [event for txn in txns for event in txn]


def tids_of(txns: Iterable[list[Event]]) -> list[bytes]:
    return [txn[0].tid for txn in txns]


def snapshot(path: str, blob_dir: str | None) -> dict[str, str]:
    """Hashes of the Data.fs and of every file under the blob directory (temporary files too)."""
    files = {"Data.fs": _hash(path)}
    if blob_dir is not None:
        for dirpath, _dirs, names in os.walk(blob_dir):
            for name in names:
                full = os.path.join(dirpath, name)
                files[os.path.relpath(full, blob_dir)] = _hash(full)
    return files


def _hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def replace_txn(txns: list[list[Event]], index: int, change: Callable[[list[Event]], list[Event]]
                ) -> list[list[Event]]:
    """A copy of the stream with transaction ``index`` changed (and re-sealed)."""
    out = list(txns)
    out[index] = seal(change(list(txns[index])))
    return out


def _fixed_undos(db, storage, tm, root, *, blobs: bool) -> None:
    """Undos the random workload may miss: of a creation (no data) and of a blob change (back pointer)."""
    def last_id() -> bytes:
        return storage.undoLog(0, 1)[0]["id"]

    tm.begin()
    root["ghost"] = PersistentMapping({"boo": 1})
    tm.commit()
    tm.begin()
    db.undo(last_id(), tm.get())  # the ghost's creation is undone: a record without data
    tm.commit()
    if blobs:
        tm.begin()
        root["undone_blob"] = blob = Blob()
        with blob.open("w") as f:
            f.write(b"first version " * 100)
        tm.commit()
        tm.begin()
        with root["undone_blob"].open("w") as f:
            f.write(b"second version " * 100)
        tm.commit()
        tm.begin()
        db.undo(last_id(), tm.get())  # back pointer to the first version's record, blob copied
        tm.commit()
