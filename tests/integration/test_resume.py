"""A transaction cut off by a broken link goes on where it stopped, instead of from its start.

Over a slow link that breaks now and then, a big transaction might never
arrive if every connection fetched it from its first byte. The secondary
keeps what it got: the transaction stays open in its storage while the
process runs ("open"), and a stop turns its blobs into kept files for the
next process ("files"); the next connection leaves out what was kept.
Nothing kept is committed unless the whole transaction's digest equals the
primary's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob
from ZODB.FileStorage import FileStorage

from replicator.applier import BLOB_TEMP_PREFIX, KEEP_MIN_BYTES, KEPT_MANIFEST, OPEN_MANIFEST, Applier
from replicator.config import Address, PrimaryConfig
from replicator.errors import ConfigError, ResumeError
from replicator.metrics import render_metrics
from replicator.primary import Primary
from replicator.protocol import PROTOCOL_VERSION, Connection, Hello, Role, Welcome
from replicator.protocol.events import BlobChunk, Event, Record, TxnBegin, TxnEnd
from replicator.secondary import Backoff
from replicator.storage import open_file_storage
from replicator.tailer import Tailer
from replicator.verify import verify
from tests.helpers import zeo_server_db
from tests.integration.test_bad_input import raw_client
from tests.integration.test_replication import assert_equal as assert_replica
from tests.integration.test_replication import running_primary, running_secondary, tls, wait_equal_tid
from tests.integration.zodb_workload import identity_of

MB = 1 << 20
#: The blobs of the big transaction: several, so a cut can fall in any of them.
BLOB_SIZES = (3 * MB + 12_345, 5 * MB + 777, 2 * MB)
#: The big transaction without blobs: this many records of this many bytes (about 12 MB).
RECORDS, RECORD_SIZE = 600, 20_000


def write_big_blobs(db: ZODB.DB) -> None:
    """After the root's creation, a transaction with the big blobs, a small one after it."""
    rng = random.Random(5)
    try:
        with db.transaction("big blobs") as conn:
            for i, size in enumerate(BLOB_SIZES):
                blob = conn.root()[f"blob{i}"] = Blob()
                with blob.open("w") as f:
                    f.write(rng.randbytes(size))
            conn.root()["n"] = 2
        with db.transaction() as conn:
            conn.root()["n"] = 3
    finally:
        transaction.abort()


def make_source(tmp_path) -> None:
    """``src.fs``: the root's creation, a transaction with the big blobs, a small one after it."""
    db = ZODB.DB(FileStorage(str(tmp_path / "src.fs"), blob_dir=str(tmp_path / "src-blobs")))
    try:
        write_big_blobs(db)
    finally:
        db.close()


def make_records_source(tmp_path) -> None:
    """``src.fs`` like ``make_source``'s, but its big transaction is ``RECORDS`` records and no blob."""
    rng = random.Random(7)
    db = ZODB.DB(FileStorage(str(tmp_path / "src.fs"), blob_dir=str(tmp_path / "src-blobs")))
    try:
        with db.transaction("many records") as conn:
            for i in range(RECORDS):
                conn.root()[f"r{i}"] = PersistentMapping({"v": rng.randbytes(RECORD_SIZE)})
        with db.transaction() as conn:
            conn.root()["n"] = 3
    finally:
        db.close()
        transaction.abort()


def stream(tmp_path, skip: int = 0, records: int = 0) -> list[list[Event]]:
    """The source's transactions as the primary's tailer ships them, the big one missing its
    first ``records`` records with their blobs, then ``skip`` blob bytes."""
    tailer = Tailer(str(tmp_path / "src.fs"), str(tmp_path / "src-blobs")).open()
    try:
        tailer.seek_after(b"\0" * 8)
        txns: list[list[Event]] = []
        while True:
            if len(txns) == 1 and (skip or records):
                tailer.skip(records, skip)
            events = tailer.read_events(1)  # a transaction at a time, or less
            if not events:
                return txns
            for event in events:
                if isinstance(event, TxnBegin):
                    txns.append([])
                txns[-1].append(event)
    finally:
        tailer.close()


def blob_bytes(events: list[Event]) -> int:
    return sum(len(e.data) for e in events if isinstance(e, BlobChunk))


def cut_after(events: list[Event], count: int) -> list[Event]:
    """The events of a transaction until ``count`` of its blob bytes arrived (the last chunk cut
    short), never its end."""
    out: list[Event] = []
    for event in events:
        if isinstance(event, TxnEnd):
            break
        if isinstance(event, BlobChunk):
            if count <= 0:
                break
            if len(event.data) > count:
                event = BlobChunk(event.data[:count])
            count -= len(event.data)
        out.append(event)
    return out


def cut_off(applier: Applier, events: list[Event], count: int, *, stop: bool = False) -> None:
    """``events`` arrive until ``count`` of their blob bytes are in, then the link breaks
    (and with ``stop``, the node stops following, which turns what it kept into files)."""
    applier.apply(cut_after(events, count))
    applier.abort(keep=True)
    if stop:
        applier.release_suspended(keep=True)


