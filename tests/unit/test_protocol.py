"""The sans-IO protocol: two connections paired in memory, no loop, no sockets."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.errors import LocalProtocolError, RemoteProtocolError
from replicator.protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Ack,
    BlobChunk,
    Connection,
    ConnectionState,
    Goodbye,
    Heartbeat,
    Hello,
    Record,
    Reject,
    Role,
    TxnBegin,
    TxnEnd,
    Welcome,
)
from replicator.protocol.events import MAX_EPOCH
from replicator.protocol.framing import FrameDecoder, encode_event

Z64 = b"\0" * 8


def tid(n: int) -> bytes:
    return n.to_bytes(8, "big")


def handshake(start: bytes = Z64) -> tuple[Connection, Connection]:
    primary = Connection(Role.PRIMARY)
    secondary = Connection(Role.SECONDARY)
    primary.receive_data(secondary.send(Hello(PROTOCOL_VERSION, "s1", start, None)))
    assert primary.next_event() == Hello(PROTOCOL_VERSION, "s1", start, None)
    secondary.receive_data(primary.send(Welcome(PROTOCOL_VERSION, "p", 0, start, tid(9))))
    assert isinstance(secondary.next_event(), Welcome)
    assert primary.state is secondary.state is ConnectionState.STREAMING
    return primary, secondary


def txn_events(n: int, prev: int) -> list:
    return [
        TxnBegin(tid(n), tid(prev), " ", b"user\xff", b"desc", b"\x80ext"),
        Record(b"\0" * 7 + b"\1", b"pickle", None),
        Record(b"\0" * 7 + b"\2", b"blobpickle", tid(prev) if prev else None, blob_size=5),
        BlobChunk(b"abc"),
        BlobChunk(b"de"),
        Record(b"\0" * 7 + b"\3", None, None),
        TxnEnd(tid(n), b"d" * 16),
    ]


def stream_bytes(primary: Connection, events: list) -> bytes:
    return b"".join(primary.send(e) for e in events)


def test_stream_round_trip_whole_and_byte_by_byte_and_trailing():
    events = txn_events(1, 0) + [Heartbeat(tid(1), 12.5)] + txn_events(2, 1)
    primary, secondary = handshake()
    data = stream_bytes(primary, events)
    secondary.receive_data(data)
    assert secondary.events() == events

    primary, secondary = handshake()
    data = stream_bytes(primary, events)
    got = []
    for i in range(len(data)):
        secondary.receive_data(data[i:i + 1])
        got.extend(secondary.events())
    assert got == events
    assert secondary.next_event() is NEED_DATA

    # A partial frame at the end stays buffered until the rest comes.
    primary, secondary = handshake()
    data = stream_bytes(primary, events)
    secondary.receive_data(data + encode_event(Goodbye("x", "y"))[:3])
    assert secondary.events() == events
    assert secondary.state is ConnectionState.STREAMING


def test_send_stream_is_send_of_each_event():
    events = txn_events(1, 0) + txn_events(2, 1) + txn_events(3, 2)
    primary, _ = handshake()
    one_by_one = stream_bytes(primary, events)
    primary, secondary = handshake()
    batched = primary.send_stream(events[:4]) + primary.send_stream(events[4:])
    assert batched == one_by_one
    secondary.receive_data(batched)
    assert secondary.events() == events


@pytest.mark.parametrize("events, match", [
    (txn_events(2, 1), "follows"),  # does not chain on the stream's position
    (txn_events(1, 0)[:1] + [Record(b"\0" * 8, b"x" * 2000, None)], "exceeds"),  # over max_frame
    (txn_events(1, 0)[:3] + [TxnEnd(tid(1), b"d" * 16)], "blob bytes"),
    (txn_events(1, 0)[:1] + [Record(b"\0" * 8, b"b", None, blob_size=2000), BlobChunk(b"c" * 2000)], "exceeds"),
    ([Heartbeat(Z64, 1.0)], "not a transaction event"),
])
def test_send_stream_refuses_what_send_refuses(events, match):
    primary = Connection(Role.PRIMARY, max_frame=1500)
    primary.receive_data(Connection(Role.SECONDARY).send(Hello(PROTOCOL_VERSION, "s", Z64, None)))
    primary.send(Welcome(PROTOCOL_VERSION, "p", 0, Z64, Z64))
    with pytest.raises(LocalProtocolError, match=match):
        primary.send_stream(events)
    assert primary.state is ConnectionState.ERROR


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=1, max_value=40), max_size=30))
def test_any_chunking_gives_the_same_events(cuts):
    events = txn_events(1, 0) + txn_events(2, 1)
    primary, secondary = handshake()
    data = stream_bytes(primary, events)
    got, pos = [], 0
    for size in cuts:
        secondary.receive_data(data[pos:pos + size])
        got.extend(secondary.events())
        pos += size
    secondary.receive_data(data[pos:])
    got.extend(secondary.events())
    assert got == events


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_garbage_raises_remote_error_or_waits(garbage):
    primary, secondary = handshake()
    try:
        secondary.receive_data(garbage)
        events = secondary.events()
    except RemoteProtocolError:
        assert secondary.state is ConnectionState.ERROR
        with pytest.raises(RemoteProtocolError):
            secondary.receive_data(b"")
    else:
        # Garbage that happens to be valid must still obey the rules.
        assert all(isinstance(e, (Heartbeat, Goodbye)) for e in events)


def test_oversized_frame_is_refused():
    conn = Connection(Role.SECONDARY, max_frame=1024)
    conn.send(Hello(PROTOCOL_VERSION, "s", Z64, None))
    big = msgpack.packb([Record.TYPE, b"\0" * 8, b"x" * 4096, None, None], use_bin_type=True)
    with pytest.raises(RemoteProtocolError, match="limit|exceeds|malformed"):
        conn.receive_data(big)
    assert conn.state is ConnectionState.ERROR
    with pytest.raises(LocalProtocolError):
        Connection(Role.PRIMARY, max_frame=1024).send(Record(b"\0" * 8, b"x" * 4096, None))


@pytest.mark.parametrize(
    "frame, match",
    [
        ([99, 1], "unknown frame type"),
        (["Hello"], "unknown frame type"),
        ({"a": 1}, "malformed|not a non-empty array"),
        ([Hello.TYPE, PROTOCOL_VERSION, "s", b"short", None, 0], "last_tid"),
        ([Hello.TYPE, PROTOCOL_VERSION, "s"], "invalid Hello"),
        ([Hello.TYPE, PROTOCOL_VERSION, "s", Z64, None, 0, " ", None, b"i" * 16, None, 0, 0, "more"],
         "invalid Hello"),
        ([Hello.TYPE, PROTOCOL_VERSION, "s", Z64, None, 0, " ", None, b"short"], "instance"),
        ([Hello.TYPE, PROTOCOL_VERSION, "s", Z64, None, 0, " ", None, None, b"x" * 8, -1], "resume_bytes"),
        ([Hello.TYPE, PROTOCOL_VERSION, "s", Z64, None, 0, " ", None, None, None, 5], "without resume_tid"),
        ([Hello.TYPE, PROTOCOL_VERSION, "s", b"\0" * 7 + b"\2", None, 0, " ", None, None, b"\0" * 7 + b"\1", 5],
         "resume_tid must be greater"),
        ([Welcome.TYPE, PROTOCOL_VERSION, "p", 0, Z64, Z64, 0.0, -3], "resume_bytes"),
        ([Hello.TYPE, PROTOCOL_VERSION, "s", Z64, None, 0, " ", None, None, b"x" * 8, 0, -1], "resume_records"),
        ([Hello.TYPE, PROTOCOL_VERSION, "s", Z64, None, 0, " ", None, None, None, 0, 2], "without resume_tid"),
        ([Welcome.TYPE, PROTOCOL_VERSION, "p", 0, Z64, Z64, 0.0, 0, -3], "resume_records"),
        ([Welcome.TYPE, PROTOCOL_VERSION, "p", 0, Z64, Z64, 0.0, 0, 0, "more"], "invalid Welcome"),
        ([Hello.TYPE, 0, "s", Z64, None, 0, " ", None, None, "more"], "invalid Hello"),
        (7, "not a non-empty array"),
    ],
)
def test_malformed_frames(frame, match):
    conn = Connection(Role.PRIMARY)
    with pytest.raises(RemoteProtocolError, match=match):
        conn.receive_data(msgpack.packb(frame, use_bin_type=True))


def test_hello_of_another_version_decodes_for_its_refusal():
    """A newer release's Hello may have more fields: enough of it is read to refuse it by version."""
    conn = Connection(Role.PRIMARY)
    frame = [Hello.TYPE, PROTOCOL_VERSION + 1, "dr-site", Z64, None, 0, " ", None, b"i" * 16, None, 0, "new", 5]
    conn.receive_data(msgpack.packb(frame, use_bin_type=True))
    hello = conn.next_event()
    assert isinstance(hello, Hello)
    assert (hello.protocol_version, hello.node) == (PROTOCOL_VERSION + 1, "dr-site")
    # Its fields are not trusted for anything else: a bad node name is not passed on.
    conn = Connection(Role.PRIMARY)
    conn.receive_data(msgpack.packb([Hello.TYPE, PROTOCOL_VERSION + 1, 7, "junk"], use_bin_type=True))
    assert conn.next_event().node == "?"
    # Fields of kinds this decoder refuses (a map, more than 16): still its version, for a refusal.
    conn = Connection(Role.PRIMARY)
    conn.receive_data(msgpack.packb([*frame, {"features": ["x"]}, *range(20)], use_bin_type=True))
    hello = conn.next_event()
    assert (hello.protocol_version, hello.node) == (PROTOCOL_VERSION + 1, "dr-site")
    assert conn.send(Reject("version", "no"))
    # Never for this release's own version, nor for anything but a Hello first.
    for bad in ([Hello.TYPE, PROTOCOL_VERSION, "s", Z64, {"a": 1}], [Ack.TYPE, PROTOCOL_VERSION + 1, {"a": 1}]):
        with pytest.raises(RemoteProtocolError):
            Connection(Role.PRIMARY).receive_data(msgpack.packb(bad, use_bin_type=True))
    # A secondary reads no such thing from its primary.
    with pytest.raises(RemoteProtocolError):
        Connection(Role.SECONDARY).receive_data(msgpack.packb([*frame, {"a": 1}], use_bin_type=True))


