"""Protocol events: small dataclasses that validate themselves.

Each event is one frame on the wire (see ``docs/protocol.md``).  Names are the
nouns the wire uses.  Every field is a msgpack-native value (bytes, str, int,
float, None, bool), so no pickle ever crosses the wire: ZODB record data travel
as opaque bytes.

The stream of one transaction is::

    TxnBegin  Record (BlobChunk*)  Record (BlobChunk*) ...  TxnEnd

A ``Record`` with ``blob_size`` not ``None`` is followed by exactly as many
``BlobChunk`` bytes as ``blob_size`` says, in chunks of at most
``MAX_BLOB_CHUNK`` bytes.

Events are treated as values (nobody changes one once built) but are not
frozen dataclasses: a frozen ``__init__`` sets each field through
``object.__setattr__``, which made building the hundreds of thousands of
events of a catch-up cost three times as much.  The checks of the hot
events (``Record``, ``BlobChunk``) are written out for the same reason.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from ..integrity import CHECK_LEN, DIGEST_LEN  # Hello's identity digests; TxnEnd's stream check
from ..tid import check_tid

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_BLOB_CHUNK",
    "Event",
    "Hello",
    "Welcome",
    "Reject",
    "TxnBegin",
    "Record",
    "BlobChunk",
    "TxnEnd",
    "Ack",
    "Heartbeat",
    "Goodbye",
    "EVENT_TYPES",
    "INSTANCE_LEN",
    "TXN_STATUSES",
]

#: Bumped on any incompatible change of frames or their meaning.
PROTOCOL_VERSION = 9

#: Blob bytes per ``BlobChunk``; keeps a frame small whatever the blob's size.
MAX_BLOB_CHUNK = 1 << 20

#: FileStorage transaction statuses that may be shipped (``'c'`` never is).
TXN_STATUSES = (" ", "p", "u")

#: Bytes of ``Hello.instance``.
INSTANCE_LEN = 16

#: Longest ``Welcome.ack_delay`` a primary may ask for.
MAX_ACK_DELAY = 1.0


def _bytes(value: object, what: str, *, max_len: int | None = None, exact: int | None = None) -> None:
    if not isinstance(value, bytes):
        raise ValueError(f"{what} must be bytes, got {type(value).__name__}")
    if exact is not None and len(value) != exact:
        raise ValueError(f"{what} must be {exact} bytes, got {len(value)}")
    if max_len is not None and len(value) > max_len:
        raise ValueError(f"{what} is {len(value)} bytes, more than {max_len}")


def _str(value: object, what: str, *, max_len: int = 4096) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > max_len:
        raise ValueError(f"{what} is longer than {max_len} characters")


def _name(value: object, what: str) -> None:
    """A name that ends up in log lines, ``/status`` and terminals: no control characters
    (a line break would forge a log line, an escape sequence drive a terminal)."""
    _str(value, what, max_len=256)
    bad = unprintable(value)  # type: ignore[arg-type]
    if bad is not None:
        raise ValueError(f"{what} holds the control character {bad!r}")


def unprintable(text: str) -> str | None:
    """The first control or format character of ``text`` (line breaks, escapes), if any."""
    for char in text:
        category = unicodedata.category(char)
        if category[0] == "C" or category in ("Zl", "Zp"):
            return char
    return None


def printable(text: str) -> str:
    """``text`` with its control characters escaped (``\\n``, ``\\x1b``), for a log line."""
    if unprintable(text) is None:
        return text
    return "".join(char.encode("unicode_escape").decode("ascii")
                   if unprintable(char) is not None else char for char in text)


#: Largest integer a field takes (msgpack's signed 64 bits).
MAX_INT = (1 << 63) - 1
#: Largest epoch: a failover a second for 68 years.  A bigger one is no epoch
#: a node began, and would overflow where it is incremented.
MAX_EPOCH = (1 << 31) - 1


def _int(value: object, what: str, *, minimum: int = 0, maximum: int = MAX_INT) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        raise ValueError(f"{what} must be an integer from {minimum} to {maximum}, got {value!r:.40}")


def _time(value: object, what: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r:.40}")


class Event:
    """Base of all events; ``TYPE`` is the frame's type code on the wire."""

    TYPE: ClassVar[int]

    def to_fields(self) -> list[Any]:
        return [getattr(self, f.name) for f in fields(self)]  # type: ignore[arg-type]