def expected_offer(events: list[Event]) -> tuple[int, int]:
    """(bytes of the blob in part, complete records) of a transaction received as far as ``events``."""
    records = [e for e in events if isinstance(e, Record)]
    last_blob = max((i for i, e in enumerate(events) if isinstance(e, Record) and e.blob_size is not None),
                    default=None)
    if last_blob is None:
        return 0, len(records)
    got = blob_bytes(events[last_blob:])
    if got == events[last_blob].blob_size:  # type: ignore[union-attr]
        return 0, len(records)
    return got, len(records) - 1


def commit_lock_free(storage) -> bool:
    return not storage._commit_lock.locked()


def temp_files(storage) -> list[str]:
    return sorted(name for name in os.listdir(storage.temporaryDirectory()) if name.startswith(BLOB_TEMP_PREFIX))


def replica_of(tmp_path, make: Callable[[Path], None]) -> Iterator[tuple[FileStorage, Applier, list[list[Event]]]]:
    """An applier on an empty storage, the stream of the source ``make`` wrote, and its first
    transaction applied."""
    make(tmp_path)
    storage = open_file_storage(str(tmp_path / "dst.fs"), str(tmp_path / "dst-blobs"))
    applier = Applier(storage)
    txns = stream(tmp_path)
    applier.apply(txns[0])
    yield storage, applier, txns
    applier.close()
    storage.close()


@pytest.fixture
def replica(tmp_path):
    """``replica_of`` ``make_source``: its big transaction has blobs."""
    yield from replica_of(tmp_path, make_source)


def assert_equal(tmp_path, storage) -> None:
    storage.close()
    result = verify(str(tmp_path / "src.fs"), str(tmp_path / "dst.fs"), str(tmp_path / "src-blobs"),
                    str(tmp_path / "dst-blobs"))
    assert result.equal, result
    assert result.transactions == 3


def test_the_tailer_leaves_out_the_bytes_asked_and_its_digest_covers_them(tmp_path):
    make_source(tmp_path)
    whole = stream(tmp_path)
    for skip in (1, BLOB_SIZES[0], BLOB_SIZES[0] + 1, sum(BLOB_SIZES) - 1, sum(BLOB_SIZES)):
        part = stream(tmp_path, skip)
        assert blob_bytes(part[1]) == sum(BLOB_SIZES) - skip
        # The same records, in the same order, and the same digest.
        assert [e for e in part[1] if not isinstance(e, BlobChunk)] == \
            [e for e in whole[1] if not isinstance(e, BlobChunk)]
        assert b"".join(e.data for e in part[1] if isinstance(e, BlobChunk)) == \
            b"".join(e.data for e in whole[1] if isinstance(e, BlobChunk))[skip:]
        assert part[0] == whole[0] and part[2] == whole[2]  # only that transaction, and only once


@pytest.mark.parametrize("cut", [KEEP_MIN_BYTES, BLOB_SIZES[0], BLOB_SIZES[0] + 5 * MB - 1, sum(BLOB_SIZES) - 1])
def test_a_transaction_cut_off_goes_on_from_what_was_kept(tmp_path, replica, cut):
    storage, applier, (first, big, last) = replica
    cut_off(applier, big, cut)
    assert storage.lastTransaction() == first[0].tid
    partial, records = expected_offer(cut_after(big, cut))
    assert applier.resume_offer() == (big[0].tid, partial, records)
    assert not commit_lock_free(storage)  # kept open
    applier.resume(partial, records)
    rest = stream(tmp_path, partial, records)[1]
    # The link breaks again at once, after the TxnBegin: the same offer, the same rest.
    applier.apply(rest[:1])
    applier.abort(keep=True)
    assert applier.resume_offer() == (big[0].tid, partial, records)
    applier.resume(partial, records)
    assert blob_bytes(rest) == sum(BLOB_SIZES) - cut
    assert sum(isinstance(e, Record) for e in rest) == sum(isinstance(e, Record) for e in big) - records
    assert applier.apply(rest + last) == [big[0].tid, last[0].tid]
    assert applier.resumed_bytes >= cut
    assert temp_files(storage) == []
    assert_equal(tmp_path, storage)


@pytest.mark.parametrize("cut", [KEEP_MIN_BYTES, BLOB_SIZES[0], BLOB_SIZES[0] + 5 * MB - 1, sum(BLOB_SIZES) - 1])
def test_a_transaction_cut_off_then_stopped_goes_on_from_its_kept_files(tmp_path, replica, cut):
    storage, applier, (first, big, last) = replica
    cut_off(applier, big, cut, stop=True)
    assert storage.lastTransaction() == first[0].tid and commit_lock_free(storage)
    assert applier.resume_offer() == (big[0].tid, cut, 0)
    # A file for each blob whose Record came: the placed ones moved back out of the blob directory.
    assert len(temp_files(storage)) == sum(1 for start in _starts(big) if start <= cut)
    applier.resume(cut)
    rest = stream(tmp_path, cut)[1]
    assert blob_bytes(rest) == sum(BLOB_SIZES) - cut
    assert applier.apply(rest + last) == [big[0].tid, last[0].tid]
    assert applier.resumed_bytes == cut
    assert temp_files(storage) == []
    assert_equal(tmp_path, storage)