def test_ext_types_and_pickles_never_decode():
    conn = Connection(Role.PRIMARY)
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(msgpack.packb(msgpack.ExtType(1, b"x")))
    conn = Connection(Role.PRIMARY)
    import pickle
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(pickle.dumps(Hello(1, "s", Z64, None)))


def test_ordering_rules_on_receive():
    # prev_tid must chain.
    primary, secondary = handshake()
    bad = Connection(Role.PRIMARY)
    bad.receive_data(Connection(Role.SECONDARY).send(Hello(1, "s", Z64, None)))
    bad.send(Welcome(1, "p", 0, tid(5), tid(5)))  # primary believes start is 5
    with pytest.raises(RemoteProtocolError, match="follows"):
        secondary.receive_data(bad.send(TxnBegin(tid(6), tid(5), " ", b"", b"", b"")))

    # Blob bytes must add up exactly.
    primary, secondary = handshake()
    frames = [
        encode_event(TxnBegin(tid(1), Z64, " ", b"", b"", b"")),
        encode_event(Record(b"\0" * 8, b"d", None, blob_size=2)),
        encode_event(TxnEnd(tid(1), b"d" * 16)),
    ]
    with pytest.raises(RemoteProtocolError, match="blob bytes"):
        secondary.receive_data(b"".join(frames))

    # Records only inside a transaction; Welcome only once.
    primary, secondary = handshake()
    with pytest.raises(RemoteProtocolError, match="outside"):
        secondary.receive_data(encode_event(Record(b"\0" * 8, b"d", None)))
    primary, secondary = handshake()
    with pytest.raises(RemoteProtocolError, match="may not receive Welcome"):
        secondary.receive_data(encode_event(Welcome(1, "p", 0, Z64, Z64)))


