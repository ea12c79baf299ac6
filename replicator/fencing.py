"""A primary's fence, kept durably beside its storage so that a restart does not undo it.

A fence lives in the primary's memory; on its own it would be lost with the
process, and a fenced old primary restarted with its configuration unchanged
(a reboot with its services enabled) would take writes again beside the node
promoted in its place.  So while a primary is fenced, ``<Data.fs>.fence``
(JSON) says so: why, since when (UTC), on which node and in which epoch, and
whether a newer epoch superseded it (``stale``, which no ``/unfence`` undoes;
or ``superseded``, for a primary fenced before a node was promoted in its
place: it goes on streaming to its secondaries, but no ``/unfence`` undoes
its fence either).  A primary that starts on a storage with this record
starts fenced.

The record is written when a primary is fenced (an operator's ``/fence``, a
switchover's, a newer epoch heard of) and removed by ``/unfence`` and by a
promotion, the operator's explicit choice of a new primary.  A demotion
keeps it.  Writes and removals are atomic and durable (temporary file,
fsync, rename, fsync of the directory).  A primary never fenced has no such
file and reads nothing but its absence at start.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass

from .storage import fsync_dir, write_durably

__all__ = ["FenceRecord", "fence_path", "load_fence", "save_fence", "clear_fence"]


@dataclass(frozen=True)
class FenceRecord:
    """Node ``node``, a primary of ``epoch``, has taken no writes since ``at`` (Unix time) for ``reason``."""

    reason: str
    at: float
    node: str
    epoch: int
    #: A newer epoch superseded it: it must neither write nor stream, and ``/unfence`` refuses.
    stale: bool = False
    #: Fenced first, then superseded (``by epoch 2 (seen from b)``): it still streams what it
    #: has to its secondaries, but ``/unfence`` refuses.  Empty if no newer epoch was heard of.
    superseded: str = ""

    @property
    def since(self) -> str:
        """``2026-12-01 04:29:00 UTC``"""
        return datetime.datetime.fromtimestamp(self.at, tz=datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

    def as_dict(self) -> dict:
        at = datetime.datetime.fromtimestamp(self.at, tz=datetime.UTC).isoformat(timespec="seconds")
        return {"reason": self.reason, "at": at.replace("+00:00", "Z"), "node": self.node, "epoch": self.epoch,
                "stale": self.stale, "superseded": self.superseded}


def fence_path(storage_path: str) -> str:
    return f"{storage_path}.fence"


def load_fence(storage_path: str) -> FenceRecord | None:
    """The fence recorded beside the storage, None if there is none.

    A record that cannot be read or understood (edited by hand, say) still
    says the node was fenced: it counts as a fence, its reason saying what is
    wrong with it, rather than letting the node take writes.
    """
    path = fence_path(storage_path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return _unreadable(path, str(exc))
    try:
        data = json.loads(text)
        at = datetime.datetime.fromisoformat(str(data["at"]))
        if at.tzinfo is None:
            at = at.replace(tzinfo=datetime.UTC)
        return FenceRecord(str(data["reason"]), at.timestamp(), str(data["node"]), int(data["epoch"]),
                           data.get("stale") is True, str(data.get("superseded") or ""))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        return _unreadable(path, f"{type(exc).__name__}: {exc}")


def _unreadable(path: str, problem: str) -> FenceRecord:
    try:
        at = os.stat(path).st_mtime
    except OSError:
        at = 0.0
    return FenceRecord(f"the fence record {path} is unreadable ({problem}); it is taken as a fence", at, "?", -1)


def save_fence(storage_path: str, record: FenceRecord) -> None:
    """Write the fence record atomically and durably."""
    write_durably(fence_path(storage_path), json.dumps(record.as_dict(), indent=1) + "\n")


def clear_fence(storage_path: str) -> FenceRecord | None:
    """Remove the fence record durably; the record removed, None if there was none."""
    path = fence_path(storage_path)
    record = load_fence(storage_path)
    try:
        os.remove(path)
    except FileNotFoundError:
        return None
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return record
