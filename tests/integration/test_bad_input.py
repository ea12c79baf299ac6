"""Bad input on the wire and at the TLS layer: a clear error, a closed connection, no data touched.

Real parts only: the primary and secondary services over real TLS on
127.0.0.1, a hostile client built from aiohttp, and a hostile primary that is
a real aiohttp TLS server speaking garbage.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
from pathlib import Path

import aiohttp
import msgpack
import pytest
from aiohttp import web

from replicator.config import Address, SecondaryConfig
from replicator.errors import TLSError, TransportError
from replicator.integrity import TxnCheck
from replicator.protocol import (
    PROTOCOL_VERSION,
    Ack,
    BlobChunk,
    Hello,
    Record,
    Reject,
    TxnBegin,
    TxnEnd,
    Welcome,
)
from replicator.protocol.framing import DEFAULT_MAX_FRAME, decode_frame, encode_event
from replicator.secondary import Secondary
from replicator.transport import client_ssl_context, server_ssl_context, start_server, stop_server
from tests.integration.test_replication import (
    closed_source,
    running_primary,
    running_secondary,
    tls,
    wait_equal_tid,
)

Z64 = b"\0" * 8


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"


async def raw_client(port: int, tls_dir: Path, node: str = "secondary"):
    t = tls(tls_dir, node)
    http = aiohttp.ClientSession()
    ws = await http.ws_connect(f"wss://127.0.0.1:{port}/replicate", ssl=client_ssl_context(t.ca, t.cert, t.key),
                               max_msg_size=1 << 28)
    return http, ws


@pytest.fixture
def source(tmp_path):
    return closed_source(tmp_path, 15)


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1garbage",  # msgpack's never-used byte
        msgpack.packb([99, 1, 2]),  # unknown frame type
        msgpack.packb([Hello.TYPE, PROTOCOL_VERSION, "x", b"short", None, 0]),  # a TID of the wrong size
        msgpack.packb({"type": "Hello"}),  # maps are refused
        encode_event(TxnBegin(b"\0" * 7 + b"\2", Z64, " ", b"", b"", b"")),  # secondaries may not stream
        # A node name that would forge a line of the primary's log.
        msgpack.packb([Hello.TYPE, PROTOCOL_VERSION, "evil\n2026-12-02 CRITICAL fake", Z64, None, 0]),
        msgpack.packb([Hello.TYPE, PROTOCOL_VERSION, "x", Z64, None, 1 << 63]),  # no such epoch
    ],
    ids=["garbage", "unknown-type", "bad-tid", "map", "wrong-direction", "control-character", "epoch-2**63"],
)
def test_primary_closes_on_malformed_frames_and_keeps_serving(source, tls_dir, payload):
    async def scenario() -> None:
        async with running_primary(source, tls_dir) as primary:
            http, ws = await raw_client(primary.port, tls_dir)
            async with http:
                await ws.send_bytes(payload)
                msg = await asyncio.wait_for(ws.receive(), 10)
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                assert ws.close_code == 1002
            assert primary.fatal is None
            # A well-behaved secondary is still served.
            async with running_secondary(source, tls_dir, primary.port) as (secondary, _):
                await wait_equal_tid(primary, secondary)

    asyncio.run(scenario())


def test_primary_closes_on_a_secondary_that_streams_after_its_hello(source, tls_dir, caplog):
    """Past the handshake (where the case above is refused for coming before the Hello)."""
    async def scenario() -> None:
        async with running_primary(source, tls_dir) as primary:
            http, ws = await raw_client(primary.port, tls_dir)
            async with http:
                await ws.send_bytes(encode_event(Hello(PROTOCOL_VERSION, "streamer", Z64, None)))
                msg = await asyncio.wait_for(ws.receive(), 10)
                assert msg.type is aiohttp.WSMsgType.BINARY  # the Welcome, then the stream
                await ws.send_bytes(encode_event(TxnBegin(b"\0" * 7 + b"\2", Z64, " ", b"", b"", b"")))

                async def closed() -> aiohttp.WSMessage:
                    while (msg := await ws.receive()).type is aiohttp.WSMsgType.BINARY:
                        pass  # transactions and heartbeats already on their way
                    return msg

                msg = await asyncio.wait_for(closed(), 10)
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                assert ws.close_code == 1002
            assert primary.fatal is None

    asyncio.run(scenario())
    assert any("may not receive TxnBegin" in r.getMessage() for r in caplog.records), caplog.text


def test_oversized_message_is_refused(source, tls_dir, caplog):
    async def scenario() -> None:
        async with running_primary(source, tls_dir, max_frame=1 << 16) as primary:
            http, ws = await raw_client(primary.port, tls_dir)
            async with http:
                await ws.send_bytes(b"\x00" * (3 << 20))
                msg = await asyncio.wait_for(ws.receive(), 10)
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                assert ws.close_code in (1002, 1006, 1009)
            assert primary.fatal is None

    asyncio.run(scenario())
    assert any("exceeds limit" in r.getMessage() for r in caplog.records), caplog.text


def test_a_secondary_may_send_only_small_messages(source, tls_dir, caplog):
    """It sends a Hello and acknowledgements: a message of many acknowledgements (one deflated
    message could hold millions, decoded on the primary's event loop) is refused unread."""
    async def scenario() -> None:
        async with running_primary(source, tls_dir) as primary:
            http, ws = await raw_client(primary.port, tls_dir)
            async with http:
                await ws.send_bytes(encode_event(Hello(PROTOCOL_VERSION, "flooder", Z64, None)))
                assert (await asyncio.wait_for(ws.receive(), 10)).type is aiohttp.WSMsgType.BINARY  # Welcome
                await ws.send_bytes(encode_event(Ack(Z64)) * 20_000)  # 240 KB of acknowledgements

                async def closed() -> aiohttp.WSMessage:
                    while (msg := await ws.receive()).type is aiohttp.WSMsgType.BINARY:
                        pass  # transactions and heartbeats already on their way
                    return msg

                msg = await asyncio.wait_for(closed(), 10)
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                assert ws.close_code in (1002, 1006, 1009)
            assert primary.fatal is None
            async with running_secondary(source, tls_dir, primary.port) as (secondary, _):
                await wait_equal_tid(primary, secondary)

    asyncio.run(scenario())
    assert any("exceeds limit" in r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.parametrize("more_fields", [[], ["new", 1], [{"a": 1}, ["x"] * 20], [None] * 30],
                         ids=["same-fields", "more-fields", "a-map-field", "past-16-fields"])
def test_wrong_protocol_version_gets_a_reject(source, tls_dir, more_fields):
    """Also when a newer release's Hello has fields this one does not know, even of kinds this
    release's decoder refuses (a map, a longer array)."""
    async def scenario() -> None:
        async with running_primary(source, tls_dir) as primary:
            http, ws = await raw_client(primary.port, tls_dir)
            async with http:
                hello = Hello(PROTOCOL_VERSION + 1, "future", Z64, None)
                frame = [Hello.TYPE, *hello.to_fields(), *more_fields]
                await ws.send_bytes(msgpack.packb(frame, use_bin_type=True))
                msg = await asyncio.wait_for(ws.receive(), 10)
                event = decode_frame(msgpack.unpackb(msg.data, raw=False))
                assert isinstance(event, Reject)
                assert event.code == "version"
                assert f"protocol {PROTOCOL_VERSION + 1}" in event.message

    asyncio.run(scenario())


@pytest.mark.parametrize("case", ["no-certificate", "other-ca", "plaintext"])
def test_unauthenticated_secondaries_get_nothing(source, tls_dir, foreign_tls_dir, case, caplog):
    """The secondary names the TLS problem, retries, and its storage is never created or written."""
    async def scenario() -> None:
        async with running_primary(source, tls_dir) as primary:
            port = primary.port
            if case == "plaintext":
                config = SecondaryConfig(storage=str(source / "dst.fs"), primary=Address("127.0.0.1", port),
                                         insecure=True, reconnect_min=0.05, reconnect_max=0.1,
                                         give_up_after=1.0, blob_dir=str(source / "dst-blobs"))
            elif case == "other-ca":
                config = SecondaryConfig(storage=str(source / "dst.fs"), primary=Address("127.0.0.1", port),
                                         tls=tls(foreign_tls_dir, "secondary"), reconnect_min=0.05,
                                         reconnect_max=0.1, give_up_after=1.0, blob_dir=str(source / "dst-blobs"))
            else:
                # Bypass the Secondary: it always presents a certificate.
                bare = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
                answered = False
                async with aiohttp.ClientSession() as http:
                    with contextlib.suppress(aiohttp.ClientError, ConnectionError, asyncio.TimeoutError):
                        ws = await http.ws_connect(f"wss://127.0.0.1:{port}/replicate", ssl=bare)
                        await ws.send_bytes(encode_event(Hello(1, "x", Z64, None)))
                        msg = await ws.receive(timeout=5)
                        answered = msg.type is aiohttp.WSMsgType.BINARY
                assert not answered, "the primary answered a client without a certificate"
                assert not primary.sessions
                return
            secondary = Secondary(config.validate())
            await secondary.open()
            try:
                with pytest.raises(TransportError) as info:
                    await asyncio.wait_for(secondary.run(), 30)
                if case == "other-ca":
                    assert isinstance(info.value, TLSError) or "certificate" in str(info.value)
                assert secondary.progress.applied_tid == Z64
            finally:
                await secondary.close()
            assert not primary.sessions

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())
    from replicator.storage import last_state, open_file_storage
    if (source / "dst.fs").exists():
        storage = open_file_storage(str(source / "dst.fs"), read_only=True)
        try:
            assert last_state(storage)[0] == Z64
        finally:
            storage.close()


class HostilePrimary:
    """A real TLS WebSocket server that welcomes a secondary and then misbehaves."""

    def __init__(self, tls_dir: Path, script) -> None:
        self.tls_dir = tls_dir
        self.script = script
        self.connections = 0

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.connections += 1
        msg = await ws.receive()
        hello = decode_frame(msgpack.unpackb(msg.data, raw=False))
        assert isinstance(hello, Hello)
        await ws.send_bytes(encode_event(Welcome(PROTOCOL_VERSION, "hostile", 0, hello.last_tid, hello.last_tid)))
        await self.script(ws, hello)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.receive(), 2)
        return ws

    @contextlib.asynccontextmanager
    async def serving(self):
        app = web.Application()
        app.router.add_get("/replicate", self.handle)
        t = tls(self.tls_dir, "primary")
        runner, port = await start_server(app, "127.0.0.1", 0, server_ssl_context(t.ca, t.cert, t.key))
        try:
            yield port
        finally:
            await stop_server(runner)


