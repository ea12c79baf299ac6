"""Epochs: which line of primaries a node's history belongs to, kept durably beside its storage.

Every promotion starts a new epoch, as PostgreSQL's timelines do.  The file
``<Data.fs>.epoch`` (JSON) records the epoch a node is in and, for each
epoch it has seen begin, the last transaction the new primary had when it
was promoted.  The stream carries the epoch both ways, so that:

- a secondary never follows a primary of an older epoch (a stale primary
  that came back after a failover);
- a primary that hears of a newer epoch knows it was replaced and fences
  itself (stops accepting writes).

A missing file means epoch 0 on a node that never followed another (a
primary that was never part of a failover); a secondary records the primary
it follows, epoch 0 included.

The record also names the **database** the history belongs to: the TID of
the first transaction a primary found in its file when it first served a
secondary, recorded then and never changed by a later pack.  Secondaries
take their primary's on each accepted handshake and carry it through a
promotion, so every node of one replication group names the same one.  A
secondary whose history the primary cannot place in its own and that names
another database is a replica of something else (pointed at another
storage's port, say): the primary refuses it as ``foreign`` and does not
take its epoch for a sign that it was replaced.
Writes are atomic (temporary file, fsync, rename, fsync of the directory),
so a crash leaves either the old or the new record, never half of one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from .errors import ConfigError
from .storage import write_durably
from .tid import tid_from_hex

__all__ = ["EpochRecord", "EpochState", "epoch_path", "load_epoch", "save_epoch", "begin_epoch",
           "adopt_epoch", "record_database"]


@dataclass(frozen=True)
class EpochRecord:
    """Epoch ``epoch`` began after transaction ``start_tid``, on node ``node``, at ``at``.

    A node that joined an epoch by following its primary does not know where
    it began: its record has ``start_tid`` None (``null`` in the file), and
    ``at`` is when it joined.
    """

    epoch: int
    start_tid: bytes | None
    node: str
    at: float


@dataclass(frozen=True)
class EpochState:
    history: tuple[EpochRecord, ...] = ()
    #: The first TID of the database this history belongs to, once known (see above).
    database: bytes | None = None

    @property
    def epoch(self) -> int:
        return self.history[-1].epoch if self.history else 0

    def as_dict(self) -> dict:
        return {"epoch": self.epoch,
                "history": [{"epoch": r.epoch, "start_tid": None if r.start_tid is None else r.start_tid.hex(),
                             "node": r.node, "at": r.at}
                            for r in self.history],
                "database": None if self.database is None else self.database.hex()}


def epoch_path(storage_path: str) -> str:
    return f"{storage_path}.epoch"


def load_epoch(storage_path: str) -> EpochState:
    """The node's epoch state; epoch 0 if it never had one.  A damaged file is a ``ConfigError``."""
    path = epoch_path(storage_path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return EpochState()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the epoch record: {exc}") from None
    try:
        records = tuple(EpochRecord(int(r["epoch"]), None if r["start_tid"] is None else tid_from_hex(r["start_tid"]),
                                    str(r["node"]), float(r["at"])) for r in data["history"])
        database = data.get("database")
        database = None if database is None else tid_from_hex(database)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{path}: malformed epoch record: {exc}") from None
    if any(b.epoch <= a.epoch for a, b in zip(records, records[1:], strict=False)):
        raise ConfigError(f"{path}: epochs do not increase")
    return EpochState(records, database)


def save_epoch(storage_path: str, state: EpochState) -> None:
    """Replace the epoch record atomically and durably."""
    write_durably(epoch_path(storage_path), json.dumps(state.as_dict(), indent=1))


def begin_epoch(storage_path: str, start_tid: bytes, node: str) -> EpochState:
    """Promotion: start the epoch after the current one, from ``start_tid``."""
    state = load_epoch(storage_path)
    new = EpochState(state.history + (EpochRecord(state.epoch + 1, start_tid, node, time.time()),), state.database)
    save_epoch(storage_path, new)
    return new


def adopt_epoch(storage_path: str, epoch: int, node: str, start_tid: bytes | None = None) -> EpochState:
    """A secondary follows ``node``, a primary of ``epoch``: record that it is in that epoch now.

    Only a newer epoch is recorded, or epoch 0 when the node has no record
    yet: so every node that ever followed another says so, and one that
    began its epoch itself (a promotion) keeps saying that until it follows
    a newer one.
    """
    state = load_epoch(storage_path)
    if epoch < state.epoch or (epoch == state.epoch and state.history):
        return state
    new = EpochState(state.history + (EpochRecord(epoch, start_tid, node, time.time()),), state.database)
    save_epoch(storage_path, new)
    return new


def record_database(storage_path: str, database: bytes) -> EpochState:
    """Name the database this storage's history belongs to (a primary's first TID), durably."""
    state = load_epoch(storage_path)
    if state.database == database:
        return state
    new = EpochState(state.history, database)
    save_epoch(storage_path, new)
    return new
