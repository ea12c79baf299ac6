"""``verify`` names the first difference between two real FileStorages."""

from __future__ import annotations

import dataclasses
import os

import pytest
from ZODB.serialize import referencesf

from replicator.applier import Applier
from replicator.errors import ConfigError
from replicator.protocol.events import BlobChunk, Record
from replicator.storage import open_file_storage
from replicator.tid import tid_repr, tid_time
from replicator.verify import format_result, verify

from .zodb_workload import build_source, flatten, reference_stream, replace_txn, tids_of


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("verify-source")
    path, blobs = str(d / "Data.fs"), str(d / "blobs")
    build_source(path, blobs, seed=11, commits=30)
    return path, blobs, reference_stream(path, blobs)


def replica(tmp_path, txns, name="replica"):
    """A FileStorage holding ``txns``, applied through the applier."""
    path, blobs = str(tmp_path / name / "Data.fs"), str(tmp_path / name / "blobs")
    storage = open_file_storage(path, blobs)
    try:
        Applier(storage).apply(flatten(txns))
    finally:
        storage.close()
    return path, blobs


def compare(source, other):
    return verify(source[0], other[0], source[1], other[1])


def test_equal(source, tmp_path):
    result = compare(source, replica(tmp_path, source[2]))
    assert result.equal
    assert result.transactions == len(source[2])
    assert result.records == sum(isinstance(e, Record) for e in flatten(source[2]))
    assert result.blobs > 0
    assert result.last_common_tid == source[2][-1][0].tid
    assert format_result(result).startswith(f"equal: {len(source[2])} transaction(s)")


def test_storage_compared_with_itself_is_equal(source):
    assert verify(source[0], source[0], source[1], source[1]).equal


def first_record(txns, predicate):
    for i, txn in enumerate(txns):
        for j, event in enumerate(txn):
            if isinstance(event, Record) and predicate(event):
                return i, j
    raise LookupError


def test_altered_data(source, tmp_path):
    txns = source[2]
    i, j = first_record(txns[3:], lambda r: r.data is not None and r.blob_size is None)
    i += 3
    rec = txns[i][j]

    def change(events):
        events[j] = dataclasses.replace(rec, data=rec.data[:-1] + bytes([rec.data[-1] ^ 1]))
        return events
    result = compare(source, replica(tmp_path, replace_txn(txns, i, change)))
    assert (result.kind, result.field, result.tid, result.oid) == ("record", "data", txns[i][0].tid, rec.oid)
    assert result.transactions == i
    assert result.last_common_tid == txns[i - 1][0].tid
    assert f"byte {len(rec.data) - 1}" in result.detail
    text = format_result(result)
    assert text.startswith("DIFFERENT") and rec.oid.hex() in text and txns[i][0].tid.hex() in text


def test_altered_blob_bytes(source, tmp_path):
    txns = source[2]
    i = next(i for i, t in enumerate(txns) if any(isinstance(e, BlobChunk) for e in t))
    k = next(k for k, e in enumerate(txns[i]) if isinstance(e, BlobChunk))
    oid = next(e.oid for e in reversed(txns[i][:k]) if isinstance(e, Record))

    def change(events):
        data = events[k].data
        events[k] = BlobChunk(data[:5] + bytes([data[5] ^ 0xFF]) + data[6:])
        return events
    result = compare(source, replica(tmp_path, replace_txn(txns, i, change)))
    assert (result.kind, result.field, result.tid, result.oid) == ("record", "blob", txns[i][0].tid, oid)
    assert "offset 5" in result.detail


def test_a_record_that_lost_its_back_pointer(source, tmp_path):
    """An undo's record written as plain data on one side: the same bytes, another history."""
    txns = source[2]
    i, j = first_record(txns, lambda r: r.data_txn is not None and r.data is not None and r.blob_size is None)
    rec = txns[i][j]

    def change(events):
        events[j] = dataclasses.replace(rec, data_txn=None)
        return events
    result = compare(source, replica(tmp_path, replace_txn(txns, i, change)))
    assert (result.kind, result.field, result.tid, result.oid) == ("record", "data_txn", txns[i][0].tid, rec.oid)
    assert result.detail == f"A points to {tid_repr(rec.data_txn)}, B to {tid_repr(None)}"


