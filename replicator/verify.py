"""Compare two FileStorages transaction by transaction and name the first difference.

Backs ``replicator verify A B``.  Both storages are opened read-only (they may
be in use) and read in lockstep through ZODB's iterator, so memory stays
bounded whatever their size: one record per side, blobs compared chunk by
chunk.  Everything a replica must reproduce is compared: TID, status, user,
description, extension bytes, and per record oid, data, ``data_txn`` and
blob bytes.  One storage being a prefix of the other is a difference too.

Blob bytes can only be compared with both blob directories.  Without them a
blob record's data (its pickle) is still compared, but not its file; such
records are counted in ``blobs_not_compared`` and the result is not
``complete``: equal records do not make the blobs equal.

Packs are not replicated: each node packs on its own.  A pack rewrites the
records of the transactions it covers (status ``p``) and drops those left
with none, but never a transaction's TID, user, description or extension.
So a transaction packed on either side is compared by that identity only,
and one side may lack a transaction inside the other side's packed region
(the pack dropped it).  A fork within packed regions can hide that way, as
it can from any comparison after a pack; the first transaction after them
is compared in full.  A transaction a pack dropped after the last one it
kept (a pack up to now drops the newest transactions when nothing reaches
their records) cannot be told from a fork, and is reported as one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from itertools import zip_longest

from .errors import ConfigError
from .fsformat import is_blob_data
from .storage import StoredRecord, StoredTxn, has_blobs, iter_transactions, open_file_storage, read_blob
from .tid import Z64, tid_repr

__all__ = ["VerifyResult", "verify", "compare_storages", "format_result", "EQUAL"]

EQUAL = "equal"
#: Kinds of difference: transaction metadata, a record, or transactions one side lacks.
TRANSACTION, RECORD, MISSING = "transaction", "record", "missing"

_BLOB_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The outcome of a comparison: equality, or the first difference found.

    ``transactions``/``records``/``blobs`` count what was found equal before
    the difference (everything, when equal).  ``last_common_tid`` is the
    last transaction both sides hold identically.  For a difference, ``tid``
    is the transaction where it is, ``oid`` the record (if it is in one),
    ``field`` what differs (``tid``, ``status``, ``user``, ``description``,
    ``extension``, ``records``, ``oid``, ``data``, ``data_txn``, ``blob``,
    ``transactions``) and ``detail`` says how, for people.  ``missing_in``
    (``"A"`` or ``"B"``) and ``missing`` tell which side lacks how many
    trailing transactions.  ``blobs_not_compared`` counts the blob records
    whose files were not compared (no blob directories): ``equal`` then
    speaks of the records only, and ``complete`` is False.
    """

    kind: str
    transactions: int
    records: int
    blobs: int
    last_common_tid: bytes = Z64
    #: Of ``transactions``, those packed on one side or both (compared by identity only).
    packed: int = 0
    #: Transactions one side lacks inside the other side's packed region, per side lacking them.
    dropped_a: int = 0
    dropped_b: int = 0
    tid: bytes | None = None
    oid: bytes | None = None
    field: str | None = None
    detail: str = ""
    missing_in: str | None = None
    missing: int = 0
    #: Blob records met whose files were not compared (no blob directories given).
    blobs_not_compared: int = 0
    #: Bytes past each side's last committed transaction, which FileStorage ignores: a commit
    #: cut short by a crash, or damage.  Not compared, but reported.
    tail_a: int = 0
    tail_b: int = 0

    @property
    def equal(self) -> bool:
        """No difference found in what was compared (see ``complete``)."""
        return self.kind == EQUAL

    @property
    def complete(self) -> bool:
        """Equal, blob files included: what ``replicator verify`` exits 0 for."""
        return self.equal and not self.blobs_not_compared


def verify(path_a: str, path_b: str, blob_dir_a: str | None = None, blob_dir_b: str | None = None) -> VerifyResult:
    """Open both FileStorages read-only and compare them.

    Blob bytes are compared only when both blob directories are given; giving
    one alone is a ``ConfigError`` (the comparison would report every blob).
    Unusable paths raise ``ConfigError``/``StorageError`` from
    ``open_file_storage``.
    """
    if (blob_dir_a is None) != (blob_dir_b is None):
        raise ConfigError("give a blob directory for both storages or for neither")
    with contextlib.ExitStack() as stack:
        a = open_file_storage(path_a, blob_dir_a, read_only=True)
        stack.callback(a.close)
        b = open_file_storage(path_b, blob_dir_b, read_only=True)
        stack.callback(b.close)
        return dataclasses.replace(compare_storages(a, b), tail_a=_tail(path_a, a), tail_b=_tail(path_b, b))


