"""Opening FileStorages and reading committed transactions back as replication content.

Everything here is blocking; the async layers call it through
``replicator.threads.blocking`` (or ``asyncio.to_thread``).

A committed transaction is read through ZODB's own FileStorage iterator and
turned into the content the wire carries (``TxnBegin``/``Record`` fields plus
blob bytes), following the same conventions the primary's tailer must follow
so that the digests agree:

- ``user``, ``description`` and ``extension`` are the raw bytes stored in the
  transaction header (``extension_bytes``, never a re-pickled dict);
- ``data`` is the record's data with one back pointer resolved, ``None`` for an
  undone creation; ``data_txn`` is the TID of the record a back pointer names
  (what ``restore()`` needs to write the same back pointer), else ``None``;
- ``blob_size`` is set exactly when the storage has a blob directory and the
  data is a blob record (``ZODB.blob.is_blob_record``); it is the size of the
  blob file committed for (oid, tid).

The transaction status is not part of the digest (a pack changes it), but
``verify`` compares it.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import json
import logging
import os
import pickle
import re
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass

import zc.lockfile
from ZODB.FileStorage import FileStorage
from ZODB.FileStorage.FileStorage import FileStorageFormatError
from ZODB.FileStorage.format import CorruptedError
from ZODB.POSException import POSError, POSKeyError
from ZODB.utils import u64

from .errors import ConfigError, DurabilityError, StorageError, StorageInUseError
from .fsformat import is_blob_data
from .integrity import TxnDigest, TxnIdentity, meta_digest
from .protocol.events import MAX_BLOB_CHUNK, Record, TxnBegin
from .tid import Z64, tid_repr

log = logging.getLogger("replicator.storage")

__all__ = [
    "open_file_storage",
    "UNSYNCED_SUFFIX",
    "record_fsync_failure",
    "drop_unsynced_tail",
    "lock_storage",
    "has_blobs",
    "StoredTxn",
    "StoredRecord",
    "iter_transactions",
    "read_blob",
    "txn_digest",
    "last_state",
    "correct_last_tid",
    "fsync_dir",
    "check_restore_support",
    "RESTORE_SINCE",
]

#: The oldest ZODB whose ``FileStorage.restore`` writes what the primary
#: has.  Before 6.0, restoring an undo whose back pointer names a transaction
#: that holds two records of the object (one undo of several transactions)
#: pointed to the first of them, so the replica read another state than the
#: primary (zopefoundation/ZODB#395); 6.0.0 wrote a copy of the data instead
#: of every such back pointer (#409), so the replica's transactions no
#: longer matched the primary's digests.
RESTORE_SINCE = (6, 0, 1)


def check_restore_support(version: str | None = None) -> None:
    """Refuse to apply a stream with a ZODB (``version``, by default the one
    installed) whose ``restore`` would make a replica unlike its primary."""
    if version is None:
        try:
            version = importlib.metadata.version("ZODB")
        except importlib.metadata.PackageNotFoundError:  # not installed as a distribution: cannot tell
            return
    found = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", version)
    if found is None or tuple(int(part or 0) for part in found.groups()) >= RESTORE_SINCE:
        return
    error = ConfigError(f"ZODB {version} cannot apply the stream faithfully: its FileStorage.restore "
                        "writes some undo records unlike the primary's (zopefoundation/ZODB#395 and "
                        "#409, fixed in ZODB 6.0.1)")
    error.hint = "install ZODB 6.0.1 or later: pip install -U 'ZODB>=6.0.1'"
    raise error


#: Files of a blob directory that ZODB writes before any blob: its layout marker.
_BLOB_DIR_MARKERS = {".layout"}


def check_new_storage_blob_dir(path: str, blob_dir: str | None) -> None:
    """``ConfigError`` if creating the FileStorage at ``path`` would delete files in ``blob_dir``.

    ZODB's FileStorage, when its file does not exist yet, creates it and
    empties an existing blob directory, whatever it holds: a wrong path (the
    primary's own blob directory on a shared host, a backup) would lose its
    files without a word.  A new storage gets a new or empty blob directory;
    the operator removes old files, if they are not needed, by hand.
    """
    if not blob_dir or os.path.exists(path) or not os.path.isdir(blob_dir):
        return
    found: list[str] = []
    count = 0
    for top, _dirs, files in os.walk(blob_dir):
        for name in files:
            if top == blob_dir and name in _BLOB_DIR_MARKERS:
                continue
            count += 1
            if len(found) < 3:
                found.append(os.path.relpath(os.path.join(top, name), blob_dir))
        if count > 100:
            break
    if count:
        more = f" and more (over {count - len(found)})" if count > 100 else (
            f" and {count - len(found)} more" if count > len(found) else "")
        error = ConfigError(
            f"the storage {path} does not exist yet, but its blob directory {blob_dir} holds files "
            f"({', '.join(found)}{more}): creating the storage would delete them (ZODB's FileStorage empties "
            "the blob directory of a storage it creates)")
        error.hint = ("give a new or empty blob directory (is it another storage's, the primary's on this "
                      "host, say?); if these files are the leftovers of a replica started again from scratch, "
                      "delete them yourself first")
        raise error


def nearby_blob_dirs(path: str) -> list[str]:
    """Directories beside the file at ``path``, or beside its directory, that hold ZODB's ``.layout``.

    A hint for a missing ``--blob-dir``, never a choice made for the user:
    Zope's buildouts keep ``var/filestorage/Data.fs`` beside
    ``var/blobstorage``, other set-ups a ``blobs`` directory next to the file.
    """
    here = os.path.dirname(os.path.abspath(path))
    found: list[str] = []
    for parent in dict.fromkeys((here, os.path.dirname(here))):  # one look where they are the same (/)
        try:
            entries = sorted(os.scandir(parent), key=lambda entry: entry.name)
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir() and any(os.path.isfile(os.path.join(entry.path, marker))
                                          for marker in _BLOB_DIR_MARKERS):
                    found.append(entry.path)
            except OSError:
                continue
    return found


def missing_blob_dir_hint(path: str) -> str:
    """What to say of a blob directory for ``path`` when none was given (empty if none is in sight)."""
    found = nearby_blob_dirs(path)
    if not found:
        return ""
    shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    return f"{shown} {'looks' if len(found) == 1 else 'look'} like a blob directory (ZODB's .layout is there)"


def open_file_storage(path: str, blob_dir: str | None = None, read_only: bool = False) -> FileStorage:
    """Open (or, unless ``read_only``, create) the FileStorage at ``path``.

    Raises ``ConfigError`` when the paths cannot be what the operator meant
    (a directory, a missing file to read, no permission, not a FileStorage),
    ``StorageInUseError`` when another process has it open (holds its lock),
    and ``StorageError`` when the storage itself fails (I/O error), so that
    callers can tell "fix the command line" or "fix the deployment" from
    "fix the machine".
    """
    problems = []
    if os.path.isdir(path):
        problems.append(f"{path} is a directory; give the Data.fs file path")
    elif read_only and not os.path.isfile(path):
        problems.append(f"{path}: no such file")
    elif read_only and os.path.getsize(path) == 0:
        # FileStorage writes its 4-byte header when it creates a file: this one it never wrote.
        problems.append(f"{path} is empty (0 bytes), not a FileStorage file")
    if blob_dir is not None:
        if os.path.exists(blob_dir) and not os.path.isdir(blob_dir):
            problems.append(f"blob directory {blob_dir} is not a directory")
        elif read_only and not os.path.isdir(blob_dir):
            # Creating it would only hide a wrong path: a storage read for
            # comparison must already have its blobs.
            problems.append(f"blob directory {blob_dir} does not exist")
    if problems:
        raise ConfigError(problems)
    if not read_only:
        check_new_storage_blob_dir(path, blob_dir)
        drop_unsynced_tail(path)
    elif os.path.exists(path + UNSYNCED_SUFFIX):
        log.warning("%s: an fsync of this file failed (%s says so): its end may not be on disk; the next "
                    "node that opens it for writing cuts it back", path, path + UNSYNCED_SUFFIX)
    try:
        if not read_only:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        storage = FileStorage(path, read_only=read_only, blob_dir=blob_dir)
    except PermissionError as exc:
        raise ConfigError(f"{exc.filename or path}: permission denied") from exc
    except FileStorageFormatError as exc:
        raise ConfigError(f"{path} is not a FileStorage file") from exc
    except zc.lockfile.LockError as exc:
        raise StorageInUseError(path, f"{path}.lock", _lock_holder(f"{path}.lock")) from exc
    except (OSError, POSError) as exc:
        if isinstance(exc, OSError) and exc.errno == errno.EROFS:
            # A mount, not the machine failing: the operator's to fix, as a permission is.
            raise ConfigError(f"{exc.filename or path}: read-only file system (this storage must be "
                              "written to)") from exc
        raise StorageError(f"cannot open {path}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001  (what FileStorage raises reading a damaged file is not typed)
        # ZODB's scan of the file's end meets bytes it cannot parse and fails
        # with whatever its parsing raised (a UnicodeDecodeError on a bad
        # status byte, a struct or value error on a bad length).
        raise StorageError(f"cannot open {path}: the file is damaged: FileStorage failed reading it "
                           f"({type(exc).__name__}: {exc})",
                           hint=f"check it with `python -m ZODB.scripts.fstest {path}`; a damaged replica can be "
                                "kept aside and started anew from an empty storage") from exc
    correct_last_tid(storage)
    return storage


class _IndexSaveFailure(logging.Filter):
    """Catches FileStorage's "Error saving index on close()" record of an ``OSError``."""

    def __init__(self) -> None:
        super().__init__()
        self.error: OSError | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, OSError) and record.getMessage() == "Error saving index on close()":
            self.error = exc
            return False
        return True