def test_missing_transactions(source, tmp_path):
    txns = source[2]
    short = replica(tmp_path, txns[:-3])
    result = compare(source, short)
    assert (result.kind, result.missing_in, result.missing) == ("missing", "B", 3)
    assert result.tid == txns[-3][0].tid
    assert result.last_common_tid == txns[-4][0].tid
    assert result.detail.startswith("B lacks 3 transaction(s) after " + txns[-4][0].tid.hex())
    reverse = verify(short[0], source[0], short[1], source[1])
    assert (reverse.missing_in, reverse.missing) == ("A", 3)
    assert "A lacks 3" in format_result(reverse)
    # A replica still catching up looks like this too: the report says so.
    assert "(A holds the same history so far: if it is a replica still catching up" in format_result(reverse)
    empty = replica(tmp_path, [], name="empty")
    assert compare(source, empty).missing == len(txns)


@pytest.mark.parametrize("field, value", [("user", b"mallory \xff"), ("description", b""),
                                          ("extension", b"\x80\x03}q\x00.")])
def test_altered_metadata(source, tmp_path, field, value):
    txns = source[2]
    i = len(txns) // 2
    if getattr(txns[i][0], field) == value:
        i += 1

    def change(events):
        events[0] = dataclasses.replace(events[0], **{field: value})
        return events
    result = compare(source, replica(tmp_path, replace_txn(txns, i, change)))
    assert (result.kind, result.field, result.tid, result.oid) == ("transaction", field, txns[i][0].tid, None)
    assert result.transactions == i


def test_a_packed_transaction_in_the_middle_is_compared_by_what_both_kept(source, tmp_path):
    """A replica that followed its primary across a pack holds packed transactions after unpacked ones."""
    txns = source[2]
    i = len(txns) // 2
    while not any(isinstance(e, Record) and e.data and e.blob_size is None for e in txns[i]):
        i += 1
    j = next(n for n, e in enumerate(txns[i]) if isinstance(e, Record) and e.data and e.blob_size is None)

    def mark(events, alter=False):
        events[0] = dataclasses.replace(events[0], status="p")
        if alter:
            events[j] = dataclasses.replace(events[j], data=events[j].data + b"x")
        return events
    marked = compare(source, replica(tmp_path, replace_txn(txns, i, mark), name="marked"))
    assert marked.equal and marked.packed == 1, format_result(marked)
    altered = compare(source, replica(tmp_path, replace_txn(txns, i, lambda e: mark(e, True)), name="altered"))
    assert (altered.kind, altered.field, altered.tid, altered.oid) == ("record", "data", txns[i][0].tid,
                                                                      txns[i][j].oid)


def test_fork_names_the_tid(source, tmp_path):
    txns = source[2]
    last = txns[-1]
    later = (int.from_bytes(last[0].tid, "big") + 1).to_bytes(8, "big")

    def change(events):
        events[0] = dataclasses.replace(events[0], tid=later)
        events[-1] = dataclasses.replace(events[-1], tid=later)
        return events
    result = compare(source, replica(tmp_path, replace_txn(txns, len(txns) - 1, change)))
    assert (result.kind, result.field, result.tid) == ("transaction", "tid", last[0].tid)
    assert "fork" in result.detail


def test_missing_blob_file(source, tmp_path):
    other = replica(tmp_path, source[2])
    storage = open_file_storage(other[0], other[1], read_only=True)
    try:
        i, j = first_record(source[2], lambda r: r.blob_size is not None)
        rec, tid = source[2][i][j], source[2][i][0].tid
        os.remove(storage.loadBlob(rec.oid, tid))
    finally:
        storage.close()
    result = compare(source, other)
    assert (result.field, result.tid, result.oid) == ("blob", tid, rec.oid)
    assert "missing in B" in result.detail


def test_blob_dirs_both_or_neither(source, tmp_path):
    with pytest.raises(ConfigError):
        verify(source[0], source[0], source[1], None)
    # Without blob directories the records are still compared.
    assert verify(source[0], source[0]).equal
    assert tids_of(source[2])