def _txn(prev: bytes, n: int, digest: bytes) -> list:
    tid = (int.from_bytes(prev, "big") + n).to_bytes(8, "big")
    return [TxnBegin(tid, prev, " ", b"u", b"d", b""), Record(b"\0" * 7 + b"\1", b"data", None),
            TxnEnd(tid, digest)]


async def _bad_digest(ws, hello):
    await ws.send_bytes(b"".join(encode_event(e) for e in _txn(hello.last_tid, 1000, b"\0" * 16)))


async def _garbage(ws, hello):
    await ws.send_bytes(b"\xc1\xc1\xc1")


async def _broken_chain(ws, hello):
    events = _txn(b"\0" * 7 + b"\5", 1000, b"\0" * 16)  # does not follow the secondary's last TID
    await ws.send_bytes(b"".join(encode_event(e) for e in events))


async def _cut_mid_transaction(ws, hello):
    events = _txn(hello.last_tid, 1000, b"\0" * 16)[:2]
    await ws.send_bytes(b"".join(encode_event(e) for e in events))
    await ws.close()


async def _deflate_bomb(ws, hello):
    """A message that deflates to a few dozen kilobytes and inflates past the size limit."""
    assert ws.compress, "the secondary asked for compression and this server agreed"
    await ws.send_bytes(bytes(DEFAULT_MAX_FRAME + (2 << 20)))


