"""The Data.fs header parser on hand-built bytes: every framing rule, and garbage."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.errors import CorruptedSourceError
from replicator.fsformat import (
    DATA_HDR_LEN,
    TRANS_HDR_LEN,
    check_txn_header,
    parse_txn_header,
    walk_data_headers,
)

TID = bytes.fromhex("03ed4b1c2a3b4c5d")
POS = 1000


def data_record(oid, *, data=None, back=0, tid=TID, prev=0, tloc=POS, vlen=0, plen=None):
    if plen is None:
        plen = len(data) if data else 0
    head = struct.pack(">8s8sQQHQ", oid, tid, prev, tloc, vlen, plen)
    return head + (data if data else struct.pack(">Q", back))


def txn(records, *, status=b" ", tid=TID, user=b"alice", desc=b"why", ext=b"", extra=b""):
    body = b"".join(records) + extra
    tlen = TRANS_HDR_LEN + len(user) + len(desc) + len(ext) + len(body)
    head = struct.pack(">8sQcHHH", tid, tlen, status, len(user), len(desc), len(ext))
    return head + user + desc + ext + body + struct.pack(">Q", tlen)


def reader(raw, base=POS):
    return lambda pos, n: raw[pos - base:pos - base + n]


def walk(raw):
    h = parse_txn_header(raw, POS)
    return h, list(walk_data_headers(reader(raw), h, "Data.fs"))


OID1, OID2 = b"\0" * 7 + b"\1", b"\0" * 7 + b"\2"


def test_good_transaction():
    raw = txn([data_record(OID1, data=b"pickle"), data_record(OID2, back=500, prev=400)])
    h, recs = walk(raw)
    assert (h.tid, h.status, h.end - h.pos) == (TID, b" ", len(raw))
    assert h.header_end == POS + TRANS_HDR_LEN + len(b"alice") + len(b"why")
    assert [(dh.oid, dh.plen, back) for dh, back in recs] == [(OID1, 6, 0), (OID2, 0, 500)]
    assert recs[1][0].pos == recs[0][0].pos + DATA_HDR_LEN + 6
    check_txn_header(h, b"\0" * 8, "Data.fs")


@pytest.mark.parametrize("record, reason", [
    (data_record(OID1, data=b"x", tid=b"\0" * 8), "record tid"),
    (data_record(OID1, data=b"x", tloc=4), "points to transaction"),
    (data_record(OID1, data=b"x", vlen=3), "version"),
    (data_record(OID1, data=b"x", prev=POS), "previous-record pointer"),
    (data_record(OID1, data=b"x", prev=2), "previous-record pointer"),
    (data_record(OID1, back=POS), "back pointer"),
    (data_record(OID1, back=3), "back pointer"),
    (data_record(OID1, data=b"x", plen=10_000), "runs past"),
])
def test_bad_record(record, reason):
    raw = txn([data_record(OID2, data=b"fine"), record])
    with pytest.raises(CorruptedSourceError) as info:
        walk(raw)
    assert reason in info.value.reason
    assert info.value.offset == POS + TRANS_HDR_LEN + 8 + DATA_HDR_LEN + 4  # the second record


def test_records_must_fill_the_transaction():
    raw = txn([data_record(OID1, data=b"x")], extra=b"\0" * 10)
    with pytest.raises(CorruptedSourceError, match="exactly fill"):
        walk(raw)


@pytest.mark.parametrize("change, reason", [
    (dict(tid=b"\0" * 8), "not after"),
    (dict(status=b"\0"), "status"),
    (dict(status=b"x"), "status"),
])
def test_bad_transaction_header(change, reason):
    h = parse_txn_header(txn([], **change), POS)
    with pytest.raises(CorruptedSourceError, match=reason) as info:
        check_txn_header(h, b"\0" * 7 + b"\1", "Data.fs")
    assert info.value.offset == POS


def test_length_shorter_than_header():
    raw = bytearray(txn([], user=b"u" * 50))
    raw[8:16] = struct.pack(">Q", 30)
    with pytest.raises(CorruptedSourceError, match="shorter than its header"):
        check_txn_header(parse_txn_header(bytes(raw), POS), b"\0" * 8, "Data.fs")


def test_checkpoint_status_is_not_judged_alone():
    check_txn_header(parse_txn_header(txn([], status=b"c"), POS), b"\0" * 8, "Data.fs")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.data())
def test_garbage_only_ever_raises_corrupted_source(body, data):
    """Whatever the bytes, the walk ends or names damage; it never crashes or loops."""
    raw = txn([body])
    if data.draw(st.booleans()):  # or a good transaction with bytes flipped
        raw = bytearray(txn([data_record(OID1, data=b"p" * 30), data_record(OID2, back=8)]))
        for _ in range(data.draw(st.integers(1, 5))):
            i = data.draw(st.integers(TRANS_HDR_LEN + 8, len(raw) - 9))
            raw[i] = data.draw(st.integers(0, 255))
        raw = bytes(raw)
    h = parse_txn_header(raw, POS)
    try:
        recs = list(walk_data_headers(reader(raw), h, "Data.fs"))
    except CorruptedSourceError as error:
        assert POS <= error.offset < h.data_end
    else:
        end = h.header_end
        for dh, back in recs:
            assert dh.pos == end and dh.tid == TID and dh.tloc == POS
            assert back == 0 or 4 <= back < POS
            end += dh.reclen
        assert end == h.data_end
