"""The secondary's applier: re-commits shipped transactions into a local FileStorage.

It turns the stream ``TxnBegin Record (BlobChunk*) ... TxnEnd`` into ZODB's
restore API: ``tpc_begin(txn, tid, status)``, ``restore`` or ``restoreBlob``
per record, then ``tpc_vote`` and ``tpc_finish`` once the digest of what was
received equals the one the primary sent.  Blob files and the directory
entries that name them are fsynced before the vote, and every TID ``apply``
returns is durable and may be acknowledged.

Group commit: FileStorage fsyncs its file in every ``tpc_finish``, which
bounds a catching-up secondary at one fsync per transaction.  While ``apply``
runs, the applier switches that fsync off for its own storage instance only
(``_GroupCommit``; never the module-wide switch, other storages of the
process keep theirs) and fsyncs the file once when the call ends, before it
returns the TIDs.  A batch of one transaction (a caught-up secondary) costs
one fsync, as before; a batch of a thousand costs one instead of a thousand.
Until that fsync the batch's transactions are committed in the storage
(readers of the file may see them) but are not acknowledged; a crash loses at
most that unacknowledged tail, which the primary sends again.

``apply(events, durable=False)`` leaves that fsync to ``make_durable(tids)``,
which another thread may run while this one applies the next batch: the disk
writes back one batch while the CPU commits the next (a catch-up otherwise
waits for the disk about a quarter of its time).  ``make_durable`` touches
nothing but the file descriptor (``fsync``), so it is the one call that may
overlap ``apply``.

Transaction data in memory: FileStorage writes each record of a transaction
to its temporary file (``Data.fs.tmp``), then copies the file into
``Data.fs`` at the vote, a few system calls per record and per transaction.
While the applier commits, that temporary file is a memory buffer instead
(``_GroupCommit``), and a transaction that outgrows ``MEMORY_TEMP`` moves to
the real file; outside the applier's transactions (a promoted node's own
commits) FileStorage's file is back in place.  Measured apart from the
network, it made applying a 575 MB catch-up about 15% faster.

The code blocks.  The async layer hands it *batches* of events (a thread
hop, if any, per batch, not per record: a small batch is applied on the
event loop itself, see ``may_stall``); a transaction may span several
batches.  One ``Applier`` must be used by one thread at a time.

Any failure leaves the storage as it was before the transaction in progress:
the transaction is aborted, its blob files are removed, and the applier is
ready for the same transaction again (which is what a reconnect sends).

Resuming a transaction: over a slow link that breaks now and then, a
transaction with big blobs may never arrive whole if each reconnect fetches
it from its start.  ``abort(keep=True)`` (a broken link, not bad data)
therefore keeps the blob files received so far, once they reach
``KEEP_MIN_BYTES``: the storage's transaction is aborted as always, and
the files wait, under temporary names, outside the storage.
``resume_offer()`` names them for the next ``Hello``; once the primary
agreed (``resume(count)``) and sends that transaction again without those
bytes, each kept file is checked against its ``Record`` (oid and size),
hashed again from disk into the transaction's digest and completed with
what follows.  Nothing kept is committed unless the whole transaction's
digest equals the primary's; any mismatch drops what was kept and the
transaction is fetched whole.  A stop hands the kept files to the next
process on the storage (``save_kept`` writes a manifest, which the next
``Applier`` reads); a crash leaves no manifest, and they are removed.

Within one process the applier keeps more: a transaction cut off once it
received ``KEEP_MIN_BYTES`` (records or blobs) stays open in the storage
instead (``_suspended``: ``tpc_begin`` done, its records in FileStorage's
temporary data, its blobs placed, the blob in part open), so that a
transaction of many records but no blobs resumes too.  ``resume_offer()``
then names its complete records and the bytes of its blob in part; once
the primary agreed, its ``TxnBegin`` must be the same, the ``Record`` of a
blob in part comes again and must be the same, and what follows goes on
into the same storage transaction and digest.  The storage's commit lock
stays taken meanwhile, which nothing else on a secondary needs while it
follows (a pack of it waits); whatever ends the following (a stop, a
promotion, a refusal) turns it into kept blob files or drops it
(``release_suspended``).
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, NoReturn

from ZODB.blob import remove_committed
from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileStorage
from ZODB.FileStorage.FileStorage import TempFormatter
from ZODB.POSException import POSError

from .errors import (
    ConfigError,
    DivergenceError,
    DurabilityError,
    IntegrityError,
    RemoteProtocolError,
    ResumeError,
    StorageError,
)
from .fsformat import is_blob_data
from .integrity import TxnCheck
from .protocol.events import BlobChunk, Event, Record, TxnBegin, TxnEnd
from .status import size_text
from .storage import UNSYNCED_SUFFIX, check_restore_support, fsync_dir, has_blobs, record_fsync_failure
from .tid import tid_repr

__all__ = ["Applier", "TRACE_ENV"]

log = logging.getLogger("replicator.applier")

#: Debugging/benchmark aid, off by default: when this environment variable
#: names a file, the applier appends ``<tid hex> <unix time>`` for every
#: transaction once it is durable (one buffered write per ``apply`` call).
TRACE_ENV = "REPLICATOR_TRACE_FILE"

# FileStorage._finish_finish as ZODB 5.6 to 6.x write it: flush, fsync, then
# publish the new position, index and last TID and finish the blobs.  The
# group commit re-does exactly that minus the fsync, so it is used only when
# the installed ZODB's method still refers to exactly these names.
_FINISH_FINISH_NAMES = ('_file', 'flush', 'fsync', 'fileno', '_nextpos', '_pos', '_index', 'update',
                        '_tindex', '_ltid', '_blob_tpc_finish')

#: A transaction's records are kept in memory up to this many bytes, in
#: FileStorage's temporary file beyond (so memory stays bounded whatever the
#: transaction's size).
MEMORY_TEMP = 4 << 20

#: A transaction cut off by a broken link keeps its blob files for the next
#: connection once they hold this many bytes; less is fetched again.
KEEP_MIN_BYTES = 1 << 20

#: FileStorage saves its index (``Data.fs.index``: where each object's newest
#: record is, and up to where the file was read) only when it closes or packs;
#: opened after a crash, it reads the file again from where the saved index
#: ends, which after a catch-up of many gigabytes takes minutes.  The applier
#: saves it whenever the file grew by this much since, and by at least
#: ``INDEX_SAVE_RATIO`` times the index's own size (a big database's index is
#: hundreds of megabytes), with everything applied durable.
INDEX_SAVE_BYTES = 256 << 20
INDEX_SAVE_RATIO = 16

#: Written in the blob temporary directory by a stopping process that kept
#: blob files, for the next one (``Applier.save_kept``).
KEPT_MANIFEST = "repl-kept.json"

#: Written in the blob temporary directory while a transaction is kept open
#: (``_suspend``, which may last as long as the link is down): the blob files
#: it placed under their final names.  Should the process be killed, the
#: next one removes them (``remove_orphans``); nothing else would.
OPEN_MANIFEST = "repl-open.json"

#: Called with (tid, oids) inside ``tpc_finish``, before ``lastTransaction`` moves,
#: so that a serving secondary can invalidate its clients' caches in time.
Invalidate = Callable[[bytes, frozenset], None]


@dataclass
class _Blob:
    """The blob file of the current record, while its chunks arrive."""

    record: Record
    path: str
    file: BinaryIO
    left: int


@dataclass
class _KeptBlob:
    """A blob file of a transaction cut off by a broken link, kept for its resumption."""

    oid: bytes
    size: int  # the blob's size, as its Record announced it
    path: str  # a temporary file outside the blob directory
    have: int  # bytes of it in the file


@dataclass
class _Kept:
    """What a broken link left of a transaction: its blob files, in stream order."""

    begin: TxnBegin
    blobs: list[_KeptBlob]

    @property
    def count(self) -> int:
        return sum(blob.have for blob in self.blobs)

    def remove(self) -> None:
        _remove_files(self.blobs)
        self.blobs = []


def _remove_files(blobs: Iterable[_KeptBlob]) -> None:
    """Remove kept blob files, whatever is left of them."""
    for blob in blobs:
        with contextlib.suppress(OSError):
            os.remove(blob.path)


@dataclass
class _Txn:
    """The transaction in progress: everything ``abort`` must undo."""

    begin: TxnBegin
    meta: TransactionMetaData
    digest: TxnCheck
    started: bool = False  # tpc_begin succeeded, so tpc_abort is owed
    oids: list[bytes] = field(default_factory=list)
    blob: _Blob | None = None
    placed: list[_KeptBlob] = field(default_factory=list)  # blob files placed so far, at their committed paths
    #: Kept blob files of a resumed transaction not yet matched with their Record.
    resume: collections.deque[_KeptBlob] = field(default_factory=collections.deque)
    resumed: int = 0  # bytes taken from kept files, or received over earlier connections
    received: int = 0  # bytes of record data and blobs received so far
    again: bool = False  # resumed with a blob in part: its Record comes again first
    dirs: set[str] = field(default_factory=set)  # directories whose entries must be fsynced
    journaled: bool = False  # its placed blob files are listed in OPEN_MANIFEST


def _blob_placed(txn: _Txn, oid: bytes) -> bool:
    """Whether an earlier record of ``txn`` placed the blob file of ``oid`` (a few blobs a transaction)."""
    return any(placed.oid == oid for placed in txn.placed)


#: Incoming blob files are named so; whatever a crash leaves of them is removed at start.
BLOB_TEMP_PREFIX = "repl-"


def _incoming_blob_file(name: str) -> bool:
    """Whether ``name``, in a blob temporary directory, is one of the files an applier writes."""
    return name.startswith(BLOB_TEMP_PREFIX) and name.endswith(".tmp")


def discard_leftovers(temp_dir: str) -> tuple[int, int]:
    """Remove what an applier left in the blob temporary directory ``temp_dir``: ``(files, bytes)``.

    For a storage that a primary serves now: blob files a stopped (or killed)
    secondary kept, or was receiving, for a transaction it will never
    commit, and their manifest.  Left there, a big blob cut off would take
    its room on disk for ever.
    """
    files = size = 0
    try:
        names = os.listdir(temp_dir)
    except OSError:
        return 0, 0
    for name in names:
        blob = _incoming_blob_file(name)
        if blob or name == KEPT_MANIFEST:
            path = os.path.join(temp_dir, name)
            try:
                length = os.stat(path).st_size
                os.remove(path)
            except OSError:
                continue
            if blob:
                files += 1
                size += length
    return files, size


def remove_orphans(temp_dir: str, last_tid: bytes, blob_filename: Callable[[bytes, bytes], str]) -> int:
    """Remove the blob files that ``OPEN_MANIFEST`` in ``temp_dir`` lists, if any, and the manifest.

    They are the files a transaction kept open had placed when its process
    was killed; they are removed only if that transaction is newer than
    ``last_tid``, the storage's last one (a process killed between the
    commit and the removal of the manifest leaves a list of committed files).
    ``blob_filename(oid, tid)`` is where the storage keeps a blob.  Returns
    how many files were removed.
    """
    manifest = os.path.join(temp_dir, OPEN_MANIFEST)
    try:
        with open(manifest) as f:
            data = json.load(f)
        tid = bytes.fromhex(data["tid"])
        oids = [bytes.fromhex(oid) for oid in data["oids"]]
        if len(tid) != 8 or any(len(oid) != 8 for oid in oids):
            raise ValueError("not 8-byte ids")
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("cannot read %s (%s): blob files of a transaction kept open when a process was killed "
                    "may be left in the blob directory", manifest, exc)
        oids = []
    removed = 0
    if oids and tid > last_tid:
        for oid in oids:
            path = blob_filename(oid, tid)
            try:
                if os.path.exists(path):
                    remove_committed(path)
                    removed += 1
            except OSError as exc:
                log.warning("cannot remove %s, a blob file of transaction %s, which was never committed: %s",
                            path, tid_repr(tid), exc)
    if removed:
        log.warning("removed %d blob file(s) of transaction %s, which a secondary killed while it kept the "
                    "transaction open had placed; it was never committed", removed, tid_repr(tid))
    with contextlib.suppress(OSError):
        os.remove(manifest)
    return removed


class Applier:
    """Applies the transaction stream to ``storage`` (an open, writable FileStorage).

    ``temp_dir`` is where incoming blob files are written; it defaults to the
    storage's own blob temporary directory, which is on the same file system
    as the blobs so that placing a blob is a rename.  ``invalidate`` is
    called as ``invalidate(tid, oids)`` while each transaction finishes.
    """

    def __init__(self, storage, *, temp_dir: str | None = None, invalidate: Invalidate | None = None,
                 group_commit: bool = True, trace_file: str | None = None) -> None:
        check_restore_support()
        self._storage = storage
        self._blobs = has_blobs(storage)
        self._temp_dir = temp_dir
        self._invalidate = invalidate
        self._txn: _Txn | None = None
        #: Transactions committed by this applier, durable or not yet.
        self.committed = 0
        self._group = _GroupCommit.install(storage) if group_commit else None
        #: What a broken link left of a transaction (``abort(keep=True)``),
        #: and the same once the primary agreed to resume it (``resume``).
        self._kept: _Kept | None = None
        self._resuming: _Kept | None = None
        #: A transaction cut off by a broken link and kept open in the
        #: storage, and the same once the primary agreed to resume it.
        self._suspended: _Txn | None = None
        self._continuing: _Txn | None = None
        #: Bytes primaries left out because this applier had kept them from a
        #: broken link (``resume``), summed over its resumptions and its life.
        self.resumed_bytes = 0
        #: Where the file ended at the last save of the storage's index, and the index's size.
        self._index_pos = getattr(storage, "_pos", 0)
        self._index_size = 0
        self._dirs_durable = False  # make_all_durable fsyncs them once
        trace_file = trace_file or os.environ.get(TRACE_ENV) or None
        self._trace = open(trace_file, "a", buffering=1 << 16) if trace_file else None
        if self._trace is not None:
            # When this process was ready to replicate (interpreter and imports done).
            self._trace.write(f"start {time.time():.6f}\n")
            self._trace.flush()
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Delete blob files a killed process left half received: nothing refers to them.

        Those a stopped process kept for a resumption (``save_kept``) are
        taken over instead, if its manifest still describes them.
        """
        temp_dir = self._incoming_dir
        if temp_dir is None:
            return
        try:
            names = os.listdir(temp_dir)
        except OSError:
            return
        if OPEN_MANIFEST in names:
            remove_orphans(temp_dir, self.last_tid, self._storage.fshelper.getBlobFilename)
        if KEPT_MANIFEST in names:
            self._kept = self._load_kept(os.path.join(temp_dir, KEPT_MANIFEST))
        ours = {blob.path for blob in self._kept.blobs} if self._kept is not None else set()
        for name in names:
            path = os.path.join(temp_dir, name)
            if _incoming_blob_file(name) and path not in ours:
                with contextlib.suppress(OSError):
                    os.remove(path)

    def _journal(self, txn: _Txn) -> None:
        """List the blob files ``txn``, kept open, placed so far in ``OPEN_MANIFEST``."""
        temp_dir = self._incoming_dir
        if temp_dir is None or not (txn.placed or txn.journaled):
            return
        manifest = os.path.join(temp_dir, OPEN_MANIFEST)
        try:
            with open(manifest + ".new", "w") as f:
                json.dump({"tid": txn.begin.tid.hex(), "oids": [placed.oid.hex() for placed in txn.placed]}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(manifest + ".new", manifest)
            fsync_dir(temp_dir)
        except OSError as exc:
            log.warning("cannot list the blob files of transaction %s, kept open, in %s (%s): should this "
                        "process be killed before it commits, they stay in %s", tid_repr(txn.begin.tid),
                        manifest, exc, self._storage.blob_dir)
            return
        txn.journaled = True

    def _unjournal(self, txn: _Txn) -> None:
        """``txn`` is committed or aborted: its ``OPEN_MANIFEST`` goes."""
        temp_dir = self._incoming_dir
        if txn.journaled and temp_dir is not None:
            txn.journaled = False
            with contextlib.suppress(OSError):
                os.remove(os.path.join(temp_dir, OPEN_MANIFEST))

    @property
    def _incoming_dir(self) -> str | None:
        """Where incoming blob files are written (None: this storage takes no blobs).

        By default the storage's own blob temporary directory, on the same
        file system as the blobs, so that placing a blob is a rename.
        """
        if self._temp_dir is not None:
            return self._temp_dir
        return self._storage.temporaryDirectory() if self._blobs else None

    def _new_blob_file(self) -> tuple[int, str]:
        """A new, empty incoming blob file, named so that the next start finds it if it is left."""
        return tempfile.mkstemp(suffix=".tmp", prefix=BLOB_TEMP_PREFIX, dir=self._incoming_dir)

    def save_kept(self) -> None:
        """Leave what is kept to the next process on this storage (a stop), or nothing.

        Writes a manifest beside the kept files, which the next ``Applier``
        reads once (``_remove_leftovers``); without one, as after a crash,
        they are removed.  The files are not fsynced: whatever a crash did to
        them, the transaction's digest finds.
        """
        self.release_suspended(keep=True)  # a transaction kept open: its blob files, as files
        kept = self._kept or self._resuming
        temp_dir = self._incoming_dir
        if temp_dir is None:
            return
        manifest = os.path.join(temp_dir, KEPT_MANIFEST)
        if kept is None or not kept.blobs:
            with contextlib.suppress(FileNotFoundError):
                os.remove(manifest)
            return
        begin = kept.begin
        state = {"version": 1, "tid": begin.tid.hex(), "prev_tid": begin.prev_tid.hex(), "status": begin.status,
                 "user": begin.user.hex(), "description": begin.description.hex(),
                 "extension": begin.extension.hex(),
                 "blobs": [{"oid": blob.oid.hex(), "size": blob.size, "file": os.path.basename(blob.path)}
                           for blob in kept.blobs]}
        try:
            with open(manifest + ".new", "w") as f:
                json.dump(state, f)
            os.replace(manifest + ".new", manifest)
        except OSError as exc:
            log.warning("cannot leave the kept blob files of transaction %s to the next start (%s); it will "
                        "be fetched whole", tid_repr(begin.tid), exc)
            return
        self._kept = self._resuming = None  # the next process's now
        log.info("left %s of the blobs of transaction %s for the next start to resume", size_text(kept.count),
                 tid_repr(begin.tid))

    def _load_kept(self, manifest: str) -> _Kept | None:
        """What a stopped process kept, as its manifest says, or None (its files are then removed).

        The manifest is read once and removed.  Only a prefix of the blobs
        in stream order counts: whole ones, then at most one in part.
        """
        temp_dir = os.path.dirname(manifest)
        try:
            try:
                with open(manifest) as f:
                    state = json.load(f)
            finally:
                with contextlib.suppress(OSError):
                    os.remove(manifest)
            if state.get("version") != 1:
                raise ValueError(f"version {state.get('version')!r}")
            begin = TxnBegin(bytes.fromhex(state["tid"]), bytes.fromhex(state["prev_tid"]), state["status"],
                             bytes.fromhex(state["user"]), bytes.fromhex(state["description"]),
                             bytes.fromhex(state["extension"]))
            blobs = []
            for entry in state["blobs"]:
                name = entry["file"]
                if os.path.basename(name) != name or not name.startswith(BLOB_TEMP_PREFIX):
                    raise ValueError(f"file name {name!r}")
                path = os.path.join(temp_dir, name)
                have = os.path.getsize(path)
                if not 0 <= have <= entry["size"]:
                    raise ValueError(f"{name} holds {have} bytes, more than the blob's {entry['size']}")
                blobs.append(_KeptBlob(bytes.fromhex(entry["oid"]), entry["size"], path, have))
                if have < entry["size"]:
                    break  # what follows a blob in part cannot be resumed
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("cannot take over the blob files a stopped process kept (%s): %s; they are removed",
                        manifest, exc)
            return None
        kept = _Kept(begin, blobs)
        log.info("found %s of the blobs of transaction %s, kept by the process before this one",
                 size_text(kept.count), tid_repr(begin.tid))
        return kept

    @property
    def last_tid(self) -> bytes:
        """The last transaction committed in the storage (``Z64`` when empty)."""
        return self._storage.lastTransaction()

    @property
    def in_transaction(self) -> bool:
        return self._txn is not None

    @property
    def may_stall(self) -> bool:
        """Whether the next ``apply`` may take long whatever its events.

        True while a pack of this storage runs (it takes the commit lock
        for its last stretch), once the open transaction has outgrown
        memory (its vote copies it back from disk), and without group
        commit (FileStorage then fsyncs every transaction itself).
        """
        group = self._group
        if group is None or getattr(self._storage, "_pack_is_in_progress", False):
            return True
        return self._txn is not None and group.spilled

    def apply(self, events: Sequence[Event], *, durable: bool = True) -> list[bytes]:
        """Apply ``TxnBegin``/``Record``/``BlobChunk``/``TxnEnd`` events, in order.

        Returns the TIDs committed during this call, in order; durably unless
        ``durable`` is false, in which case they may be acknowledged only
        after ``make_durable`` returned.  A transaction may begin in one call
        and end in a later one.

        Errors, after which the transaction in progress is aborted (the
        transactions committed earlier in the same call stay; ``last_tid``
        says how far the storage got):

        - ``RemoteProtocolError``: events out of order, a TID gap, or a
          transaction this storage already holds; reconnect and resume.
        - ``IntegrityError``: the content did not match ``TxnEnd.digest``.
        - ``ResumeError``: a transaction resumed from kept blob files did not
          go on as kept, or did not match its digest; what was kept is
          dropped, and the transaction must be fetched whole.
        - ``DivergenceError``: this storage holds a transaction the primary's
          history lacks.
        - ``ConfigError``: blobs are shipped but this storage has no blob
          directory, or the reverse.
        - ``StorageError``: the storage or a blob file could not be written.
        """
        committed: list[bytes] = []
        group = self._group
        if group is not None and group.failure is not None:
            raise group.failure
        on_record, on_chunk = self._on_record, self._on_chunk
        if group is not None:
            group.deferring = True
        try:
            for event in events:
                # Records and chunks first: they are nearly all the events.
                kind = type(event)
                if kind is Record:
                    on_record(event)  # type: ignore[arg-type]
                elif kind is BlobChunk:
                    on_chunk(event)  # type: ignore[arg-type]
                elif kind is TxnBegin:
                    self._on_begin(event)  # type: ignore[arg-type]
                elif kind is TxnEnd:
                    committed.append(self._on_end(event))  # type: ignore[arg-type]
                else:
                    raise RemoteProtocolError(f"unexpected {type(event).__name__} in the transaction stream")
        except BaseException as exc:
            # Whatever went wrong (ours, the peer's, the disk's, an interrupt),
            # the commit lock must not stay held by a half-received transaction.
            try:
                self.abort(write_failed=isinstance(exc, StorageError))
            finally:
                if group is not None:
                    group.deferring = False
                    # What committed before the failure stays; make it durable too.
                    if committed:
                        try:
                            group.sync()
                        except OSError:
                            log.exception("fsync after a failed batch")
            raise
        if group is not None:
            group.deferring = False
        if durable and committed:
            self.make_durable(committed)
        return committed

    def make_durable(self, tids: Sequence[bytes]) -> None:
        """Fsync the storage file: ``tids``, committed by ``apply``, survive a crash from now on.

        May run in another thread while ``apply`` runs (it only fsyncs the
        file descriptor); every byte of a committed transaction was written
        out of Python's buffers when it finished.
        """
        if not tids:
            return
        self._sync(f"transactions up to {tid_repr(tids[-1])}")
        if self._trace is not None:
            now = f" {time.time():.6f}\n"
            self._trace.write("".join(tid.hex() + now for tid in tids))
            self._trace.flush()

    @property
    def index_save_due(self) -> bool:
        """Whether the file grew enough since the last index save for ``save_index`` (see
        ``INDEX_SAVE_BYTES``)."""
        pos = getattr(self._storage, "_pos", None)
        if pos is None or not hasattr(self._storage, "_save_index"):
            return False
        if pos < self._index_pos:  # packed since: the pack saved the index
            self._index_pos = pos
        return pos - self._index_pos >= max(INDEX_SAVE_BYTES, INDEX_SAVE_RATIO * self._index_size)

    def save_index(self) -> None:
        """Save the storage's index as FileStorage does when it closes, so that it opens after
        a crash without reading again what was applied before this call.

        Call it only between transactions with everything applied durable: the
        index it saves says the file is complete up to its end.
        """
        storage = self._storage
        if self._txn is not None:
            return
        with storage._lock:  # what FileStorage's pack holds around the same call
            pos = storage._pos
            try:
                storage._save_index()
            except OSError as exc:
                # A full disk, say: nothing is lost but the quick start after a crash.
                log.warning("cannot save the index of %s (%s); opened after a crash, it would read the "
                            "file again from its last saved index", storage.getName(), exc)
                self._index_pos = pos  # try again only once as much more was applied
                return
        self._index_pos = pos
        with contextlib.suppress(OSError):
            self._index_size = os.path.getsize(storage.__name__ + ".index")
        log.debug("saved the index of %s, up to byte %d", storage.getName(), pos)

    def make_all_durable(self) -> None:
        """Fsync the storage file: every transaction it holds survives a crash from now on.

        What a secondary names as its last transaction when it connects
        counts as acknowledged.  Without group commit FileStorage fsynced
        each transaction itself.
        """
        self._sync(self._storage.getName())
        if not self._dirs_durable:
            self._sync_dirs()

    def _sync_dirs(self) -> None:
        """Fsync the directories holding the storage file and the blob directory, once: a new
        replica's first acknowledgement must not outlive the directory entry of its file."""
        storage = self._storage
        dirs = []
        name = getattr(storage, "_file_name", None)
        if isinstance(name, str):
            dirs.append(os.path.dirname(os.path.abspath(name)))
        if self._blobs:
            base = os.path.abspath(storage.fshelper.base_dir)
            dirs += [base, os.path.dirname(base)]
        try:
            for path in dict.fromkeys(dirs):
                fsync_dir(path)
        except OSError as exc:
            raise StorageError(f"cannot make the directory entries of {storage.getName()} durable: {exc}") from exc
        self._dirs_durable = True

    def _sync(self, what: str) -> None:
        """The group commit's one fsync; its failure is a ``StorageError`` naming ``what``."""
        if self._group is not None:
            try:
                self._group.sync()
            except OSError as exc:
                raise StorageError(f"cannot make {what} durable: {exc}") from exc

    def close(self) -> None:
        """Drop what is kept, stop tracing and give the storage its own methods back."""
        self.discard_kept()
        self.detach()

    def detach(self) -> None:
        """Stop tracing and give the storage its own methods back; what ``save_kept`` left stays.

        The storage may outlive this applier: a node promoted and then demoted
        again follows the new primary with a new applier on the same storage,
        which can hook it for group commit only once these hooks are gone.
        """
        if self._group is not None:
            self._group.uninstall()
            self._group = None
        if self._trace is not None:
            self._trace.close()
            self._trace = None

    # -- keeping a transaction across a broken link ------------------------

    def resume_offer(self) -> tuple[bytes, int, int] | None:
        """What the next ``Hello`` offers to resume: ``(tid, blob bytes, records)``, or None.

        For a transaction kept open: its complete records, and the bytes of
        its blob in part.  For kept blob files: their bytes, counted in
        stream order, and no records.  None if nothing is kept, or if what
        is kept no longer follows the storage's last transaction (then it
        is dropped).
        """
        txn = self._suspended
        if txn is not None:
            return (txn.begin.tid, *self._offer_of(txn))
        kept = self._kept
        if kept is None:
            return None
        if kept.begin.prev_tid != self.last_tid:
            self.discard_kept()
            return None
        return kept.begin.tid, kept.count, 0

    def resume(self, count: int, records: int = 0) -> None:
        """The primary's answer to ``resume_offer``: it leaves out ``records``
        records, then ``count`` blob bytes (0 and 0: none).

        With 0 and 0 it sends the transaction whole, and what was kept is
        dropped; any other answer than the offer is a ``ResumeError``.
        """
        txn, self._suspended = self._suspended, None
        kept, self._kept = self._kept, None
        if txn is not None:
            offered = self._offer_of(txn)
            if (count, records) == offered and any(offered):
                self._continuing = txn
                self.resumed_bytes += txn.received
                return
            self._abort_txn(txn)
            held = f"{offered[1]} record(s) and {offered[0]} bytes of its blob in part"
        else:
            if kept is not None and count and (count, records) == (kept.count, 0):
                self._resuming = kept
                self.resumed_bytes += count
                return
            if kept is not None:
                kept.remove()
            held = f"{kept.count if kept else 0} blob bytes"
        if count or records:
            raise ResumeError(f"the primary leaves out {records} record(s) and {count} blob bytes of its "
                              f"first transaction, but this node kept {held}")

    @staticmethod
    def _offer_of(txn: _Txn) -> tuple[int, int]:
        """(bytes of the blob in part, complete records) of a transaction kept open."""
        blob = txn.blob
        if blob is None:
            return 0, len(txn.oids)
        return blob.record.blob_size - blob.left, len(txn.oids) - 1  # type: ignore[operator]

    @property
    def kept_bytes(self) -> int:
        """Bytes kept of a transaction cut off by a broken link (0: none)."""
        txn = self._suspended or self._continuing
        if txn is not None:
            return txn.received
        kept = self._kept or self._resuming
        return kept.count if kept is not None else 0

    def release_suspended(self, *, keep: bool) -> None:
        """End a transaction kept open (the node stops following): abort it in the
        storage, keeping its blob files (``keep``) as a stop leaves them, or not."""
        txn = self._suspended or self._continuing
        self._suspended = self._continuing = None
        if txn is None:
            return
        if keep:
            self._kept = self._keep(txn)
        self._abort_txn(txn)

    def discard_kept(self) -> None:
        """Drop what is kept: the files of a kept transaction, and a transaction kept open."""
        for kept in (self._kept, self._resuming):
            if kept is not None:
                kept.remove()
        self._kept = self._resuming = None
        self.release_suspended(keep=False)

    def _keep(self, txn: _Txn) -> _Kept | None:
        """Move ``txn``'s blob files out of the way for its resumption, if they are worth it.

        Placed files go back from the blob directory to temporary names (a
        rename: the storage's own temporary directory is beside it); the
        file being received is closed where it is.  What is moved no longer
        belongs to ``txn``, so ``abort`` leaves it alone.
        """
        blob = txn.blob
        count = sum(placed.have for placed in txn.placed) + sum(kept.have for kept in txn.resume)
        if blob is not None:
            count += blob.record.blob_size - blob.left  # type: ignore[operator]
        if count < KEEP_MIN_BYTES:
            return None
        moved: list[_KeptBlob] = []
        try:
            for placed in txn.placed:
                fd, path = self._new_blob_file()
                os.close(fd)
                os.rename(placed.path, path)
                os.chmod(path, 0o600)  # placed blob files are read-only
                moved.append(_KeptBlob(placed.oid, placed.size, path, placed.have))
            txn.placed = []
            if blob is not None:
                blob.file.close()
                moved.append(_KeptBlob(blob.record.oid, blob.record.blob_size,  # type: ignore[arg-type]
                                       blob.path, os.path.getsize(blob.path)))
                txn.blob = None
        except OSError as exc:
            log.warning("cannot keep the blob files of transaction %s for its resumption, so it will be "
                        "fetched whole: %s", tid_repr(txn.begin.tid), exc)
            _Kept(txn.begin, moved).remove()
            return None
        moved += txn.resume
        txn.resume = collections.deque()
        kept = _Kept(txn.begin, moved)
        log.info("kept %s of the blobs of transaction %s, received before the connection ended",
                 size_text(kept.count), tid_repr(txn.begin.tid))
        return kept

    def abort(self, *, write_failed: bool = False, keep: bool = False) -> None:
        """Drop the transaction in progress, if any, leaving the storage as it was.

        Called on errors and when the connection is lost mid-transaction;
        ``write_failed``: a write to the storage failed (a full disk).
        ``keep``: the link broke (the data were not at fault), so what was
        received so far is kept for a resumption (``resume_offer``): the
        transaction stays open in the storage once it is worth it, else its
        blob files are kept; otherwise whatever was kept is dropped too.
        Raises ``StorageError`` if the storage cannot undo its side.
        """
        txn, self._txn = self._txn, None
        if txn is None:
            if self._resuming is not None:  # agreed on, but the transaction did not start again
                self._kept, self._resuming = self._resuming, None
            if self._continuing is not None:  # the same, for a transaction kept open
                self._suspended, self._continuing = self._continuing, None
            if not keep:
                self.discard_kept()
            return
        self.discard_kept()  # nothing else is kept while a transaction runs; be sure
        if keep and self._suspend(txn):
            return
        if keep:
            # Before the storage's abort, which may remove placed blob files.
            self._kept = self._keep(txn)
        self._abort_txn(txn, write_failed=write_failed)

    def _suspend(self, txn: _Txn) -> bool:
        """Keep ``txn`` open in the storage for its resumption, if it is worth it and can be."""
        if txn.received < KEEP_MIN_BYTES or not txn.started or txn.resume or self._group is None:
            return False
        self._suspended = txn
        self._journal(txn)
        _, records = self._offer_of(txn)
        log.info("kept transaction %s open: %d record(s) and %s received before the connection ended",
                 tid_repr(txn.begin.tid), records, size_text(txn.received))
        return True

    def _abort_txn(self, txn: _Txn, *, write_failed: bool = False) -> None:
        """Undo ``txn`` in the storage and remove its blob files (but those ``_keep`` moved away)."""
        failures = []
        _remove_files(txn.resume)  # kept files this transaction did not get to
        if txn.blob is not None:
            failures += _discard_temp(txn.blob)
        if txn.started:
            try:
                self._storage.tpc_abort(txn.meta)
            except (OSError, POSError) as exc:
                failures.append(f"tpc_abort: {exc}")
            if self._group is not None:
                self._group.temp_on_disk()
                try:
                    self._group.drop_tail(force=write_failed)
                except OSError as exc:
                    failures.append(f"removing what the failed transaction wrote: {exc}")
        # FileStorage removes placed blob files only when the abort follows a
        # vote; before it they would stay behind as orphans.
        for placed in txn.placed:
            try:
                if os.path.exists(placed.path):
                    remove_committed(placed.path)
            except OSError as exc:
                failures.append(f"removing {placed.path}: {exc}")
        self._unjournal(txn)
        if failures:
            raise StorageError(f"aborting transaction {tid_repr(txn.begin.tid)} failed: " + "; ".join(failures))

    # -- events ----------------------------------------------------------

    def _on_begin(self, begin: TxnBegin) -> None:
        if self._txn is not None:
            raise RemoteProtocolError(f"TxnBegin {tid_repr(begin.tid)} inside transaction "
                                      f"{tid_repr(self._txn.begin.tid)}")
        continuing, self._continuing = self._continuing, None
        if continuing is not None:
            self._txn = continuing  # abort() undoes it from here on
            if begin != continuing.begin:
                raise ResumeError(f"the primary agreed to resume transaction {tid_repr(continuing.begin.tid)} "
                                  f"but sent {tid_repr(begin.tid)}")
            continuing.resumed = continuing.received
            continuing.again = continuing.blob is not None
            return
        last = self.last_tid
        if begin.prev_tid != last:
            raise self._position_error(begin, last)
        # Bytes given to TransactionMetaData are kept as they are, so the
        # header is rewritten byte for byte (no re-encoding, no re-pickling).
        meta = TransactionMetaData(begin.user, begin.description, begin.extension)
        txn = self._txn = _Txn(begin, meta, TxnCheck(begin))
        resuming, self._resuming = self._resuming, None
        if resuming is not None:
            txn.resume.extend(resuming.blobs)  # removed by abort() unless used
            if begin != resuming.begin:
                raise ResumeError(f"the primary agreed to resume transaction {tid_repr(resuming.begin.tid)} "
                                  f"but sent {tid_repr(begin.tid)}")
        self._call("tpc_begin", self._storage.tpc_begin, meta, begin.tid, begin.status)
        txn.started = True
        if self._group is not None:
            self._group.temp_in_memory()

    def _position_error(self, begin: TxnBegin, last: bytes) -> RemoteProtocolError | DivergenceError:
        """Why a transaction that does not follow our last one is refused.

        A gap (the primary's ``prev_tid`` is newer than ours) is the peer's
        fault and reconnecting resumes from our last TID.  If ``prev_tid`` is
        older than ours and the new TID newer, the primary's history has
        nothing between them while ours has ``last``: a true fork, retrying
        cannot help.  If the new TID is not newer than ours, the primary is
        resending history we hold, or a different one; this side cannot tell
        which, but the handshake after a reconnect compares our last digest
        and refuses a fork there, so it is a protocol error here.
        """
        where = (f"transaction {tid_repr(begin.tid)} follows {tid_repr(begin.prev_tid)}, "
                 f"but this storage ends at {tid_repr(last)}")
        if begin.prev_tid > last:
            return RemoteProtocolError(f"gap in the stream: {where}")
        if begin.tid > last:
            return DivergenceError(f"histories fork: {where}, which the primary does not have")
        return RemoteProtocolError(f"transaction already covered: {where}")

    def _on_record(self, record: Record) -> None:
        txn = self._txn
        if txn is None or txn.blob is not None:
            if txn is not None and txn.again:
                self._record_again(txn, record)
                return
            self._misplaced(record)
        if record.data is not None:
            txn.received += len(record.data)
        blob_size = record.blob_size
        if blob_size is None:
            if self._blobs and is_blob_data(record.data) and not _blob_placed(txn, record.oid):
                # Committing it would leave a blob record without its file.  (One that follows a
                # blob record of the same oid names the file that record placed: the file of
                # (oid, tid), shipped once.)
                raise ConfigError(f"the primary ships blob records without their files (oid "
                                  f"{record.oid.hex()}); give the primary --blob-dir too, or none to either")
        elif not self._blobs:
            raise ConfigError(f"the primary ships blobs (oid {record.oid.hex()} in transaction "
                              f"{tid_repr(txn.begin.tid)}); the secondary needs --blob-dir")
        elif txn.resume:
            self._resume_blob(txn, record)
            return
        txn.digest.add_record(record)
        txn.oids.append(record.oid)
        if self._group is not None and record.data is not None:
            self._group.room_for(len(record.data))
        if blob_size is None:
            if record.data_txn is None:
                # The common case, without the indirections of _restore and _call.
                try:
                    self._storage.restore(record.oid, txn.begin.tid, record.data, "", None, txn.meta)
                except (OSError, POSError) as exc:
                    raise StorageError(f"restore failed for transaction {tid_repr(txn.begin.tid)}: "
                                       f"{type(exc).__name__}: {exc}") from exc
                return
            self._restore(record, "restore", self._storage.restore, record.oid, txn.begin.tid, record.data, "",
                          record.data_txn, txn.meta)
            return
        try:
            fd, path = self._new_blob_file()
        except OSError as exc:
            raise StorageError(f"cannot create a blob file in {self._incoming_dir}: {exc}") from exc
        txn.blob = _Blob(record, path, os.fdopen(fd, "wb"), blob_size)
        if blob_size == 0:
            self._place_blob(txn)

    def _resume_blob(self, txn: _Txn, record: Record) -> None:
        """Go on with a blob file kept from a broken link: check it, hash it again, expect the rest."""
        kept = txn.resume.popleft()
        try:
            if (kept.oid, kept.size) != (record.oid, record.blob_size):
                raise ResumeError(
                    f"resumed transaction {tid_repr(txn.begin.tid)} differs from what this node kept of it "
                    f"(a blob of oid {record.oid.hex()}, {record.blob_size} bytes, where it kept one of oid "
                    f"{kept.oid.hex()}, {kept.size} bytes); it is fetched whole")
        except ResumeError:
            with contextlib.suppress(OSError):
                os.remove(kept.path)
            raise
        txn.digest.add_record(record)
        txn.oids.append(record.oid)
        if self._group is not None:
            self._group.room_for(len(record.data))  # type: ignore[arg-type]
        read = 0
        try:
            # Once it is the current blob, abort() removes the file on failure.
            txn.blob = blob = _Blob(record, kept.path, open(kept.path, "rb+"), kept.size)
            while chunk := blob.file.read(1 << 20):
                txn.digest.add_blob_bytes(chunk)
                read += len(chunk)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.remove(kept.path)
            raise ResumeError(f"cannot read kept blob file {kept.path} ({exc}); the transaction "
                              "is fetched whole") from exc
        if read != kept.have:
            raise ResumeError(f"kept blob file {kept.path} holds {read} bytes, not the {kept.have} "
                              "it was kept with; the transaction is fetched whole")
        blob.left -= read
        txn.resumed += read
        txn.received += read
        if blob.left == 0:
            self._place_blob(txn)

    @staticmethod
    def _record_again(txn: _Txn, record: Record) -> None:
        """The ``Record`` of the blob in part of a transaction kept open: the same one, or else."""
        txn.again = False
        assert txn.blob is not None
        if record != txn.blob.record:
            raise ResumeError(f"resumed transaction {tid_repr(txn.begin.tid)} goes on with a record of oid "
                              f"{record.oid.hex()} where this node holds the blob of oid "
                              f"{txn.blob.record.oid.hex()} in part; it is fetched whole")

    def _misplaced(self, record: Record) -> NoReturn:
        """Raise why ``record`` may not come now: outside a transaction, or inside a blob."""
        txn = self._require_txn(record)
        assert txn.blob is not None
        raise RemoteProtocolError(f"Record {record.oid.hex()} before the blob of "
                                  f"{txn.blob.record.oid.hex()} is complete ({txn.blob.left} bytes missing)")

    def _on_chunk(self, chunk: BlobChunk) -> None:
        txn = self._require_txn(chunk)
        blob = txn.blob
        if blob is None:
            raise RemoteProtocolError("BlobChunk without a blob record")
        if len(chunk.data) > blob.left:
            raise RemoteProtocolError(f"blob of oid {blob.record.oid.hex()} is longer than its "
                                      f"announced {blob.record.blob_size} bytes")
        try:
            blob.file.write(chunk.data)
        except OSError as exc:
            raise StorageError(f"cannot write blob file {blob.path}: {exc}") from exc
        txn.digest.add_chunk(chunk)
        txn.received += len(chunk.data)
        blob.left -= len(chunk.data)
        if blob.left == 0:
            self._place_blob(txn)

    def _on_end(self, end: TxnEnd) -> bytes:
        txn = self._require_txn(end)
        tid = txn.begin.tid
        if end.tid != tid:
            raise RemoteProtocolError(f"TxnEnd {tid_repr(end.tid)} ends transaction {tid_repr(tid)}")
        if txn.blob is not None:
            raise RemoteProtocolError(f"TxnEnd before the blob of {txn.blob.record.oid.hex()} is complete")
        if txn.resume:
            raise ResumeError(f"resumed transaction {tid_repr(tid)} ended before the blob of oid "
                              f"{txn.resume[0].oid.hex()} this node kept of it; it is fetched whole")
        if txn.resumed and txn.digest.digest() != end.digest:
            # The kept files, or what the primary now has under this TID, differ:
            # not the primary's damage (yet). The abort drops what was kept.
            raise ResumeError(f"transaction {tid_repr(tid)}, resumed with {txn.resumed} bytes "
                              "kept from a broken link, does not match the primary's digest; "
                              "it is fetched whole")
        if txn.digest.digest() != end.digest:
            raise IntegrityError(f"transaction {tid_repr(tid)}: digest mismatch "
                                 f"(received {txn.digest.digest().hex()}, primary sent {end.digest.hex()})")
        try:
            for path in sorted(txn.dirs, key=len, reverse=True):
                fsync_dir(path)
        except OSError as exc:
            raise StorageError(f"cannot make the blobs of {tid_repr(tid)} durable: {exc}") from exc
        self._call("tpc_vote", self._storage.tpc_vote, txn.meta)
        oids = frozenset(txn.oids)
        callback = None
        if self._invalidate is not None:
            invalidate = self._invalidate

            def callback(tid_: bytes) -> None:
                invalidate(tid_, oids)
        finished = self._call("tpc_finish", self._storage.tpc_finish, txn.meta, callback)
        # The transaction is committed from here on: nothing left to abort.
        self._txn = None
        if txn.journaled:
            self._unjournal(txn)
        self.committed += 1
        if txn.resumed:
            log.info("transaction %s committed with %s of it received over earlier connections", tid_repr(tid),
                     size_text(txn.resumed))
        if self._group is not None:
            self._group.temp_on_disk()
        if finished is not None and finished != tid:
            raise StorageError(f"storage committed {tid_repr(tid)} as {tid_repr(finished)}")
        return tid

    # -- helpers ---------------------------------------------------------

    def _require_txn(self, event: Event) -> _Txn:
        if self._txn is None:
            raise RemoteProtocolError(f"{type(event).__name__} outside a transaction")
        return self._txn

    def _place_blob(self, txn: _Txn) -> None:
        """Hand the complete blob file to ``restoreBlob``, which renames it into the blob directory."""
        blob = txn.blob
        assert blob is not None  # our own state, not input
        record = blob.record
        try:
            blob.file.close()
        except OSError as exc:
            raise StorageError(f"cannot write blob file {blob.path}: {exc}") from exc
        fshelper = self._storage.fshelper
        target = fshelper.getBlobFilename(record.oid, txn.begin.tid)
        # Directories restoreBlob creates must have their entries fsynced in
        # their parents; find them before they exist.
        new_dirs = []
        parent = os.path.dirname(target)
        while not os.path.isdir(parent):
            new_dirs.append(parent)
            parent = os.path.dirname(parent)
        txn.placed.append(_KeptBlob(record.oid, record.blob_size, target, record.blob_size))  # type: ignore[arg-type]
        self._restore(record, "restoreBlob", self._storage.restoreBlob, record.oid, txn.begin.tid, record.data,
                      blob.path, record.data_txn, txn.meta)
        txn.blob = None
        try:
            # restoreBlob copies instead of renaming across file systems, and
            # the copy is not synced; syncing the final file covers both.
            with open(target, "rb") as f:
                os.fsync(f.fileno())
        except OSError as exc:
            raise StorageError(f"cannot make blob file {target} durable: {exc}") from exc
        txn.dirs.add(os.path.dirname(target))
        txn.dirs.update(os.path.dirname(d) for d in new_dirs)
        if txn.journaled:  # resumed after it was kept open: the list grows
            self._journal(txn)

    def _restore(self, record: Record, what: str, fn, *args) -> None:
        """``restore``/``restoreBlob``; a back pointer is looked up through the object's history."""
        group = self._group
        if record.data_txn is None or group is None:
            self._call(what, fn, *args)
            return
        group.oid = record.oid
        try:
            self._call(what, fn, *args)
        finally:
            group.oid = None

    def _call(self, what: str, fn, *args):
        """Run a storage call; its failures become ``StorageError`` (the caller aborts)."""
        try:
            return fn(*args)
        except (OSError, POSError) as exc:
            tid = self._txn.begin.tid if self._txn is not None else None
            raise StorageError(f"{what} failed for transaction {tid_repr(tid)}: "
                               f"{type(exc).__name__}: {exc}") from exc


class _GroupCommit:
    """Per-storage hooks of the applier: group commit, and a quick way to find back pointers.

    Installed as instance attributes of that one storage (its class and every
    other storage are untouched):

    - ``_finish_finish``: while ``deferring``, finish without FileStorage's
      fsync; ``sync()`` then fsyncs the file once for all of them.
    - ``_tfile``: during the applier's transactions (``temp_in_memory`` to
      ``temp_on_disk``), a memory buffer instead of FileStorage's temporary
      file; ``room_for`` moves a transaction that outgrows ``MEMORY_TEMP``
      to the file.  FileStorage only writes, seeks, tells and reads it.
    - ``_txn_find``: ``restore(..., prev_txn)`` of an undo record looks for
      the transaction ``prev_txn`` by walking every transaction header back
      from the end of the file, which makes each such record cost a pass
      over the whole history.  While the applier restores such a record
      (``oid`` set), the transaction is found by walking that object's own
      revisions instead (each data record points to the previous one);
      anything unexpected falls back to FileStorage's own walk.
    """

    def __init__(self, storage: FileStorage) -> None:
        self.storage = storage
        self.deferring = False
        #: oid of the record being restored with a back pointer, else None.
        self.oid: bytes | None = None
        finish_finish, txn_find = storage._finish_finish, storage._txn_find

        def _finish_finish(tid: bytes) -> None:
            s = self.storage
            if not self.deferring:
                # A promoted node's own commit: FileStorage's finish, fsync included.
                try:
                    finish_finish(tid)
                except OSError as exc:
                    self._failed(exc)  # FileStorage closes itself next
                    raise
                self._durable(s._file, s._pos, tid)
                return
            s._file.flush()
            s._pos = s._nextpos
            s._index.update(s._tindex)
            s._ltid = tid
            s._blob_tpc_finish()

        def _txn_find(tid: bytes, stop_at_pack: bool) -> int:
            if self.oid is not None and not stop_at_pack:
                pos = self._find_in_history(self.oid, tid)
                if pos:
                    return pos
            return txn_find(tid, stop_at_pack)

        storage._finish_finish = _finish_finish  # type: ignore[method-assign]
        storage._txn_find = _txn_find  # type: ignore[method-assign]
        #: Where the file was last known durable: as opened, then at each fsync that succeeded.
        self._durable(storage._file, storage._pos, storage._ltid)
        #: Set once an fsync failed: from then on nothing more is applied or acknowledged.
        self.failure: DurabilityError | None = None
        #: FileStorage's temporary file and its formatter, and the memory buffer standing in for it.
        tfile, tfmt = getattr(storage, "_tfile", None), getattr(storage, "_tfmt", None)
        self._disk_temp: tuple = (tfile, tfmt)
        self.memory: io.BytesIO | None = None
        if isinstance(tfile, io.BufferedRandom) and isinstance(tfmt, TempFormatter):
            self.memory = io.BytesIO()
            self._memory_temp = (self.memory, TempFormatter(self.memory))

    @classmethod
    def install(cls, storage) -> _GroupCommit | None:
        """The hooks for ``storage``, or None when it is not a FileStorage we know how to hook."""
        cls_ = type(storage)
        code = getattr(FileStorage._finish_finish, "__code__", None)
        hooked = {"_finish_finish", "_txn_find"} & set(vars(storage))
        if (not isinstance(storage, FileStorage)
                or getattr(cls_, "_finish_finish", None) is not FileStorage._finish_finish
                or getattr(code, "co_names", None) != _FINISH_FINISH_NAMES
                or getattr(cls_, "_txn_find", None) is not FileStorage._txn_find
                or hooked):
            why = ("another applier's hooks are still on it" if hooked
                   else "it does not finish transactions the way this ZODB's FileStorage does")
            log.warning("group commit off for %s: %s; every transaction is fsynced on its own",
                        storage.getName(), why)
            return None
        return cls(storage)

    def _find_in_history(self, oid: bytes, tid: bytes) -> int:
        """Position of transaction ``tid`` found through ``oid``'s revisions; 0 if not found."""
        s = self.storage
        try:
            pos = s._index.get(oid, 0)
            while pos:
                h = s._read_data_header(pos, oid)
                if h.tid == tid:
                    return h.tloc
                if h.tid < tid:
                    return 0
                pos = h.prev
        except Exception:  # the full walk decides (and reports) instead
            return 0
        return 0

    def sync(self) -> None:
        """Fsync the file; every finished transaction was flushed to it already.

        Runs in another thread than the applier, and a pack of this storage
        swaps its file under the storage lock: the descriptor is duplicated
        under that lock, so the fsync never meets a file the pack just closed.
        If a pack swapped the file meanwhile, the finished transactions were
        copied into the new one, which is synced in turn.
        """
        if self.failure is not None:
            raise self.failure
        s = self.storage
        while True:
            with s._lock:
                current, pos, tid = s._file, s._pos, s._ltid
                fd = os.dup(current.fileno())
            try:
                os.fsync(fd)
            except OSError as exc:
                raise self._failed(exc) from exc
            finally:
                os.close(fd)
            if s._file is current:
                self._durable(current, pos, tid)
                return

    def _durable(self, file: object, pos: int, tid: bytes) -> None:
        self._durable_file, self.durable_pos, self.durable_tid = file, pos, tid

    def _failed(self, exc: OSError) -> DurabilityError:
        """An fsync failed: say so once, leave the marker that the next start cuts the file back by,
        and refuse every later fsync (one would "succeed" over pages the kernel dropped)."""
        if self.failure is not None:
            return self.failure
        s = self.storage
        path = s._file_name
        known = self._durable_file is s._file  # not so if a pack swapped the file since the last good fsync
        durable = self.durable_pos if known else None
        unrecorded = record_fsync_failure(path, durable, self.durable_tid, exc)
        where = (f"past byte {durable} (after transaction {tid_repr(self.durable_tid)})" if known
                 else "since it was packed")
        then = (f"its next start cuts the file back to byte {durable} ({path}{UNSYNCED_SUFFIX} says so), and "
                "a secondary fetches the rest from its primary again" if known
                else f"where the file is durable is unknown ({path}{UNSYNCED_SUFFIX})")
        if unrecorded is not None:
            then = (f"this could not be recorded in {path}{UNSYNCED_SUFFIX} ({unrecorded}): before starting it "
                    + (f"again, cut the file back yourself (truncate -s {durable} {path})" if known
                       else "again, compare the replica with its primary (replicator verify)"))
        self.failure = DurabilityError(
            f"fsync of {path} failed ({type(exc).__name__}: {exc}): what was written to it {where} may never "
            f"reach the disk, even if a later fsync says it did; nothing past it was acknowledged. This node "
            f"writes nothing more to the file; {then}")
        log.critical("%s", self.failure)
        return self.failure

    def drop_tail(self, *, force: bool) -> None:
        """After an aborted transaction: the file ends where the last committed one does.

        FileStorage truncates what a failed vote wrote, but its buffered file
        flushes first, and with a full disk that fails again: the partial
        transaction stays past the end, and the buffer keeps bytes that a
        later flush writes there.  ZODB's readers then take that tail for the
        end of the file ("Can't find last transaction in large file"), which
        stopped the secondary from resuming even once the disk had room.

        Checked after every abort; ``force`` (a write failed) also drops what
        may still be buffered: the file is reopened, as a pack does, and the
        old file object closed, which discards its buffer if it cannot write
        it.  Truncating needs no free space.
        """
        s = self.storage
        with s._lock:
            if s._file.closed or (not force and os.fstat(s._file.fileno()).st_size == s._pos):
                return
        with s._files.write_lock(), s._lock:
            old = s._file
            with contextlib.suppress(OSError):
                old.close()
            s._file = open(s._file_name, "r+b")  # noqa: SIM115  (the storage owns it from here)
            size = os.fstat(s._file.fileno()).st_size
            s._file.truncate(s._pos)
        if size != s._pos:
            log.warning("%s: removed the %d bytes a failed transaction left past its end", s._file_name,
                        size - s._pos)

    def temp_in_memory(self) -> None:
        """After the applier's ``tpc_begin`` (the commit lock is its): records go to memory."""
        if self.memory is not None:
            self.memory.seek(0)
            self.storage._tfile, self.storage._tfmt = self._memory_temp

    def room_for(self, size: int) -> None:
        """Before a record of ``size`` bytes: past ``MEMORY_TEMP``, the transaction moves to the file."""
        memory = self.memory
        s = self.storage
        if memory is None or s._tfile is not memory or memory.tell() + size + 64 <= MEMORY_TEMP:
            return
        disk, fmt = self._disk_temp
        used = memory.tell()
        try:
            disk.seek(0)
            with memory.getbuffer() as view:
                disk.write(view[:used])
        except OSError as exc:
            raise StorageError(f"cannot write {s._file_name}.tmp: {exc}") from exc
        s._tfile, s._tfmt = disk, fmt

    @property
    def spilled(self) -> bool:
        """The transaction under way writes to FileStorage's own file (it outgrew ``MEMORY_TEMP``)."""
        return self.memory is None or self.storage._tfile is not self.memory

    def temp_on_disk(self) -> None:
        """After ``tpc_finish`` or ``tpc_abort``: FileStorage's own temporary file is back."""
        if self.memory is not None:
            self.storage._tfile, self.storage._tfmt = self._disk_temp

    def uninstall(self) -> None:
        self.temp_on_disk()
        vars(self.storage).pop("_finish_finish", None)
        vars(self.storage).pop("_txn_find", None)


def _discard_temp(blob: _Blob) -> list[str]:
    """Close and remove a blob file still being received; return what failed."""
    failures = []
    if not blob.file.closed:
        try:
            blob.file.close()
        except OSError as exc:
            failures.append(f"closing {blob.path}: {exc}")
    try:
        os.remove(blob.path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        failures.append(f"removing {blob.path}: {exc}")
    return failures
