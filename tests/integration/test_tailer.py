"""The tailer against real FileStorage files, checked against ZODB's own iterator.

ZODB's ``FileStorage.iterator()`` is the reference for what a transaction
contains; the tailer must agree with it field by field, and must hold back
what FileStorage has not committed, whatever the writer is doing meanwhile.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from dataclasses import dataclass, field

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob
from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileStorage
from ZODB.utils import z64

from replicator import tailer as tailer_module
from replicator.errors import (
    ConfigError,
    CorruptedSourceError,
    DivergenceError,
    MissingBlobError,
    SourceReplacedError,
    SourceRewrittenError,
)
from replicator.integrity import TxnCheck, TxnDigest
from replicator.protocol.events import MAX_BLOB_CHUNK, BlobChunk, Record, TxnBegin, TxnEnd
from replicator.tailer import Tailer
from replicator.tid import Z64, tid_repr


@dataclass
class Txn:
    begin: TxnBegin
    records: list[tuple[Record, bytes | None]] = field(default_factory=list)
    end: TxnEnd | None = None


def group(events, txns=None):
    """Assemble events into transactions, checking the stream's grammar."""
    txns = [] if txns is None else txns
    for ev in events:
        if isinstance(ev, TxnBegin):
            assert not txns or txns[-1].end is not None
            txns.append(Txn(ev))
        elif isinstance(ev, Record):
            assert txns[-1].end is None
            txns[-1].records.append((ev, b"" if ev.blob_size is not None else None))
        elif isinstance(ev, BlobChunk):
            assert 0 < len(ev.data) <= MAX_BLOB_CHUNK
            rec, blob = txns[-1].records[-1]
            txns[-1].records[-1] = (rec, blob + ev.data)
        else:
            assert isinstance(ev, TxnEnd) and ev.tid == txns[-1].begin.tid
            txns[-1].end = ev
    return txns


def drain(tailer, max_bytes=4 << 20):
    """Every transaction available now, and the error that stopped the reading, if any."""
    txns: list[Txn] = []
    while True:
        try:
            events = tailer.read_events(max_bytes)
        except (CorruptedSourceError, DivergenceError, ConfigError) as error:
            return txns, error
        if not events:
            return txns, None
        group(events, txns)


def reference(path, blob_dir=None):
    """ZODB's own view: (tid, status, user, descr, ext, pos, [(oid, data, data_txn, blob)])."""
    fs = FileStorage(path, read_only=True, blob_dir=blob_dir)
    try:
        out = []
        for t in fs.iterator():
            recs = []
            for r in t:
                blob = None
                if blob_dir and r.data and fs.is_blob_record(r.data):
                    with open(fs.loadBlob(r.oid, t.tid), "rb") as f:
                        blob = f.read()
                recs.append((r.oid, r.data, r.data_txn, blob))
            out.append((t.tid, t.status, t.user, t.description, t.extension_bytes, t._tpos, recs))
        return out
    finally:
        fs.close()


def digest_of(ref_txn, prev_tid, hasher=TxnDigest):
    tid, status, user, descr, ext, _, recs = ref_txn
    d = hasher(TxnBegin(tid, prev_tid, status, user, descr, ext))
    for oid, data, data_txn, blob in recs:
        d.add_record(Record(oid, data, data_txn, None if blob is None else len(blob)))
        if blob:
            d.add_blob_bytes(blob)
    return d.digest()


def commit(root, key, value, note=""):
    root[key] = value
    txn = transaction.get()
    if note:
        txn.note(note)
        txn.setUser("alice")
        txn.setExtendedInfo("why", note)
    txn.commit()


@pytest.fixture
def history(tmp_path):
    """A closed FileStorage with plain, undo, redo, blob and undone-creation transactions."""
    path, blobs = str(tmp_path / "Data.fs"), str(tmp_path / "blobs")
    db = ZODB.DB(FileStorage(path, blob_dir=blobs))
    conn = db.open()
    root = conn.root()
    for i in range(4):
        commit(root, f"k{i}", PersistentMapping(v=i), note=f"txn {i}")
    commit(root, "blob", Blob(b"hello"))
    with root["blob"].open("w") as f:
        f.write(b"world")
    transaction.commit()
    for _ in range(2):  # undo the blob change, then undo that undo: back pointer chains
        db.undo(db.undoLog(0, 1)[0]["id"])
        transaction.commit()
    commit(root, "gone", PersistentMapping())
    db.undo(db.undoLog(0, 1)[0]["id"])  # undo of a creation: a record without data
    transaction.commit()
    conn.close()
    db.close()
    return path, blobs


def test_matches_zodb_iterator_and_digests(history):
    path, blobs = history
    ref = reference(path, blobs)
    with Tailer(path, blobs) as tailer:
        txns, error = drain(tailer, max_bytes=100)  # tiny budget: cursor inside transactions
        assert error is None
        assert len(txns) == len(ref)
        prev = Z64
        for got, want in zip(txns, ref, strict=True):
            tid, status, user, descr, ext, _, recs = want
            b = got.begin
            assert (b.tid, b.prev_tid, b.status, b.user, b.description, b.extension) == (
                tid, prev, status, user, descr, ext)
            assert [(r.oid, r.data, r.data_txn, blob) for r, blob in got.records] == recs
            # The stream carries the check; the identity nodes compare is the SHA-256 digest.
            assert got.end.digest == digest_of(want, prev, TxnCheck)
            assert tailer.digest_of(tid) == digest_of(want, prev) != got.end.digest
            prev = tid
        assert tailer.last_tid == prev
        assert tailer.head() == (prev, len(ref))
        assert tailer.read_events() == []
        kinds = {(r.data is None, r.data_txn is not None, blob is not None)
                 for t in txns for r, blob in t.records}
        # plain, blob, undone blob (back pointer to blob data), undone creation
        assert {(False, False, False), (False, False, True), (False, True, True),
                (True, False, False)} <= kinds