def test_without_blob_dirs_the_blob_records_are_counted_as_not_compared(source, tmp_path):
    """A blob changed on one side is invisible without blob directories: the result must say so."""
    blob_records = sum(isinstance(e, Record) and e.blob_size is not None for e in flatten(source[2]))
    assert blob_records
    other = replica(tmp_path, source[2])
    storage = open_file_storage(other[0], other[1], read_only=True)
    try:
        i, j = first_record(source[2], lambda r: r.blob_size is not None)
        path = storage.loadBlob(source[2][i][j].oid, source[2][i][0].tid)
    finally:
        storage.close()
    os.chmod(path, 0o644)
    with open(path, "wb") as fh:
        fh.write(b"tampered")
    assert compare(source, other).field == "blob"
    result = verify(source[0], other[0])
    assert result.equal and not result.complete
    assert (result.blobs, result.blobs_not_compared) == (0, blob_records)
    text = format_result(result)
    assert text.startswith("INCOMPLETE") and not text.startswith("equal")
    assert f"{blob_records} blob file(s) were not compared" in text and "--blob-dir-a and --blob-dir-b" in text
    # With both directories the count is of blobs compared, and nothing is left out.
    full = compare(source, replica(tmp_path, source[2], name="full"))
    assert full.complete and (full.blobs, full.blobs_not_compared) == (blob_records, 0)
    assert "NOT compared" not in format_result(full)


def test_blob_records_of_packed_transactions_are_counted_as_not_compared(source, tmp_path):
    packed = packed_copy(source, tmp_path, "packed", len(source[2]) // 2)
    with_dirs = compare(source, packed)
    without = verify(source[0], packed[0])
    assert with_dirs.complete and with_dirs.packed and with_dirs.blobs
    assert without.equal and not without.complete and without.blobs_not_compared == with_dirs.blobs


def packed_copy(source, tmp_path, name: str, at: int) -> tuple[str, str]:
    """An equal replica, then packed to the time of transaction ``at``, as its node would pack it."""
    path, blobs = replica(tmp_path, source[2], name=name)
    storage = open_file_storage(path, blobs)
    try:
        storage.pack(tid_time(source[2][at][0].tid), referencesf)
    finally:
        storage.close()
    return path, blobs


def test_a_pack_on_one_side_is_not_a_difference(source, tmp_path):
    txns = source[2]
    packed = packed_copy(source, tmp_path, "packed", len(txns) // 2)
    for result in (compare(source, packed), verify(packed[0], source[0], packed[1], source[1])):
        assert result.equal, format_result(result)
        assert result.packed > 0
        assert result.transactions + result.dropped_a + result.dropped_b == len(txns)
        assert result.last_common_tid == txns[-1][0].tid
    assert "packed on a side" in format_result(result)
    # Both packed, to different times.
    other = packed_copy(source, tmp_path, "packed-later", len(txns) * 3 // 4)
    assert verify(packed[0], other[0], packed[1], other[1]).equal


def test_a_pack_does_not_hide_what_differs_after_it(source, tmp_path):
    txns = source[2]
    i, j = first_record(txns[len(txns) * 3 // 4:], lambda r: r.data and r.blob_size is None)
    i += len(txns) * 3 // 4

    def change(events):
        events[j] = dataclasses.replace(events[j], data=events[j].data + b"x")
        return events
    altered = replica(tmp_path, replace_txn(txns, i, change), name="altered")
    storage = open_file_storage(*altered)
    try:
        storage.pack(tid_time(txns[len(txns) // 2][0].tid), referencesf)
    finally:
        storage.close()
    result = compare(source, altered)
    assert (result.kind, result.field, result.tid) == ("record", "data", txns[i][0].tid)


def test_a_packed_transaction_keeps_its_identity(source, tmp_path):
    # Packed transactions are compared by what a pack never changes.
    txns = source[2]
    i = 3

    def pack_mark(events):
        events[0] = dataclasses.replace(events[0], status="p")
        return events

    def pack_mark_and_rename(events):
        events[0] = dataclasses.replace(events[0], status="p", user=b"mallory")
        return events
    marked = txns
    for k in range(i):
        marked = replace_txn(marked, k, pack_mark)
    marked = replace_txn(marked, i, pack_mark_and_rename)
    result = compare(source, replica(tmp_path, marked))
    assert (result.kind, result.field, result.tid) == ("transaction", "user", txns[i][0].tid)
    assert result.transactions == i and result.packed == i