@dataclass(slots=True)
class Hello(Event):
    """Secondary -> primary: who I am and where my history ends."""

    TYPE: ClassVar[int] = 1
    protocol_version: int
    node: str
    last_tid: bytes
    last_digest: bytes | None
    epoch: int = 0
    #: Status byte and metadata digest of the last transaction: after a pack
    #: on either side, the records differ but these still identify it.
    last_status: str = " "
    last_meta_digest: bytes | None = None
    #: Random, drawn once per secondary process (kept across its
    #: reconnections): a primary that still holds a session of the same node
    #: and instance knows it for this process's broken connection and drops
    #: it; the same node name from another instance is a second secondary
    #: under the same name, and is refused (``duplicate``).
    instance: bytes | None = None
    #: A transaction the secondary was receiving when the link broke, and
    #: what it kept of it: the primary may leave out its first
    #: ``resume_records`` records, with their blobs, and then
    #: ``resume_bytes`` blob bytes in stream order (``Welcome``).
    resume_tid: bytes | None = None
    resume_bytes: int = 0
    resume_records: int = 0
    #: The database the secondary's history belongs to, as its epoch record
    #: names it (``epoch.py``); None when it has not been told one yet.
    database: bytes | None = None

    def __post_init__(self) -> None:
        _int(self.protocol_version, "protocol_version", minimum=1)
        _name(self.node, "node")
        check_tid(self.last_tid, "last_tid")
        if self.database is not None:
            check_tid(self.database, "database")
        if self.last_digest is not None:
            _bytes(self.last_digest, "last_digest", exact=DIGEST_LEN)
        _int(self.epoch, "epoch", maximum=MAX_EPOCH)
        if self.last_status not in TXN_STATUSES:
            raise ValueError(f"invalid last_status {self.last_status!r}")
        if self.last_meta_digest is not None:
            _bytes(self.last_meta_digest, "last_meta_digest", exact=DIGEST_LEN)
        if self.instance is not None:
            _bytes(self.instance, "instance", exact=INSTANCE_LEN)
        _int(self.resume_bytes, "resume_bytes")
        _int(self.resume_records, "resume_records")
        if self.resume_tid is None:
            if self.resume_bytes or self.resume_records:
                raise ValueError("resume_bytes or resume_records without resume_tid")
        else:
            check_tid(self.resume_tid, "resume_tid")
            if self.resume_tid <= self.last_tid:
                raise ValueError("resume_tid must be greater than last_tid")


@dataclass(slots=True)
class Welcome(Event):
    """Primary -> secondary: accepted; transactions after ``start_tid`` follow.

    ``ack_delay``: the secondary may hold an acknowledgement back this many
    seconds to cover more transactions with it (0: acknowledge each durable
    batch at once, which synchronous replication needs).  ``resume_records``
    and ``resume_bytes``: the first transaction's first that many records
    are left out, with their blobs, and then that many bytes of the blobs
    after them (0 and 0: everything is sent); it is ``Hello.resume_tid``,
    unless a pack replaced the primary's file meanwhile (the secondary then
    refuses it).
    """

    TYPE: ClassVar[int] = 2
    protocol_version: int
    node: str
    epoch: int
    start_tid: bytes
    head_tid: bytes
    ack_delay: float = 0.0
    resume_bytes: int = 0
    resume_records: int = 0
    #: The database this primary's history belongs to (``epoch.py``), which
    #: the secondary records; None while the primary holds no transaction.
    database: bytes | None = None

    def __post_init__(self) -> None:
        _int(self.protocol_version, "protocol_version", minimum=1)
        _name(self.node, "node")
        _int(self.epoch, "epoch", maximum=MAX_EPOCH)
        check_tid(self.start_tid, "start_tid")
        if self.database is not None:
            check_tid(self.database, "database")
        check_tid(self.head_tid, "head_tid")
        _time(self.ack_delay, "ack_delay")
        _int(self.resume_bytes, "resume_bytes")
        _int(self.resume_records, "resume_records")
        if not 0 <= self.ack_delay <= MAX_ACK_DELAY:
            raise ValueError(f"ack_delay must be between 0 and {MAX_ACK_DELAY} seconds, got {self.ack_delay}")


