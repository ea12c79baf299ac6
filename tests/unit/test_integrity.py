"""The two transaction hashes: the SHA-256 identity nodes compare, the XXH3-128 stream check."""

from __future__ import annotations

import hashlib
import struct

import pytest

from replicator.integrity import CHECK_LEN, DIGEST_LEN, TxnCheck, TxnDigest
from replicator.protocol.events import BlobChunk, Record, TxnBegin, TxnEnd

TID, PREV = bytes(7) + b"\2", bytes(7) + b"\1"
OID = bytes(7) + b"\1"


def _begin(user: bytes = b"alice") -> TxnBegin:
    return TxnBegin(TID, PREV, " ", user, b"note", b"")


def _fed(hasher, begin: TxnBegin, data: bytes, blob: bytes) -> bytes:
    h = hasher(begin)
    h.add_record(Record(OID, data, None))
    h.add_record(Record(bytes(7) + b"\2", b"blob-record", None, len(blob)))
    h.add_chunk(BlobChunk(blob[:3]))
    h.add_blob_bytes(blob[3:])
    return h.digest()


def test_identity_digest_is_domain_prefixed_sha256_of_the_framed_content():
    """Nodes built before the stream check compare identities with this exact value: it must not move."""
    begin = _begin()
    want = hashlib.sha256(b"zodb-repl-txn2\0")
    want.update(TID + struct.pack(">III", 5, 4, 0) + b"alice" + b"note")
    want.update(struct.pack(">c8s8sQQ", b"R", OID, b"\xff" * 8, 4, (1 << 64) - 1) + b"data")
    want.update(struct.pack(">c8s8sQQ", b"R", bytes(7) + b"\2", b"\xff" * 8, 11, 5) + b"blob-record")
    want.update(b"bytes")
    got = _fed(TxnDigest, begin, b"data", b"bytes")
    assert got == want.digest() and len(got) == DIGEST_LEN == 32


def test_stream_check_is_16_bytes_and_differs_from_the_identity():
    check = _fed(TxnCheck, _begin(), b"data", b"bytes")
    assert len(check) == CHECK_LEN == 16
    assert check != _fed(TxnDigest, _begin(), b"data", b"bytes")[:16]
    assert TxnEnd(TID, check).digest == check
    with pytest.raises(ValueError, match="digest"):
        TxnEnd(TID, _fed(TxnDigest, _begin(), b"data", b"bytes"))  # an identity is not a stream check


@pytest.mark.parametrize("hasher", [TxnCheck, TxnDigest])
def test_any_changed_byte_changes_both_hashes(hasher):
    base = _fed(hasher, _begin(), b"data", b"bytes")
    assert _fed(hasher, _begin(), b"data", b"bytes") == base  # deterministic
    assert _fed(hasher, _begin(), b"dbta", b"bytes") != base  # record data
    assert _fed(hasher, _begin(), b"data", b"bytez") != base  # blob bytes
    assert _fed(hasher, _begin(b"alicf"), b"data", b"bytes") != base  # metadata
    # Framing: moving a byte from the record into the blob is another transaction.
    assert _fed(hasher, _begin(), b"dat", b"abytes") != base