_deflate_bomb.compress = True  # type: ignore[attr-defined]


async def _tiny_chunks(ws, hello):
    """A blob in one-byte chunks, more to a message than a primary ever sends: decoded, each
    would take ~90 bytes, and a 64 MiB message of them gigabytes."""
    from replicator.protocol.framing import MAX_MESSAGE_FRAMES

    tid = (int.from_bytes(hello.last_tid, "big") + 1000).to_bytes(8, "big")
    await ws.send_bytes(encode_event(TxnBegin(tid, hello.last_tid, " ", b"u", b"d", b"")) + encode_event(
        Record(b"\0" * 7 + b"\1", b"blobpickle", None, blob_size=1 << 30)))
    await ws.send_bytes(encode_event(BlobChunk(b"x")) * (MAX_MESSAGE_FRAMES + 1))


_bad_digest.refused_for = "digest mismatch"  # type: ignore[attr-defined]
_garbage.refused_for = "RemoteProtocolError: malformed frame: bytes that are not msgpack"  # type: ignore[attr-defined]
_broken_chain.refused_for = "RemoteProtocolError: TxnBegin 00000000000003ed follows 0000000000000005"  # type: ignore[attr-defined]
_cut_mid_transaction.refused_for = "TransportError: primary closed the connection"  # type: ignore[attr-defined]
_deflate_bomb.refused_for = "RemoteProtocolError: the primary sent a message over the"  # type: ignore[attr-defined]
_tiny_chunks.refused_for = "RemoteProtocolError: a message of more than 65536 frames"  # type: ignore[attr-defined]


