"""What packs dropped: proof for a secondary that was away across more than one pack.

A pack drops every transaction whose records were all superseded.  A
secondary whose last transaction was dropped while it was away can resume
only if the primary can show that transaction was its own, and where its
file goes on after it (``Tailer.resumes_across_pack``).  The file the last
pack replaced (``Data.fs.old``) shows both, but the next pack replaces it in
turn.  So after each pack it sees, a primary records here, next to the
storage (``<path>.dropped``), every transaction that pack dropped: its TID,
its metadata digest (TID, user, description, extension: what a pack never
changes, and what the handshake compares of packed transactions) and the
TID of the transaction that follows it in the packed file.  A chain of
those records leads from the secondary's last transaction, through later
packs, to a transaction the file still has.

The record is written only for a replaced file that is a pack of
``Data.fs.old``: every transaction of the new file up to the end of the old
one is a transaction of the old one.  A restored backup of another history
is not, and gets no record.  The records of the newest ``keep`` packs are
kept.

The file is plain text, one line per dropped transaction
(``T <tid> <meta digest> <next tid or ->``, hex), each pack's lines closed by
``P <old file's size>:<mtime in ns> <count>``; lines after the last ``P`` line
are the rest of a write a crash cut short, and are ignored, then cut away
by the next write.  It is read a line at a time, never held in memory: a
pack of a big storage may drop millions of transactions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator

from .fsfile import HEADER_AHEAD, SourceFile
from .fsformat import FIRST_POS, TRANS_HDR_LEN, TxnHeader, parse_txn_header
from .storage import fsync_dir
from .tid import tid_repr

__all__ = ["record_pack", "recorded_packs", "successor_of", "log_path", "KEEP_PACKS"]

log = logging.getLogger(__name__)

#: How many packs' dropped transactions are kept by default.
KEEP_PACKS = 8
_MAGIC = "zodb-replicator dropped transactions 1\n"
_locks: dict[str, threading.Lock] = {}
_locks_lock = threading.Lock()


def log_path(path: str) -> str:
    """Where the record of the packs of the storage at ``path`` lives."""
    return path + ".dropped"


def record_pack(path: str, keep: int | None = None) -> int | None:
    """Record what the pack that left ``<path>.old`` dropped; the number recorded, or None.

    None: nothing to record (no ``.old``, recorded already, ``keep`` is 0)
    or the files are not a pack and its result (said in the log).  Raises
    ``OSError`` when the record cannot be written.
    """
    keep = KEEP_PACKS if keep is None else keep
    with _lock(path):
        try:
            st = os.stat(path + ".old")
        except FileNotFoundError:
            return None
        # The replaced file, known without reading it (a big one takes minutes to walk).
        ident = f"{st.st_size}:{st.st_mtime_ns}"
        if keep <= 0 or ident in _recorded_packs(log_path(path)):
            return None
        try:
            old, new = SourceFile(path + ".old"), SourceFile(path)
        except FileNotFoundError:
            return None  # a pack under way
        try:
            old.scan()
            new.scan()
            for src in (old, new):
                if src.damage is not None:
                    log.info("not recording what the pack dropped: %s", src.damage)
                    return None
            lines = _dropped(old, new)
            return _append(log_path(path), ident, lines, keep)
        except _NotAPack as exc:
            log.info("%s is not a pack of %s.old (%s): nothing recorded of what it dropped", path, path, exc)
            # Noted as a pack that dropped nothing, so that the next start does not walk them again.
            _append(log_path(path), ident, iter(()), keep)
            return None
        finally:
            old.close()
            new.close()


def successor_of(path: str, tid: bytes, meta: bytes, present: Callable[[bytes], bool]) -> bytes | None:
    """The transaction the file goes on with after ``tid``, if the records show a pack dropped it.

    ``meta``: the metadata digest the secondary has for ``tid``; it must be
    the recorded one.  Follows the records through later packs until a TID
    for which ``present`` (in the file now) is true, and returns it; None
    when the records do not lead there.
    """
    want: bytes = tid
    expected: bytes | None = meta
    for _ in range(1 + len(_recorded_packs(log_path(path)))):
        found = _find(log_path(path), want)
        if found is None or (expected is not None and found[0] != expected):
            return None
        nxt = found[1]
        if nxt is None:
            return None  # nothing followed it in that pack's file
        if present(nxt):
            return nxt
        want, expected = nxt, None  # dropped by a later pack too
    return None


def recorded_packs(path: str) -> int:
    """How many packs of the storage at ``path`` the record holds (a line per pack is read)."""
    return len(_recorded_packs(log_path(path)))


class _NotAPack(Exception):
    pass


def _lock(path: str) -> threading.Lock:
    with _locks_lock:
        return _locks.setdefault(os.path.abspath(path), threading.Lock())


def _headers(src: SourceFile) -> Iterator[TxnHeader]:
    pos = FIRST_POS
    while pos < src.scan_pos:
        h = parse_txn_header(src.read(pos, TRANS_HDR_LEN, HEADER_AHEAD), pos)
        yield h
        pos = h.end


def _dropped(old: SourceFile, new: SourceFile) -> Iterator[str]:
    """The record lines of the transactions of ``old`` that ``new`` lacks (a merge by TID)."""
    kept = _headers(new)
    nxt = next(kept, None)
    for h in _headers(old):
        if nxt is not None and nxt.tid < h.tid:
            raise _NotAPack(f"its transaction {tid_repr(nxt.tid)} is not in the old file")
        if nxt is not None and nxt.tid == h.tid:
            nxt = next(kept, None)
            continue
        yield f"T {h.tid.hex()} {old.meta_digest(h).hex()} {nxt.tid.hex() if nxt is not None else '-'}\n"


def _groups(path: str) -> Iterator[tuple[int, str | None]]:
    """``(offset after the line, pack ident or None)`` per line; ``ValueError`` if not such a record."""
    with open(path, encoding="ascii") as f:
        first = f.readline()
        if first != _MAGIC:
            raise ValueError(f"{path}: not a record of dropped transactions")
        offset = len(first)
        for line in f:
            offset += len(line)
            yield offset, (line.split()[1] if line.startswith("P ") and line.endswith("\n") else None)


def _recorded_packs(path: str) -> list[str]:
    try:
        return [ident for _, ident in _groups(path) if ident is not None]
    except FileNotFoundError:
        return []
    except (ValueError, UnicodeDecodeError, IndexError) as exc:
        log.warning("%s cannot be read (%s): it is ignored", path, exc)
        return []


def _find(path: str, tid: bytes) -> tuple[bytes, bytes | None] | None:
    """``(meta digest, next TID or None)`` recorded for ``tid`` in a complete pack's lines."""
    want = tid.hex()
    found = None
    try:
        with open(path, encoding="ascii") as f:
            if f.readline() != _MAGIC:
                return None
            pending = None
            for line in f:
                if line.startswith("T ") and line[2:18] == want and line.endswith("\n"):
                    _, _, meta, nxt = line.split()
                    pending = (bytes.fromhex(meta), None if nxt == "-" else bytes.fromhex(nxt))
                elif line.startswith("P ") and line.endswith("\n") and pending is not None:
                    found, pending = pending, None  # its pack's lines are complete
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return found


