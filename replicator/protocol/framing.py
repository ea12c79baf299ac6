"""Frames: one msgpack array ``[type, field, ...]`` per event, with size limits.

Frames are self-delimiting, so several may be concatenated into one WebSocket
message (the primary batches small transactions that way) and a decoder may
be fed any split of the byte stream.  No pickle and no msgpack extension types
are accepted: a frame decodes to plain values only, then to a self-checking
event dataclass.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import fields

import msgpack

from ..errors import LocalProtocolError, RemoteProtocolError
from .events import EVENT_TYPES, PROTOCOL_VERSION, Event, Hello

__all__ = ["encode_event", "new_packer", "FrameDecoder", "DEFAULT_MAX_FRAME", "MAX_MESSAGE_FRAMES",
           "foreign_hello"]

#: Largest frame accepted.  A frame holds at most one record's data, so this
#: bounds the largest single object revision; blobs travel in 1 MiB chunks and
#: are not limited by it.
DEFAULT_MAX_FRAME = 64 << 20
#: Frames one message of the stream may hold.  A decoded frame costs about 100-150 bytes of
#: memory besides its data, so a primary could otherwise make a 64 MiB message of 1-byte blob
#: chunks weigh gigabytes on its secondary.  A primary's messages hold at most about 41,000
#: (``Tailer.read_events``: a 1 MiB budget at 64 bytes per event, plus one small transaction).
MAX_MESSAGE_FRAMES = 1 << 16

# Feeding the unpacker in slices keeps its buffer near one frame, whatever
# the size of the message the bytes came in.
_FEED_SLICE = 1 << 20

def new_packer(*, autoreset: bool = True) -> msgpack.Packer:
    """The one msgpack dialect of the wire: bytes as bin, strings as str."""
    return msgpack.Packer(use_bin_type=True, autoreset=autoreset)


_packer = new_packer()

#: Per event class: a getter of its fields as a tuple (``dataclasses.fields``
#: walks the class on every call; this runs once per event sent).
_getters: dict[type, Callable[[Event], tuple]] = {}


def _fields_of(event: Event) -> tuple:
    cls = type(event)
    getter = _getters.get(cls)
    if getter is None:
        names = [f.name for f in fields(event)]  # type: ignore[arg-type]
        single = operator.attrgetter(*names)
        getter = _getters[cls] = (lambda e: (single(e),)) if len(names) == 1 else single  # type: ignore[assignment]
    return getter(event)  # type: ignore[misc]


def encode_event(event: Event, *, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Serialise ``event`` as one frame; our own oversized frame is a local bug."""
    frame = _packer.pack((event.TYPE, *_fields_of(event)))
    if len(frame) > max_frame:
        raise LocalProtocolError(
            f"{type(event).__name__} frame of {len(frame)} bytes exceeds the {max_frame}-byte limit",
            hint="raise --max-frame on both ends, or store large data in blobs",
        )
    return frame


class FrameDecoder:
    """Turns bytes, split anyhow, into events; raises ``RemoteProtocolError`` on bad input."""

    def __init__(self, *, max_frame: int = DEFAULT_MAX_FRAME, max_events: int | None = None) -> None:
        self.max_frame = max_frame
        #: Events one ``feed`` may return at most (one message's), if bounded.
        self.max_events = max_events
        self._unpacker = msgpack.Unpacker(
            raw=False,
            use_list=True,
            max_buffer_size=max_frame + _FEED_SLICE,
            max_bin_len=max_frame,
            max_str_len=1 << 16,
            max_array_len=16,
            max_map_len=0,
            max_ext_len=0,
        )

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Every complete event in ``data`` plus what was buffered before."""
        view = memoryview(data)
        events: list[Event] = []
        for start in range(0, len(view), _FEED_SLICE):
            try:
                self._unpacker.feed(view[start:start + _FEED_SLICE])
            except msgpack.BufferFull:
                raise RemoteProtocolError(
                    f"frame larger than the {self.max_frame}-byte limit"
                ) from None
            self._drain(events)
        if not view:
            self._drain(events)
        return events

    def _drain(self, events: list[Event]) -> None:
        limit = self.max_events
        try:
            # Iterating stops quietly at the end of the buffered bytes.
            for frame in self._unpacker:
                events.append(decode_frame(frame))
                if limit is not None and len(events) > limit:
                    raise RemoteProtocolError(f"a message of more than {limit} frames (the limit: each costs "
                                              "memory besides its bytes)")
        except (ValueError, msgpack.UnpackException, TypeError) as exc:
            # msgpack reports over-limit lengths as ValueError.
            # msgpack's FormatError (a byte no msgpack value starts with) says little or nothing
            # itself, depending on msgpack's version.
            reason = str(exc)
            if isinstance(exc, msgpack.exceptions.FormatError):
                reason = "bytes that are not msgpack" + (f": {reason}" if reason else "")
            raise RemoteProtocolError(f"malformed frame: {reason or 'undecodable'} ({type(exc).__name__})") from None


def decode_frame(frame: object) -> Event:
    """Check one decoded msgpack value and build its event."""
    if type(frame) is not list or not frame:
        raise RemoteProtocolError(f"frame is not a non-empty array: {type(frame).__name__}")
    code = frame[0]
    cls = EVENT_TYPES.get(code) if type(code) is int else None
    if cls is None:
        raise RemoteProtocolError(f"unknown frame type {code!r:.20}")
    try:
        return cls(*frame[1:])
    except (TypeError, ValueError) as exc:
        hello = _other_version_hello(frame) if cls is Hello else None
        if hello is not None:
            return hello
        raise RemoteProtocolError(f"invalid {cls.__name__} frame: {exc}") from None


#: What ``foreign_hello`` reads at most: a first message is a Hello, far smaller.
FOREIGN_HELLO_BYTES = 1 << 16


def foreign_hello(data: bytes | bytearray | memoryview) -> Hello | None:
    """Another protocol version's Hello that this release's decoder cannot read, or None.

    A newer release may add fields of kinds this decoder refuses (a map,
    more than 16 fields). So that such a secondary is still refused by
    version, naming both, instead of cut off as a protocol error, its first
    frame is read again with looser bounded limits, and only its type,
    version and node name are taken. Our own version's Hello never comes
    here: it must decode strictly.
    """
    if len(data) > FOREIGN_HELLO_BYTES:
        return None
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=FOREIGN_HELLO_BYTES, max_bin_len=FOREIGN_HELLO_BYTES,
                                max_str_len=FOREIGN_HELLO_BYTES, max_array_len=256, max_map_len=256,
                                max_ext_len=FOREIGN_HELLO_BYTES)
    try:
        unpacker.feed(data)
        frame = next(unpacker)
    except (StopIteration, ValueError, TypeError, msgpack.UnpackException, msgpack.BufferFull):
        return None
    if type(frame) is not list or not frame or frame[0] != Hello.TYPE:
        return None
    return _other_version_hello(frame)


def _other_version_hello(frame: list) -> Hello | None:
    """A Hello frame of another protocol version, whatever its fields (a newer one may have
    more), as far as its version and node name: enough for a refusal naming both versions."""
    if len(frame) < 2 or type(frame[1]) is not int or frame[1] < 1 or frame[1] == PROTOCOL_VERSION:
        return None
    node = frame[2] if len(frame) > 2 and type(frame[2]) is str and len(frame[2]) <= 256 else "?"
    return Hello(frame[1], node, bytes(8), None)
