"""A replica of another database, pointed at a primary by mistake, is refused as such.

One ZEO server often serves several storages, each with a replication port
of its own; a secondary given the wrong port holds a replica of another
database.  Its newer epoch (its own storage was failed over more often)
used to make the primary fence itself for good, and a node name that
another secondary of the primary also has got it told that its name was
taken.  The primary now knows which database each node's history belongs
to (``epoch.py``) and refuses such a secondary as ``foreign``, leaving both
storages as they were.  Real nodes, real TLS on loopback.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import aiohttp
import msgpack
import pytest

from replicator.control import call
from replicator.epoch import begin_epoch, load_epoch, record_database
from replicator.errors import DivergenceError
from replicator.protocol import PROTOCOL_VERSION, Hello, Reject
from replicator.protocol.framing import decode_frame, encode_event
from replicator.tid import Z64
from tests.integration.test_bad_input import raw_client
from tests.integration.test_failover import commit_to, primary_on, secondary_on, until
from tests.integration.test_replication import tls


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_replica_of_another_database_is_refused_and_fences_nothing(tmp_path, tls_dir):
    commit_to(tmp_path / "x.fs", tmp_path / "x-blobs", 4, seed=91)  # the storage "catalog", say
    commit_to(tmp_path / "y.fs", tmp_path / "y-blobs", 6, seed=92)  # the storage "1"

    async def replicate_y() -> None:
        async with primary_on(tmp_path, tls_dir, "y") as y:
            async with secondary_on(tmp_path, tls_dir, "ry", y.port, node="standby") as (ry, _):
                await until(lambda: ry.progress.applied_tid == y.head_tid and ry.progress.connected)

    asyncio.run(replicate_y())
    y_database = load_epoch(str(tmp_path / "y.fs")).database
    assert y_database is not None and load_epoch(str(tmp_path / "ry.fs")).database == y_database
    # y's standby was promoted since (epoch 1), as storage "1" was failed over and x never was.
    ry_last = load_epoch(str(tmp_path / "ry.fs"))
    begin_epoch(str(tmp_path / "ry.fs"), Z64, "standby")
    before = {name: digest(tmp_path / f"{name}.fs") for name in ("x", "ry")}
    assert ry_last.epoch == 0

    async def wrong_port() -> None:
        async with primary_on(tmp_path, tls_dir, "x") as x:
            # x's own standby, under the name the examples give every standby.
            async with secondary_on(tmp_path, tls_dir, "rx", x.port, node="standby") as (rx, _):
                await until(lambda: rx.progress.applied_tid == x.head_tid and rx.progress.connected)
                async with secondary_on(tmp_path, tls_dir, "ry", x.port, node="standby") as (_, task):
                    with pytest.raises(DivergenceError) as info:
                        await asyncio.wait_for(task, 10)
                message = str(info.value)
                assert "(foreign)" in message and "another database" in message, message
                assert "another secondary named" not in message  # not a name clash: the wrong port
                assert "serves another one" in info.value.hint
                # x goes on as it was: writable, in its epoch, its standby still following.
                assert x.writable and not x.stale and x.epoch == 0
                status = await call(f"127.0.0.1:{x.port}", "GET", "/status", tls(tls_dir, "secondary"))
                assert not status.get("stale") and not status.get("fenced")
                assert rx.progress.connected
                assert status["refusals"]["foreign"] == 1, status["refusals"]
        assert not (tmp_path / "x.fs.fence").exists()

    asyncio.run(wrong_port())
    before_after = {name: digest(tmp_path / f"{name}.fs") for name in ("x", "ry")}
    assert before_after == before
    assert load_epoch(str(tmp_path / "x.fs")).epoch == 0
    assert load_epoch(str(tmp_path / "ry.fs")).database == y_database


def test_a_node_of_the_group_that_names_another_database_still_resumes_and_takes_its_primarys(tmp_path, tls_dir):
    """Another name alone is no proof (a node may have begun its record on its own after an
    upgrade): a secondary whose last transaction is the primary's resumes, and records its name."""
    commit_to(tmp_path / "a.fs", tmp_path / "a-blobs", 5, seed=93)

    async def scenario(more: bool) -> None:
        async with primary_on(tmp_path, tls_dir, "a") as a:
            async with secondary_on(tmp_path, tls_dir, "b", a.port) as (b, task):
                await until(lambda: b.progress.applied_tid == a.head_tid and b.progress.connected)
                assert not task.done()

    asyncio.run(scenario(False))
    a_database = load_epoch(str(tmp_path / "a.fs")).database
    assert a_database is not None
    record_database(str(tmp_path / "b.fs"), b"\x03" * 8)  # a name of its own
    commit_to(tmp_path / "a.fs", tmp_path / "a-blobs", 3, seed=94)
    asyncio.run(scenario(True))
    assert load_epoch(str(tmp_path / "b.fs")).database == a_database



@pytest.mark.parametrize("database", [None, b"\0" * 7 + b"\1"], ids=["no-database", "another-database"])
def test_a_newer_epoch_from_a_node_that_does_not_name_the_database_fences_nothing(tmp_path, tls_dir, database):
    """A newer epoch fences a primary for good: it is taken only from a node of the group, which
    names the primary's database (a buggy or misdirected peer's Hello with any epoch did it)."""
    commit_to(tmp_path / "x.fs", tmp_path / "x-blobs", 3, seed=93)

    async def scenario() -> None:
        async with primary_on(tmp_path, tls_dir, "x") as x:
            http, ws = await raw_client(x.port, tls_dir)
            async with http:
                await ws.send_bytes(encode_event(Hello(PROTOCOL_VERSION, "claimant", Z64, None, epoch=1000,
                                                       database=database)))
                msg = await asyncio.wait_for(ws.receive(), 10)
                assert msg.type is aiohttp.WSMsgType.BINARY
                event = decode_frame(msgpack.unpackb(msg.data, raw=False))
                assert isinstance(event, Reject) and event.code == "foreign", event
                assert "epoch 1000" in event.message and "the claim is not taken" in event.message
            assert x.writable and not x.stale and x.epoch == 0
            # A node of the group is still heard: the same claim naming the database fences it.
            http, ws = await raw_client(x.port, tls_dir)
            async with http:
                await ws.send_bytes(encode_event(Hello(PROTOCOL_VERSION, "claimant", Z64, None, epoch=1,
                                                       database=load_epoch(str(tmp_path / "x.fs")).database)))
                msg = await asyncio.wait_for(ws.receive(), 10)
                event = decode_frame(msgpack.unpackb(msg.data, raw=False))
                assert isinstance(event, Reject) and event.code == "stale", event
            assert x.stale

    asyncio.run(scenario())
    assert load_epoch(str(tmp_path / "x.fs")).epoch == 0