def _tail(path: str, storage) -> int:
    """Bytes of ``path`` after the end of ``storage``'s last committed transaction."""
    end = getattr(storage, "_pos", None)
    if not isinstance(end, int):
        return 0
    try:
        return max(0, os.path.getsize(path) - end)
    except OSError:
        return 0


@dataclass
class _Counts:
    """What was found equal so far."""

    transactions: int = 0
    records: int = 0
    blobs: int = 0
    #: Blob records whose files are not compared: the storages were opened without blob directories.
    blobs_not_compared: int = 0
    packed: int = 0
    dropped_a: int = 0
    dropped_b: int = 0
    compare_blobs: bool = True
    #: The transaction whose blob files were counted last, and their oids: a blob file is
    #: named by (oid, tid), and ZEO's server writes two records of each blob it stores.
    blob_files: tuple[bytes, set[bytes]] = field(default_factory=lambda: (b"", set()))

    def blob(self, tid: bytes, a: StoredRecord, b: StoredRecord) -> None:
        """Compare the blob files of two records with equal data, or count them as not compared
        (each file once, however many records of its transaction name it)."""
        if not self.compare_blobs:
            # b's data: in a packed transaction a's is only a digest here
            if is_blob_data(b.data) and self._first_record_of_file(tid, a.oid):
                self.blobs_not_compared += 1
        elif (a.is_blob or b.is_blob) and self._first_record_of_file(tid, a.oid):
            _compare_blobs(tid, a, b)
            self.blobs += 1

    def _first_record_of_file(self, tid: bytes, oid: bytes) -> bool:
        """Whether no earlier record of transaction ``tid`` named the blob file of ``oid``."""
        if self.blob_files[0] != tid:
            self.blob_files = (tid, set())
        seen = self.blob_files[1]
        if oid in seen:
            return False
        seen.add(oid)
        return True

    def result(self, kind: str, last: bytes, *, tid: bytes | None = None, oid: bytes | None = None,
               field: str | None = None, detail: str = "", missing_in: str | None = None,
               missing: int = 0) -> VerifyResult:
        return VerifyResult(kind, self.transactions, self.records, self.blobs, last_common_tid=last,
                            packed=self.packed, dropped_a=self.dropped_a, dropped_b=self.dropped_b,
                            tid=tid, oid=oid, field=field, detail=detail, missing_in=missing_in,
                            missing=missing, blobs_not_compared=self.blobs_not_compared)


class _Found(Exception):
    """Carries the first difference out of the nested comparison loops."""

    def __init__(self, kind: str, field: str, detail: str, *, tid: bytes | None = None,
                 oid: bytes | None = None) -> None:
        super().__init__(detail)
        self.kind, self.field, self.detail, self.tid, self.oid = kind, field, detail, tid, oid


