"""The connection state machine: bytes in, events out, and no I/O at all.

Both ends run one ``Connection``.  ``send(event)`` checks that we may send the
event now and returns its bytes; ``receive_data(bytes)`` buffers the peer's
bytes and ``next_event()`` returns the next event the peer may legally send,
or ``NEED_DATA``.  A violation by the peer raises ``RemoteProtocolError``, one
of ours ``LocalProtocolError``; either moves the connection into ``ERROR``,
which it cannot leave.

Rules, in one place (see ``docs/protocol.md``):

=============  ==========================  ===============================
state          secondary sends             primary sends
=============  ==========================  ===============================
HANDSHAKE      Hello (once), Goodbye       Welcome | Reject, Goodbye
STREAMING      Ack, Goodbye                TxnBegin/Record/BlobChunk/TxnEnd,
                                           Heartbeat (between txns), Goodbye
CLOSED         nothing                     nothing
=============  ==========================  ===============================

The primary may send Welcome only after it received Hello.  Inside the stream,
each ``TxnBegin.prev_tid`` must equal the previous transaction's TID (the
Welcome's ``start_tid`` for the first), a blob's chunks must add up to its
``blob_size`` exactly (in the first transaction, less the ``resume_bytes``
the Welcome announced, left out from its first blob sent on; the
``resume_records`` it announced are not sent at all), ``TxnEnd`` names the
transaction it ends, and an
``Ack`` may only name a transaction the primary has ended, never going back.
"""

from __future__ import annotations

import enum
from collections import deque

from ..errors import LocalProtocolError, RemoteProtocolError, ReplicatorError
from .events import (
    PROTOCOL_VERSION,
    Ack,
    BlobChunk,
    Event,
    Goodbye,
    Heartbeat,
    Hello,
    Record,
    Reject,
    TxnBegin,
    TxnEnd,
    Welcome,
)
from .framing import (
    DEFAULT_MAX_FRAME,
    MAX_MESSAGE_FRAMES,
    FrameDecoder,
    encode_event,
    foreign_hello,
    new_packer,
)

__all__ = ["Connection", "ConnectionState", "Role", "NEED_DATA"]


class Role(enum.Enum):
    PRIMARY = "primary"
    SECONDARY = "secondary"


class ConnectionState(enum.Enum):
    HANDSHAKE = "handshake"
    STREAMING = "streaming"
    CLOSED = "closed"
    ERROR = "error"


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


class _Stream:
    """Position inside the primary-to-secondary transaction stream (both ends keep one)."""

    __slots__ = ("last_tid", "txn", "blob_left", "ended_tid", "skip")

    def __init__(self) -> None:
        self.last_tid: bytes | None = None  # set by Welcome.start_tid
        self.txn: TxnBegin | None = None
        self.blob_left = 0
        self.ended_tid: bytes | None = None
        #: Blob bytes the first transaction leaves out (Welcome.resume_bytes).
        self.skip = 0

    def check(self, event: Event, error: type[ReplicatorError]) -> None:
        """Raise ``error`` if ``event`` may not come next; else advance."""
        kind = type(event)
        if kind is Record:  # nearly every event: tested first, by identity
            if self.txn is None:
                raise error("Record outside a transaction")
            if self.blob_left:
                raise error(f"Record while {self.blob_left} blob bytes are still due")
            self.blob_left = event.blob_size or 0  # type: ignore[attr-defined]
            if self.skip and self.blob_left:
                left_out = min(self.skip, self.blob_left)
                self.skip -= left_out
                self.blob_left -= left_out
        elif kind is TxnBegin:
            if self.txn is not None:
                raise error(f"TxnBegin {event.tid.hex()} inside transaction {self.txn.tid.hex()}")  # type: ignore[attr-defined]
            if event.prev_tid != self.last_tid:  # type: ignore[attr-defined]
                raise error(
                    f"TxnBegin {event.tid.hex()} follows {event.prev_tid.hex()}, "  # type: ignore[attr-defined]
                    f"but the stream is at {self.last_tid.hex() if self.last_tid else 'nothing'}"
                )
            self.txn = event  # type: ignore[assignment]
        elif kind is TxnEnd:
            if self.txn is None or event.tid != self.txn.tid:  # type: ignore[attr-defined]
                raise error("TxnEnd does not end the open transaction")
            if self.blob_left:
                raise error(f"TxnEnd while {self.blob_left} blob bytes are still due")
            self.last_tid = self.ended_tid = event.tid  # type: ignore[attr-defined]
            self.txn = None
            # More left out than the transaction held: the secondary kept
            # something else, which its applier finds out (ResumeError).
            self.skip = 0
        elif kind is BlobChunk:
            if self.txn is None or len(event.data) > self.blob_left:  # type: ignore[attr-defined]
                raise error(f"BlobChunk of {len(event.data)} bytes where {self.blob_left} are due")  # type: ignore[attr-defined]
            self.blob_left -= len(event.data)  # type: ignore[attr-defined]
        elif kind is Heartbeat:
            if self.txn is not None:
                raise error("Heartbeat inside a transaction")


