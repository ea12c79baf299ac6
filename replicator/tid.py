"""Transaction ids (TIDs): the only positions the replicator speaks of.

A TID is ZODB's 8-byte big-endian timestamp.  Logs and status show it as hex
plus the UTC time it encodes, e.g. ``03ed4b1c2a3b4c5d (2026-11-22T04:06:45.123Z)``.
"""

from __future__ import annotations

import datetime

from persistent.TimeStamp import TimeStamp

__all__ = ["Z64", "TID_LEN", "tid_time", "tid_repr", "tid_hex", "tid_from_hex", "check_tid"]

TID_LEN = 8
Z64 = b"\0" * 8


def check_tid(value: object, what: str = "tid") -> bytes:
    """Return ``value`` if it is an 8-byte TID, else raise ``ValueError``."""
    if not isinstance(value, bytes) or len(value) != TID_LEN:
        raise ValueError(f"{what} must be {TID_LEN} bytes, got {value!r:.40}")
    return value


def tid_time(tid: bytes) -> float:
    """Seconds since the epoch that ``tid`` encodes (0.0 for ``Z64``)."""
    if tid == Z64:
        return 0.0
    return TimeStamp(tid).timeTime()


def tid_hex(tid: bytes) -> str:
    return tid.hex()


def tid_from_hex(text: str) -> bytes:
    text = text.strip().lower().removeprefix("0x")
    raw = bytes.fromhex(text)
    return check_tid(raw)


def tid_repr(tid: bytes | None) -> str:
    """Hex plus the UTC time a TID encodes, for logs and status."""
    if tid is None:
        return "none"
    if tid == Z64:
        return "0000000000000000 (empty)"
    when = datetime.datetime.fromtimestamp(tid_time(tid), tz=datetime.UTC)
    return f"{tid.hex()} ({when.isoformat(timespec='milliseconds').replace('+00:00', 'Z')})"