def make_zeo_source(tmp_path) -> None:
    """``make_source``'s history committed through a ZEO server, which stores each blob as two
    records of its oid in the transaction (both naming one file, shipped once)."""
    with zeo_server_db(tmp_path, tmp_path / "src.fs", tmp_path / "src-blobs") as db:
        write_big_blobs(db)


@pytest.fixture
def zeo_replica(tmp_path):
    """``replica_of`` ``make_zeo_source``: its big transaction has each blob record twice."""
    yield from replica_of(tmp_path, make_zeo_source)


@pytest.mark.parametrize("stop", [False, True], ids=["open", "files"])
@pytest.mark.parametrize("cut", [BLOB_SIZES[0] + 1, BLOB_SIZES[0] + 5 * MB - 1])
def test_a_transaction_with_blobs_stored_twice_cut_off_goes_on(tmp_path, zeo_replica, cut, stop):
    """Cut off after a blob whose second record is still to come, or in the blob after it: the
    second record finds the file its first one placed (or the kept file put back), and is not
    taken for a blob record without its file."""
    storage, applier, (first, big, last) = zeo_replica
    records = [e for e in big if isinstance(e, Record)]
    blob_oids = [e.oid for e in records if e.blob_size is not None]
    assert len(blob_oids) == len(BLOB_SIZES)  # each file once ...
    assert sum(e.oid in blob_oids for e in records) == 2 * len(BLOB_SIZES)  # ... for two records each
    assert blob_bytes(big) == sum(BLOB_SIZES)
    cut_off(applier, big, cut, stop=stop)
    partial, done = (cut, 0) if stop else expected_offer(cut_after(big, cut))
    assert applier.resume_offer() == (big[0].tid, partial, done)
    applier.resume(partial, done)
    rest = stream(tmp_path, partial, done)[1]
    assert applier.apply(rest + last) == [big[0].tid, last[0].tid]
    assert temp_files(storage) == []
    assert_equal(tmp_path, storage)


def test_a_repeated_blob_record_without_its_first_is_refused(tmp_path, zeo_replica):
    """A blob record without its file is taken only after the record that placed that file."""
    storage, applier, (first, big, _) = zeo_replica
    oid = next(e.oid for e in big if isinstance(e, Record) and e.blob_size is not None)
    without: list[Event] = []
    dropping = False
    for event in big:  # the stream without the blob record of oid that carries the file
        if isinstance(event, Record):
            dropping = event.oid == oid and event.blob_size is not None
        if not dropping:
            without.append(event)
    with pytest.raises(ConfigError, match=f"blob records without their files \\(oid {oid.hex()}\\)"):
        applier.apply(without)
    applier.abort()
    assert storage.lastTransaction() == first[0].tid and commit_lock_free(storage)
    assert temp_files(storage) == []


def _starts(events: list[Event]) -> list[int]:
    """Where each blob begins in the transaction's blob bytes, in stream order."""
    sizes = [e.blob_size for e in events if isinstance(e, Record) and e.blob_size is not None]
    return [sum(sizes[:i]) for i in range(len(sizes))]


@pytest.mark.parametrize("stop", [False, True], ids=["open", "files"])
def test_a_resumed_transaction_cut_off_again_keeps_more(tmp_path, replica, stop):
    storage, applier, (first, big, last) = replica
    offered: tuple[int, int] = (0, 0)
    done = 0
    blobs = [e for e in big if isinstance(e, Record) and e.blob_size is not None]
    ends = [start + blob.blob_size for start, blob in zip(_starts(big), blobs, strict=True)]  # type: ignore[operator]
    for cut in (2 * MB, 4 * MB + 1, 9 * MB):
        applier.apply(cut_after(stream(tmp_path, *offered)[1], cut - done))
        if cut == 9 * MB and not stop:
            # Kept open before, then resumed: a blob file placed since is listed at once.
            assert journaled(storage) == (big[0].tid, [blob.oid for blob in blobs[:2]])
        applier.abort(keep=True)
        if stop:
            applier.release_suspended(keep=True)
        # Kept open, the blob files it placed are listed, should the process be killed.
        placed = [blob.oid for blob, end in zip(blobs, ends, strict=True) if end <= cut]
        assert journaled(storage) == (None if stop or not placed else (big[0].tid, placed))
        expected = (cut, 0) if stop else expected_offer(cut_after(big, cut))
        assert applier.resume_offer() == (big[0].tid, *expected)
        applier.resume(*expected)
        offered, done = expected, cut
    applier.apply(stream(tmp_path, *offered)[1] + last)
    assert journaled(storage) is None
    if stop:
        assert applier.resumed_bytes == 2 * MB + 4 * MB + 1 + 9 * MB
    else:  # every byte received before each resumption, records included
        assert applier.resumed_bytes > 2 * MB + 4 * MB + 1 + 9 * MB
    assert temp_files(storage) == []
    assert_equal(tmp_path, storage)


