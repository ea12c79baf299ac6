"""Finding where two histories fork, and rewinding a node to the last common transaction.

A primary that failed and comes back may hold transactions that the new
primary never had (they were committed after the last one it shipped).
``find_fork`` walks this node's transactions from the newest backwards and
asks the new primary (``GET /identities``) which of them it has; the newest
one it has, with the same identity, is the fork point.  ``rewind`` then
copies every transaction after it into a separate FileStorage (the orphans,
with their blobs: never deleted, so nothing is lost), truncates this node's
file after the fork point and removes its stale index, after which the node
can follow the new primary.  The node's own processes must be stopped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ZODB.FileStorage import FileStorage

from .errors import ConfigError, DivergenceError, ReplicatorError, StorageError, UsageError
from .fsformat import FIRST_POS, TRANS_HDR_LEN, is_blob_data, parse_txn_header, u64
from .integrity import TxnIdentity
from .storage import check_restore_support, lock_storage, open_file_storage, txn_identity
from .tid import Z64, tid_repr

__all__ = ["Fork", "local_tids_backwards", "find_fork", "save_orphans", "truncate_after"]

BATCH = 256


@dataclass(frozen=True)
class Fork:
    """The last transaction both nodes share (``Z64``: none) and this node's transactions after it."""

    fork_tid: bytes
    orphans: int
    #: Offset in this node's file where the first orphan starts.
    cut: int

    def describe(self) -> str:
        if not self.orphans:
            return f"no fork: this node's history is part of the primary's (up to {tid_repr(self.fork_tid)})"
        return (f"histories fork after {tid_repr(self.fork_tid)}: this node has {self.orphans} "
                "transaction(s) after it that the primary does not have")


def local_tids_backwards(path: str) -> Iterator[tuple[bytes, int]]:
    """``(tid, offset)`` of each committed transaction of ``path``, newest first.

    Walks the redundant length that ends every transaction, so it reads two
    small pieces per transaction whatever the file's size.
    """
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        while end > FIRST_POS:
            f.seek(end - 8)
            tlen = u64(f.read(8))
            pos = end - 8 - tlen
            if tlen < TRANS_HDR_LEN or pos < FIRST_POS:
                raise StorageError(f"{path}: bad redundant length before offset {end}")
            f.seek(pos)
            h = parse_txn_header(f.read(TRANS_HDR_LEN), pos)
            if h.tlen != tlen:
                raise StorageError(f"{path}: transaction at {pos} does not match the length after it")
            if h.status != b"c":
                yield h.tid, pos
            end = pos


def find_fork(path: str, blob_dir: str | None, remote_identities) -> Fork:
    """Where ``path``'s history leaves the primary's.

    ``remote_identities(tids) -> dict[tid, TxnIdentity]`` asks the primary.
    """
    storage = open_file_storage(path, blob_dir, read_only=True)
    try:
        orphans = 0
        batch: list[tuple[bytes, int]] = []
        walker = local_tids_backwards(path)
        while True:
            batch = [pair for _, pair in zip(range(BATCH), walker, strict=False)]
            if not batch:
                return Fork(Z64, orphans, FIRST_POS)
            theirs = remote_identities([tid for tid, _ in batch])
            for tid, pos in batch:
                other = theirs.get(tid)
                if other is not None:
                    ours = txn_identity(storage, tid)
                    if ours is not None and ours.matches(other):
                        return Fork(tid, orphans, _end_of(path, pos))
                    if blob_dir is None and _has_blob_records(storage, tid):
                        # Its blob files are part of its identity: without them the same
                        # transaction looks different, and the fork would be put too early.
                        raise ConfigError(f"transaction {tid_repr(tid)} has blob records: give --blob-dir, "
                                          "whose files are part of each transaction's identity")
                orphans += 1
    finally:
        storage.close()


def _blob_records(txns) -> int:
    """How many records of the transactions ``txns`` (a storage's iterator) are blob records."""
    return sum(1 for txn in txns for record in txn if record.data is not None and is_blob_data(record.data))


def _has_blob_records(storage: FileStorage, tid: bytes) -> bool:
    return _blob_records(storage.iterator(tid, tid)) > 0


