"""FileStorage ``Data.fs`` layout: parse and check record headers, no I/O.

The file starts with a 4-byte magic: ``b"FS30"`` (ZODB on Python 3) or
``b"FS21"`` (written under Python 2; same layout, older pickles).  Then come transaction records::

    pos   tid(8) tlen(8) status(1) ulen(2) dlen(2) elen(2)   -- 23-byte header
          user(ulen) description(dlen) extension(elen)
          data records, exactly filling up to pos + tlen
    pos + tlen   tlen again (8, the "redundant length")
    pos + tlen + 8   next transaction

and each data record is::

    rpos  oid(8) tid(8) prev(8) tloc(8) vlen(2) plen(8)     -- 42-byte header
          pickle(plen), or when plen == 0 a back pointer(8) to an earlier
          record of the same oid whose data this record reuses (0: no data,
          the undo of the object's creation)

FileStorage writes a transaction at vote with status ``'c'`` and overwrites
that byte with ``' '`` (or ``'p'``, ``'u'``) at ``tpc_finish`` only after every
other byte is in the file.  So a ``'c'`` status means "not committed yet" and
a committed status on a transaction the file does not fully hold is damage.

The checks are those of ZODB's ``fstest``; each failure raises
``CorruptedSourceError`` naming the offset of the transaction or record at
fault.  Reading goes through a ``read(pos, n) -> bytes`` callable so that the
same walk serves a transaction held in memory and one streamed from disk.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ZODB.blob import is_blob_record
from ZODB.FileStorage.format import DATA_HDR, DATA_HDR_LEN, TRANS_HDR, TRANS_HDR_LEN

from .errors import CorruptedSourceError

__all__ = [
    "is_blob_data",
    "MAGICS",
    "TRANS_HDR_LEN",
    "DATA_HDR_LEN",
    "COMMITTED",
    "CHECKPOINT",
    "TxnHeader",
    "DataHeader",
    "Reader",
    "parse_txn_header",
    "check_txn_header",
    "parse_data_header",
    "check_data_header",
    "walk_data_headers",
    "plain_records",
    "u64",
]

MAGICS = (b"FS30", b"FS21")
#: Statuses of a committed transaction: normal, packed, undone-into.
COMMITTED = (b" ", b"p", b"u")
#: Status of a transaction written at vote and not yet finished.
CHECKPOINT = b"c"
#: Smallest offset a record may have: right after the magic.
FIRST_POS = 4

Reader = Callable[[int, int], bytes]

_txn_struct = struct.Struct(TRANS_HDR)
_data_struct = struct.Struct(DATA_HDR)
_u64 = struct.Struct(">Q")


def u64(raw: bytes) -> int:
    return _u64.unpack(raw)[0]


@dataclass(slots=True)
class TxnHeader:
    """A transaction header found at ``pos``; the properties are offsets in the file."""

    pos: int
    tid: bytes
    tlen: int
    status: bytes
    ulen: int
    dlen: int
    elen: int

    @property
    def header_end(self) -> int:
        """Offset of the first data record."""
        return self.pos + TRANS_HDR_LEN + self.ulen + self.dlen + self.elen

    @property
    def data_end(self) -> int:
        """Offset of the redundant length, just after the last data record."""
        return self.pos + self.tlen

    @property
    def end(self) -> int:
        """Offset of the next transaction."""
        return self.pos + self.tlen + 8


@dataclass(slots=True)
class DataHeader:
    """A data record header found at ``pos``."""

    pos: int
    oid: bytes
    tid: bytes
    prev: int
    tloc: int
    vlen: int
    plen: int

    @property
    def reclen(self) -> int:
        """Bytes of the whole record: header, then pickle or back pointer."""
        return DATA_HDR_LEN + (self.plen if self.plen else 8)


def parse_txn_header(raw: bytes, pos: int) -> TxnHeader:
    """Decode the first ``TRANS_HDR_LEN`` bytes of ``raw`` (no checks)."""
    tid, tlen, status, ulen, dlen, elen = _txn_struct.unpack_from(raw)
    return TxnHeader(pos, tid, tlen, status, ulen, dlen, elen)


def check_txn_header(h: TxnHeader, prev_tid: bytes, path: str) -> None:
    """Raise ``CorruptedSourceError`` if the header alone shows damage.

    ``'c'`` passes: whether it is a commit in progress or damage depends on
    what follows it, which the caller knows.
    """
    if h.tid <= prev_tid:
        raise CorruptedSourceError(path, h.pos, f"transaction id {h.tid.hex()} is not "
                                   f"after the previous one {prev_tid.hex()}")
    if h.status not in COMMITTED and h.status != CHECKPOINT:
        raise CorruptedSourceError(path, h.pos, f"invalid transaction status {h.status!r}")
    if h.tlen < h.header_end - h.pos:
        raise CorruptedSourceError(path, h.pos, f"transaction length {h.tlen} is shorter "
                                   f"than its header ({h.header_end - h.pos})")


def parse_data_header(raw: bytes, pos: int) -> DataHeader:
    """Decode the first ``DATA_HDR_LEN`` bytes of ``raw`` (no checks)."""
    oid, tid, prev, tloc, vlen, plen = _data_struct.unpack_from(raw)
    return DataHeader(pos, oid, tid, prev, tloc, vlen, plen)


def _pointer_ok(value: int, txn_pos: int) -> bool:
    return value == 0 or FIRST_POS <= value < txn_pos


def check_data_header(dh: DataHeader, txn: TxnHeader, path: str) -> None:
    """Raise ``CorruptedSourceError`` unless ``dh`` belongs inside ``txn``."""
    problem = None
    if dh.tid != txn.tid:
        problem = f"record tid {dh.tid.hex()} differs from its transaction's {txn.tid.hex()}"
    elif dh.tloc != txn.pos:
        problem = f"record points to transaction {dh.tloc}, not {txn.pos}"
    elif dh.vlen != 0:
        problem = f"record has a version (vlen {dh.vlen}), which FileStorage no longer writes"
    elif dh.pos + dh.reclen > txn.data_end:
        problem = f"record of {dh.reclen} bytes runs past its transaction's end {txn.data_end}"
    elif not _pointer_ok(dh.prev, txn.pos):
        problem = f"previous-record pointer {dh.prev} is outside the file before the transaction"
    if problem is not None:
        raise CorruptedSourceError(path, dh.pos, problem)


def walk_data_headers(read: Reader, txn: TxnHeader, path: str) -> Iterator[tuple[DataHeader, int]]:
    """Yield every data record header of ``txn`` with its back pointer (0 if it has data).

    Checks that the records exactly fill the transaction and that each back
    pointer lies before the transaction; the caller checks the target itself.
    """
    pos = txn.header_end
    while pos < txn.data_end:
        raw = read(pos, DATA_HDR_LEN)
        if len(raw) < DATA_HDR_LEN or pos + DATA_HDR_LEN > txn.data_end:
            raise CorruptedSourceError(path, pos, "data records do not exactly fill the transaction")
        dh = parse_data_header(raw, pos)
        check_data_header(dh, txn, path)
        back = 0
        if dh.plen == 0:
            raw = read(pos + DATA_HDR_LEN, 8)
            if len(raw) < 8:
                raise CorruptedSourceError(path, pos, "back pointer cut short")
            back = u64(raw)
            if not _pointer_ok(back, txn.pos):
                raise CorruptedSourceError(path, pos, f"back pointer {back} is outside the "
                                           "file before the transaction")
        yield dh, back
        pos += dh.reclen


#: How much of a record ``is_blob_data`` looks at.  A record's first pickle
#: is its class; for a blob that is ``ZODB.blob.Blob``, a few dozen bytes.
BLOB_SNIFF = 512


def is_blob_data(data: bytes | None) -> bool:
    """``ZODB.blob.is_blob_record`` on the record's first bytes only.

    ZODB's function searches the whole record for ``ZODB.blob`` before it
    unpickles the class; on every record of a catch-up that scan cost both
    ends several percent of their time.  The class pickle comes first and a
    blob's is far shorter than ``BLOB_SNIFF``, so the answer is the same.
    """
    return data is not None and data.find(b"ZODB.blob", 0, BLOB_SNIFF) != -1 and is_blob_record(data[:BLOB_SNIFF])


def plain_records(buf: bytes, start: int, txn: TxnHeader, max_plen: int) -> list[tuple[bytes, bytes]] | None:
    """``(oid, data)`` of every record of ``txn`` if all are plain, else None.

    ``buf[start:]`` holds the whole transaction.  Plain means what nearly
    every commit is: each record carries its own data (no back pointer),
    passes ``check_data_header``, and is not a blob.  Anything else, damage
    included, returns None and the caller takes the careful path
    (``walk_data_headers``), which says exactly what is wrong.  One unpack
    per record straight out of the buffer: this runs for every transaction
    a primary ships.
    """
    unpack = _data_struct.unpack_from
    tid, tpos = txn.tid, txn.pos
    off = start + (txn.header_end - tpos)
    end = start + txn.tlen
    records = []
    while off < end:
        hdr_end = off + DATA_HDR_LEN
        if hdr_end > end:
            return None
        oid, rtid, prev, tloc, vlen, plen = unpack(buf, off)
        data_end = hdr_end + plen
        if (rtid != tid or tloc != tpos or vlen or not plen or plen > max_plen or data_end > end
                or not (prev == 0 or FIRST_POS <= prev < tpos)):
            return None
        data = buf[hdr_end:data_end]
        if data.find(b"ZODB.blob", 0, BLOB_SNIFF) != -1:
            return None  # perhaps a blob: is_blob_data decides, on the careful path
        records.append((oid, data))
        off = data_end
    return records