def _append(path: str, ident: str, lines: Iterator[str], keep: int) -> int:
    """Write one pack's lines after the last complete pack, durably; keep the newest ``keep`` packs."""
    end, packs = len(_MAGIC), 0
    with contextlib.suppress(FileNotFoundError, ValueError, UnicodeDecodeError, IndexError):
        for offset, found in _groups(path):
            if found is not None:
                end, packs = offset, packs + 1
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    count = 0
    try:
        os.ftruncate(fd, end)  # a cut-short write, or a file that was no record: gone
        with os.fdopen(os.dup(fd), "w", encoding="ascii") as f:
            f.seek(0)
            f.write(_MAGIC)
            f.seek(end)
            for line in lines:
                f.write(line)
                count += 1
            f.write(f"P {ident} {count}\n")
            f.flush()
            os.fsync(f.fileno())
    finally:
        os.close(fd)
    if packs + 1 > keep:
        _keep_newest(path, keep)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return count


def _keep_newest(path: str, keep: int) -> None:
    """Rewrite the record with the lines of its newest ``keep`` packs only."""
    ends = [offset for offset, ident in _groups(path) if ident is not None]
    start = ends[-keep - 1]
    tmp = f"{path}.tmp{os.getpid()}"
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(_MAGIC.encode())
        src.seek(start)
        while chunk := src.read(1 << 20):
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)