def _end_of(path: str, pos: int) -> int:
    with open(path, "rb") as f:
        f.seek(pos)
        return parse_txn_header(f.read(TRANS_HDR_LEN), pos).end


def save_orphans(path: str, blob_dir: str | None, fork: Fork) -> str:
    """Copy the transactions after ``fork.fork_tid`` into a new FileStorage; return its path."""
    check_restore_support()
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = f"{path}.orphans-{fork.fork_tid.hex()}-{stamp}"
    if os.path.exists(target):
        raise ConfigError(f"{target} exists already")
    source = open_file_storage(path, blob_dir, read_only=True)
    dest = FileStorage(target, blob_dir=f"{target}.blobs" if blob_dir else None, create=True)
    try:
        start = None if fork.fork_tid == Z64 else fork.fork_tid
        for txn in source.iterator(start):
            if txn.tid <= fork.fork_tid:
                continue
            dest.tpc_begin(txn, txn.tid, txn.status)
            for record in txn:
                if blob_dir and record.data is not None and is_blob_data(record.data):
                    copy = os.path.join(dest.temporaryDirectory(), f"orphan-{record.oid.hex()}")
                    shutil.copyfile(source.loadBlob(record.oid, record.tid), copy)
                    dest.restoreBlob(record.oid, record.tid, record.data, copy, record.data_txn, txn)
                else:
                    dest.restore(record.oid, record.tid, record.data, "", record.data_txn, txn)
            dest.tpc_vote(txn)
            dest.tpc_finish(txn)
    finally:
        dest.close()
        source.close()
        # FileStorage leaves its lock file and its scratch file (each transaction's records
        # before its vote, all in the file once closed) behind: the saved orphans are the
        # file itself, its index and its blob directory.
        for leftover in (f"{target}.lock", f"{target}.tmp"):
            with contextlib.suppress(OSError):
                os.remove(leftover)
    return target


def truncate_after(path: str, blob_dir: str | None, fork: Fork, orphan_tids: list[bytes]) -> None:
    """Cut ``path`` where the first orphan starts and drop what referred to the orphans."""
    with open(path, "r+b") as f:
        f.truncate(fork.cut)
        f.flush()
        os.fsync(f.fileno())
    for stale in (f"{path}.index", f"{path}.tmp"):
        if os.path.exists(stale):
            os.remove(stale)
    if blob_dir:
        # The orphans' blob files were copied with them; remove them here.
        suffixes = {f"{tid.hex()}.blob" for tid in orphan_tids}
        for root, _dirs, files in os.walk(blob_dir):
            for name in files:
                if name.removeprefix("0x") in suffixes:
                    os.remove(os.path.join(root, name))


def identities_from_json(data: dict) -> dict[bytes, TxnIdentity]:
    out = {}
    for hex_tid, info in data.get("identities", {}).items():
        tid = bytes.fromhex(hex_tid)
        out[tid] = TxnIdentity(tid, info["status"], bytes.fromhex(info["digest"]), bytes.fromhex(info["meta"]))
    return out


def check_fork(fork: Fork) -> None:
    if fork.fork_tid == Z64 and fork.orphans:
        raise DivergenceError("this node shares no transaction with the primary: there is nothing to rewind "
                              "to; start it anew from an empty storage", fork_tid=Z64)


async def remote_identities(primary: str, tls, insecure: bool, tids: list[bytes]) -> dict[bytes, TxnIdentity]:
    from .control import call

    query = ",".join(t.hex() for t in tids)
    return identities_from_json(await call(primary, "GET", f"/identities?tids={query}", tls, insecure=insecure))


async def check_is_primary(primary: str, tls, insecure: bool, path: str) -> None:
    """``UsageError`` unless the node at ``primary`` is a primary (a promoted secondary is one)
    of an epoch no older than that of the storage at ``path``.

    Against a secondary the fork would be found in a copy that may lack the
    primary's newest transactions, and this node's copies of those would be
    taken for orphans; against a secondary of this very node, no fork at all.
    Against a superseded primary (an older epoch), this node's history of
    the newer epochs would be cut away as orphans.
    """
    from .control import call, describe_node
    from .epoch import load_epoch

    status = await call(primary, "GET", "/status", tls, insecure=insecure)
    if status.get("role") != "primary":
        following = status.get("primary")
        raise UsageError(f"{primary} is not a primary: it is {describe_node(status)}; rewind takes the "
                         "address of the primary this node is to follow",
                         hint=f"give --primary {following}, the node it follows, if that is the new primary"
                         if following else "")
    ours = load_epoch(path).epoch
    theirs = status.get("epoch")
    if isinstance(theirs, int) and theirs < ours:
        raise UsageError(f"{primary} is {describe_node(status)}, but this node's storage is at epoch {ours}: "
                         f"that primary was superseded, and rewinding to it would cut away this node's "
                         f"history of epoch {theirs + 1}{f' to {ours}' if ours > theirs + 1 else ''}",
                         hint="give --primary the address of the current primary (`replicator status` "
                              "shows each node's epoch)")


