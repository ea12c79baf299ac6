"""A secondary on a slow link: a message that takes longer than the idle timeout to arrive is not a dead link.

The link is a real TCP proxy between a real primary and a real secondary
(TLS passes through it), forwarding the primary's bytes at a fixed rate.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import os
import socket

import ZODB
from persistent.mapping import PersistentMapping
from ZODB.FileStorage import FileStorage

from replicator.config import Address, SecondaryConfig
from replicator.secondary import Secondary
from replicator.verify import verify
from tests.helpers import until
from tests.integration.test_replication import running_primary, running_secondary, tls

RATE = 100_000  # bytes a second, primary to secondary
RECORD = 400_000  # one record: four times what the link carries in the idle timeout


@contextlib.asynccontextmanager
async def slow_proxy(target_port: int, rate: int, cut: asyncio.Event | None = None, chunk: int | None = None):
    """Forward 127.0.0.1:PORT to the target; the target's answers at ``rate`` bytes a second,
    in writes of ``chunk`` bytes (a twentieth of the rate by default).

    Once ``cut`` is set, nothing more gets through either way, and the
    connections stay open: a link that died without a word.
    """
    tasks: set[asyncio.Task] = set()
    cut = cut if cut is not None else asyncio.Event()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: int | None) -> None:
        try:
            while data := await reader.read(limit or 65536):
                if cut.is_set():
                    await asyncio.Event().wait()
                writer.write(data)
                await writer.drain()
                if limit:
                    await asyncio.sleep(len(data) / rate)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)
        for task in (asyncio.create_task(pipe(client_r, server_w, None)),
                     asyncio.create_task(pipe(server_r, client_w, chunk or rate // 20))):
            tasks.add(task)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def caught_up_over(tmp_path, tls_dir, primary, port: int, timeout: float, **overrides):
    """A secondary following ``primary`` through ``port``, yielded once it applied the primary's head."""
    async with running_secondary(tmp_path, tls_dir, port, reconnect_max=0.2, **overrides) as (node, _):
        for _ in range(int(timeout / 0.05)):
            if node.progress.applied_tid == primary.head_tid:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"not replicated over the slow link: {node.progress.last_error}")
        yield node


def test_a_record_slower_than_the_idle_timeout_still_arrives(tmp_path, tls_dir):
    db = ZODB.DB(FileStorage(str(tmp_path / "src.fs"), blob_dir=str(tmp_path / "src-blobs")))
    with db.transaction() as conn:
        conn.root()["big"] = PersistentMapping(data=os.urandom(RECORD))
    db.close()
    idle = 1.0
    assert RECORD / RATE > 3 * idle

    async def scenario() -> Secondary:
        async with running_primary(tmp_path, tls_dir) as primary, slow_proxy(primary.port, RATE) as port, \
                caught_up_over(tmp_path, tls_dir, primary, port, 30, idle_timeout=idle) as node:
            return node

    node = asyncio.run(scenario())
    assert node.link_log.failures == 0, "the slow message was taken for a dead link"
    assert verify(str(tmp_path / "src.fs"), str(tmp_path / "dst.fs"), str(tmp_path / "src-blobs"),
                  str(tmp_path / "dst-blobs")).equal


def test_a_link_that_carries_nothing_is_taken_down_after_the_idle_timeout(tmp_path, tls_dir):
    db = ZODB.DB(FileStorage(str(tmp_path / "src.fs"), blob_dir=str(tmp_path / "src-blobs")))
    with db.transaction() as conn:
        conn.root()["small"] = 1
    db.close()

    async def scenario() -> None:
        cut = asyncio.Event()
        async with running_primary(tmp_path, tls_dir) as primary, slow_proxy(primary.port, RATE, cut) as port:
            config = SecondaryConfig(storage=str(tmp_path / "dst.fs"), blob_dir=str(tmp_path / "dst-blobs"),
                                     primary=Address("127.0.0.1", port), tls=tls(tls_dir, "secondary"),
                                     node="dst", idle_timeout=1.0, reconnect_min=5, reconnect_max=5).validate()
            node = Secondary(config)
            await node.open()
            task = asyncio.create_task(node.run())
            try:
                for _ in range(int(10 / 0.05)):
                    if node.progress.applied_tid == primary.head_tid and node.progress.connected:
                        break
                    await asyncio.sleep(0.05)
                cut.set()
                await asyncio.sleep(3.0)  # heartbeats stop arriving; the wait gives up after 1 s
                assert not node.progress.connected
                assert "nothing from the primary for 1 s" in node.progress.last_error
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await node.close()

    asyncio.run(scenario())