def test_plain_transactions_take_a_shortcut_with_the_same_events(history, monkeypatch):
    """Plain transactions are read in one go (``_plain_txn``); the events must be the careful path's."""
    path, blobs = history

    def events(budget):
        with Tailer(path, blobs) as tailer:
            out = []
            while batch := tailer.read_events(budget):
                out += batch
        return out

    fast = events(1 << 20)
    taken = []
    plain_txn = Tailer._plain_txn
    # Every transaction through the careful path, noting what the shortcut would have given.
    monkeypatch.setattr(Tailer, "_plain_txn", lambda self, h: taken.append(plain_txn(self, h)))
    assert events(1 << 20) == fast
    looked, shortcut = len(taken), [t for t in taken if t is not None]
    assert events(100) == fast
    # The plain ones took it; blobs, undos and the undone creation did not.
    assert 0 < len(shortcut) < looked == len(reference(path, blobs))
    assert all(not isinstance(e, Record) or (e.data_txn is None and e.blob_size is None)
               for t in shortcut for e in t)


def test_seek_after_and_divergence(history):
    path, blobs = history
    ref = reference(path, blobs)
    with Tailer(path, blobs) as tailer:
        tailer.seek_after(ref[3][0])
        txns, _ = drain(tailer)
        assert [t.begin.tid for t in txns] == [r[0] for r in ref[4:]]
        assert txns[0].begin.prev_tid == ref[3][0]
        tailer.seek_after(Z64)
        assert len(drain(tailer)[0]) == len(ref)
        missing = (int.from_bytes(ref[5][0], "big") + 1).to_bytes(8, "big")
        with pytest.raises(DivergenceError) as info:
            tailer.seek_after(missing)
        assert info.value.fork_tid == ref[5][0]
        assert ref[5][0].hex() in str(info.value)
        assert tailer.digest_of(missing) is None


def test_seek_through_many_transactions(tmp_path):
    """More transactions than the index keeps marks for: lookups walk from a mark."""
    path = str(tmp_path / "Data.fs")
    fs = FileStorage(path)
    tids = [_raw_commit(fs, b"x%d" % i) for i in range(700)]
    fs.close()
    with Tailer(path) as tailer:
        assert tailer.head() == (tids[-1], 700)
        for i in (0, 255, 256, 257, 511, 699):
            tailer.seek_after(tids[i])
            events = tailer.read_events(max_bytes=1)
            if i + 1 < len(tids):
                assert (events[0].prev_tid, events[0].tid) == (tids[i], tids[i + 1])
            else:
                assert events == []
            assert tailer.digest_of(tids[i]) is not None


def test_a_second_reader_of_an_open_file_starts_from_its_scan(tmp_path):
    """A primary's sessions each open the file: they start from the furthest scan of a reader
    that still has it open, and answer as a scan of their own would; a closed reader's scan or
    another file's (a pack's new inode at the same path) is not taken."""
    from replicator.fsfile import FIRST_POS, SourceFile

    path = str(tmp_path / "Data.fs")
    fs = FileStorage(path)
    tids = [_raw_commit(fs, b"x%d" % i) for i in range(600)]
    first = SourceFile(path)
    first.scan()
    assert (first.scan_tid, first.count) == (tids[-1], 600)
    tids += [_raw_commit(fs, b"y%d" % i) for i in range(100)]
    first.scan()

    second = SourceFile(path)
    assert (second.scan_pos, second.scan_tid, second.count) == (first.scan_pos, tids[-1], 700)
    assert second.marks == first.marks and second.marks is not first.marks
    tids += [_raw_commit(fs, b"z%d" % i) for i in range(10)]  # it goes on from there by itself
    fs.close()
    second.scan()
    assert (second.scan_tid, second.count) == (tids[-1], 710)

    first.close()
    third = SourceFile(path)  # from `second`, which went further
    assert third.scan_tid == tids[-1]
    second.close()
    alone = SourceFile(path)  # the reader that scanned furthest closed the file: a scan of its own
    assert (alone.scan_pos, alone.count, alone.marks) == (FIRST_POS, 0, [])
    alone.scan()
    for reader in (third, alone):
        reader.scan()
        assert reader.counts_up_to([Z64, tids[0], tids[255], tids[256], tids[-1]]) == [0, 1, 256, 257, 710]
        assert reader.find(tids[300])[1] == tids[299]
        assert reader.successor(tids[511]).tid == tids[512]

    # The same path, another inode (as a pack leaves it): nothing of the old file's scan.
    shutil.copyfile(path, path + ".new")
    os.replace(path + ".new", path)
    other = SourceFile(path)
    assert other.ident != third.ident
    assert (other.scan_pos, other.count) == (FIRST_POS, 0)
    other.scan()
    assert (other.scan_tid, other.count) == (tids[-1], 710)
    for reader in (third, alone, other):
        reader.close()