def orphan_blob_records(path: str, fork: Fork) -> int:
    """How many records of the transactions after the fork are blob records."""
    storage = open_file_storage(path, None, read_only=True)
    try:
        start = None if fork.fork_tid == Z64 else fork.fork_tid
        return _blob_records(txn for txn in storage.iterator(start) if txn.tid > fork.fork_tid)
    finally:
        storage.close()


async def rewind_node(path: str, blob_dir: str | None, primary: str, tls, insecure: bool, *,
                      dry_run: bool = False) -> str:
    """Find the fork against ``primary``; unless ``dry_run``, save the orphans and truncate.

    Refuses what the real run would refuse, dry or not: ``UsageError`` if
    ``primary`` is not a current primary (see ``check_is_primary``),
    ``DivergenceError`` if the histories share nothing, ``ConfigError`` if
    orphans have blobs and no ``blob_dir`` was given (they would be lost).
    """
    import asyncio

    loop = asyncio.get_running_loop()

    def ask(tids: list[bytes]) -> dict[bytes, TxnIdentity]:
        return asyncio.run_coroutine_threadsafe(remote_identities(primary, tls, insecure, tids), loop).result()

    # Truncating a file a running node writes would wreck it: hold the
    # storage's lock throughout, as its own processes do (a dry run only reads).
    # This node's own problems (no such file, in use) first: they need no network.
    if dry_run and not os.path.exists(path):
        raise ConfigError(f"{path}: no such file")
    lock = None if dry_run else await asyncio.to_thread(lock_storage, path)
    try:
        await check_is_primary(primary, tls, insecure, path)
        fork = await asyncio.to_thread(find_fork, path, blob_dir, ask)
        if not fork.orphans:
            return fork.describe()
        check_fork(fork)
        if not blob_dir:
            blobs = await asyncio.to_thread(orphan_blob_records, path, fork)
            if blobs:
                raise ConfigError(f"{fork.describe()}, with {blobs} blob record(s): give --blob-dir, so that "
                                  "their blob files are saved with them (without it they would be lost)")
        if dry_run:
            return (f"{fork.describe()}.\nWithout --dry-run they would be saved to "
                    f"{path}.orphans-{fork.fork_tid.hex()}-<time>" + (" (with their blobs)" if blob_dir else "")
                    + f", and {path} truncated after {tid_repr(fork.fork_tid)}.")
        orphan_tids = [tid for tid, _ in local_tids_backwards(path)][:fork.orphans]
        saved = await asyncio.to_thread(save_orphans, path, blob_dir, fork)
        await asyncio.to_thread(truncate_after, path, blob_dir, fork, orphan_tids)
    finally:
        if lock is not None:
            lock.close()
    return (f"{fork.describe()}.\nSaved them to {saved}" + (f" (blobs in {saved}.blobs)" if blob_dir else "")
            + f".\nTruncated {path} after {tid_repr(fork.fork_tid)}; it can now follow {primary}.")


async def explain_divergence(path: str, blob_dir: str | None, primary: str, tls, insecure: bool) -> Fork | None:
    """Where this node forks from ``primary``, for the error message; None if that cannot be told."""
    import asyncio

    loop = asyncio.get_running_loop()

    def ask(tids: list[bytes]) -> dict[bytes, TxnIdentity]:
        return asyncio.run_coroutine_threadsafe(remote_identities(primary, tls, insecure, tids), loop).result(60)

    try:
        return await asyncio.to_thread(find_fork, path, blob_dir, ask)
    except (ReplicatorError, OSError):
        return None
