"""One opened ``Data.fs`` inode: positioned reads and an index of its committed transactions.

Reads go through a small window (one ``pread`` serves a whole small
transaction, or the next headers of a big one), so that the tailer makes
about one system call per small transaction.  The header index is extended
incrementally; it keeps one mark every ``MARK_EVERY`` transactions so that
finding a TID walks few headers and the index stays small for huge files.
A new ``SourceFile`` of a file that another one in this process has open
starts from the furthest scan of it (a primary's sessions each open their
own, and its head scan has read every header already): connecting a
secondary does not read the whole file again.

The file handle stays valid when a pack renames another file over the path:
whoever holds this object can finish reading the old file.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
import time
import weakref

from .errors import CorruptedSourceError, SourceRewrittenError
from .fsformat import (
    CHECKPOINT,
    FIRST_POS,
    MAGICS,
    TRANS_HDR_LEN,
    TxnHeader,
    check_txn_header,
    parse_txn_header,
    u64,
)
from .integrity import meta_digest
from .tid import Z64, tid_repr

__all__ = ["SourceFile", "WHOLE_TXN", "HEADER_AHEAD", "MARK_EVERY"]

#: Transactions up to this size are read in one system call.
WHOLE_TXN = 1 << 20
#: Read-ahead when walking headers: most small transactions come in one read.
HEADER_AHEAD = 64 << 10
#: One transaction in this many is remembered in the index.
MARK_EVERY = 256
#: How long to wait before believing damage that a concurrent abort could fake.
CONFIRM_DELAY = 0.05
#: A committed transaction cut short for this long gets a warning (once).
TORN_WARNING = 30.0

log = logging.getLogger("replicator.tailer")

#: (path, offset) of torn commits warned about in this process: each reader of the file (every
#: session and the primary's head) meets the same one, and one warning says it.
_TORN_WARNED: set[tuple[str, int]] = set()


#: The open ``SourceFile`` that scanned each file furthest, by ``(st_dev, st_ino)``.  While
#: its descriptor is open the inode cannot be freed and reused, so a file opened meanwhile
#: with the same device and inode is the same file and may start from its scan.
_furthest: weakref.WeakValueDictionary[tuple[int, int], SourceFile] = weakref.WeakValueDictionary()
_furthest_lock = threading.Lock()


class SourceFile:
    """One opened ``Data.fs`` inode: a window reader and an incremental header scan."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        st = os.fstat(self.fd)
        self.ident = (st.st_dev, st.st_ino)
        self.magic_ok = False
        self._window, self._wpos = b"", 0
        self.marks: list[tuple[bytes, int, bytes]] = []  # (tid, pos, prev_tid)
        self.scan_pos, self.scan_tid, self.count = FIRST_POS, Z64, 0
        #: Where the newest transaction scanned begins (0: none yet).
        self.scan_last = 0
        #: Damage the scan ran into; the scan stops there and the transactions
        #: before it stay usable (a reader that gets there raises it itself).
        self.damage: CorruptedSourceError | None = None
        self._torn: tuple[int, float, bool] | None = None  # (offset, first seen, warned)
        #: What this scan reached, for other readers of the file: ``(scan_pos, scan_tid,
        #: count, scan_last, marks)``, replaced as a whole (another thread may read it).
        self.scanned: tuple[int, bytes, int, int, int] | None = None
        self._adopt()

    def _adopt(self) -> None:
        """Start from the furthest scan of this file by a reader that still has it open."""
        with _furthest_lock:
            other = _furthest.get(self.ident)
            state = other.scanned if other is not None and other.fd >= 0 else None
            if state is None:
                return
            # Both descriptors are open on (st_dev, st_ino): one file.  Marks are only ever
            # appended, so the first ``n`` are those of the state read.
            self.scan_pos, self.scan_tid, self.count, self.scan_last, n = state
            self.marks = other.marks[:n]  # type: ignore[union-attr]
            self.scanned = state

    def _publish(self) -> None:
        """Offer this scan to readers opened from now on, if it is the furthest of the file."""
        self.scanned = state = (self.scan_pos, self.scan_tid, self.count, self.scan_last, len(self.marks))
        with _furthest_lock:
            other = _furthest.get(self.ident)
            if (other is None or other is self or other.fd < 0 or other.scanned is None
                    or other.scanned[0] < state[0]):
                _furthest[self.ident] = self

    def close(self) -> None:
        fd, self.fd = self.fd, -1  # closed from here on for ``_adopt``, before the inode may go
        if fd >= 0:
            os.close(fd)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def ready(self) -> bool:
        """True once the magic is there; a brand-new file may still be empty."""
        if not self.magic_ok:
            magic = os.pread(self.fd, FIRST_POS, 0)
            if len(magic) < FIRST_POS:
                return False
            if magic not in MAGICS:
                raise CorruptedSourceError(self.path, 0, f"not a FileStorage file (magic {magic!r})")
            self.magic_ok = True
        return True

    def invalidate(self) -> None:
        """Forget cached bytes: past the last committed transaction they may change."""
        self._window = b""

    def view(self, pos: int, n: int) -> tuple[bytes, int] | None:
        """``(window, offset of pos in it)`` if the window holds ``[pos, pos+n)``, else None.

        Lets a parser unpack many fields straight out of one buffer, with no
        copy and no call per field.
        """
        off = pos - self._wpos
        if 0 <= off and off + n <= len(self._window):
            return self._window, off
        return None

    def read(self, pos: int, n: int, ahead: int = 0) -> bytes:
        """Bytes ``[pos, pos+n)``, fewer at the end of the file."""
        off = pos - self._wpos
        if 0 <= off and off + n <= len(self._window):
            return self._window[off:off + n]
        want = max(n, ahead)
        parts, got = [], 0
        while got < want:  # in parts: a single read returns at most about 2 GB
            ask = min(want - got, 1 << 30)
            part = os.pread(self.fd, ask, pos + got)
            if part:
                parts.append(part)
                got += len(part)
            if len(part) < ask:
                break  # the end of the file: no second read to be told so
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if want <= max(ahead, WHOLE_TXN):
            self._window, self._wpos = data, pos
        return data[:n]

    def meta_digest(self, h: TxnHeader) -> bytes:
        """``integrity.meta_digest`` of transaction ``h``: its TID, user, description and extension."""
        raw = self.read(h.pos + TRANS_HDR_LEN, h.header_end - h.pos - TRANS_HDR_LEN, HEADER_AHEAD)
        user, rest = raw[:h.ulen], raw[h.ulen:]
        return meta_digest(h.tid, user, rest[:h.dlen], rest[h.dlen:])

    def committed_header(self, pos: int, prev_tid: bytes, size: int | None = None
                         ) -> TxnHeader | None:
        """The committed transaction at ``pos``, or None if none is there yet.

        ``size`` (default: now) must have been taken before the bytes at
        ``pos`` were read: a ``'c'`` status with bytes after the transaction
        is only damage if those bytes were there while the status read ``'c'``.
        Raises ``CorruptedSourceError`` on damage.
        """
        if size is None:
            self.invalidate()
            size = self.size()
        if pos + TRANS_HDR_LEN > size:
            return None  # no whole header there yet: no read (the usual end of a caught-up read)
        raw = self.read(pos, TRANS_HDR_LEN, HEADER_AHEAD)
        if len(raw) < TRANS_HDR_LEN:
            return None  # the header itself is still being written
        h = parse_txn_header(raw, pos)
        check_txn_header(h, prev_tid, self.path)
        if h.status == CHECKPOINT:
            if size > h.end:
                raise CorruptedSourceError(self.path, pos, "transaction still has status 'c' "
                                           "but the file goes on after it")
            return None  # written at vote, tpc_finish not done (or a torn tail)
        if size < h.end and self.size() < h.end:
            # FileStorage flips the status only once every byte is written, so
            # this is a torn tail (a crash, a cut copy).  FileStorage itself
            # truncates it when it next opens the file, as it does a 'c' one,
            # and writes the next commit in its place: wait for that, ship
            # nothing of it, and say so if it lasts.
            self._note_torn(pos, h.tlen)
            return None
        if h.end - pos <= WHOLE_TXN and self.view(pos, h.end - pos) is None:
            self.read(pos, h.end - pos)  # the whole transaction in one read
        redundant = self.read(h.data_end, 8)
        if len(redundant) < 8 or u64(redundant) != h.tlen:
            raise CorruptedSourceError(self.path, pos, f"redundant length at {h.data_end} "
                                       f"does not repeat the transaction length {h.tlen}")
        return h

    def _note_torn(self, pos: int, tlen: int) -> None:
        now = time.monotonic()
        if self._torn is None or self._torn[0] != pos:
            self._torn = (pos, now, False)
        elif not self._torn[2] and now - self._torn[1] > TORN_WARNING:
            self._torn = (pos, self._torn[1], True)
            if (self.path, pos) in _TORN_WARNED:
                return  # another reader of the file (a session, the head) said it already
            _TORN_WARNED.add((self.path, pos))
            log.warning("%s: the committed transaction at offset %d (%d bytes) has been cut short for "
                        "%.0f s (torn tail?); nothing of it is shipped. FileStorage truncates such a "
                        "tail when it next opens the file", self.path, pos, tlen, now - self._torn[1])

    def scan(self) -> None:
        """Extend the header index to the newest committed transaction, or to damage."""
        if self.damage is not None or not self.ready():
            return
        self.invalidate()
        size = self.size()
        if size < self.scan_pos:
            # Shorter than what was read of it: committed transactions are gone (FileStorage
            # itself only ever cuts what no commit finished).  Damage, and for good.
            raise SourceRewrittenError(self.path, tid_repr(self.scan_tid), None, size)
        try:
            while (h := self.confirmed_header(self.scan_pos, self.scan_tid, size)) is not None:
                if self.count % MARK_EVERY == 0:
                    self.marks.append((h.tid, h.pos, self.scan_tid))
                self.scan_pos, self.scan_tid, self.count = h.end, h.tid, self.count + 1
                self.scan_last = h.pos
        except CorruptedSourceError as exc:
            self.damage = exc
        self.invalidate()
        if self.scanned is None or self.scanned[0] != self.scan_pos:
            self._publish()

    def find(self, tid: bytes) -> tuple[int, bytes] | bytes:
        """``(pos, prev_tid)`` of committed transaction ``tid``, else the nearest earlier TID."""
        self.scan()
        i = bisect.bisect_right(self.marks, tid, key=lambda m: m[0]) - 1
        if i < 0:
            return Z64
        _, pos, prev = self.marks[i]
        while pos < self.scan_pos:
            h = parse_txn_header(self.read(pos, TRANS_HDR_LEN, HEADER_AHEAD), pos)
            if h.tid == tid:
                return pos, prev
            if h.tid > tid:
                break
            pos, prev = h.end, h.tid
        return prev

    def successor(self, tid: bytes) -> TxnHeader | None:
        """Header of the first committed transaction with a TID greater than ``tid``."""
        self.scan()
        i = bisect.bisect_right(self.marks, tid, key=lambda m: m[0]) - 1
        pos = self.marks[i][1] if i >= 0 else FIRST_POS
        while pos < self.scan_pos:
            h = parse_txn_header(self.read(pos, TRANS_HDR_LEN, HEADER_AHEAD), pos)
            if h.tid > tid:
                return h
            pos = h.end
        return None

    def counts_up_to(self, tids: list[bytes]) -> list[int]:
        """For each of the ascending ``tids``, how many committed transactions the file has with a
        TID up to it (a TID the file lacks, one a pack dropped, counts those before it).

        One walk over the headers from the mark before the first, however many TIDs.
        """
        self.scan()
        out: list[int] = []
        if not tids:
            return out
        i = bisect.bisect_right(self.marks, tids[0], key=lambda m: m[0]) - 1
        count, pos = (i * MARK_EVERY, self.marks[i][1]) if i >= 0 else (0, FIRST_POS)
        want = iter(tids)
        tid = next(want)
        while pos < self.scan_pos:
            h = parse_txn_header(self.read(pos, TRANS_HDR_LEN, HEADER_AHEAD), pos)
            while h.tid > tid:
                out.append(count)
                nxt = next(want, None)
                if nxt is None:
                    return out
                tid = nxt
            count += 1
            pos = h.end
        out += [count] * (len(tids) - len(out))
        return out

    def confirmed_header(self, pos: int, prev_tid: bytes, size: int | None = None
                         ) -> TxnHeader | None:
        """``committed_header``, believing a damage verdict only if a second look agrees.

        An aborted vote truncates the file and the next commit rewrites the
        same bytes, so a read racing with both can see a mix that looks
        damaged; the second look takes a fresh size.
        """
        try:
            return self.committed_header(pos, prev_tid, size)
        except CorruptedSourceError:
            time.sleep(CONFIRM_DELAY)
            return self.committed_header(pos, prev_tid)