def _raw_commit(fs, data, *, finish=True, oid=None):
    """Commit one record through the storage API, or stop after the vote."""
    t = TransactionMetaData()
    fs.tpc_begin(t)
    fs.store(oid or fs.new_oid(), z64, data, "", t)
    fs.tpc_vote(t)
    if not finish:
        return t
    return fs.tpc_finish(t)


def test_voted_transaction_is_held_back_until_finish(tmp_path):
    path = str(tmp_path / "Data.fs")
    fs = FileStorage(path)
    try:
        first = _raw_commit(fs, b"first")
        with Tailer(path) as tailer:
            assert [t.begin.tid for t in drain(tailer)[0]] == [first]
            t = _raw_commit(fs, b"voted" * 100, finish=False)
            assert tailer.read_events() == []
            assert not tailer.wait(0.05)
            tid = fs.tpc_finish(t)
            start = time.monotonic()
            assert tailer.wait(2)
            assert time.monotonic() - start < 0.5
            txns, error = drain(tailer)
            assert error is None and [x.begin.tid for x in txns] == [tid]
            assert txns[0].records[0][0].data == b"voted" * 100
    finally:
        fs.close()


def test_transaction_being_written_is_held_back(ten):
    """Replay the writer's appends a few bytes at a time: nothing shows until the status flips."""
    path, spans = ten
    _, pos, tlen = spans[-1]
    raw = bytearray(_read(path, pos, tlen + 8))
    raw[16:17] = b"c"
    os.truncate(path, pos)
    with Tailer(path) as tailer:
        assert len(drain(tailer)[0]) == 9
        with open(path, "ab", buffering=0) as f:
            for i in range(0, len(raw), 7):
                f.write(raw[i:i + 7])
                assert tailer.read_events() == []
        assert tailer.head() == (spans[8][0], 9)
        _patch(path, pos + 16, b" ")
        assert tailer.wait(1)
        txns, error = drain(tailer)
        assert error is None and [t.begin.tid for t in txns] == [spans[9][0]]


def test_aborted_vote(tmp_path):
    path = str(tmp_path / "Data.fs")
    fs = FileStorage(path)
    try:
        first = _raw_commit(fs, b"first")
        with Tailer(path) as tailer:
            drain(tailer)
            t = _raw_commit(fs, b"big" * 1000, finish=False)
            assert tailer.read_events() == []
            fs.tpc_abort(t)  # truncates the file back to our position
            assert tailer.read_events() == []
            second = _raw_commit(fs, b"small")
            txns, error = drain(tailer)
            assert error is None
            assert [(x.begin.tid, x.begin.prev_tid) for x in txns] == [(second, first)]
    finally:
        fs.close()


WRITER = textwrap.dedent("""
    import sys, time
    from ZODB.FileStorage import FileStorage
    from ZODB.Connection import TransactionMetaData
    from ZODB.utils import z64
    fs = FileStorage(sys.argv[1])
    for i in range(int(sys.argv[2])):
        if sys.argv[3] == "aborts" and i % 2:  # a vote that is then aborted
            t = TransactionMetaData()
            fs.tpc_begin(t)
            fs.store(fs.new_oid(), z64, b"aborted" * (50 * (i % 5)), "", t)
            fs.tpc_vote(t)
            time.sleep(0.005)
            fs.tpc_abort(t)
        t = TransactionMetaData(description=b"n%d" % i)
        fs.tpc_begin(t)
        fs.store(fs.new_oid(), z64, b"data %d" % i * (1 + i % 7) * 100, "", t)
        fs.tpc_vote(t)
        tid = fs.tpc_finish(t)
        print(tid.hex(), time.time(), flush=True)
        time.sleep(0.02)
    fs.close()
""")


