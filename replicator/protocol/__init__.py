"""The wire protocol, with no I/O: events, framing and the connection state machine."""

from .connection import NEED_DATA, Connection, ConnectionState, Role
from .events import (
    EVENT_TYPES,
    INSTANCE_LEN,
    MAX_BLOB_CHUNK,
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
from .framing import DEFAULT_MAX_FRAME, FrameDecoder, encode_event

__all__ = [
    "Connection",
    "ConnectionState",
    "Role",
    "NEED_DATA",
    "EVENT_TYPES",
    "INSTANCE_LEN",
    "MAX_BLOB_CHUNK",
    "PROTOCOL_VERSION",
    "Ack",
    "BlobChunk",
    "Event",
    "Goodbye",
    "Heartbeat",
    "Hello",
    "Record",
    "Reject",
    "TxnBegin",
    "TxnEnd",
    "Welcome",
    "FrameDecoder",
    "encode_event",
    "DEFAULT_MAX_FRAME",
]