def journaled(storage) -> tuple[bytes, list[bytes]] | None:
    """The transaction kept open and the oids of the blob files it placed, as its journal lists them."""
    try:
        with open(os.path.join(storage.temporaryDirectory(), OPEN_MANIFEST)) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    return bytes.fromhex(data["tid"]), [bytes.fromhex(oid) for oid in data["oids"]]


def test_the_journal_of_a_committed_transaction_leaves_its_blob_files(tmp_path, replica):
    """A process killed between a commit and the removal of the journal: the files are committed."""
    storage, applier, (first, big, last) = replica
    applier.apply(big + last)
    blobs = sorted((tmp_path / "dst-blobs").rglob("*.blob"))
    oids = [e.oid.hex() for e in big if isinstance(e, Record) and e.blob_size is not None]
    with open(os.path.join(storage.temporaryDirectory(), OPEN_MANIFEST), "w") as f:
        json.dump({"tid": big[0].tid.hex(), "oids": oids}, f)
    storage, applier = reopen(tmp_path, storage, applier)
    try:
        assert journaled(storage) is None
        assert sorted((tmp_path / "dst-blobs").rglob("*.blob")) == blobs and len(blobs) == len(oids)
        assert_equal(tmp_path, storage)
    finally:
        applier.close()


def test_a_kept_file_changed_on_disk_is_never_committed(tmp_path, replica):
    storage, applier, (first, big, last) = replica
    cut_off(applier, big, 4 * MB, stop=True)
    # One byte of a kept file changes while the link is down.
    path = os.path.join(storage.temporaryDirectory(), temp_files(storage)[0])
    with open(path, "r+b") as f:
        byte = f.read(1)
        f.seek(0)
        f.write(bytes([byte[0] ^ 1]))
    applier.resume(4 * MB)
    with pytest.raises(ResumeError, match="does not match the primary's digest; it is fetched whole"):
        applier.apply(stream(tmp_path, 4 * MB)[1])
    assert storage.lastTransaction() == first[0].tid
    assert temp_files(storage) == [] and applier.resume_offer() is None
    # The next connection fetches it whole.
    applier.resume(0)
    applier.apply(big + last)
    assert applier.resumed_bytes == 4 * MB  # left out once, then fetched all the same
    assert_equal(tmp_path, storage)


def test_a_primary_that_sends_another_blob_or_transaction_is_refused(tmp_path, replica):
    storage, applier, (first, big, last) = replica
    # Another blob where the kept one was (the primary's transaction differs under that TID).
    cut_off(applier, big, 4 * MB, stop=True)
    applier.resume(4 * MB)
    rest = stream(tmp_path, 4 * MB)[1]
    index = next(i for i, e in enumerate(rest) if isinstance(e, Record) and e.blob_size)
    other = Record(b"\0" * 7 + b"\7", rest[index].data, None, rest[index].blob_size)
    with pytest.raises(ResumeError, match="differs from what this node kept"):
        applier.apply(rest[:index] + [other])
    assert temp_files(storage) == [] and storage.lastTransaction() == first[0].tid
    # A primary that agreed to resume it, then sent something else.
    cut_off(applier, big, 4 * MB, stop=True)
    applier.resume(4 * MB)
    with pytest.raises(ResumeError, match="agreed to resume"):
        applier.apply([TxnBegin(last[0].tid, first[0].tid, " ", b"", b"", b"")])
    assert temp_files(storage) == []
    # Leaving out another count than the one kept.
    cut_off(applier, big, 4 * MB, stop=True)
    with pytest.raises(ResumeError, match="leaves out 0 record.s. and 5 blob bytes"):
        applier.resume(5)
    assert temp_files(storage) == []
    applier.apply(big + last)
    assert_equal(tmp_path, storage)


def test_a_primary_that_goes_on_otherwise_with_a_transaction_kept_open_is_refused(tmp_path, replica):
    storage, applier, (first, big, last) = replica
    partial, records = expected_offer(cut_after(big, 4 * MB))
    assert partial  # the cut falls inside a blob
    # Another transaction than the one agreed on.
    cut_off(applier, big, 4 * MB)
    applier.resume(partial, records)
    with pytest.raises(ResumeError, match="agreed to resume"):
        applier.apply([TxnBegin(last[0].tid, first[0].tid, " ", b"", b"", b"")])
    assert commit_lock_free(storage) and temp_files(storage) == [] and applier.resume_offer() is None
    # Another record where the blob in part was.
    cut_off(applier, big, 4 * MB)
    applier.resume(partial, records)
    rest = stream(tmp_path, partial, records)[1]
    index = next(i for i, e in enumerate(rest) if isinstance(e, Record))
    other = Record(b"\0" * 7 + b"\7", rest[index].data, None, rest[index].blob_size)
    with pytest.raises(ResumeError, match="goes on with a record of oid"):
        applier.apply(rest[:index] + [other])
    assert commit_lock_free(storage) and temp_files(storage) == []
    # Another answer than the offer: the transaction is aborted, nothing kept.
    cut_off(applier, big, 4 * MB)
    with pytest.raises(ResumeError, match=f"leaves out {records + 1} record"):
        applier.resume(partial, records + 1)
    assert commit_lock_free(storage) and temp_files(storage) == [] and applier.resume_offer() is None
    # The same digest or nothing: the primary's records differ under that TID.
    cut_off(applier, big, 4 * MB)
    applier.resume(partial, records)
    rest = stream(tmp_path, partial, records)[1]
    end = rest[-1]
    assert isinstance(end, TxnEnd)
    with pytest.raises(ResumeError, match="does not match the primary's digest"):
        applier.apply(rest[:-1] + [TxnEnd(end.tid, bytes(16))])
    assert commit_lock_free(storage) and storage.lastTransaction() == first[0].tid
    applier.apply(big + last)
    assert_equal(tmp_path, storage)