def compare_storages(a, b) -> VerifyResult:
    """Compare two open storages (see ``verify``).

    Blob files are compared when both storages have a blob directory;
    otherwise blob records are compared by their data only, and counted.
    """
    counts = _Counts(compare_blobs=has_blobs(a) and has_blobs(b))
    last = Z64
    with contextlib.closing(iter_transactions(a)) as stored_a, contextlib.closing(iter_transactions(b)) as stored_b:
        # A packed transaction (status p) may follow unpacked ones: a secondary
        # that followed its primary across a pack holds the packed
        # transactions after its own.  What a pack dropped on one side is
        # excused only just before a packed transaction of that side.
        txns_a, txns_b = iter(stored_a), iter(stored_b)
        try:
            item_a = next(txns_a, None)
            item_b = next(txns_b, None)
            while True:
                if item_a is None and item_b is None:
                    return counts.result(EQUAL, last)
                if item_a is None or item_b is None:
                    side, rest, first = ("A", txns_b, item_b) if item_a is None else ("B", txns_a, item_a)
                    assert first is not None  # one of the two is not None here
                    missing = 1 + sum(1 for _ in rest)
                    return counts.result(
                        MISSING, last, tid=first[0].tid, field="transactions",
                        detail=f"{side} lacks {missing} transaction(s) after {tid_repr(last)}",
                        missing_in=side, missing=missing)
                (txn_a, records_a), (txn_b, records_b) = item_a, item_b
                if txn_a.tid < txn_b.tid and txn_b.status == "p":
                    counts.dropped_b += 1  # B's pack, which reaches past it, dropped it
                    item_a = next(txns_a, None)
                    continue
                if txn_b.tid < txn_a.tid and txn_a.status == "p":
                    counts.dropped_a += 1
                    item_b = next(txns_b, None)
                    continue
                if "p" in (txn_a.status, txn_b.status) and txn_a.tid == txn_b.tid:
                    _compare_identity(txn_a, txn_b)
                    _compare_kept_records(txn_a.tid, records_a, records_b, counts)
                    counts.packed += 1
                else:
                    _compare_txn(txn_a, txn_b, last)
                    _compare_records(txn_a.tid, records_a, records_b, counts)
                counts.transactions += 1
                last = txn_a.tid
                item_a = next(txns_a, None)
                item_b = next(txns_b, None)
        except _Found as found:
            return counts.result(found.kind, last, tid=found.tid, oid=found.oid, field=found.field,
                                 detail=found.detail)


def _compare_txn(a: StoredTxn, b: StoredTxn, last: bytes) -> None:
    if a.tid != b.tid:
        raise _Found(TRANSACTION, "tid",
                     f"after {tid_repr(last)} A has {tid_repr(a.tid)} where B has {tid_repr(b.tid)}: "
                     f"the histories fork", tid=min(a.tid, b.tid))
    for name in ("status", "user", "description", "extension"):
        value_a, value_b = getattr(a, name), getattr(b, name)
        if value_a != value_b:
            raise _Found(TRANSACTION, name, f"A has {_show(value_a)}, B has {_show(value_b)}", tid=a.tid)


def _compare_identity(a: StoredTxn, b: StoredTxn) -> None:
    """A transaction packed on one side or both: what no pack changes must be equal."""
    for name in ("user", "description", "extension"):
        value_a, value_b = getattr(a, name), getattr(b, name)
        if value_a != value_b:
            raise _Found(TRANSACTION, name, f"A has {_show(value_a)}, B has {_show(value_b)} (a packed "
                                            "transaction keeps these)", tid=a.tid)


def _compare_records(tid: bytes, records_a, records_b, counts: _Counts) -> None:
    for index, (ra, rb) in enumerate(zip_longest(records_a, records_b)):
        if ra is None or rb is None:
            side, extra = ("B", rb) if ra is None else ("A", ra)
            raise _Found(RECORD, "records", f"only {side} has record #{index} (oid {extra.oid.hex()})",
                         tid=tid, oid=extra.oid)
        if ra.oid != rb.oid:
            raise _Found(RECORD, "oid", f"record #{index} is oid {ra.oid.hex()} in A, {rb.oid.hex()} in B",
                         tid=tid, oid=min(ra.oid, rb.oid))
        if ra.data != rb.data:
            raise _Found(RECORD, "data", _data_detail(ra.data, rb.data), tid=tid, oid=ra.oid)
        if ra.data_txn != rb.data_txn:
            raise _Found(RECORD, "data_txn", f"A points to {tid_repr(ra.data_txn)}, B to {tid_repr(rb.data_txn)}",
                         tid=tid, oid=ra.oid)
        counts.blob(tid, ra, rb)
        counts.records += 1


def _compare_kept_records(tid: bytes, records_a, records_b, counts: _Counts) -> None:
    """A transaction packed on a side: the records both sides kept must be equal.

    A pack drops records (superseded revisions, unreachable objects) and may
    turn a back pointer into the data it pointed to, but never changes what
    a record holds; an object has one record per transaction.  Only a digest
    of A's data is kept while B's records are read.
    """
    kept: dict[bytes, tuple[bytes | None, StoredRecord]] = {}
    for ra in records_a:
        kept[ra.oid] = (None if ra.data is None else hashlib.sha256(ra.data).digest(),
                        dataclasses.replace(ra, data=None))
    for rb in records_b:
        found = kept.get(rb.oid)
        if found is None:
            continue
        digest_a, ra = found
        if digest_a != (None if rb.data is None else hashlib.sha256(rb.data).digest()):
            raise _Found(RECORD, "data", "the record both sides kept differs (a packed transaction)", tid=tid,
                         oid=rb.oid)
        counts.blob(tid, ra, rb)
        counts.records += 1