def test_a_slow_links_trickle_is_read_in_big_reads(tmp_path, tls_dir, monkeypatch):
    """A catch-up over a link slower than the CPU arrives a few kilobytes at a time; the secondary
    reads it tens of kilobytes at a time (SO_RCVLOWAT), and the last bytes of the stream, under
    that threshold, still come (the guard lets them through)."""
    db = ZODB.DB(FileStorage(str(tmp_path / "src.fs"), blob_dir=str(tmp_path / "src-blobs")))
    for i in range(60):
        with db.transaction() as conn:
            conn.root()[i] = PersistentMapping(data=os.urandom(100_000))
    db.close()
    reads: dict[int, list[int]] = {}
    original = asyncio.sslproto.SSLProtocol.buffer_updated

    def counting(self, nbytes: int) -> None:
        reads.setdefault(id(self), []).append(nbytes)
        original(self, nbytes)

    monkeypatch.setattr(asyncio.sslproto.SSLProtocol, "buffer_updated", counting)

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir) as primary, \
                slow_proxy(primary.port, 3_000_000, chunk=3_000) as port, \
                caught_up_over(tmp_path, tls_dir, primary, port, 60) as node:
            coalescing = node.coalescing
            assert coalescing is not None and coalescing.turned_on >= 1 and coalescing.released >= 1
            assert not coalescing.on  # caught up: every byte wakes the reader again

    asyncio.run(scenario())
    stream = max(reads.values(), key=sum)  # the secondary's side of the link: the 6 MB catch-up
    assert sum(stream) > 6_000_000
    # The first message (up to a batch's worth) shows the link slow; from the second on, big reads.
    total, later = 0, []
    for nbytes in stream:
        total += nbytes
        if total > 2_000_000:
            later.append(nbytes)
    assert sum(later) / len(later) > 32_000, (len(stream), len(later), sum(later))
    assert verify(str(tmp_path / "src.fs"), str(tmp_path / "dst.fs"), str(tmp_path / "src-blobs"),
                  str(tmp_path / "dst-blobs")).equal


def test_bytes_left_under_the_read_threshold_are_let_through():
    """The guard of ReadCoalescing on a real TCP connection: on after a big message of a slow link,
    off once the few bytes that follow stop growing, and at once on a small message."""
    from replicator.transport import COALESCE_BYTES, COALESCE_MESSAGE, COALESCE_WINDOW, ReadCoalescing

    class Ws:  # what ReadCoalescing asks of a WebSocket
        def __init__(self, sock) -> None:
            self.sock = sock

        def get_extra_info(self, name: str):
            return self.sock if name == "socket" else None

    async def scenario() -> None:
        received = asyncio.get_running_loop().create_future()

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            received.set_result((reader, writer))

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        _, sender = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        _, writer = await received
        sock = writer.get_extra_info("socket")
        now = [0.0]
        coalescing = ReadCoalescing(Ws(sock), clock=lambda: now[0])
        lowat = lambda: sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)  # noqa: E731
        now[0] += COALESCE_WINDOW  # a window in which the link carried next to nothing: slow
        coalescing.message(COALESCE_MESSAGE)
        assert coalescing.on and lowat() == COALESCE_BYTES
        sender.write(b"x" * 100)  # the end of a burst, under the threshold
        await sender.drain()
        await until(lambda: not coalescing.on, timeout=2, what="the guard lets the bytes through")
        assert lowat() == 1 and coalescing.released == 1
        now[0] += COALESCE_WINDOW
        coalescing.message(COALESCE_MESSAGE)
        assert coalescing.on
        coalescing.message(100)  # a small message: every byte wakes the reader again
        assert not coalescing.on and lowat() == 1
        coalescing.off()
        sender.close()
        writer.close()
        server.close()

    asyncio.run(scenario())
