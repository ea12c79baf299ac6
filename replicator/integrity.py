"""Transaction digests over a transaction's canonical content.

Both cover what a re-commit must reproduce exactly: the TID, user,
description and extension bytes, and for every record in order its oid,
``data_txn``, data and blob bytes.  They leave out the status byte, which a
pack changes.  Lengths are framed so that no two different transactions can
feed the hash the same bytes.  Two functions over the same feed, for two jobs:

- ``TxnDigest``, 32 bytes of SHA-256: a transaction's *identity*.  The same
  function run over a committed storage gives the same value, so two nodes
  compare their histories by it (the handshake does, for the secondary's last
  transaction; so do ``/identities`` and rewind).  Cryptographic,
  because a history comparison must not be foolable by crafted content.
- ``TxnCheck``, 16 bytes of XXH3-128: the *stream check* in every ``TxnEnd``.
  The primary's tailer computes it while reading the source; the secondary
  recomputes it from what it received (and from the files it kept of a broken
  transfer) and refuses to commit on a mismatch.  It catches accidental
  damage between the two reads (a bug, bad memory, a kept file changed on
  disk); the wire itself is authenticated by TLS, and the primary is trusted.
  A non-cryptographic hash does that job at a fifth of SHA-256's cost: about
  0.35 CPU-seconds less per 600 MB replicated on each side, where the
  secondary's single event-loop thread bounds a catch-up
  (docs/performance.md).

SHA-256 because OpenSSL runs it on the CPU's SHA extensions where there are
any (about twice BLAKE2b's speed on the machines we measure; BLAKE3 gains
nothing at ZODB's record sizes).  Domain prefixes keep the kinds apart.  Each
record is fed as one framed header and its data: two ``update`` calls, not
one per field.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import xxhash

if TYPE_CHECKING:  # the events import this module (its lengths); avoid a cycle
    from .protocol.events import BlobChunk, Record, TxnBegin

__all__ = ["TxnDigest", "TxnCheck", "TxnHash", "DIGEST_LEN", "CHECK_LEN", "TxnIdentity", "meta_digest"]

DIGEST_LEN = 32
CHECK_LEN = 16
_PERSON = b"zodb-repl-txn2\0"
_CHECK_PERSON = b"zodb-repl-chk1\0"
_META_PERSON = b"zodb-repl-meta2\0"
_NO_TXN = b"\xff" * 8
_NO_DATA = 0xFFFFFFFFFFFFFFFF
_NO_BLOB = 0xFFFFFFFFFFFFFFFF
_record_header = struct.Struct(">c8s8sQQ").pack


class TxnHash:
    """Incremental hash of one transaction, fed the same events that go on the wire."""

    __slots__ = ("_h",)
    _new: ClassVar[Callable[[], Any]]

    def __init__(self, begin: TxnBegin) -> None:
        self._h = h = type(self)._new()
        h.update(begin.tid + struct.pack(">III", len(begin.user), len(begin.description), len(begin.extension))
                 + begin.user + begin.description + begin.extension)

    def add_record(self, record: Record) -> None:
        data = record.data
        self._h.update(_record_header(b"R", record.oid,
                                      _NO_TXN if record.data_txn is None else record.data_txn,
                                      _NO_DATA if data is None else len(data),
                                      _NO_BLOB if record.blob_size is None else record.blob_size))
        if data:
            self._h.update(data)

    def add_blob_bytes(self, data: bytes | memoryview) -> None:
        self._h.update(data)

    def add_chunk(self, chunk: BlobChunk) -> None:
        self._h.update(chunk.data)

    def digest(self) -> bytes:
        return self._h.digest()  # type: ignore[no-any-return]


class TxnDigest(TxnHash):
    """A transaction's identity: ``DIGEST_LEN`` bytes of SHA-256, compared between nodes."""

    __slots__ = ()
    _new = staticmethod(lambda: hashlib.sha256(_PERSON))


class TxnCheck(TxnHash):
    """A transaction's stream check: ``CHECK_LEN`` bytes of XXH3-128, sent in ``TxnEnd``."""

    __slots__ = ()
    _new = staticmethod(lambda: xxhash.xxh3_128(_CHECK_PERSON))


def meta_digest(tid: bytes, user: bytes, description: bytes, extension: bytes) -> bytes:
    """Digest of a transaction's identity without its records.

    A pack rewrites a transaction's records (it drops superseded revisions and
    unreachable objects) but never its TID, user, description or extension,
    so this is what two nodes compare when one of them packed.
    """
    h = hashlib.sha256(_META_PERSON)
    h.update(tid + struct.pack(">III", len(user), len(description), len(extension)) + user + description
             + extension)
    return h.digest()


@dataclass(frozen=True, slots=True)
class TxnIdentity:
    """What the handshake compares of one committed transaction."""

    tid: bytes
    status: str
    digest: bytes
    meta: bytes

    def matches(self, other: TxnIdentity) -> bool:
        """Same transaction: equal digests, or, if either side packed it, equal metadata."""
        if self.tid != other.tid:
            return False
        if self.digest == other.digest:
            return True
        return "p" in (self.status, other.status) and self.meta == other.meta