@pytest.mark.parametrize("stop", [False, True], ids=["open", "files"])
def test_little_is_not_kept_and_promoting_drops_what_is(tmp_path, replica, stop):
    storage, applier, (_, big, _) = replica
    cut_off(applier, big, KEEP_MIN_BYTES // 2, stop=stop)
    assert applier.resume_offer() is None and temp_files(storage) == [] and commit_lock_free(storage)
    cut_off(applier, big, 4 * MB, stop=stop)
    assert temp_files(storage)
    applier.abort()  # promoted: the node will not resume it
    assert applier.resume_offer() is None and temp_files(storage) == [] and commit_lock_free(storage)
    cut_off(applier, big, 4 * MB, stop=stop)
    applier.discard_kept()  # the same, once the following ended
    assert applier.resume_offer() is None and temp_files(storage) == [] and commit_lock_free(storage)
    # The primary sends it whole after all: what was kept goes.
    cut_off(applier, big, 4 * MB, stop=stop)
    applier.resume(0)
    assert temp_files(storage) == [] and commit_lock_free(storage)
    if stop:
        # Kept, but the storage moved on meanwhile (it cannot, but be safe): not offered.
        cut_off(applier, big, 4 * MB, stop=True)
        applier.apply(big)
        assert applier.resume_offer() is None and temp_files(storage) == []


def first_records(events: list[Event], count: int) -> list[Event]:
    """A transaction's events up to its first ``count`` records, as a link that broke then delivered them."""
    out: list[Event] = []
    for event in events:
        if isinstance(event, TxnEnd) or (isinstance(event, Record) and count == 0):
            break
        if isinstance(event, Record):
            count -= 1
        out.append(event)
    return out


def test_the_tailer_leaves_out_the_records_asked_and_its_digest_covers_them(tmp_path):
    make_records_source(tmp_path)
    whole = stream(tmp_path)
    for records in (1, 100, RECORDS, RECORDS + 1, 1 << 40):
        part = stream(tmp_path, 0, records)
        left_out = min(records, RECORDS + 1)  # the root too
        assert part[1][0] == whole[1][0] and part[1][-1] == whole[1][-1]  # same TxnBegin, same digest
        assert part[1][1:-1] == whole[1][1 + left_out:-1]
        assert part[0] == whole[0] and part[2] == whole[2]
    # Records of blobs go with their blobs.
    (tmp_path / "blobs").mkdir()
    make_source(tmp_path / "blobs")
    whole = stream(tmp_path / "blobs")[1]
    records = [e for e in whole if isinstance(e, Record)]
    first_blob = next(i for i, e in enumerate(records) if e.blob_size)
    part = stream(tmp_path / "blobs", 10, first_blob + 1)[1]
    assert [e for e in part if isinstance(e, Record)] == records[first_blob + 1:]
    assert blob_bytes(part) == sum(BLOB_SIZES) - records[first_blob].blob_size - 10
    assert part[-1] == whole[-1]


@pytest.fixture
def records_replica(tmp_path):
    """``replica_of`` ``make_records_source``: its big transaction is records only."""
    yield from replica_of(tmp_path, make_records_source)


def test_a_transaction_of_records_cut_off_goes_on_from_the_records_received(tmp_path, records_replica):
    """No blob: the records received stay in the open storage transaction, and are not sent again."""
    storage, applier, (first, big, last) = records_replica
    done = 0
    for count in (100, 101, 450):  # cut three times, the second time after one record more
        applier.apply(first_records(stream(tmp_path, 0, done)[1], count - done))
        applier.abort(keep=True)
        assert applier.resume_offer() == (big[0].tid, 0, count)
        assert storage.lastTransaction() == first[0].tid and not commit_lock_free(storage)
        applier.resume(0, count)
        done = count
    rest = stream(tmp_path, 0, done)[1]
    assert sum(isinstance(e, Record) for e in rest) == RECORDS + 1 - done
    assert applier.apply(rest + last) == [big[0].tid, last[0].tid]
    assert applier.resumed_bytes > (100 + 101 + 450) * RECORD_SIZE
    assert_equal(tmp_path, storage)


def test_a_transaction_of_records_kept_open_is_dropped_by_a_stop_and_little_is_not_kept(tmp_path, records_replica):
    storage, applier, (first, big, last) = records_replica
    applier.apply(first_records(big, 20))  # 400 KB: fetched whole again
    applier.abort(keep=True)
    assert applier.resume_offer() is None and commit_lock_free(storage)
    applier.apply(first_records(big, 300))
    applier.abort(keep=True)
    assert applier.resume_offer() == (big[0].tid, 0, 300)
    applier.save_kept()  # a stop: records are not handed over, and the storage is left as it was
    assert applier.resume_offer() is None and commit_lock_free(storage)
    assert KEPT_MANIFEST not in os.listdir(storage.temporaryDirectory())
    assert storage.lastTransaction() == first[0].tid
    applier.apply(big + last)
    assert_equal(tmp_path, storage)


def reopen(tmp_path, storage, applier, *, saved: bool = False):
    """The process stops (``save_kept``, unless the test did) and the next one opens the storage."""
    if not saved:
        applier.save_kept()
    applier.close()
    storage.close()
    storage = open_file_storage(str(tmp_path / "dst.fs"), str(tmp_path / "dst-blobs"))
    return storage, Applier(storage)


def test_a_stop_hands_what_was_kept_to_the_next_process(tmp_path, replica):
    storage, applier, (first, big, last) = replica
    cut_off(applier, big, 6 * MB)
    storage, applier = reopen(tmp_path, storage, applier)
    try:
        assert applier.resume_offer() == (big[0].tid, 6 * MB, 0)
        assert KEPT_MANIFEST not in temp_files(storage)  # read once
        applier.resume(6 * MB)
        applier.apply(stream(tmp_path, 6 * MB)[1] + last)
        assert temp_files(storage) == []
        assert_equal(tmp_path, storage)
    finally:
        applier.close()


async def start_primary_on_replica(tmp_path, tls_dir) -> None:
    """A primary starts on the secondary's storage (a failover), and stops."""
    primary = Primary(PrimaryConfig(storage=str(tmp_path / "dst.fs"), blob_dir=str(tmp_path / "dst-blobs"),
                                    tls=tls(tls_dir, "primary"), node="p2",
                                    listen=Address("127.0.0.1", 0)).validate())
    await primary.start()
    await primary.stop()


def test_a_primary_on_the_storage_removes_what_a_secondary_left_there(tmp_path, tls_dir, replica, caplog):
    """After a failover the storage is a primary's: nothing would ever take over the blob files a
    stopped secondary kept, or the one a killed secondary was writing, and a big one keeps its room."""
    storage, applier, (first, big, last) = replica
    cut_off(applier, big, 6 * MB)
    applier.save_kept()
    applier.close()
    storage.close()
    temp = tmp_path / "dst-blobs" / "tmp"
    kept = sorted(path.name for path in temp.iterdir())
    assert KEPT_MANIFEST in kept and len(kept) == 3  # the manifest, the first blob and the one in part
    (temp / f"{BLOB_TEMP_PREFIX}killed.tmp").write_bytes(b"x" * 1000)  # what a killed one was writing
    (temp / "other.tmp").write_bytes(b"not ours")

    with caplog.at_level(logging.WARNING, logger="replicator"):
        asyncio.run(start_primary_on_replica(tmp_path, tls_dir))
    assert sorted(path.name for path in temp.iterdir()) == ["other.tmp"]
    assert f"removed 3 blob file(s) (6.0 MiB) from {temp}" in caplog.text
    left = FileStorage(str(tmp_path / "dst.fs"), read_only=True)
    try:
        assert left.lastTransaction() == first[0].tid  # the storage itself as it was
    finally:
        left.close()


def test_what_a_stopped_process_kept_is_checked_before_it_is_offered(tmp_path, replica):
    """A short file drops the blobs after it; an unreadable manifest, everything."""
    storage, applier, (first, big, last) = replica
    sizes = [e.blob_size for e in big if isinstance(e, Record) and e.blob_size]
    cut_off(applier, big, sizes[0] + MB)
    applier.save_kept()
    files = temp_files(storage)
    manifest = os.path.join(storage.temporaryDirectory(), KEPT_MANIFEST)
    with open(manifest) as f:
        first_file = json.load(f)["blobs"][0]["file"]
    os.truncate(os.path.join(storage.temporaryDirectory(), first_file), sizes[0] - 10)
    storage, applier = reopen(tmp_path, storage, applier, saved=True)
    try:
        assert applier.resume_offer() == (big[0].tid, sizes[0] - 10, 0)
        assert temp_files(storage) == [first_file]  # the one after it is gone
        applier.resume(sizes[0] - 10)
        applier.apply(stream(tmp_path, sizes[0] - 10)[1] + last)
        assert_equal(tmp_path, storage)
    finally:
        applier.close()
    assert len(files) == 3  # two blob files and the manifest


def test_a_damaged_manifest_leaves_nothing_kept(tmp_path, replica, caplog):
    storage, applier, (first, big, last) = replica
    cut_off(applier, big, 4 * MB)
    applier.save_kept()
    with open(os.path.join(storage.temporaryDirectory(), KEPT_MANIFEST), "w") as f:
        f.write("{not json")
    storage, applier = reopen(tmp_path, storage, applier, saved=True)
    try:
        assert applier.resume_offer() is None
        assert temp_files(storage) == []
        assert "cannot take over the blob files a stopped process kept" in caplog.text
    finally:
        applier.close()
        storage.close()


# -- end to end ----------------------------------------------------------------

@contextlib.asynccontextmanager
async def breaking_proxy(target_port: int, budget: int, connections: int | None = None):
    """Forward 127.0.0.1:PORT to the target, and break each connection once it carried ``budget``
    bytes from the target: a link that keeps failing long before a big transaction is through.
    Past ``connections`` connections, each is closed at once: the link stays down."""
    tasks: set[asyncio.Task] = set()
    carried: list[int] = []

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if connections is not None and len(carried) >= connections:
            client_w.transport.abort()
            return
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)
        carried.append(0)
        index = len(carried) - 1

        async def up() -> None:
            with contextlib.suppress(ConnectionError):
                while data := await client_r.read(65536):
                    server_w.write(data)
                    await server_w.drain()

        async def down() -> None:
            with contextlib.suppress(ConnectionError):
                while data := await server_r.read(65536):
                    data = data[:budget - carried[index]]
                    client_w.write(data)
                    carried[index] += len(data)
                    await client_w.drain()
                    if carried[index] >= budget:
                        break
            for writer in (client_w, server_w):
                writer.transport.abort()

        for task in (asyncio.create_task(up()), asyncio.create_task(down())):
            tasks.add(task)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], carried
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def test_a_link_breaking_every_few_megabytes_still_gets_a_big_transaction_through(tmp_path, tls_dir, monkeypatch):
    """Each connection carries 3 MB; the transaction holds 10 MB of blobs. Fetched from its start
    each time, it would never arrive. A connection that kept more counts as progress: the next
    attempt is as quick as after an applied transaction, not backed off further."""
    make_source(tmp_path)
    budget = 3 * MB
    attempts: list[int] = []
    next_delay = Backoff.next_delay

    def spy(self: Backoff) -> float:
        attempts.append(self.attempt)
        return next_delay(self)

    monkeypatch.setattr(Backoff, "next_delay", spy)

    async def scenario():
        async with running_primary(tmp_path, tls_dir) as primary, breaking_proxy(primary.port, budget) as (
                port, carried), running_secondary(tmp_path, tls_dir, port, reconnect_max=0.1) as (node, _):
            await wait_equal_tid(primary, node)
            return node, list(carried), node.status()

    node, carried, status = asyncio.run(scenario())
    total = sum(BLOB_SIZES)
    assert len(carried) >= total // budget + 1, carried  # it did take several connections
    assert attempts and set(attempts) == {0}, attempts
    assert sum(carried) < 2 * total, carried  # and little was fetched twice
    assert status["resumed_bytes"] == node.applier.resumed_bytes >= total - budget
    metrics = render_metrics(lambda: status).decode().splitlines()
    assert [float(line.split()[1]) for line in metrics if line.startswith("replicator_resumed_bytes_total ")] \
        == [status["resumed_bytes"]]
    assert_replica(tmp_path)
    assert not [name for name in os.listdir(tmp_path / "dst-blobs" / "tmp") if name.startswith(BLOB_TEMP_PREFIX)]