def close_storage(storage: FileStorage) -> None:
    """``storage.close()``; a failure to save its index then (a full disk) is one warning line,
    not ZODB's traceback, and its partial index file is removed.

    Nothing is lost: the index only speeds up the next start, which reads the
    file from where the last saved index ends.
    """
    zodb_log = logging.getLogger("ZODB.FileStorage")
    catcher = _IndexSaveFailure()
    zodb_log.addFilter(catcher)
    try:
        storage.close()
    finally:
        zodb_log.removeFilter(catcher)
    if catcher.error is not None:
        name = getattr(storage, "_file_name", "") or ""
        with contextlib.suppress(OSError):
            os.remove(f"{name}.index.index_tmp")
        log.warning("%s: could not save its index on close (%s); the next start reads the file from the last "
                    "saved index instead", name, catcher.error)


def lock_storage(path: str) -> zc.lockfile.LockFile:
    """Take the FileStorage's own lock, as a process that opens it for writing does.

    For work on the file outside FileStorage (``rewind`` truncates it):
    ``StorageInUseError`` while another process has the storage open.
    ``close()`` the returned lock when done.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such file")
    lock_path = f"{path}.lock"
    try:
        return zc.lockfile.LockFile(lock_path)
    except zc.lockfile.LockError as exc:
        raise StorageInUseError(path, lock_path, _lock_holder(lock_path)) from exc
    except PermissionError as exc:
        raise ConfigError(f"{lock_path}: permission denied") from exc


def _lock_holder(lock_path: str) -> str:
    """``process 1234 (runzeo -C zeo.conf)``: who holds a FileStorage's lock, as far as can be told.

    zc.lockfile writes the holder's process id into the lock file; its
    command line is known only when it runs on this machine (Linux /proc).
    """
    try:
        with open(lock_path) as f:
            pid = int(f.read(32).split()[0])
    except (OSError, ValueError, IndexError):
        return ""
    return _describe_process(pid)


def _describe_process(pid: int) -> str:
    """``process 1234 (runzeo -C zeo.conf)``, or ``process 1234`` where its command line is unknown."""
    if pid == 0:  # how the kernel shows the holder of a lock to a reader of another PID namespace
        return "a process outside this one's PID namespace (another container's)"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return f"process {pid}"
    if len(argv) > 1 and os.path.basename(argv[0]).startswith("python") and not argv[1].startswith("-"):
        argv = argv[1:]  # a script run by its interpreter: name the script (replicator, runzeo)
    command = " ".join([os.path.basename(argv[0]), *argv[1:]]) if argv else ""
    if len(command) > 120:
        command = command[:117] + "..."
    return f"process {pid} ({command})" if command else f"process {pid}"


def writers_visible(locks: str = "/proc/locks") -> bool:
    """Whether ``storage_writer`` can tell: this system has the kernel's table of file locks."""
    return os.access(locks, os.R_OK)