def test_secondary_may_not_stream_and_primary_may_not_ack():
    primary, secondary = handshake()
    with pytest.raises(LocalProtocolError):
        secondary.send(TxnBegin(tid(1), Z64, " ", b"", b"", b""))
    primary, secondary = handshake()
    with pytest.raises(LocalProtocolError):
        primary.send(Ack(Z64))
    with pytest.raises(LocalProtocolError, match="before the secondary's Hello"):
        Connection(Role.PRIMARY).send(Welcome(1, "p", 0, Z64, Z64))


def test_primary_refuses_stream_events_and_secondary_refuses_acks_received():
    """The receiving side keeps the same rule: a peer that breaks it is refused, not followed."""
    primary, secondary = handshake()
    with pytest.raises(RemoteProtocolError, match="may not receive TxnBegin"):
        primary.receive_data(encode_event(TxnBegin(tid(1), Z64, " ", b"", b"", b"")))
    assert primary.state is ConnectionState.ERROR
    primary, secondary = handshake()
    with pytest.raises(RemoteProtocolError, match="may not receive Record"):
        primary.receive_data(encode_event(Record(b"\0" * 8, b"d", None)))
    primary, secondary = handshake()
    with pytest.raises(RemoteProtocolError, match="may not receive Ack"):
        secondary.receive_data(encode_event(Ack(Z64)))