@pytest.mark.parametrize("mode", ["commits", "aborts"])
def test_follows_another_process(tmp_path, mode):
    """Every commit is seen, in order, quickly; aborted votes never show up."""
    path = str(tmp_path / "Data.fs")
    FileStorage(path).close()
    n = 40
    with Tailer(path) as tailer:
        writer = subprocess.Popen([sys.executable, "-c", WRITER, path, str(n), mode],
                                  stdout=subprocess.PIPE, text=True)
        seen: dict[bytes, float] = {}
        txns: list[Txn] = []
        deadline = time.monotonic() + 30
        while len(seen) < n and time.monotonic() < deadline:
            if tailer.wait(1.0):
                for t in group(tailer.read_events(), []):
                    seen[t.begin.tid] = time.time()
                    txns.append(t)
        out, _ = writer.communicate(timeout=30)
        assert writer.returncode == 0
    committed = [(bytes.fromhex(line.split()[0]), float(line.split()[1]))
                 for line in out.splitlines()]
    assert [tid for tid, _ in committed] == [t.begin.tid for t in txns]
    lags = sorted(seen[tid] - when for tid, when in committed)
    assert lags[len(lags) // 2] < 0.1 and lags[-1] < 1.0, lags
    ref = reference(path)
    assert [[r[1] for r in x[6]] for x in ref] == [[r.data for r, _ in t.records] for t in txns]


def test_pack_while_following(tmp_path):
    path = str(tmp_path / "Data.fs")
    db = ZODB.DB(FileStorage(path))
    conn = db.open()
    root = conn.root()
    try:
        for i in range(3):
            commit(root, "obj", PersistentMapping(v=i))
        # A big transaction, read across several calls
        for i in range(20):
            root[f"big{i}"] = PersistentMapping(payload="x" * 100_000)
        transaction.commit()
        with Tailer(path) as tailer:
            txns = group(tailer.read_events(max_bytes=1))
            while txns[-1].begin.tid != db.lastTransaction():
                group(tailer.read_events(max_bytes=1), txns)
            assert txns[-1].end is None  # inside the big transaction
            inode = os.stat(path).st_ino
            db.pack(time.time() + 1)
            assert os.stat(path).st_ino != inode
            txns = group(tailer.read_events(max_bytes=10 << 20), txns)
            assert txns[-1].end is not None and len(txns[-1].records) == 21
            last = tailer.last_tid
            commit(root, "after", PersistentMapping())
            after, error = drain(tailer)
            assert error is None
            assert [(t.begin.prev_tid, t.begin.tid) for t in after] == [(last, db.lastTransaction())]
            assert after[0].begin.status == " "
            assert tailer.head()[0] == db.lastTransaction()
    finally:
        conn.close()
        db.close()


def test_a_look_older_than_the_read_is_not_taken_for_a_truncation_or_a_pack(tmp_path):
    """The primary's poller offers the stat of its last look, which a session that caught up
    on its own may have read past, or which may be of the file a pack has since replaced.
    That stat's smaller size, or other inode, is its age: the tailer reads on in the file it
    follows, without reopening it and scanning it again from the start."""
    path = str(tmp_path / "Data.fs")
    db = ZODB.DB(FileStorage(path))
    conn = db.open()
    root = conn.root()
    try:
        for i in range(5):
            commit(root, f"k{i}", PersistentMapping(v=i))
        stale = os.stat(path)
        for i in range(5):
            commit(root, f"later{i}", PersistentMapping(v=i))
        with Tailer(path) as tailer:
            drain(tailer)
            followed = tailer._src
            commit(root, "new", PersistentMapping())
            tailer.offer_stat(stale)  # smaller than what was read
            assert tailer.pending_bytes() == os.path.getsize(path) - tailer._pos
            tailer.offer_stat(stale)
            txns = group(tailer.read_events())
            assert [t.begin.tid for t in txns] == [db.lastTransaction()]
            assert tailer._src is followed  # not reopened, not scanned again

            before_pack = os.stat(path)
            db.pack(time.time() + 1)
            commit(root, "after the pack", PersistentMapping())
            assert [t.begin.tid for t in drain(tailer)[0]] == [db.lastTransaction()]
            packed = tailer._src
            assert packed is not followed
            commit(root, "one more", PersistentMapping())
            tailer.offer_stat(before_pack)  # the replaced file's
            txns = group(tailer.read_events())
            assert [t.begin.tid for t in txns] == [db.lastTransaction()]
            assert tailer._src is packed
    finally:
        conn.close()
        db.close()


def test_pack_dropping_our_position_continues_after_it(tmp_path):
    """A pack may drop the transaction we stand on; the packed region goes on past it."""
    path = str(tmp_path / "Data.fs")
    db = ZODB.DB(FileStorage(path))
    conn = db.open()
    root = conn.root()
    try:
        commit(root, "obj", PersistentMapping())
        root["obj"]["v"] = 1
        transaction.commit()  # touches only obj: dropped by a pack once superseded
        dropped = db.lastTransaction()
        root["obj"]["v"] = 2
        transaction.commit()
        last = db.lastTransaction()
        with Tailer(path) as tailer:
            tailer.seek_after(dropped)
            db.pack(time.time() + 1)
            events = tailer.read_events()
            begin = events[0]
            assert isinstance(begin, TxnBegin)
            assert (begin.tid, begin.prev_tid, begin.status) == (last, dropped, "p")
    finally:
        conn.close()
        db.close()


def commit_orphans(db, count: int) -> bytes:
    """Commit objects nothing refers to: a pack drops their transactions whole."""
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    for _ in range(count):
        conn.add(PersistentMapping())
        tm.commit()
    conn.close()
    return db.lastTransaction()


def test_pack_up_to_now_dropping_our_newest_continues_after_it(tmp_path):
    """Packed up to now, our transaction and all before it since the last kept one go; commits follow."""
    path = str(tmp_path / "Data.fs")
    db = ZODB.DB(FileStorage(path))
    conn = db.open()
    try:
        commit(conn.root(), "a", 1)
        ours = commit_orphans(db, 3)
        with Tailer(path) as tailer:
            tailer.seek_after(ours)
            db.pack(time.time() + 1)
            assert os.path.exists(path + ".old")
            commit(conn.root(), "b", 2)  # committed after the pack, before the tailer looks
            after = db.lastTransaction()
            txns, error = drain(tailer)
            assert error is None
            assert [(t.begin.tid, t.begin.prev_tid, t.begin.status) for t in txns] == [(after, ours, " ")]
    finally:
        conn.close()
        db.close()


def test_restored_packed_backup_without_our_position_is_damage(tmp_path):
    """A packed backup put in place of the file looks like such a pack, but FileStorage did not pack it:
    the file lost what was read from it (damage of the source, not a secondary's divergence)."""
    path, backup = str(tmp_path / "Data.fs"), str(tmp_path / "backup.fs")
    db = ZODB.DB(FileStorage(path))
    conn = db.open()
    commit(conn.root(), "a", 1)
    db.pack(time.time() + 1)  # every transaction so far packed (status p)
    kept = db.lastTransaction()
    shutil.copy(path, backup)
    ours = commit_orphans(db, 2)
    conn.close()
    db.close()
    with Tailer(path) as tailer:
        tailer.seek_after(ours)
        os.rename(path, path + ".broken")
        os.rename(backup, path)
        with pytest.raises(SourceRewrittenError, match="read from this file before, is no longer in it") as info:
            tailer.read_events()
        assert info.value.fork_tid == kept


def test_replaced_file_without_our_position_is_damage(tmp_path):
    """A file replaced by another history (not a pack) is refused, naming the nearest earlier TID."""
    path, fork = str(tmp_path / "Data.fs"), str(tmp_path / "fork.fs")
    db = ZODB.DB(FileStorage(path))
    conn = db.open()
    commit(conn.root(), "a", 1)
    kept = db.lastTransaction()
    shutil.copy(path, fork)  # the same history so far
    commit(conn.root(), "b", 2)
    ours = db.lastTransaction()
    conn.close()
    db.close()
    db2 = ZODB.DB(FileStorage(fork))
    c2 = db2.open()
    commit(c2.root(), "c", 3)  # another history from here on, not packed
    c2.close()
    db2.close()
    with Tailer(path) as tailer:
        tailer.seek_after(ours)
        os.rename(fork, path)
        with pytest.raises(SourceRewrittenError) as info:
            tailer.read_events()
        assert info.value.fork_tid == kept


# -- damage -----------------------------------------------------------------

@pytest.fixture
def ten(tmp_path):
    """A closed FileStorage of ten transactions with their offsets and lengths."""
    path = str(tmp_path / "Data.fs")
    db = ZODB.DB(FileStorage(path))
    conn = db.open()
    for i in range(9):
        commit(conn.root(), f"k{i}", PersistentMapping(v="x" * i * 10))
    conn.close()
    db.close()
    spans = []
    with open(path, "rb") as f:
        for t in reference(path):
            f.seek(t[5] + 8)
            spans.append((t[0], t[5], struct.unpack(">Q", f.read(8))[0]))
    return path, spans


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _expect_damage(path, spans, k, offset_range):
    with Tailer(path) as tailer:
        txns, error = drain(tailer)
    assert [t.begin.tid for t in txns] == [tid for tid, _, _ in spans[:k]]
    assert all(t.end is not None for t in txns)
    assert isinstance(error, CorruptedSourceError), error
    assert error.offset in offset_range and error.path.endswith("Data.fs")
    return error


def test_nul_overwritten_header(ten):
    path, spans = ten
    _, pos, tlen = spans[5]
    _patch(path, pos, b"\0" * 60)
    error = _expect_damage(path, spans, 5, [pos])
    assert str(pos) in str(error)


def test_nul_overwritten_data_records(ten):
    path, spans = ten
    _, pos, tlen = spans[6]
    _patch(path, pos + 40, b"\0" * 80)
    _expect_damage(path, spans, 6, range(pos, pos + tlen))


def test_broken_redundant_length(ten):
    path, spans = ten
    _, pos, tlen = spans[4]
    _patch(path, pos + tlen, struct.pack(">Q", tlen + 1))
    error = _expect_damage(path, spans, 4, [pos])
    assert "redundant" in error.reason


def test_checkpoint_status_mid_file_is_damage(ten):
    path, spans = ten
    _patch(path, spans[3][1] + 16, b"c")
    _expect_damage(path, spans, 3, [spans[3][1]])


def test_torn_committed_tail_waits(ten):
    """A committed transaction cut short: FileStorage truncates it on its next open, so wait."""
    path, spans = ten
    _, pos, tlen = spans[-1]
    os.truncate(path, pos + tlen // 2)
    with Tailer(path) as tailer:
        txns, error = drain(tailer)
        assert error is None and len(txns) == 9
        assert tailer.head() == (spans[8][0], 9)
        assert tailer.damage is None


def test_torn_voted_tail_waits(ten):
    """A 'c' transaction cut short: a commit still being written, or the torn tail of a crash."""
    path, spans = ten
    _, pos, tlen = spans[-1]
    _patch(path, pos + 16, b"c")
    os.truncate(path, pos + tlen // 2)
    with Tailer(path) as tailer:
        txns, error = drain(tailer)
        assert error is None and len(txns) == 9
        assert tailer.head() == (spans[8][0], 9)


def test_bad_back_pointer(history, tmp_path):
    path, blobs = history
    ref = reference(path, blobs)
    # the redo transaction's record points back into the undo; aim it at another oid's record
    undo_txn = next(t for t in ref if any(r[2] is not None for r in t[6]))
    with open(path, "rb") as f:
        f.seek(undo_txn[5] + 8)
        tlen = struct.unpack(">Q", f.read(8))[0]
        f.seek(undo_txn[5])
        raw = f.read(tlen)
    ulen, dlen, elen = struct.unpack(">HHH", raw[17:23])
    rpos = undo_txn[5] + 23 + ulen + dlen + elen
    first_root_record = ref[0][5] + 23 + sum(struct.unpack(">HHH", _read(path, ref[0][5] + 17, 6)))
    _patch(path, rpos + 42, struct.pack(">Q", first_root_record))
    with Tailer(path, blobs) as tailer:
        txns, error = drain(tailer)
    assert isinstance(error, CorruptedSourceError) and error.offset == rpos
    assert [t.begin.tid for t in txns] == [t[0] for t in ref[:ref.index(undo_txn)]]


def _read(path, offset, n):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def test_bad_magic(tmp_path):
    path = tmp_path / "Data.fs"
    path.write_bytes(b"XXXX" + b"\0" * 100)
    with pytest.raises(CorruptedSourceError) as info:
        Tailer(str(path)).open()
    assert info.value.offset == 0


# -- blobs ------------------------------------------------------------------

def _blob_db(tmp_path, content):
    path, blobs = str(tmp_path / "Data.fs"), str(tmp_path / "blobs")
    db = ZODB.DB(FileStorage(path, blob_dir=blobs))
    conn = db.open()
    blob = Blob()
    with blob.open("w") as f:
        for chunk in content:
            f.write(chunk)
    commit(conn.root(), "blob", blob)
    tid = db.lastTransaction()
    oid = conn.root()["blob"]._p_oid
    conn.close()
    db.close()
    return path, blobs, oid, tid


def test_big_blob_is_streamed_with_bounded_memory(tmp_path):
    block = os.urandom(1 << 20)
    path, blobs, oid, tid = _blob_db(tmp_path, [block] * 50)
    with Tailer(path, blobs) as tailer:
        tailer.seek_after(reference(path)[0][0])
        tracemalloc.start()
        try:
            total, chunks, calls = 0, 0, 0
            digest = hashlib.sha256()
            record = None
            while events := tailer.read_events(max_bytes=4 << 20):
                calls += 1
                for ev in events:
                    if isinstance(ev, Record) and ev.oid == oid:
                        record = ev
                    elif isinstance(ev, BlobChunk):
                        assert len(ev.data) <= MAX_BLOB_CHUNK
                        digest.update(ev.data)
                        total += len(ev.data)
                        chunks += 1
                del events
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert record.blob_size == total == 50 << 20
    assert chunks == 50 and calls >= 10
    assert digest.digest() == hashlib.sha256(block * 50).digest()
    assert peak < 12 << 20, peak


def test_missing_blob_file(tmp_path):
    path, blobs, oid, tid = _blob_db(tmp_path, [b"data"])
    fs = FileStorage(path, read_only=True, blob_dir=blobs)
    blob_file = fs.fshelper.getBlobFilename(oid, tid)
    fs.close()
    os.remove(blob_file)
    with Tailer(path, blobs) as tailer:
        txns, error = drain(tailer)
    assert isinstance(error, MissingBlobError) and error.blob_path == blob_file
    assert len(txns) == 1  # the root's creation; nothing of the blob transaction
    assert blob_file in str(error)


@pytest.fixture
def superseded_blob(tmp_path):
    """A database whose second transaction holds a blob revision the third supersedes: a pack drops it."""
    path, blobs = str(tmp_path / "Data.fs"), str(tmp_path / "blobs")
    db = ZODB.DB(FileStorage(path, blob_dir=blobs))
    conn = db.open()
    root = conn.root()
    root["pad"] = PersistentMapping(payload="x" * 1000)
    root["blob"] = blob = Blob(b"first revision")
    transaction.commit()
    with blob.open("w") as f:
        f.write(b"second revision")
    transaction.commit()
    yield db, path, blobs
    conn.close()
    db.close()


def _pack(db):
    db.pack(time.time() + 1)


def test_pack_removing_a_blob_of_a_half_shipped_transaction(superseded_blob):
    """Its blob files were opened before its first event: the transaction ships whole, as it was."""
    db, path, blobs = superseded_blob
    with Tailer(path, blobs) as tailer:
        root_txn = group(tailer.read_events(max_bytes=1))  # the root's creation, whole
        txns = group(tailer.read_events(max_bytes=1))
        assert txns[0].end is None  # the blob transaction is under way
        _pack(db)
        assert not os.path.exists(db.storage.fshelper.getBlobFilename(
            db.open().root()["blob"]._p_oid, txns[0].begin.tid))  # the pack removed its blob file
        while txns[0].end is None:
            group(tailer.read_events(max_bytes=1), txns)
        after, error = drain(tailer)  # then on from the packed file
    assert error is None
    assert b"first revision" in [blob for _, blob in txns[0].records]
    assert [t.begin.prev_tid for t in after] == [txns[0].begin.tid]
    assert after[0].begin.tid == db.lastTransaction()
    assert root_txn[0].begin.tid < txns[0].begin.tid


def test_pack_removing_a_blob_not_opened_yet(superseded_blob, monkeypatch):
    """Past EAGER_BLOBS files are opened late; a missing one ends the stream, and nothing looks damaged."""
    monkeypatch.setattr(tailer_module, "EAGER_BLOBS", 0)
    db, path, blobs = superseded_blob
    with Tailer(path, blobs) as tailer:
        root_txn = group(tailer.read_events(max_bytes=1))
        half = tailer.read_events(max_bytes=1)
        assert isinstance(half[0], TxnBegin)
        _pack(db)
        with pytest.raises(SourceReplacedError) as caught:
            while True:
                tailer.read_events(max_bytes=1)
        assert tid_repr(half[0].tid) in str(caught.value) and "packed" in str(caught.value)
        assert not isinstance(caught.value, CorruptedSourceError)  # no "damaged" alarm
        # The same tailer reads on from the packed file, after the last whole transaction.
        after, error = drain(tailer)
    assert error is None
    assert [t.begin.prev_tid for t in after] == [root_txn[-1].begin.tid, half[0].tid]
    assert after[0].begin.tid == half[0].tid and after[0].begin.status == "p"
    assert after[-1].begin.tid == db.lastTransaction()


def test_pack_removing_a_blob_before_its_transaction_is_read(superseded_blob, monkeypatch):
    """Nothing of it is out yet: the call reads on from the packed file and nobody notices."""
    db, path, blobs = superseded_blob
    with Tailer(path, blobs) as tailer:
        group(tailer.read_events(max_bytes=1))  # the root's creation
        open_blob, packed = Tailer._open_blob, []

        def pack_first(self, *args):
            if not packed:  # the first pass found a blob record; a pack removes its file now
                packed.append(1)
                _pack(db)
            return open_blob(self, *args)

        monkeypatch.setattr(Tailer, "_open_blob", pack_first)
        txns = group(tailer.read_events(max_bytes=64 << 20))
        assert packed
        monkeypatch.undo()
        with Tailer(path, blobs) as fresh:  # what a fresh reader of the packed file gets
            want, error = drain(fresh)  # the pack dropped the root's creation: the file starts with ours
    assert error is None
    assert [(t.begin.tid, t.begin.status, t.end.digest) for t in txns] == \
        [(t.begin.tid, t.begin.status, t.end.digest) for t in want]
    assert txns[0].begin.status == "p" and len(txns) == 2


def test_a_pack_during_a_look_up_is_routine_not_damage(superseded_blob, monkeypatch):
    """A secondary's handshake looks up its last transaction, whose blob revision a pack drops
    and removes meanwhile: that is the routine end of a pack (the secondary reconnects), not
    a missing blob file that would stop the primary or be reported as damage."""
    db, path, blobs = superseded_blob
    with Tailer(path, blobs) as tailer:
        txns, _ = drain(tailer)
        first_blob = next(t.begin.tid for t in txns if any(blob for _, blob in t.records))
        open_blob, packed = Tailer._open_blob, []

        def pack_first(self, *args):
            if not packed:
                packed.append(1)
                _pack(db)
            return open_blob(self, *args)

        monkeypatch.setattr(Tailer, "_open_blob", pack_first)
        with pytest.raises(SourceReplacedError) as caught:
            tailer.identity(first_blob)
        assert packed and not isinstance(caught.value, CorruptedSourceError)
        assert tid_repr(first_blob) in str(caught.value) and "packed" in str(caught.value)
        monkeypatch.undo()
        again = tailer.identity(first_blob)  # the next look reads the packed file
    assert again is not None and again.status == "p"


def test_open_blob_files_are_closed(superseded_blob):
    """A transaction dropped half read closes the files opened for it."""
    _, path, blobs = superseded_blob
    with Tailer(path, blobs) as tailer:
        tailer.read_events(max_bytes=1)  # the root's creation
        before = len(os.listdir("/proc/self/fd"))
        tailer.read_events(max_bytes=1)  # the blob transaction's first pass opened its blob file
        assert len(os.listdir("/proc/self/fd")) == before + 1
        tailer.seek_after(Z64)  # drops the transaction under way
        assert len(os.listdir("/proc/self/fd")) == before


def test_blob_records_need_a_blob_dir(tmp_path):
    path, _, _, _ = _blob_db(tmp_path, [b"data"])
    with Tailer(path) as tailer:
        txns, error = drain(tailer)
    assert isinstance(error, ConfigError) and "--blob-dir" in str(error)
    assert len(txns) == 1


def test_record_over_the_size_limit(history):
    path, blobs = history
    with Tailer(path, blobs, max_record_size=80) as tailer:
        txns, error = drain(tailer)
    assert isinstance(error, ConfigError) and "max_record_size" in str(error)
    assert len(txns) == 1  # only the root's creation is small enough


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError):
        Tailer(str(tmp_path / "nope.fs")).open()


def _half_swapped(path):
    """Leave ``path`` as FileStorage's pack does between its two renames: at .old, the new file at .pack."""
    shutil.copy(path, path + ".pack")
    os.rename(path, path + ".old")


def test_open_waits_for_a_pack_to_put_its_file_in_place(history):
    path, blobs = history
    want = Tailer(path, blobs).open().head()
    _half_swapped(path)
    finisher = threading.Timer(0.3, os.rename, (path + ".pack", path))
    finisher.start()
    try:
        with Tailer(path, blobs) as tailer:  # arrives between the renames
            assert os.path.exists(path)
            assert tailer.head() == want
    finally:
        finisher.join()


def test_open_names_an_interrupted_pack(history, monkeypatch):
    path, blobs = history
    _half_swapped(path)
    monkeypatch.setattr(tailer_module, "PACK_SWAP_WAIT", 0.2)
    with pytest.raises(ConfigError, match=r"Data\.fs\.pack is there: a pack was interrupted"):
        Tailer(path, blobs).open()


def test_readers_ride_out_packs_swapping_the_file(history):
    """Opening and looking at the head while the file is swapped again and again never fails."""
    path, blobs = history
    shutil.copy(path, path + ".copy")
    stop = threading.Event()

    def swap_forever():
        while not stop.is_set():
            shutil.copy(path + ".copy", path + ".pack")  # a new inode each time, same history
            os.rename(path, path + ".old")
            os.rename(path + ".pack", path)
            time.sleep(0.002)  # a pack's own work: packs do not follow each other within microseconds

    swapper = threading.Thread(target=swap_forever)
    swapper.start()
    try:
        want = None
        deadline = time.monotonic() + 1.5
        with Tailer(path, blobs) as follower:
            while time.monotonic() < deadline:
                with Tailer(path, blobs) as fresh:
                    got = fresh.head()
                assert follower.head() == got
                want = want or got
                assert got == want
    finally:
        stop.set()
        swapper.join()


def test_copy_of_history_keeps_digests(history, tmp_path):
    """Digests do not depend on where the file lives or how it is read."""
    path, blobs = history
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(path, copy / "Data.fs")
    shutil.copytree(blobs, copy / "blobs")
    with Tailer(path, blobs) as a, Tailer(str(copy / "Data.fs"), str(copy / "blobs")) as b:
        tid = a.head()[0]
        assert a.digest_of(tid) == b.digest_of(tid) is not None


def test_a_file_truncated_below_what_was_read_is_damage(tmp_path):
    """Cut below the last transaction read (and perhaps shipped): the secondaries may hold what
    the file lost, so this is the source's damage, with the advice to promote, not a divergence."""
    path = str(tmp_path / "Data.fs")
    db = ZODB.DB(FileStorage(path))
    conn = db.open()
    commit(conn.root(), "a", 1)
    kept = db.lastTransaction()
    commit(conn.root(), "b", 2)
    ours = db.lastTransaction()
    conn.close()
    db.close()
    with Tailer(path) as tailer:
        tailer.seek_after(ours)
        os.truncate(path, os.path.getsize(path) - 10)
        with pytest.raises(SourceRewrittenError) as info:
            tailer.read_events()
        assert info.value.fork_tid == kept
        assert isinstance(info.value, CorruptedSourceError) and "promote one of them" in str(info.value)


def test_a_torn_tail_that_lasts_is_warned_about_once_per_process(ten, monkeypatch, caplog):
    """Every reader of the file (each session, the primary's head) meets the same torn commit:
    one warning says it, not one per reader."""
    from replicator import fsfile

    path, spans = ten
    _, pos, tlen = spans[-1]
    os.truncate(path, pos + tlen // 2)
    monkeypatch.setattr(fsfile, "TORN_WARNING", 0.0)
    monkeypatch.setattr(fsfile, "_TORN_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="replicator.tailer"):
        for _ in range(3):  # three readers, each looking twice
            with Tailer(path) as tailer:
                drain(tailer)
                time.sleep(0.01)
                drain(tailer)
    warned = [r for r in caplog.records if "has been cut short" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in warned]


def test_the_head_of_a_file_cut_below_what_was_scanned_is_damage(tmp_path):
    """The primary's head, with no session reading: it too must see committed transactions gone."""
    path = str(tmp_path / "Data.fs")
    db = ZODB.DB(FileStorage(path))
    conn = db.open()
    for i in range(3):
        commit(conn.root(), f"k{i}", i)
    newest = db.lastTransaction()
    conn.close()
    db.close()
    with Tailer(path) as tailer:
        assert tailer.head()[0] == newest
        os.truncate(path, os.path.getsize(path) - 10)
        with pytest.raises(SourceRewrittenError, match="read from this file before, is no longer in it"):
            tailer.head()


def test_no_message_holds_more_frames_than_a_secondary_takes(tmp_path):
    """Transactions of many one-byte records, read with the largest budget a primary may have:
    each batch fits in one message a secondary accepts (MAX_MESSAGE_FRAMES), the transaction
    of ~1 MiB read whole included, and every record arrives."""
    from replicator.config import MAX_BATCH_BYTES
    from replicator.protocol import PROTOCOL_VERSION, Connection, Hello, Role, Welcome
    from replicator.protocol.framing import MAX_MESSAGE_FRAMES

    path = str(tmp_path / "Data.fs")
    fs = FileStorage(path)
    sizes = [100_000, 24_000, 3]  # 4.3 MB; just under 1 MiB (WHOLE_TXN): plain, read whole; tiny
    for n in sizes:
        t = TransactionMetaData()
        fs.tpc_begin(t)
        for _ in range(n):
            fs.store(fs.new_oid(), z64, b"x", "", t)
        fs.tpc_vote(t)
        fs.tpc_finish(t)
    fs.close()
    primary, secondary = Connection(Role.PRIMARY), Connection(Role.SECONDARY)
    primary.receive_data(secondary.send(Hello(PROTOCOL_VERSION, "s", Z64, None)))
    secondary.receive_data(primary.send(Welcome(PROTOCOL_VERSION, "p", 0, Z64, Z64)))
    counts, records = [], 0
    with Tailer(path) as tailer:
        while events := tailer.read_events(MAX_BATCH_BYTES):
            counts.append(len(events))
            secondary.receive_data(primary.send_stream(events))
            records += sum(type(e) is Record for e in secondary.events())
    assert records == sum(sizes)
    assert max(counts) <= MAX_MESSAGE_FRAMES, counts
    assert len(counts) > 3, counts  # the big one came in several messages


def test_a_primary_gathers_at_most_max_batch_bytes_per_message(tmp_path):
    from replicator.config import MAX_BATCH_BYTES, Address, PrimaryConfig
    from replicator.errors import ConfigError

    path = tmp_path / "Data.fs"
    FileStorage(str(path)).close()
    def config(batch_bytes: int) -> PrimaryConfig:
        return PrimaryConfig(storage=str(path), listen=Address("127.0.0.1", 0), insecure=True,
                             batch_bytes=batch_bytes)

    config(MAX_BATCH_BYTES).validate()
    with pytest.raises(ConfigError, match=f"batch-bytes {MAX_BATCH_BYTES + 1}: must be between 1 and"):
        config(MAX_BATCH_BYTES + 1).validate()