def storage_writer(path: str, locks: str = "/proc/locks") -> str | None:
    """``process 1234 (runzeo ...)``: another process of this machine holding the FileStorage at
    ``path`` open for writing (its lock), or None: none, or it cannot be told (no ``/proc/locks``).

    Read from the kernel's table of file locks, which takes no lock itself:
    trying the lock would make a ZEO server starting at that moment fail.
    """
    try:
        st = os.stat(f"{path}.lock")
        with open(locks, encoding="ascii") as fh:
            table = fh.read()
    except (OSError, ValueError):
        return None
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF" (blocked waiters are marked "->")
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
            try:
                pid = int(fields[4])
            except ValueError:
                continue
            if pid != os.getpid():
                return _describe_process(pid)
    return None


def correct_last_tid(storage: FileStorage) -> None:
    """Undo a ZODB quirk: after a crash mid-commit, ``lastTransaction()`` names the lost transaction.

    FileStorage's index reader takes the TID of a transaction still marked
    ``'c'`` (a vote that never finished) as the last TID before it notices
    the mark and truncates that tail away.  A replica resuming from such a
    phantom TID would ask its primary for the wrong position, so the last
    TID is taken from the last transaction actually in the file instead.
    """
    pos = getattr(storage, "_pos", None)
    if not isinstance(pos, int) or pos <= 4 or not hasattr(storage, "_ltid"):
        return
    with open(storage._file_name, "rb") as f:
        f.seek(pos - 8)
        tlen = u64(f.read(8))
        f.seek(pos - 8 - tlen)
        tid = f.read(8)
    if len(tid) == 8 and tid != storage._ltid:
        log.warning("%s: the last transaction is %s, not %s (a commit under way, if the storage is in use; "
                    "else a commit cut short by a crash, or damage after the last transaction)",
                    storage._file_name, tid_repr(tid), tid_repr(storage._ltid))
        storage._ltid = tid