def test_a_link_breaking_every_few_megabytes_still_gets_a_big_transaction_of_records_through(tmp_path, tls_dir):
    """The same with 12 MB of records and no blob: the transaction stays open on the secondary
    between connections, and each leaves out the records received before."""
    make_records_source(tmp_path)
    budget = 3 * MB
    total = RECORDS * RECORD_SIZE

    async def scenario():
        async with running_primary(tmp_path, tls_dir) as primary, breaking_proxy(primary.port, budget) as (
                port, carried), running_secondary(tmp_path, tls_dir, port, reconnect_max=0.1) as (node, _):
            await wait_equal_tid(primary, node)
            return list(carried), node.status()

    carried, status = asyncio.run(scenario())
    assert len(carried) >= total // budget + 1, carried
    assert sum(carried) < 1.5 * total, carried
    assert status["resumed_bytes"] >= total - budget
    assert_replica(tmp_path)


@pytest.mark.parametrize("ask", ["all-and-more", "all-records-and-more", "not-the-next-one"])
def test_the_primary_checks_what_a_secondary_asks_to_leave_out(tmp_path, tls_dir, ask):
    """A secondary asking to leave out more than the transaction holds, or naming another
    transaction than the next one, cannot stop or confuse the primary."""
    make_source(tmp_path)
    first, big, last = stream(tmp_path)
    resume_tid = last[0].tid if ask == "not-the-next-one" else big[0].tid
    count, records = (0, 1 << 40) if ask == "all-records-and-more" else (1 << 40, 0)

    async def scenario() -> tuple[Welcome, list[Event]]:
        async with running_primary(tmp_path, tls_dir) as primary:
            http, ws = await raw_client(primary.port, tls_dir)
            async with http:
                conn = Connection(Role.SECONDARY)
                await ws.send_bytes(conn.send(Hello(PROTOCOL_VERSION, "asker", first[0].tid, identity_of(first),
                                                    0, " ", None, None, resume_tid, count, records)))
                got: list[Event] = []
                while not any(isinstance(e, TxnEnd) and e.tid == last[0].tid for e in got):
                    msg = await asyncio.wait_for(ws.receive(), 20)
                    conn.receive_data(msg.data)
                    got += conn.events()
            assert primary.fatal is None
            return conn.welcome, got  # type: ignore[return-value]

    welcome, got = asyncio.run(scenario())
    if ask == "all-records-and-more":
        assert (welcome.resume_bytes, welcome.resume_records) == (0, 1 << 40)
        # Nothing of the transaction but its beginning and its end, with the same digest.
        assert [e for e in got if isinstance(e, (TxnBegin, Record, BlobChunk, TxnEnd))] == [big[0], big[-1]] + last
        return
    if ask == "all-and-more":
        assert (welcome.resume_bytes, welcome.resume_records) == (1 << 40, 0)
        assert blob_bytes(got) == 0  # the whole transaction's blob bytes left out, no more
    else:
        assert (welcome.resume_bytes, welcome.resume_records) == (0, 0)
        assert blob_bytes(got) == sum(BLOB_SIZES)
    # The same records and digests either way.
    assert [e for e in got if isinstance(e, (TxnBegin, Record, TxnEnd))] == \
        [e for e in big + last if not isinstance(e, BlobChunk)]