@pytest.mark.parametrize("script", [_bad_digest, _garbage, _broken_chain, _cut_mid_transaction, _deflate_bomb,
                                    _tiny_chunks],
                         ids=["bad-digest", "garbage", "broken-chain", "cut-mid-transaction", "deflate-bomb",
                              "tiny-chunks"])
def test_secondary_survives_a_hostile_primary_with_data_unchanged(source, tls_dir, script):
    """First replicate for real, then point the secondary at a hostile primary."""
    async def scenario() -> None:
        async with running_primary(source, tls_dir) as primary:
            async with running_secondary(source, tls_dir, primary.port) as (secondary, _):
                await wait_equal_tid(primary, secondary)
        before = file_digest(source / "dst.fs")
        hostile = HostilePrimary(tls_dir, script)
        async with hostile.serving() as port:
            config = SecondaryConfig(storage=str(source / "dst.fs"), blob_dir=str(source / "dst-blobs"),
                                     primary=Address("127.0.0.1", port), tls=tls(tls_dir, "secondary"),
                                     reconnect_min=0.05, reconnect_max=0.1,
                                     compress=getattr(script, "compress", False))
            secondary = Secondary(config.validate())
            await secondary.open()
            task = asyncio.create_task(secondary.run())
            try:
                deadline = asyncio.get_running_loop().time() + 20
                while hostile.connections < 3:  # it keeps reconnecting, never applies
                    assert not task.done(), task.exception()
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.05)
                # Refused for what it is, not only for the hostile server hanging up afterwards.
                assert script.refused_for in secondary.progress.last_error, secondary.progress.last_error
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await secondary.close()
        assert file_digest(source / "dst.fs") == before

    asyncio.run(scenario())


def test_transactions_before_a_bad_one_in_the_same_message_are_counted(source, tls_dir):
    """One message: a good transaction, then one with a bad digest.  The good one stays and is reported."""
    good_tids = []

    async def good_then_bad(ws, hello):
        if good_tids:
            return  # the secondary came back: nothing more for it
        good = _txn(hello.last_tid, 1000, b"\0" * 16)
        digest = TxnCheck(good[0])
        digest.add_record(good[1])
        good[-1] = TxnEnd(good[0].tid, digest.digest())
        bad = _txn(good[0].tid, 1000, b"\0" * 16)
        good_tids.append(good[0].tid)
        await ws.send_bytes(b"".join(encode_event(e) for e in good + bad))

    async def scenario() -> None:
        async with running_primary(source, tls_dir) as primary:
            async with running_secondary(source, tls_dir, primary.port) as (secondary, _):
                await wait_equal_tid(primary, secondary)
        hostile = HostilePrimary(tls_dir, good_then_bad)
        async with hostile.serving() as port:
            config = SecondaryConfig(storage=str(source / "dst.fs"), blob_dir=str(source / "dst-blobs"),
                                     primary=Address("127.0.0.1", port), tls=tls(tls_dir, "secondary"),
                                     reconnect_min=0.05, reconnect_max=0.1)
            secondary = Secondary(config.validate())
            await secondary.open()
            task = asyncio.create_task(secondary.run())
            try:
                deadline = asyncio.get_running_loop().time() + 20
                while hostile.connections < 2:
                    assert not task.done(), task.exception()
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.2)
                assert "digest mismatch" in secondary.progress.last_error
                assert secondary.progress.applied_tid == good_tids[0]
                assert secondary.status()["transactions_applied"] == 1
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await secondary.close()

    asyncio.run(scenario())


def test_identities_looks_each_transaction_up_once(tmp_path, tls_dir, monkeypatch):
    """``GET /identities`` reads and hashes whole transactions: the same big one named hundreds of
    times in one request was hashed as often (3.5 GiB for 8 KB of URL), on the worker threads a
    secondary's handshake also waits for."""
    from replicator.control import call
    from replicator.tailer import Tailer
    from tests.integration.test_failover import commit_to, primary_on

    commit_to(tmp_path / "a.fs", tmp_path / "a-blobs", 3, seed=5)
    looked_up: list[bytes] = []
    identity = Tailer.identity

    def counted(self, tid, *args, **kwargs):
        looked_up.append(tid)
        return identity(self, tid, *args, **kwargs)

    async def scenario() -> dict:
        async with primary_on(tmp_path, tls_dir, "a") as a:
            monkeypatch.setattr(Tailer, "identity", counted)
            tid = a.head_tid.hex()
            return await call(f"127.0.0.1:{a.port}", "GET", f"/identities?tids={','.join([tid] * 400)}",
                              tls(tls_dir, "monitor"))

    found = asyncio.run(scenario())
    assert list(found["identities"]) == [looked_up[0].hex()]
    assert len(looked_up) == 1, len(looked_up)