def has_blobs(storage: FileStorage) -> bool:
    """True when the storage was opened with a blob directory."""
    return bool(getattr(storage, "blob_dir", None))


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One committed record; ``blob_file`` is its committed blob, if it has one.

    ``is_blob`` with ``blob_file`` ``None`` means the record is a blob record
    whose file is missing from the blob directory.
    """

    oid: bytes
    data: bytes | None
    data_txn: bytes | None
    is_blob: bool
    blob_file: str | None
    blob_size: int | None

    def event(self) -> Record:
        return Record(self.oid, self.data, self.data_txn, self.blob_size)


@dataclass(frozen=True, slots=True)
class StoredTxn:
    """One committed transaction's metadata, with the raw header bytes."""

    tid: bytes
    prev_tid: bytes | None  # None when the iteration did not start at the first transaction
    status: str
    user: bytes
    description: bytes
    extension: bytes

    def begin(self) -> TxnBegin:
        """The ``TxnBegin`` for this transaction (``prev_tid`` must be known)."""
        if self.prev_tid is None:
            raise ValueError("prev_tid is unknown for a transaction read out of sequence")
        return TxnBegin(self.tid, self.prev_tid, self.status, self.user, self.description, self.extension)

    def digest_start(self) -> TxnDigest:
        # The digest leaves prev_tid (and status) out, so any valid value
        # does when the real one is not known.
        begin = TxnBegin(self.tid, self.prev_tid if self.prev_tid is not None else Z64, self.status,
                         self.user, self.description, self.extension)
        return TxnDigest(begin)


