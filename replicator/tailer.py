"""Follow a ``Data.fs`` that another process appends to, as protocol events.

The tailer reads the file with its own parser (``fsformat``), never through
FileStorage, so it can run beside an unmodified ZEO server.  It returns only
committed transactions: a transaction is shipped once its status byte left
``'c'`` and every byte of it is in the file, and only after its whole framing
(every data record header and back pointer) was checked, so that a damaged
transaction yields nothing.

Positions are TIDs: after a pack (the file is replaced through a rename) or a
truncation below our position the tailer reopens the path and finds its last
TID again.  A transaction being read keeps its own file handle until it ends.

Blocking code on purpose: the async layer calls it through ``asyncio.to_thread``;
one caller at a time.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Generator, Iterator
from typing import BinaryIO

from ZODB.blob import FilesystemHelper

from . import packlog
from .errors import (
    ConfigError,
    CorruptedSourceError,
    DivergenceError,
    MissingBlobError,
    ReplicatorError,
    SourceReplacedError,
    SourceRewrittenError,
)
from .fsfile import HEADER_AHEAD, WHOLE_TXN, SourceFile
from .fsformat import (
    BLOB_SNIFF,
    DATA_HDR_LEN,
    FIRST_POS,
    TRANS_HDR_LEN,
    TxnHeader,
    is_blob_data,
    parse_data_header,
    parse_txn_header,
    plain_records,
    u64,
    walk_data_headers,
)
from .integrity import TxnCheck, TxnDigest, TxnIdentity, meta_digest
from .protocol.events import MAX_BLOB_CHUNK, BlobChunk, Event, Record, TxnBegin, TxnEnd
from .storage import missing_blob_dir_hint
from .tid import Z64, tid_repr

log = logging.getLogger("replicator.tailer")

__all__ = ["Tailer"]

#: wait() polls this often: a commit is seen within tens of milliseconds.
POLL = 0.01
#: How long open() waits for a pack to put the packed file in place (two renames apart).
PACK_SWAP_WAIT = 10.0
#: Budget charged per event besides its data, so many empty records still fill it.
EVENT_COST = 64
#: Blob files of one transaction opened before its first event is read (file descriptors).
EAGER_BLOBS = 64


class Tailer:
    """Reads committed transactions of ``path`` as ``TxnBegin Record BlobChunk* ... TxnEnd``."""

    def __init__(self, path: str, blob_dir: str | None = None, *,
                 max_record_size: int = 64 << 20) -> None:
        self.path = os.path.abspath(path)
        self.blob_dir = blob_dir
        self.max_record_size = max_record_size
        self._fshelper = FilesystemHelper(blob_dir) if blob_dir else None
        self._src: SourceFile | None = None   # the file now at ``path``
        self._cur: SourceFile | None = None   # the file the cursor reads (older after a pack)
        self._pos, self._last_tid = FIRST_POS, Z64
        #: The last ``read_events`` stopped because no further committed transaction was there yet.
        self.at_end = False
        self._size: int | None = None  # the file's size, taken once per read_events call
        self._txn: Iterator[Event] | None = None  # events of the transaction under way
        self._txn_end = 0  # where the transaction under way ends
        self._txn_tid = Z64  # and its TID
        self._error: Exception | None = None
        self._seen: tuple[object, ...] | None = None  # what wait() compares against
        self._stat_hint: os.stat_result | None = None  # a stat of path taken just before read_events
        #: How many times another file took the place of the one open at ``path`` (packs).
        self.replacements = 0
        #: (records, blob bytes) the next transaction read leaves out, and the same
        #: for the transaction under way (``skip``).
        self._skip: tuple[int, int] = (0, 0)
        self._txn_skip: tuple[int, int] = (0, 0)

    # -- life cycle ---------------------------------------------------------

    def open(self) -> Tailer:
        """Open the file at ``path``, waiting out a pack that is swapping it in.

        FileStorage's pack renames the file to ``<path>.old`` and then
        ``<path>.pack`` to ``path``: a reader arriving between the two must
        wait, not report a missing file.
        """
        if self._src is None:
            deadline = time.monotonic() + PACK_SWAP_WAIT
            while True:
                try:
                    self._src = self._cur = SourceFile(self.path)
                    break
                except FileNotFoundError:
                    if not os.path.exists(self.path + ".pack"):
                        if os.path.exists(self.path):
                            continue  # the pack's second rename came meanwhile
                        raise ConfigError(f"{self.path}: no such file (is --storage right?)") from None
                    if time.monotonic() > deadline:
                        raise ConfigError(
                            f"{self.path}: no such file, but {self.path}.pack is there: a pack was"
                            f" interrupted before it put the packed file in place (finish or undo it"
                            f" by hand: rename {self.path}.old or {self.path}.pack to {self.path})") from None
                    time.sleep(POLL)
            try:
                self._src.ready()
            except CorruptedSourceError:
                self.close()
                raise
        return self

    def close(self) -> None:
        self._drop_txn()
        for src in {id(s): s for s in (self._src, self._cur) if s is not None}.values():
            src.close()
        self._src = self._cur = None

    def __enter__(self) -> Tailer:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def last_tid(self) -> bytes:
        """TID of the last transaction fully returned (or sought)."""
        return self._last_tid

    # -- positions ----------------------------------------------------------

    def seek_after(self, tid: bytes, *, resume_at: bytes | None = None) -> None:
        """Position the reader just after committed transaction ``tid`` (``Z64``: start).

        Raises ``DivergenceError`` (``fork_tid``: the nearest earlier TID) when
        the file has no such transaction, ``CorruptedSourceError`` on damage.
        ``resume_at``: what ``resumes_across_pack`` answered for ``tid``, a
        pack dropped it; the reader goes on with that transaction.
        """
        self._drop_txn()
        self._switch_to(self._path_source(), tid, resume_at=resume_at)

    def resumes_across_pack(self, theirs: TxnIdentity) -> tuple[bytes, str] | None:
        """Where a reader whose last transaction is ``theirs`` goes on, though a pack dropped it.

        ``(TID of the transaction after it in the file, the file that showed
        it)``, or None.  A pack drops a transaction whose every record was
        superseded, so a secondary that was away during a pack may name a
        last transaction the file no longer has.  FileStorage's pack keeps
        the file it replaced as ``<path>.old`` (and the blob files as
        ``<blob dir>.old``) unless ``pack-keep-old`` is off.  Yes when:

        - ``.old`` holds that transaction, the same one (``TxnIdentity.matches``;
          the metadata alone when its blob files are gone too); and
        - the first transaction after it in our file was rewritten by a pack
          (status ``p``) and ``.old`` holds it with the same metadata: our
          file is the pack of ``.old`` there.  A backup restored next to a
          stale ``.old`` is not, and has no such transaction.

        The reader's history is then ours up to its last transaction, and our
        file from that next transaction on is what a fresh copy of the packed
        file holds after it.  Else, ``.old`` being gone (packed again since)
        or not holding it, the record of the last packs (``packlog``) may
        show it: the metadata of the dropped transaction, and a chain of
        dropped transactions through later packs that leads to the one our
        file has after it.  Anything else, damage in ``.old`` included, is a
        no (the caller refuses as before).
        """
        src = self._path_source()
        if isinstance(src.find(theirs.tid), tuple):
            return None  # not dropped: the usual handshake applies
        nxt = src.successor(theirs.tid)
        if nxt is None:
            return None
        if nxt.status == b"p" and os.path.exists(self.path + ".old"):
            # Without <blob dir>.old, a blob record's file is missing, which says the pack took it.
            old = Tailer(self.path + ".old", self.blob_dir and self.blob_dir + ".old",
                         max_record_size=self.max_record_size)
            # One scan of a given .old at a time: secondaries that come back
            # together after a pack wait for the first scan and reuse it.
            with _old_scan_lock(self.path + ".old"):
                if self._resumes_from(old, nxt, theirs):
                    return nxt.tid, os.path.basename(self.path) + ".old"
        if packlog.successor_of(self.path, theirs.tid, theirs.meta,
                                lambda tid: isinstance(src.find(tid), tuple)) == nxt.tid:
            return nxt.tid, os.path.basename(packlog.log_path(self.path))
        log.info("neither %s.old (gone when packed again since, or with pack-keep-old off) nor the record "
                 "of the last packs (%s) shows that a pack dropped transaction %s of this history",
                 self.path, packlog.log_path(self.path), tid_repr(theirs.tid))
        return None

    def _resumes_from(self, old: Tailer, nxt: TxnHeader, theirs: TxnIdentity) -> bool:
        try:
            old.open()
            _reuse_scan(old._src)  # type: ignore[arg-type]
            kept, now = old.identity(nxt.tid, digest=False), self.identity(nxt.tid, digest=False)
            if kept is None or now is None or kept.meta != now.meta:
                return False
            try:
                had = old.identity(theirs.tid)
            except MissingBlobError:  # its blob files went with the pack: compare what is left
                had = old.identity(theirs.tid, digest=False)
                return had is not None and had.meta == theirs.meta
            return had is not None and had.matches(theirs)
        except (OSError, ReplicatorError) as exc:
            log.info("%s.old cannot show whether a pack dropped transaction %s: %s", self.path,
                     tid_repr(theirs.tid), exc)
            return False
        finally:
            if old._src is not None:
                _keep_scan(old._src)
            old.close()

    def head(self) -> tuple[bytes, int]:
        """Newest committed TID in the file at ``path`` and how many transactions it has.

        Stops short of damage (see ``damage``): the transactions before it
        can still be served, and a reader that reaches it raises the error.
        """
        src = self._path_source()
        src.scan()
        return src.scan_tid, src.count

    def head_pos(self) -> int:
        """Where the newest transaction ``head()`` found begins (0: none yet)."""
        return self._src.scan_last if self._src is not None else 0

    def unscanned_bytes(self) -> int:
        """Bytes past what ``head()`` scanned so far.

        Huge when nothing is open yet or a pack replaced the file: ``head()``
        then scans a whole file, which callers should not do inline.
        """
        src = self._src
        if src is None or src.fd < 0:
            return 1 << 62
        size = self._size_if_same_file(src)
        return 1 << 62 if size is None else max(0, size - src.scan_pos)

    def offer_stat(self, st: os.stat_result | None) -> None:
        """A stat of ``path`` just taken by someone else (the primary's poller), for the next read.

        Any stat taken before the bytes are read will do: a newer size is
        read at the next wake-up.
        """
        self._stat_hint = st

    def _size_if_same_file(self, src: SourceFile) -> int | None:
        """Size of the file at ``path`` if it is still ``src``'s (None: replaced or gone).

        The ``stat`` (or the one offered, ``offer_stat``) is kept for the
        next ``read_events``, which would otherwise take the same one again
        right after.
        """
        st = self._stat_hint = self._hinted_stat() or self._stat()
        return st.st_size if st is not None and (st.st_dev, st.st_ino) == src.ident else None

    def _hinted_stat(self) -> os.stat_result | None:
        """The stat ``offer_stat`` gave, unless it may be older than what this tailer read.

        The poller's look can predate this tailer's last read (a session that
        caught up on its own read past it): its size is then below the
        cursor, or, taken before a pack's rename, it is another file's.  Taken
        as they stand, those would read as a truncation or a replacement and
        send the cursor scanning the whole file again.  Such a hint is
        dropped, and the caller takes a stat of its own.
        """
        st = self._stat_hint
        src = self._src
        if st is None or src is None or (st.st_dev, st.st_ino) != src.ident:
            return None
        if self._cur is src and st.st_size < self._pos:
            return None
        return st

    def _stat(self) -> os.stat_result | None:
        try:
            return os.stat(self.path)
        except OSError:  # between the two renames of a pack; look again later
            return None

    @property
    def damage(self) -> CorruptedSourceError | None:
        """Damage the head scan of the file now at ``path`` ran into, if any."""
        return self._src.damage if self._src is not None else None

    def counts_up_to(self, tids: list[bytes]) -> list[int]:
        """``SourceFile.counts_up_to`` in the file now at the path (ascending ``tids``)."""
        return self._path_source().counts_up_to(tids)

    def digest_of(self, tid: bytes) -> bytes | None:
        """Digest of committed transaction ``tid`` in the file, None if it has none."""
        identity = self.identity(tid)
        return None if identity is None else identity.digest

    def identity(self, tid: bytes, *, digest: bool = True) -> TxnIdentity | None:
        """Digest, metadata digest and status of transaction ``tid``; None if absent.

        ``digest=False``: only the header is read, and the digest is left empty.
        """
        src = self._path_source()
        found = src.find(tid)
        if not isinstance(found, tuple):
            return None
        pos, prev = found
        h = src.confirmed_header(pos, prev)
        if h is None:  # cannot happen for a scanned transaction; be safe
            return None
        if not digest:
            return TxnIdentity(tid, h.status.decode("latin-1"), b"", src.meta_digest(h))
        begin: TxnBegin | None = None
        try:
            # The identity is SHA-256 over the events the stream carries (integrity).
            sha: TxnDigest | None = None
            for event in self._txn_events(src, h, prev):
                if isinstance(event, Record) and sha is not None:
                    sha.add_record(event)
                elif isinstance(event, BlobChunk) and sha is not None:
                    sha.add_chunk(event)
                elif isinstance(event, TxnBegin):
                    begin, sha = event, TxnDigest(event)
                elif isinstance(event, TxnEnd) and begin is not None and sha is not None:
                    return TxnIdentity(tid, begin.status, sha.digest(),
                                       meta_digest(tid, begin.user, begin.description, begin.extension))
        except MissingBlobError as error:
            if not self._replaced(src):
                raise
            # A pack finished while the file was read: it removed the blob files of the revisions
            # it dropped. Routine, not damage: the next look reads the packed file.
            raise SourceReplacedError(
                f"{self.path} was packed while transaction {tid_repr(tid)} was being read (its blob file "
                f"{error.blob_path} was removed by the pack); it is looked up again in the packed file"
            ) from error
        return None

    def next_tid(self) -> bytes | None:
        """TID of the committed transaction after the cursor, if there is one yet; the cursor stays."""
        self._size = None
        try:
            h = self._next_header()
        finally:
            self._size = None
        return None if h is None else h.tid

    def skip(self, records: int, blob_bytes: int) -> None:
        """Leave out the first ``records`` records of the next transaction read,
        with their blobs, then the first ``blob_bytes`` bytes of the blobs after them.

        A secondary that kept them from a broken connection asked so, for the
        transaction ``next_tid`` named.  Whatever transaction comes first
        (a pack may have replaced the file since), it leaves them out, as
        the ``Connection`` of both ends expects; a secondary that kept
        another refuses it.  The ``TxnBegin``, the ``Record`` of a blob
        left out in part, and the ``TxnEnd`` are sent, and the digest still
        covers every byte: what is left out is read and hashed, not sent.
        Asked for more than the transaction holds, it leaves out all of it.
        """
        self._skip = (records, blob_bytes)

    def successor(self, tid: bytes) -> tuple[bytes, str] | None:
        """TID and status of the first committed transaction after ``tid``, if any."""
        h = self._path_source().successor(tid)
        return None if h is None else (h.tid, h.status.decode("latin-1"))

    # -- reading ------------------------------------------------------------

    def read_events(self, max_bytes: int = 4 << 20) -> list[Event]:
        """The next events of committed transactions, about ``max_bytes`` of payload.

        Returns ``[]`` when no further complete committed transaction exists
        yet.  A big transaction spans several calls; the consumer must drop a
        transaction that never gets its ``TxnEnd`` (that happens only when an
        error stops a transaction already under way).  On damage, the complete
        transactions gathered so far are returned and the error is raised by
        the next call.
        """
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        events: list[Event] = []
        done = 0  # events up to here belong to finished transactions
        size = 0
        self.at_end = False
        self._size = None
        started_here = False  # the transaction under way began in this call
        reread = False  # a pack made this call start a transaction again
        while True:
            try:
                while size < max_bytes or not events:  # at least one event, whatever the budget
                    if self._txn is None:
                        h = self._next_header()
                        if h is None:
                            self.at_end = True
                            break
                        skip, self._skip = self._skip, (0, 0)
                        plain = None if any(skip) else self._plain_txn(h)
                        if plain is not None:
                            events += plain
                            size += h.tlen + EVENT_COST * len(plain)
                            self._pos, self._last_tid = h.end, h.tid
                            done = len(events)
                            continue
                        self._txn = self._txn_events(self._cur, h, self._last_tid, skip)  # type: ignore[arg-type]
                        self._txn_skip = skip
                        self._txn_end, self._txn_tid = h.end, h.tid
                        started_here = True
                    event = next(self._txn)
                    events.append(event)
                    if isinstance(event, (Record, BlobChunk)):
                        size += len(event.data or b"")
                    size += EVENT_COST
                    if isinstance(event, TxnEnd):
                        self._txn = None
                        self._pos, self._last_tid = self._txn_end, event.tid
                        done = len(events)
                        started_here = False
                return events
            except MissingBlobError as error:
                self._drop_txn()
                if not self._cur_replaced():
                    return self._stop_at(events, done, error)
                # A pack swapped the file under us and removed the blob files
                # of revisions it dropped, this transaction's among them.
                if not started_here or reread:  # its first events are out already (or no progress)
                    raise SourceReplacedError(
                        f"{self.path} was packed while transaction {tid_repr(self._txn_tid)} "
                        f"was being shipped (its blob file {error.blob_path} was removed by the pack); "
                        "the transaction is dropped unfinished and must be read again from the packed file"
                    ) from error
                # Nothing of it left this call: read on from the packed file
                # (and leave out of it what was to be left out of this one).
                del events[done:]
                self._skip = self._txn_skip
                started_here, reread = False, True
                self._size = None
            except (CorruptedSourceError, DivergenceError, ConfigError) as error:
                self._drop_txn()
                return self._stop_at(events, done, error)

    def _stop_at(self, events: list[Event], done: int, error: ReplicatorError) -> list[Event]:
        """The complete transactions gathered before ``error``; it is raised now or by the next call."""
        if done == 0:
            raise error
        self._error = error
        return events[:done]

    def _cur_replaced(self) -> bool:
        """Whether ``path`` names another file than the one the cursor reads (a pack swapped it)."""
        return self._cur is not None and self._replaced(self._cur)

    def _replaced(self, src: SourceFile) -> bool:
        """Whether ``path`` names another file than ``src`` now (a pack swapped it)."""
        st = self._stat()  # None: between a pack's two renames
        return st is None or (st.st_dev, st.st_ino) != src.ident

    @property
    def commit_under_way(self) -> bool:
        """The last ``read_events`` stopped at bytes past the cursor that are no committed transaction yet."""
        return self.at_end and self._size is not None and self._size > self._pos

    def pending_bytes(self) -> int:
        """Bytes of the file past the cursor (a quick upper bound of what is left to ship).

        A huge number when the cursor's file is not the one at ``path`` any
        more (a pack replaced it: following it means scanning the new file)
        or nothing is open yet.
        """
        cur = self._cur
        if cur is None or cur is not self._src or cur.fd < 0:
            return 1 << 62
        size = self._size_if_same_file(cur)
        return 1 << 62 if size is None else max(0, size - self._pos)

    def wait(self, timeout: float) -> bool:
        """Block until the file may have changed since the last read, or ``timeout``.

        Polls every 10 ms.  Besides size, mtime and inode, it watches the status
        byte of a voted transaction: its flip to committed changes neither size
        nor, within the clock's granularity, mtime.
        """
        if self._txn is not None or self._seen is None or self._error is not None:
            return True
        deadline = time.monotonic() + timeout
        while True:
            if self._snapshot() != self._seen:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(POLL, remaining))

    # -- internals ----------------------------------------------------------

    def _snapshot(self, st: os.stat_result | None = None, read_up_to: int | None = None) -> tuple[object, ...]:
        """What ``wait()`` compares: the file's identity, size and mtime, and the status byte at the cursor.

        ``read_up_to``: the cursor's header was just read against this size;
        the status byte is then the one that read saw (still in the file's
        window), or none if the file ended before it.  That spares a read per
        wake-up, and a flip after the header was read still differs.
        """
        if st is None:
            st = self._stat()
        if st is None:  # a pack renames the old file away first
            return (None,)
        status = b""
        cur = self._cur
        if cur is not None and cur.fd >= 0:
            at = self._pos + 16
            found = cur.view(at, 1) if read_up_to is not None else None
            if found is not None:
                status = found[0][found[1]:found[1] + 1]
            elif read_up_to is None or at < read_up_to:
                status = os.pread(cur.fd, 1, at)
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, status)

    def _drop_txn(self) -> None:
        if self._txn is not None:
            self._txn.close()  # type: ignore[attr-defined]
            self._txn = None

    def _refresh(self, st: os.stat_result | None = None) -> bool:
        """Open the file now at ``path`` if it is another inode; True if it changed.

        ``st``: a stat of ``path`` just taken, if the caller has one.
        """
        if self._src is None:
            raise ConfigError("the tailer is not open")
        if st is None:
            st = self._stat()
        if st is None:
            return False  # between the two renames of a pack; look again later
        if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) != self._src.ident:
            try:
                new = SourceFile(self.path)
            except FileNotFoundError:
                return False  # renamed away since the stat: a pack began; look again later
            old, self._src = self._src, new
            self.replacements += 1
            if old is not self._cur:
                old.close()
            return True
        return False

    def _path_source(self) -> SourceFile:
        self._refresh()
        return self._src  # type: ignore[return-value]

    def _switch_to(self, src: SourceFile, tid: bytes, *, across_pack: bool = False,
                   resume_at: bytes | None = None) -> None:
        """Make ``src`` the cursor's file, just after ``tid``.

        ``across_pack``: the file was replaced while we followed it.  A pack
        drops transactions whose every record was superseded or unreachable;
        if ours was one of them, the pack's region (status ``'p'``) goes on
        past it and we continue with the first transaction after it, which
        is exactly what a fresh copy of the packed file would hold from there
        on.  If the pack dropped ours and everything after it (packed up to
        now, when nothing reached their records), the packed region ends
        before our TID and whatever follows it was committed after the pack;
        we continue after the packed region.  A restored backup that was
        packed looks the same, and following it would ship new commits on
        top of history the file no longer has; so this is done only when the
        file we followed was renamed to ``<path>.old``, which is what
        FileStorage's pack does with the file it replaces.  ``resume_at``:
        a transaction after ``tid`` that the handshake showed the file goes
        on with (``resumes_across_pack``).
        """
        if tid == Z64:
            pos = FIRST_POS
        else:
            found = src.find(tid)
            if isinstance(found, tuple):
                pos = parse_txn_header(src.read(found[0], TRANS_HDR_LEN), found[0]).end
            else:
                nxt = src.successor(tid) if across_pack or resume_at is not None else None
                if nxt is not None and (nxt.tid == resume_at if resume_at is not None else nxt.status == b"p"):
                    pos = nxt.pos
                elif (across_pack and self._replaced_by_pack()
                      and (last := self._packed_end(src, found)) is not None):
                    pos = last
                else:
                    raise DivergenceError(
                        f"{src.path}: transaction {tid_repr(tid)} is not in the file; the nearest "
                        f"earlier one is {tid_repr(found)}", fork_tid=found)
        if self._cur is not src and self._cur is not self._src and self._cur is not None:
            self._cur.close()
        self._cur, self._pos, self._last_tid = src, pos, tid

    def _follow_rewritten(self, src: SourceFile, *, across_pack: bool) -> None:
        """``_switch_to`` the file that changed under the cursor; ``SourceRewrittenError`` if it
        no longer holds the last transaction read (that is the file's damage, not a secondary's
        divergence: the secondaries may hold what the file lost)."""
        try:
            self._switch_to(src, self._last_tid, across_pack=across_pack)
        except DivergenceError as exc:
            raise SourceRewrittenError(src.path, tid_repr(self._last_tid), tid_repr(exc.fork_tid or Z64),
                                       self._pos, fork_tid=exc.fork_tid) from None

    def _replaced_by_pack(self) -> bool:
        """Whether the file we followed is now ``<path>.old``, as FileStorage's pack leaves it."""
        if self._cur is None:
            return False
        try:
            st = os.stat(self.path + ".old")
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._cur.ident

    @staticmethod
    def _packed_end(src: SourceFile, tid: bytes) -> int | None:
        """End of transaction ``tid`` if the pack rewrote it (status ``'p'``), else ``None``."""
        found = src.find(tid) if tid != Z64 else None
        if not isinstance(found, tuple):
            return None
        h = parse_txn_header(src.read(found[0], TRANS_HDR_LEN), found[0])
        return h.end if h.status == b"p" else None

    def _next_header(self) -> TxnHeader | None:
        """Header of the next committed transaction after the cursor, following replacements.

        The file's identity and size are looked at once per ``read_events``
        call (``_size`` is None at its start), not once per transaction: a
        caught-up primary ships a few transactions per wake-up, and those
        system calls were most of its cost per commit.  Every byte read
        during the call is read after that size was taken, which is what
        ``committed_header`` needs to tell a commit in progress from damage.
        """
        if self._size is None:
            # One stat serves the change snapshot, the identity check and the
            # size (pending_bytes() or the poller may just have taken it).
            st, self._stat_hint = self._hinted_stat() or self._stat(), None
            if self._refresh(st) or self._cur is not self._src:
                self._follow_rewritten(self._src, across_pack=True)  # type: ignore[arg-type]
            src = self._cur
            if src is None or not src.ready():
                self._seen = self._snapshot(st)
                return None
            same = st is not None and (st.st_dev, st.st_ino) == src.ident
            size = st.st_size if same else src.size()  # type: ignore[union-attr]
            if size < self._pos:  # truncated below us: whatever we shipped may be gone
                src.close()
                self._src = self._cur = SourceFile(self.path)
                self._follow_rewritten(self._src, across_pack=False)
                self._seen = self._snapshot(st)
                return None
            src.invalidate()
            self._size = size
            h = src.confirmed_header(self._pos, self._last_tid, size)
            self._seen = self._snapshot(st, read_up_to=size)
            return h
        return self._cur.confirmed_header(self._pos, self._last_tid, self._size)  # type: ignore[union-attr]

    def _blob_file(self, oid: bytes, tid: bytes) -> str:
        if self._fshelper is None:
            nearby = missing_blob_dir_hint(self.path)
            error = ConfigError(f"{self.path} has blob records: pass --blob-dir"
                                + (f" ({nearby}: this storage's?)" if nearby else ""))
            error.hint = ("start the primary again with --blob-dir set to the directory the ZEO server (or "
                          "Zope) keeps this storage's blobs in; embedded, that is the blob-dir of the "
                          "<filestorage> section")
            raise error
        return self._fshelper.getBlobFilename(oid, tid)

    def _open_blob(self, oid: bytes, h: TxnHeader, rpos: int) -> BinaryIO:
        """The blob file of record ``rpos``, open for reading."""
        path = self._blob_file(oid, h.tid)
        try:
            return open(path, "rb", buffering=0)
        except FileNotFoundError:
            raise MissingBlobError(self.path, rpos, path) from None

    def _resolve_back(self, src: SourceFile, oid: bytes, back: int, rpos: int
                      ) -> tuple[int, int, bytes]:
        """Follow back pointers: ``(data_pos, plen, data_txn)``, data_pos 0 for no data.

        ``data_txn`` is the tid of the record the pointer names (one hop), as
        ZODB's own iterator reports it.
        """
        data_txn = None
        while True:
            raw = src.read(back, DATA_HDR_LEN + 8)
            if len(raw) < DATA_HDR_LEN:
                raise CorruptedSourceError(self.path, rpos, f"back pointer {back} past end of file")
            target = parse_data_header(raw, back)
            if target.oid != oid or target.vlen != 0 or target.tloc >= back:
                raise CorruptedSourceError(self.path, rpos, f"back pointer {back} does not "
                                           f"name a data record of oid {oid.hex()}")
            if data_txn is None:
                data_txn = target.tid
            if target.plen:
                if target.plen > self.max_record_size:
                    self._too_big(rpos, target.plen)
                return back + DATA_HDR_LEN, target.plen, data_txn
            nxt = u64(raw[DATA_HDR_LEN:DATA_HDR_LEN + 8])
            if nxt == 0:
                return 0, 0, data_txn
            if not FIRST_POS <= nxt < back:  # strictly backwards, so the walk ends
                raise CorruptedSourceError(self.path, back, f"back pointer {nxt} does not "
                                           "point backwards")
            back = nxt

    def _too_big(self, rpos: int, plen: int) -> None:
        error = ConfigError(f"{self.path}: the record at offset {rpos} has {plen} bytes, more than the "
                            f"{self.max_record_size} a record may have to be replicated (max_record_size: "
                            "a record travels whole, in one frame)")
        error.hint = ("store data this big in a ZODB blob, which is streamed in chunks whatever its size; "
                      "the transactions before this one are served")
        raise error

    def _plain_txn(self, h: TxnHeader) -> list[Event] | None:
        """All events of ``h`` at once if it is small and plain (``plain_records``), else None.

        The common commit, shipped without the generator and the per-record
        reads of ``_txn_events``; the same events and digest.  Small: at most
        ``WHOLE_TXN`` bytes, so that its events (one per 43 bytes at most) fit in
        one message (``MAX_MESSAGE_FRAMES``); a bigger one is read event by event,
        each counted against the message's budget.
        """
        if h.tlen > WHOLE_TXN:
            return None
        found = self._cur.view(h.pos, h.end - h.pos)  # type: ignore[union-attr]
        if found is None:
            return None
        buf, start = found
        records = plain_records(buf, start, h, self.max_record_size)
        if records is None:
            return None
        begin = _txn_begin(h, self._last_tid, buf[start + TRANS_HDR_LEN:start + (h.header_end - h.pos)])
        digest = TxnCheck(begin)
        events: list[Event] = [begin]
        for oid, data in records:
            record = Record(oid, data, None)
            digest.add_record(record)
            events.append(record)
        events.append(TxnEnd(h.tid, digest.digest()))
        return events

    def _txn_events(self, src: SourceFile, h: TxnHeader, prev_tid: bytes,
                    skip: tuple[int, int] = (0, 0)) -> Iterator[Event]:
        """Check the framing of ``h`` whole, then yield its events one by one.

        ``skip``: records to leave out, with their blobs, then blob bytes to
        leave out, from the next blob on (``skip()``; read and hashed all the same).
        """
        skip_records, skip_bytes = skip
        backs: dict[int, tuple[int, int, bytes | None]] = {}
        # Blob records by position, found before anything is yielded.  Their
        # files are opened up front (the first EAGER_BLOBS of them): a pack
        # may remove a dropped revision's file while the transaction is
        # shipped, and an open file still reads whole.
        blobs: dict[int, BinaryIO | None] = {}
        # A blob file is named by (oid, tid): a second blob record of an oid in one transaction
        # (ZEO's server stores each blob it receives so) names the file the first one shipped,
        # and goes as a plain Record, with no blob bytes (docs/protocol.md, version 7).
        blob_oids: set[bytes] = set()
        try:
            for dh, back in walk_data_headers(lambda p, n: src.read(p, n, HEADER_AHEAD), h, self.path):
                if dh.plen > self.max_record_size:
                    self._too_big(dh.pos, dh.plen)
                data_pos, plen = dh.pos + DATA_HDR_LEN, dh.plen
                if not plen:  # undo: data from an earlier record, or none at all
                    resolved = self._resolve_back(src, dh.oid, back, dh.pos) if back else (0, 0, None)
                    backs[dh.pos] = resolved
                    data_pos, plen = resolved[0], resolved[1]
                if data_pos and dh.oid not in blob_oids and is_blob_data(src.read(data_pos, min(plen, BLOB_SNIFF))):
                    blob_oids.add(dh.oid)
                    opened = self._open_blob(dh.oid, h, dh.pos)  # it must exist, opened early or not
                    if len(blobs) < EAGER_BLOBS:
                        blobs[dh.pos] = opened
                    else:
                        opened.close()
                        blobs[dh.pos] = None
            begin = _txn_begin(h, prev_tid, src.read(h.pos + TRANS_HDR_LEN, h.header_end - h.pos - TRANS_HDR_LEN))
            digest = TxnCheck(begin)
            yield begin
            pos = h.header_end
            while pos < h.data_end:
                dh = parse_data_header(src.read(pos, DATA_HDR_LEN, WHOLE_TXN), pos)
                data_pos, plen, data_txn = backs.get(pos, (pos + DATA_HDR_LEN, dh.plen, None))
                data = src.read(data_pos, plen, WHOLE_TXN) if data_pos else None
                pos += dh.reclen
                if data is not None and len(data) < plen:
                    raise CorruptedSourceError(self.path, dh.pos, "record data cut short")
                if dh.pos not in blobs:
                    record = Record(dh.oid, data, data_txn)
                    digest.add_record(record)
                    if skip_records:
                        skip_records -= 1
                    else:
                        yield record
                    continue
                assert data is not None  # a blob record found by the first pass, which read its data
                blob_file = blobs.pop(dh.pos) or self._open_blob(dh.oid, h, dh.pos)
                with blob_file:
                    if skip_records:
                        skip_records -= 1
                        for _ in self._blob_events(blob_file, dh.oid, data, data_txn, digest, 1 << 62):
                            pass  # read and hashed; none of it is sent, its Record neither
                        continue
                    skip_bytes = yield from self._blob_events(blob_file, dh.oid, data, data_txn, digest,
                                                              skip_bytes)
            yield TxnEnd(h.tid, digest.digest())
        finally:
            for f in blobs.values():
                if f is not None:
                    f.close()

    @staticmethod
    def _blob_events(f: BinaryIO, oid: bytes, data: bytes, data_txn: bytes | None,
                     digest: TxnCheck, skip: int = 0) -> Generator[Event, None, int]:
        """The blob's ``Record`` then the bytes of its file ``f`` in chunks; never all in memory.

        The first ``skip`` bytes are hashed but not sent; returns how many of
        ``skip`` are left for the next blobs.
        """
        left = os.fstat(f.fileno()).st_size
        record = Record(oid, data, data_txn, left)
        digest.add_record(record)
        yield record
        while left:
            chunk = f.read(min(MAX_BLOB_CHUNK, left))
            if not chunk:
                raise CorruptedSourceError(str(f.name), record.blob_size - left,  # type: ignore[operator]
                                           "blob file shrank while being read")
            left -= len(chunk)
            digest.add_blob_bytes(chunk)
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            if skip:
                chunk, skip = chunk[skip:], 0
            yield BlobChunk(chunk)
        return skip


#: Header scans of ``<path>.old`` files, by path: ``(dev, ino, size)`` and the
#: scan's state.  A pack's ``.old`` never changes, and the first scan of a big
#: one may outlast the secondary's wait for its Welcome: its next attempt then
#: finds the file scanned.  The file itself is not kept open (the next pack
#: deletes it, and an open descriptor would keep its space in use).
_old_scans: dict[str, tuple[tuple[int, int, int], tuple]] = {}
_old_scans_lock = threading.Lock()
#: Held while a ``.old`` file is scanned (``resumes_across_pack``), by path.
_old_scan_locks: dict[str, threading.Lock] = {}


def _old_scan_lock(path: str) -> threading.Lock:
    with _old_scans_lock:
        return _old_scan_locks.setdefault(path, threading.Lock())


def _reuse_scan(src: SourceFile) -> None:
    with _old_scans_lock:
        key, state = _old_scans.get(src.path, (None, None))
    if state is not None and key == (*src.ident, src.size()):
        src.marks, src.scan_pos, src.scan_tid, src.count = list(state[0]), *state[1:]


def _keep_scan(src: SourceFile) -> None:
    if src.fd >= 0 and src.damage is None:
        with _old_scans_lock:
            _old_scans[src.path] = ((*src.ident, src.size()),
                                    (list(src.marks), src.scan_pos, src.scan_tid, src.count))


def _txn_begin(h: TxnHeader, prev_tid: bytes, meta: bytes) -> TxnBegin:
    """The ``TxnBegin`` of ``h``, from the bytes after its header (user, description, extension)."""
    user, rest = meta[:h.ulen], meta[h.ulen:]
    return TxnBegin(h.tid, prev_tid, h.status.decode("latin-1"), user, rest[:h.dlen], rest[h.dlen:])
