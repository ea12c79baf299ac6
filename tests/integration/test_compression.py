"""``compress``: a secondary on a slow link asks for a deflated stream (WebSocket permessage-deflate).

The bytes are counted on the wire, by a TCP relay between the secondary and
the primary (TLS passes through it untouched), for the same history with and
without compression.  ZODB records of text compress several times over; the
replica must be equal either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import ZODB
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob
from ZODB.FileStorage import FileStorage

from tests.integration.test_replication import (
    assert_equal,
    running_primary,
    running_secondary,
    wait_equal_tid,
)

WORDS = ("replica primary storage transaction object record commit blob index catalog "
         "document folder title description text author created modified workflow state "
         "published private review the a of and to in is for on with as by").split()


def text(rng: random.Random, size: int) -> str:
    out: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(WORDS)
        out.append(word)
        length += len(word) + 1
    return " ".join(out)


def make_text_source(tmp_path, transactions: int) -> bytes:
    """Content like a CMS's: documents of prose, some blobs of it; returns the last TID."""
    rng = random.Random(5)
    (tmp_path / "src-blobs").mkdir()
    db = ZODB.DB(FileStorage(str(tmp_path / "src.fs"), blob_dir=str(tmp_path / "src-blobs")))
    with db.transaction() as conn:
        conn.root()["docs"] = PersistentMapping()
    for i in range(transactions):
        with db.transaction() as conn:
            docs = conn.root()["docs"]
            for _ in range(rng.randint(1, 4)):
                docs[f"doc{rng.randrange(200)}"] = PersistentMapping(
                    title=text(rng, 40), body=text(rng, rng.randint(500, 8000)), n=i)
            if i % 40 == 0:
                blob = docs[f"file{i}"] = Blob()
                with blob.open("w") as fh:
                    fh.write(text(rng, 300_000).encode())
    last = db.storage.lastTransaction()
    db.close()
    return last


class Relay:
    """A TCP relay on 127.0.0.1 that counts the bytes it carries from the primary."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.from_primary = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: bool) -> None:
            try:
                while data := await src.read(1 << 16):
                    if count:
                        self.from_primary += len(data)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, False), pump(up_reader, writer, True))


def test_a_compressed_stream_is_smaller_on_the_wire_and_the_replica_equal(tmp_path, tls_dir):
    last = make_text_source(tmp_path, 150)
    wire: dict[bool, int] = {}

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir) as primary:
            for compress in (False, True):
                name = f"dst-{'deflate' if compress else 'plain'}"
                relay = Relay(primary.port)
                await relay.start()
                try:
                    async with running_secondary(tmp_path, tls_dir, relay.port, name=name,
                                                 compress=compress) as (secondary, _):
                        await wait_equal_tid(primary, secondary, target=last)
                        assert secondary.status()["compression"] is compress
                        sessions = [s for s in primary.status()["secondaries"] if s["node"] == name]
                        assert [s["compression"] for s in sessions] == [compress]
                finally:
                    with contextlib.suppress(Exception):
                        await relay.stop()
                wire[compress] = relay.from_primary

    asyncio.run(scenario())
    for name in ("dst-plain", "dst-deflate"):
        result = assert_equal(tmp_path, name)
        assert result.blobs >= 3
    ratio = wire[True] / wire[False]
    print(f"from the primary on the wire: {wire[False]} bytes plain, {wire[True]} deflated ({ratio:.2f})")
    assert ratio < 0.5, f"compression saved too little: {wire[True]} against {wire[False]} bytes"