def test_acks_must_name_ended_transactions_and_never_go_back():
    primary, secondary = handshake()
    secondary.receive_data(stream_bytes(primary, txn_events(1, 0) + txn_events(2, 1)))
    secondary.events()
    primary.receive_data(secondary.send(Ack(tid(1))))
    primary.receive_data(secondary.send(Ack(tid(2))))
    assert [e.tid for e in primary.events()] == [tid(1), tid(2)]
    assert primary.acked_tid == tid(2)
    with pytest.raises(LocalProtocolError, match="goes back"):
        secondary.send(Ack(tid(1)))
    primary2, secondary2 = handshake()
    with pytest.raises(RemoteProtocolError, match="never ended"):
        primary2.receive_data(encode_event(Ack(tid(7))))


def test_reject_closes_and_goodbye_closes():
    primary = Connection(Role.PRIMARY)
    secondary = Connection(Role.SECONDARY)
    primary.receive_data(secondary.send(Hello(1, "s", tid(3), b"x" * 32)))
    primary.events()
    secondary.receive_data(primary.send(Reject("diverged", "fork", fork_tid=tid(2))))
    assert secondary.events() == [Reject("diverged", "fork", tid(2))]
    assert primary.state is secondary.state is ConnectionState.CLOSED
    with pytest.raises(RemoteProtocolError, match="closed"):
        secondary.receive_data(encode_event(Heartbeat(Z64, 1.0)))

    primary, secondary = handshake()
    secondary.receive_data(primary.send(Goodbye("shutdown", "bye")))
    assert secondary.events() == [Goodbye("shutdown", "bye")]
    assert secondary.state is ConnectionState.CLOSED


def test_event_validation():
    with pytest.raises(ValueError):
        TxnBegin(tid(1), tid(1), " ", b"", b"", b"")
    with pytest.raises(ValueError):
        TxnBegin(tid(2), tid(1), "c", b"", b"", b"")
    with pytest.raises(ValueError):
        Record(b"\0" * 8, None, None, blob_size=3)
    with pytest.raises(ValueError):
        BlobChunk(b"")
    with pytest.raises(ValueError):
        Heartbeat(Z64, float("nan"))
    for delay in (-0.1, 1.5, float("inf"), "0.05"):
        with pytest.raises(ValueError, match="ack_delay"):
            Welcome(PROTOCOL_VERSION, "p", 0, Z64, Z64, delay)
    assert Welcome(PROTOCOL_VERSION, "p", 0, Z64, Z64).ack_delay == 0  # none held back unless asked