async def cut_off_once(node, carried: list[int], timeout: float = 20) -> None:
    """Wait until the link broke in the middle of the big transaction and the secondary kept it."""
    for _ in range(int(timeout / 0.05)):
        if carried and not node.progress.connected and node.applier.kept_bytes:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"nothing kept: {carried}, {node.progress.last_error}")


@pytest.mark.parametrize("relay", [False, True], ids=["plain", "relay"])
def test_a_secondary_stopped_with_a_transaction_kept_resumes_it_when_started_again(tmp_path, tls_dir, relay,
                                                                                  caplog):
    """A stop (SIGTERM, a restart for an upgrade) hands the kept files to the next process (whose
    relay, a primary of its own storage, leaves them to its applier)."""
    make_source(tmp_path)
    kept_dir = tmp_path / "dst-blobs" / "tmp"

    def kept() -> list[str]:
        return sorted(name for name in os.listdir(kept_dir) if name.startswith(BLOB_TEMP_PREFIX))

    async def scenario() -> tuple[int, int]:
        async with running_primary(tmp_path, tls_dir) as primary:
            async with breaking_proxy(primary.port, 3 * MB) as (port, carried), \
                    running_secondary(tmp_path, tls_dir, port, reconnect_min=30, reconnect_max=30) as (node, _):
                await cut_off_once(node, carried)
                count = node.applier.kept_bytes
                assert count >= KEEP_MIN_BYTES
            assert KEPT_MANIFEST in kept()  # stopped: left for the next start
            # Started again, straight to the primary this time.
            downstream = {"listen": Address("127.0.0.1", 0)} if relay else {}
            async with running_secondary(tmp_path, tls_dir, primary.port, **downstream) as (node, _):
                assert (node.downstream is not None) is relay
                await wait_equal_tid(primary, node)
                return count, node.status()["resumed_bytes"]

    with caplog.at_level(logging.INFO, logger="replicator"):
        count, resumed = asyncio.run(scenario())
    # Kept open, then its blob bytes kept as files at the stop: all but its records' few bytes.
    assert KEEP_MIN_BYTES <= resumed <= count and count - resumed < 4096
    assert "fetched whole" not in caplog.text and "received over earlier connections" in caplog.text
    assert kept() == []
    assert_replica(tmp_path)


def test_a_promotion_while_a_transaction_is_kept_open_drops_it_and_frees_the_storage(tmp_path, tls_dir):
    """Stopping to follow (what a promotion does first) must not leave the storage's commit lock
    taken by a transaction kept open for a connection that will not come."""
    make_records_source(tmp_path)

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir) as primary:
            async with breaking_proxy(primary.port, 3 * MB) as (port, carried), \
                    running_secondary(tmp_path, tls_dir, port, reconnect_min=30, reconnect_max=30) as (node, _):
                await cut_off_once(node, carried)
                assert not commit_lock_free(node.storage)
                await node.stop_following(timeout=10)
                assert commit_lock_free(node.storage)
                assert node.applier.kept_bytes == 0 and node.applier.resume_offer() is None
                assert not [n for n in os.listdir(tmp_path / "dst-blobs" / "tmp") if n.startswith(BLOB_TEMP_PREFIX)]

    asyncio.run(scenario())