def iter_transactions(storage: FileStorage, start: bytes | None = None, stop: bytes | None = None,
                      ) -> Generator[tuple[StoredTxn, Iterator[StoredRecord]], None, None]:
    """Yield each committed transaction in ``[start, stop]`` with an iterator of its records.

    Streams: only the current record is in memory.  Each record iterator
    must be consumed (or dropped) before the next transaction is requested.
    ``prev_tid`` is exact when ``start`` is ``None``.  Read failures raise
    ``StorageError``.
    """
    blobs = has_blobs(storage)
    try:
        it = storage.iterator(start, stop)
    except (OSError, POSError, CorruptedError, ValueError) as exc:
        raise StorageError(f"cannot iterate {getattr(storage, '_file_name', storage)}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001  (ZODB's iterator fails untyped on some damaged tails)
        raise StorageError(f"cannot iterate {getattr(storage, '_file_name', storage)}: the file is probably "
                           f"damaged: FileStorage failed reading it ({type(exc).__name__}: {exc})",
                           hint="check it with `python -m ZODB.scripts.fstest FILE`; a damaged replica can be "
                                "kept aside and started anew from an empty storage") from exc
    prev: bytes | None = Z64 if start is None else None
    try:
        while True:
            try:
                txn = next(it, None)
            except (OSError, POSError, CorruptedError, ValueError) as exc:
                raise StorageError(f"cannot read the transaction after {tid_repr(prev)}: {exc}") from exc
            if txn is None:
                return
            stored = StoredTxn(txn.tid, prev, txn.status, txn.user, txn.description, txn.extension_bytes)
            yield stored, _records(storage, txn, blobs)
            prev = txn.tid
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def _records(storage: FileStorage, txn, blobs: bool) -> Iterator[StoredRecord]:
    try:
        for rec in txn:
            is_blob = blobs and is_blob_data(rec.data)
            blob_file = None
            blob_size = None
            if is_blob:
                try:
                    blob_file = storage.loadBlob(rec.oid, rec.tid)
                    blob_size = os.stat(blob_file).st_size
                except (POSKeyError, FileNotFoundError):
                    blob_file = None
            yield StoredRecord(rec.oid, rec.data, rec.data_txn, is_blob, blob_file, blob_size)
    except (OSError, POSError, CorruptedError) as exc:
        raise StorageError(f"cannot read the records of transaction {tid_repr(txn.tid)}: {exc}") from exc


def read_blob(path: str, size: int, chunk_size: int = MAX_BLOB_CHUNK) -> Iterator[bytes]:
    """Yield the bytes of a committed blob file in chunks; it must hold exactly ``size`` bytes."""
    seen = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(chunk_size):
                seen += len(chunk)
                if seen > size:
                    break
                yield chunk
    except OSError as exc:
        raise StorageError(f"cannot read blob file {path}: {exc}") from exc
    if seen != size:
        raise StorageError(f"blob file {path} changed size while being read ({size} -> {seen}+ bytes)")


def txn_digest(storage: FileStorage, tid: bytes) -> bytes | None:
    """The ``TxnDigest`` of committed transaction ``tid``, or ``None`` if the storage lacks it.

    Gives the same value as the primary's tailer computes while shipping it,
    so that two nodes can compare histories.  A blob record whose blob file is
    missing raises ``StorageError``.
    """
    with contextlib.closing(iter_transactions(storage, tid, tid)) as txns:
        for stored, records in txns:
            if stored.tid != tid:
                return None
            digest = stored.digest_start()
            blob_oids: set[bytes] = set()
            for rec in records:
                if rec.is_blob and rec.oid in blob_oids:
                    # Its file is the one the oid's first blob record named: shipped once (tailer).
                    digest.add_record(Record(rec.oid, rec.data, rec.data_txn))
                    continue
                if rec.is_blob and rec.blob_file is None:
                    raise StorageError(f"blob of oid {rec.oid.hex()} in transaction {tid_repr(tid)} "
                                       f"is missing from {storage.blob_dir}")
                if rec.is_blob:
                    blob_oids.add(rec.oid)
                digest.add_record(rec.event())
                if rec.blob_file is not None and rec.blob_size is not None:
                    for chunk in read_blob(rec.blob_file, rec.blob_size):
                        digest.add_blob_bytes(chunk)
            return digest.digest()
    return None


def txn_identity(storage: FileStorage, tid: bytes) -> TxnIdentity | None:
    """Digest, metadata digest and status of transaction ``tid``; ``None`` if absent."""
    with contextlib.closing(iter_transactions(storage, tid, tid)) as txns:
        for stored, _records in txns:
            if stored.tid != tid:
                return None
            digest = txn_digest(storage, tid)
            if digest is None:
                return None
            return TxnIdentity(tid, stored.status, digest,
                               meta_digest(tid, stored.user, stored.description, stored.extension))
    return None


def last_identity(storage: FileStorage) -> TxnIdentity | None:
    """``txn_identity`` of the storage's last transaction; ``None`` when empty."""
    last = storage.lastTransaction()
    return None if last == Z64 else txn_identity(storage, last)


def last_state(storage: FileStorage) -> tuple[bytes, bytes | None]:
    """``(last_tid, digest of that transaction)``; ``(Z64, None)`` for an empty storage."""
    last = storage.lastTransaction()
    if last == Z64:
        return Z64, None
    return last, txn_digest(storage, last)


#: Beside a storage file whose fsync failed: where the file was last known durable.
UNSYNCED_SUFFIX = ".fsync-failed"


def record_fsync_failure(path: str, durable: int | None, durable_tid: bytes, error: OSError) -> str | None:
    """Leave ``path + UNSYNCED_SUFFIX`` saying that the file is durable up to byte ``durable`` only
    (None: unknown); None once written, else why it could not be (the disk is failing)."""
    text = json.dumps({"durable_bytes": durable, "durable_tid": tid_repr(durable_tid),
                       "error": f"{type(error).__name__}: {error}",
                       "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    try:
        write_durably(path + UNSYNCED_SUFFIX, text + "\n")
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def drop_unsynced_tail(path: str) -> None:
    """Before ``path`` is opened for writing: if an fsync of it failed (``record_fsync_failure``),
    cut it back to where it was last known durable.

    The bytes past that point may be in the page cache only, marked clean
    after the failed write-back: read back they look committed, and a
    reboot loses them.  Cut off, they are fetched from the primary again.
    Raises ``DurabilityError`` when the marker cannot say where to cut.
    """
    marker = path + UNSYNCED_SUFFIX
    try:
        with open(marker) as fh:
            raw = fh.read()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise DurabilityError(f"cannot read {marker}, left when an fsync of {path} failed: {exc}") from exc
    check_by_hand = (f"if the disk is sound now, compare the replica with its primary (replicator verify), then "
                     f"remove {marker}; or start the replica anew from an empty storage")
    try:
        info = json.loads(raw)
        durable = info["durable_bytes"]
        if durable is not None and (not isinstance(durable, int) or durable < 4):
            raise ValueError(durable)
    except (ValueError, KeyError, TypeError):
        raise DurabilityError(f"{marker}, left when an fsync of {path} failed, is damaged: it does not say "
                              "where the file was durable", hint=check_by_hand) from None
    when, why = info.get("at", "?"), info.get("error", "?")
    if durable is None:
        raise DurabilityError(f"an fsync of {path} failed at {when} ({why}) before any fsync of that file had "
                              f"succeeded (it had just been packed): where it is durable is unknown ({marker})",
                              hint=check_by_hand)
    dropped_index = False
    try:
        size = os.path.getsize(path)
        if size > durable:
            with open(path, "r+b") as fh:
                fh.truncate(durable)
                os.fsync(fh.fileno())
            if _index_reaches_past(path + ".index", durable):
                # FileStorage would ignore it, with a warning of its own; it reads the file again either way.
                os.remove(path + ".index")
                dropped_index = True
        os.remove(marker)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    except OSError as exc:
        raise DurabilityError(f"cannot cut {path} back to byte {durable}, where it was durable when an fsync "
                              f"failed at {when} ({why}): {exc}") from exc
    tid = info.get("durable_tid", "")
    if size > durable:
        log.warning("%s: cut back to byte %d, after transaction %s: the %d bytes past it were written before an "
                    "fsync failed at %s (%s), and may never have reached the disk; the primary sends them again%s",
                    path, durable, tid, size - durable, when, why,
                    " (its saved index, which covered them, is dropped: FileStorage reads the file to make "
                    "another)" if dropped_index else "")
    else:
        log.warning("%s: an fsync of it failed at %s (%s); it ends at byte %d, not past where it was durable "
                    "(%d), and is kept as it is", path, when, why, size, durable)


class _PlainUnpickler(pickle.Unpickler):
    """Loads plain values only (an index file's first record, its position): no class is looked up."""

    def find_class(self, module: str, name: str) -> object:
        raise pickle.UnpicklingError(f"{module}.{name} where a plain value was expected")


def _index_reaches_past(index: str, pos: int) -> bool:
    """Whether the FileStorage index saved in ``index`` covers the file beyond byte ``pos`` (or cannot
    be read). ``fsIndex.save`` writes the position it covers as the file's first record."""
    try:
        with open(index, "rb") as fh:
            saved = _PlainUnpickler(fh).load()
    except FileNotFoundError:
        return False
    except Exception:  # noqa: BLE001  (unreadable: FileStorage would not use it either)
        return True
    return not isinstance(saved, int) or saved > pos


def write_durably(path: str, text: str) -> None:
    """Replace file ``path`` by ``text``, atomically (a temporary file renamed) and durably (it and its
    directory entry fsynced)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def fsync_dir(path: str) -> None:
    """Make the entries of directory ``path`` (renamed or created files) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