@pytest.mark.parametrize("name", ["evil\nCRITICAL forged", "x\x1b[2J", "tab\there", "nul\x00", "ls\u2028"])
def test_node_names_hold_no_control_character(name):
    """A node name goes into the other side's log lines and terminals."""
    with pytest.raises(ValueError, match="control character"):
        Hello(PROTOCOL_VERSION, name, Z64, None)
    with pytest.raises(ValueError, match="control character"):
        Welcome(PROTOCOL_VERSION, name, 0, Z64, Z64)
    assert Hello(PROTOCOL_VERSION, "dr-site.example.org", Z64, None).node == "dr-site.example.org"
    assert Hello(PROTOCOL_VERSION, "Zürich standby", Z64, None).node == "Zürich standby"


def test_epochs_are_bounded():
    """A node would increment it, and msgpack carries at most 64 bits."""
    assert Hello(PROTOCOL_VERSION, "n", Z64, None, epoch=MAX_EPOCH).epoch == MAX_EPOCH
    for epoch in (MAX_EPOCH + 1, (1 << 64) - 1, -1):
        with pytest.raises(ValueError, match="epoch"):
            Hello(PROTOCOL_VERSION, "n", Z64, None, epoch=epoch)
        with pytest.raises(ValueError, match="epoch"):
            Welcome(PROTOCOL_VERSION, "p", epoch, Z64, Z64)


def test_the_other_sides_words_are_escaped_for_the_log():
    reject = Reject("diverged", "line one\n2026-12-02 CRITICAL forged\x1b[2J")
    assert reject.message == "line one\\n2026-12-02 CRITICAL forged\\x1b[2J"
    assert Goodbye("shutdown", "primary\r\nstopping").message == "primary\\r\\nstopping"
    assert Goodbye("shutdown", "primary stopping").message == "primary stopping"


def test_decoder_alone_handles_many_frames_in_one_feed():
    dec = FrameDecoder()
    frames = [Heartbeat(tid(i), float(i)) for i in range(1000)]
    assert list(dec.feed(b"".join(encode_event(f) for f in frames))) == frames


def test_a_message_of_more_frames_than_a_secondary_takes_is_refused():
    """One-byte blob chunks cost ~90 bytes of memory each once decoded: a 64 MiB message of
    them would take gigabytes.  A secondary refuses a message of more than MAX_MESSAGE_FRAMES
    frames before decoding the rest, and a primary never sends one."""
    from replicator.protocol.framing import MAX_MESSAGE_FRAMES

    primary, secondary = handshake()
    begin = TxnBegin(tid(1), Z64, " ", b"", b"", b"")
    blob = Record(b"\0" * 7 + b"\1", b"blobpickle", None, blob_size=10 * MAX_MESSAGE_FRAMES)
    secondary.receive_data(primary.send_stream([begin, blob]))
    chunks = [BlobChunk(b"x")] * MAX_MESSAGE_FRAMES
    secondary.receive_data(b"".join(encode_event(c) for c in chunks))  # the limit itself is fine
    assert len(secondary.events()) == 2 + MAX_MESSAGE_FRAMES
    with pytest.raises(RemoteProtocolError, match=f"more than {MAX_MESSAGE_FRAMES} frames"):
        secondary.receive_data(b"".join(encode_event(c) for c in chunks + chunks))
    assert secondary.state is ConnectionState.ERROR
    with pytest.raises(LocalProtocolError, match=f"at most {MAX_MESSAGE_FRAMES}"):
        primary.send_stream(chunks + [BlobChunk(b"x")])
    # Only a message is bounded, not a stream: the same frames fed one message at a time pass.
    primary, secondary = handshake()
    secondary.receive_data(primary.send_stream([begin, blob]))
    for _ in range(3):
        secondary.receive_data(primary.send_stream(chunks[:MAX_MESSAGE_FRAMES // 2]))
    assert len(secondary.events()) == 2 + 3 * (MAX_MESSAGE_FRAMES // 2)