def _compare_blobs(tid: bytes, a: StoredRecord, b: StoredRecord) -> None:
    for side, rec in (("A", a), ("B", b)):
        if rec.blob_file is None:
            raise _Found(RECORD, "blob", f"the blob file is missing in {side}", tid=tid, oid=a.oid)
    assert a.blob_file is not None and b.blob_file is not None and a.blob_size is not None
    if a.blob_size != b.blob_size:
        raise _Found(RECORD, "blob", f"blob is {a.blob_size} bytes in A, {b.blob_size} in B", tid=tid, oid=a.oid)
    # Same sizes: compare chunk by chunk, re-aligning since reads may be short.
    offset = 0
    buf_b = b""
    chunks_b = read_blob(b.blob_file, b.blob_size or 0, _BLOB_CHUNK)
    for chunk_a in read_blob(a.blob_file, a.blob_size, _BLOB_CHUNK):
        while len(buf_b) < len(chunk_a):
            buf_b += next(chunks_b)
        part_b, buf_b = buf_b[:len(chunk_a)], buf_b[len(chunk_a):]
        if chunk_a != part_b:
            at = offset + _first_difference(chunk_a, part_b)
            raise _Found(RECORD, "blob", f"blob bytes differ from offset {at}", tid=tid, oid=a.oid)
        offset += len(chunk_a)
    for _ in chunks_b:  # let the reader check the size it was promised
        pass


def _data_detail(a: bytes | None, b: bytes | None) -> str:
    if a is None or b is None:
        return f"A has {'no data (undone creation)' if a is None else f'{len(a)} bytes'}, " \
               f"B has {'no data (undone creation)' if b is None else f'{len(b)} bytes'}"
    return f"data differ from byte {_first_difference(a, b)} (A {len(a)} bytes, B {len(b)} bytes)"


def _first_difference(a: bytes, b: bytes) -> int:
    """Offset of the first differing byte (the shorter length if one is a prefix)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _show(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def format_result(result: VerifyResult) -> str:
    """Say the outcome for people: one line when equal, the difference otherwise.

    A comparison that left blob files out says so first: equal records are
    not equal storages.
    """
    summary = f"{result.transactions} transaction(s), {result.records} record(s), "
    if result.blobs_not_compared:
        summary += f"{result.blobs_not_compared} blob record(s) whose files were NOT compared"
    else:
        summary += f"{result.blobs} blob(s)"
    if result.packed or result.dropped_a or result.dropped_b:
        summary += (f" ({result.packed} of the transactions packed on a side, compared by TID, user, "
                    f"description, extension and the records both kept; dropped by a pack: {result.dropped_a} in A, "
                    f"{result.dropped_b} in B)")
    tails = "".join(f"\n  note: {side} has {size} byte(s) after its last committed transaction, which "
                    "are no committed transaction and were not compared: a commit under way if the storage is "
                    "in use, else a commit cut short by a crash, or damage (`python -m ZODB.scripts.fstest` "
                    "tells)" for side, size in (("A", result.tail_a), ("B", result.tail_b))
                    if size)
    if result.complete:
        return f"equal: {summary}, up to {tid_repr(result.last_common_tid)}{tails}"
    if result.equal:
        return (f"INCOMPLETE: the records are equal, but {result.blobs_not_compared} blob file(s) were not "
                f"compared: give --blob-dir-a and --blob-dir-b\n"
                f"  {summary}, up to {tid_repr(result.last_common_tid)}{tails}")
    lines = [f"DIFFERENT: {result.detail}"]
    if result.kind != MISSING:
        where = f"transaction {tid_repr(result.tid)}"
        if result.oid is not None:
            where += f", oid {result.oid.hex()}"
        lines.append(f"  first difference in {where} ({result.field})")
    lines.append(f"  equal before it: {summary}; last common transaction {tid_repr(result.last_common_tid)}")
    if result.kind == MISSING:
        lines.append(f"  ({result.missing_in} holds the same history so far: if it is a replica still catching up, "
                     "or the other side took commits while this ran, run it again once the replica has "
                     "caught up with writes stopped)")
    return "\n".join(lines) + tails