@dataclass(slots=True)
class Reject(Event):
    """Primary -> secondary: refused, with a machine code and a message for people.

    Codes: ``version``, ``diverged``, ``ahead``, ``packed``, ``stale``, ``foreign``, ``identity`` (final for
    the secondary), ``corrupted``, ``behind``, ``duplicate`` (retried; see docs/protocol.md), ``self``
    (a relay's own secondary: a configuration error).
    ``fork_tid`` is the last transaction both histories share, when known.
    """

    TYPE: ClassVar[int] = 3
    code: str
    message: str
    fork_tid: bytes | None = None

    def __post_init__(self) -> None:
        _str(self.code, "code", max_len=64)
        _str(self.message, "message")
        self.message = printable(self.message)  # the other side's words, for this side's log
        if self.fork_tid is not None:
            check_tid(self.fork_tid, "fork_tid")


@dataclass(slots=True)
class TxnBegin(Event):
    """Start of a committed transaction that directly follows ``prev_tid``."""

    TYPE: ClassVar[int] = 4
    tid: bytes
    prev_tid: bytes
    status: str
    user: bytes
    description: bytes
    extension: bytes

    def __post_init__(self) -> None:
        check_tid(self.tid, "tid")
        check_tid(self.prev_tid, "prev_tid")
        if self.tid <= self.prev_tid:
            raise ValueError("tid must be greater than prev_tid")
        if self.status not in TXN_STATUSES:
            raise ValueError(f"invalid transaction status {self.status!r}")
        # FileStorage stores each of these with a 2-byte length.
        _bytes(self.user, "user", max_len=0xFFFF)
        _bytes(self.description, "description", max_len=0xFFFF)
        _bytes(self.extension, "extension", max_len=0xFFFF)


@dataclass(slots=True)
class Record(Event):
    """One object revision of the current transaction.

    ``data`` is ``None`` for an undone creation.  ``data_txn`` is the
    transaction whose record holds the data (undo back pointers), or ``None``.
    ``blob_size`` is set when a blob file of that many bytes follows.
    """

    TYPE: ClassVar[int] = 5
    oid: bytes
    data: bytes | None
    data_txn: bytes | None
    blob_size: int | None = None

    def __post_init__(self) -> None:
        oid, data = self.oid, self.data
        if type(oid) is not bytes or len(oid) != 8:
            _bytes(oid, "oid", exact=8)
        if data is not None and type(data) is not bytes:
            _bytes(data, "data")
        if self.data_txn is not None:
            check_tid(self.data_txn, "data_txn")
        if self.blob_size is not None:
            _int(self.blob_size, "blob_size")
            if data is None:
                raise ValueError("a record without data cannot carry a blob")


@dataclass(slots=True)
class BlobChunk(Event):
    """The next bytes of the current record's blob file."""

    TYPE: ClassVar[int] = 6
    data: bytes

    def __post_init__(self) -> None:
        if type(self.data) is not bytes or len(self.data) > MAX_BLOB_CHUNK:
            _bytes(self.data, "data", max_len=MAX_BLOB_CHUNK)
        if not self.data:
            raise ValueError("an empty BlobChunk carries nothing")


@dataclass(slots=True)
class TxnEnd(Event):
    """End of transaction ``tid``; ``digest``, its stream check, covers its canonical content."""

    TYPE: ClassVar[int] = 7
    tid: bytes
    digest: bytes

    def __post_init__(self) -> None:
        check_tid(self.tid, "tid")
        _bytes(self.digest, "digest", exact=CHECK_LEN)


@dataclass(slots=True)
class Ack(Event):
    """Secondary -> primary: every transaction up to ``tid`` is durable here."""

    TYPE: ClassVar[int] = 8
    tid: bytes

    def __post_init__(self) -> None:
        check_tid(self.tid, "tid")


@dataclass(slots=True)
class Heartbeat(Event):
    """Primary -> secondary: my newest committed TID and when it was committed.

    Sent while idle so that lag stays right when nothing is committed.
    """

    TYPE: ClassVar[int] = 9
    head_tid: bytes
    sent_at: float

    def __post_init__(self) -> None:
        check_tid(self.head_tid, "head_tid")
        _time(self.sent_at, "sent_at")


@dataclass(slots=True)
class Goodbye(Event):
    """Either side: closing on purpose (shutdown, source damage, ...)."""

    TYPE: ClassVar[int] = 10
    code: str
    message: str

    def __post_init__(self) -> None:
        _str(self.code, "code", max_len=64)
        _str(self.message, "message")
        self.message = printable(self.message)  # the other side's words, for this side's log


EVENT_TYPES: dict[int, type[Event]] = {
    cls.TYPE: cls
    for cls in (Hello, Welcome, Reject, TxnBegin, Record, BlobChunk, TxnEnd, Ack, Heartbeat, Goodbye)
}