_STREAM_EVENTS = (TxnBegin, Record, BlobChunk, TxnEnd, Heartbeat)
#: Bytes a frame needs besides its bytes fields (type code, TIDs, lengths, sizes): far less than this.
_FRAME_OVERHEAD = 1024
_BEGIN, _RECORD, _CHUNK, _END = TxnBegin.TYPE, Record.TYPE, BlobChunk.TYPE, TxnEnd.TYPE
_TRANSACTION_EVENTS = frozenset({TxnBegin, Record, BlobChunk, TxnEnd})


class Connection:
    """One end of a replication connection, as a pure state machine."""

    def __init__(self, role: Role, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.role = role
        self.state = ConnectionState.HANDSHAKE
        self.max_frame = max_frame
        # Each message a secondary receives is fed whole: its frames are bounded.
        self._decoder = FrameDecoder(max_frame=max_frame,
                                     max_events=MAX_MESSAGE_FRAMES if role is Role.SECONDARY else None)
        self._pending: deque[Event] = deque()
        self._stream = _Stream()
        self._hello_sent = False
        self._hello_received = False
        self.acked_tid: bytes | None = None
        self.peer_hello: Hello | None = None
        self.welcome: Welcome | None = None
        self._packer = new_packer(autoreset=False)

    # -- sending ---------------------------------------------------------

    def send(self, event: Event) -> bytes:
        """Return the bytes of ``event`` after checking we may send it now."""
        if self.state in (ConnectionState.CLOSED, ConnectionState.ERROR):
            raise LocalProtocolError(f"cannot send {type(event).__name__}: connection is {self.state.value}")
        try:
            self._check_send(event)
            return encode_event(event, max_frame=self.max_frame)
        except LocalProtocolError:
            self.state = ConnectionState.ERROR
            raise

    def send_stream(self, events: list[Event]) -> bytes:
        """The bytes of a batch of transaction events: ``send`` of each, joined.

        A primary ships every event through here, so the checks and the
        packing of the usual events are written out, into one buffer.
        """
        if self.role is not Role.PRIMARY or self.state is not ConnectionState.STREAMING:
            return b"".join([self.send(event) for event in events])
        check, packer, room = self._stream.check, self._packer, self.max_frame - _FRAME_OVERHEAD
        try:
            if len(events) > MAX_MESSAGE_FRAMES:
                raise LocalProtocolError(f"{len(events)} events for one message; a secondary takes at most "
                                         f"{MAX_MESSAGE_FRAMES}")
            for event in events:
                kind = type(event)
                check(event, LocalProtocolError)
                if kind is Record:
                    if event.data is not None and len(event.data) > room:  # type: ignore[attr-defined]
                        encode_event(event, max_frame=self.max_frame)  # raises if it is too big
                    packer.pack((_RECORD, event.oid, event.data, event.data_txn, event.blob_size))  # type: ignore[attr-defined]
                elif kind is TxnBegin:
                    if len(event.user) + len(event.description) + len(event.extension) > room:  # type: ignore[attr-defined]
                        encode_event(event, max_frame=self.max_frame)
                    packer.pack((_BEGIN, event.tid, event.prev_tid, event.status, event.user,  # type: ignore[attr-defined]
                                 event.description, event.extension))  # type: ignore[attr-defined]
                elif kind is TxnEnd:
                    packer.pack((_END, event.tid, event.digest))  # type: ignore[attr-defined]
                elif kind is BlobChunk:
                    if len(event.data) > room:  # type: ignore[attr-defined]
                        encode_event(event, max_frame=self.max_frame)
                    packer.pack((_CHUNK, event.data))  # type: ignore[attr-defined]
                else:
                    raise LocalProtocolError(f"{kind.__name__} is not a transaction event")
            return packer.bytes()
        except LocalProtocolError:
            self.state = ConnectionState.ERROR
            raise
        finally:
            packer.reset()

    def _check_send(self, event: Event) -> None:
        name = type(event).__name__
        if isinstance(event, Goodbye):
            self.state = ConnectionState.CLOSED
            return
        if self.role is Role.SECONDARY:
            if isinstance(event, Hello):
                if self._hello_sent:
                    raise LocalProtocolError("Hello sent twice")
                self._hello_sent = True
                return
            if isinstance(event, Ack) and self.state is ConnectionState.STREAMING:
                self._check_ack(event, LocalProtocolError)
                return
        else:
            if isinstance(event, (Welcome, Reject)) and self.state is ConnectionState.HANDSHAKE:
                if not self._hello_received:
                    raise LocalProtocolError(f"{name} before the secondary's Hello")
                if isinstance(event, Welcome):
                    self._start_streaming(event)
                else:
                    self.state = ConnectionState.CLOSED
                return
            if isinstance(event, _STREAM_EVENTS) and self.state is ConnectionState.STREAMING:
                self._stream.check(event, LocalProtocolError)
                return
        raise LocalProtocolError(f"a {self.role.value} may not send {name} in state {self.state.value}")

    # -- receiving -------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer the peer's bytes; decoded events wait in ``next_event()``."""
        if self.state is ConnectionState.ERROR:
            raise RemoteProtocolError("connection already failed")
        pending, stream = self._pending, self._stream
        streaming = self.role is Role.SECONDARY and self.state is ConnectionState.STREAMING
        try:
            for event in self._decoder.feed(data):
                if streaming and type(event) in _TRANSACTION_EVENTS:
                    # The stream itself, the bulk of a secondary's input: checked directly.
                    stream.check(event, RemoteProtocolError)
                else:
                    self._check_receive(event)
                    streaming = self.role is Role.SECONDARY and self.state is ConnectionState.STREAMING
                pending.append(event)
        except RemoteProtocolError:
            hello = None
            if self.role is Role.PRIMARY and not self._hello_received and not pending:
                hello = foreign_hello(data)  # another release's Hello: refused by version, not cut off
            if hello is None:
                self.state = ConnectionState.ERROR
                raise
            self._check_receive(hello)
            pending.append(hello)

    def next_event(self) -> Event | _NeedData:
        if self._pending:
            return self._pending.popleft()
        return NEED_DATA

    def events(self) -> list[Event]:
        """All decoded events at once (the usual way to drain a message)."""
        out = list(self._pending)
        self._pending.clear()
        return out

    def _check_receive(self, event: Event) -> None:
        name = type(event).__name__
        if self.state is ConnectionState.CLOSED:
            raise RemoteProtocolError(f"{name} after the connection was closed")
        if isinstance(event, Goodbye):
            self.state = ConnectionState.CLOSED
            return
        if self.role is Role.PRIMARY:
            if isinstance(event, Hello) and self.state is ConnectionState.HANDSHAKE and not self._hello_received:
                if event.protocol_version < 1:
                    raise RemoteProtocolError("invalid protocol version")
                self._hello_received = True
                self.peer_hello = event
                return
            if isinstance(event, Ack) and self.state is ConnectionState.STREAMING:
                self._check_ack(event, RemoteProtocolError)
                return
        else:
            if isinstance(event, (Welcome, Reject)) and self.state is ConnectionState.HANDSHAKE:
                if not self._hello_sent:
                    raise RemoteProtocolError(f"{name} before our Hello")
                if isinstance(event, Welcome):
                    if event.protocol_version != PROTOCOL_VERSION:
                        raise RemoteProtocolError(
                            f"primary speaks protocol {event.protocol_version}, we speak {PROTOCOL_VERSION}"
                        )
                    self._start_streaming(event)
                else:
                    self.state = ConnectionState.CLOSED
                return
            if isinstance(event, _STREAM_EVENTS) and self.state is ConnectionState.STREAMING:
                self._stream.check(event, RemoteProtocolError)
                return
        raise RemoteProtocolError(f"a {self.role.value} may not receive {name} in state {self.state.value}")

    def _start_streaming(self, welcome: Welcome) -> None:
        """The handshake succeeded (either end): transactions after ``start_tid`` follow."""
        self._stream.last_tid = welcome.start_tid
        self._stream.skip = welcome.resume_bytes
        self.welcome = welcome
        self.state = ConnectionState.STREAMING

    def _check_ack(self, ack: Ack, error: type[ReplicatorError]) -> None:
        ended = self._stream.ended_tid
        floor = self.acked_tid or self._stream_start()
        if ack.tid < floor:
            raise error(f"Ack {ack.tid.hex()} goes back from {floor.hex()}")
        if ack.tid != floor and (ended is None or ack.tid > ended):
            raise error(f"Ack {ack.tid.hex()} for a transaction the primary never ended")
        self.acked_tid = ack.tid

    def _stream_start(self) -> bytes:
        return self.welcome.start_tid if self.welcome is not None else b"\0" * 8

    # -- introspection ---------------------------------------------------

    @property
    def in_transaction(self) -> bool:
        return self._stream.txn is not None

    @property
    def last_tid(self) -> bytes | None:
        """TID of the last transaction ended on the stream (or its start)."""
        return self._stream.last_tid
