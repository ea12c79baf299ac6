"""End to end in one process: a real FileStorage, a Primary and a Secondary over real TLS on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import threading
from pathlib import Path

import pytest
import ZODB
from ZODB.FileStorage import FileStorage
from ZODB.fsIndex import fsIndex

from replicator import applier as applier_module
from replicator.config import Address, PrimaryConfig, SecondaryConfig, TLSPaths
from replicator.errors import DivergenceError
from replicator.primary import Primary
from replicator.protocol.events import Record
from replicator.secondary import INLINE_APPLY_BYTES, INLINE_BLOBS, Secondary
from replicator.status import size_text
from replicator.tid import tid_repr
from replicator.verify import verify
from tests.helpers import Workload


def tls(tls_dir: Path, node: str) -> TLSPaths:
    return TLSPaths(str(tls_dir / "ca.pem"), str(tls_dir / f"{node}.pem"), str(tls_dir / f"{node}.key"))


def closed_source(tmp_path: Path, transactions: int) -> Path:
    """``make_source``'s ``src.fs`` with that many transactions, closed again: ``tmp_path``."""
    db, work = make_source(tmp_path, transactions)
    work.close()
    db.close()
    return tmp_path


def make_source(tmp_path: Path, transactions: int, seed: int = 1) -> tuple[ZODB.DB, Workload]:
    (tmp_path / "src-blobs").mkdir(exist_ok=True)
    db = ZODB.DB(FileStorage(str(tmp_path / "src.fs"), blob_dir=str(tmp_path / "src-blobs")))
    work = Workload(db, seed=seed)
    work.commit_random(transactions)
    return db, work


@contextlib.asynccontextmanager
async def running_primary(tmp_path: Path, tls_dir: Path, sidecar: bool = False, **overrides):
    config = PrimaryConfig(storage=str(tmp_path / "src.fs"), blob_dir=str(tmp_path / "src-blobs"),
                           tls=tls(tls_dir, "primary"), node="p",
                           **{"listen": Address("127.0.0.1", 0), "heartbeat_interval": 0.2, **overrides})
    primary = Primary(config.validate(), sidecar=sidecar)
    await primary.start()
    try:
        yield primary
    finally:
        await primary.stop()


@contextlib.asynccontextmanager
async def running_secondary(tmp_path: Path, tls_dir: Path, port: int, name: str = "dst",
                            expect_failure: bool = False, cert: str = "secondary", **overrides):
    config = SecondaryConfig(storage=str(tmp_path / f"{name}.fs"), blob_dir=str(tmp_path / f"{name}-blobs"),
                             primary=Address("127.0.0.1", port), tls=tls(tls_dir, cert),
                             node=overrides.pop("node", name),
                             **{"reconnect_min": 0.05, "reconnect_max": 0.5, **overrides})
    secondary = Secondary(config.validate())
    await secondary.open()
    task = asyncio.create_task(secondary.run())
    try:
        yield secondary, task
    finally:
        failed = task.done() and not task.cancelled() and task.exception()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await secondary.close()
    if failed and not expect_failure:
        raise failed


async def wait_equal_tid(primary: Primary, secondary: Secondary, timeout: float = 60.0,
                         target: bytes | None = None) -> None:
    """Wait until the secondary applied ``target`` (default: the primary's head as it knows it)."""
    async def cond() -> None:
        while not (primary.head_tid != b"\0" * 8
                   and secondary.progress.applied_tid == (target or primary.head_tid)):
            if primary.fatal:
                raise primary.fatal
            await asyncio.sleep(0.02)
    await asyncio.wait_for(cond(), timeout)


def assert_equal(tmp_path: Path, name: str = "dst"):
    result = verify(str(tmp_path / "src.fs"), str(tmp_path / f"{name}.fs"),
                    str(tmp_path / "src-blobs"), str(tmp_path / f"{name}-blobs"))
    assert result.equal, result
    return result


def test_initial_sync_then_live_follow_then_resume(tmp_path, tls_dir):
    db, work = make_source(tmp_path, 150)

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir) as primary:
            async with running_secondary(tmp_path, tls_dir, primary.port) as (secondary, _):
                await wait_equal_tid(primary, secondary, target=db.storage.lastTransaction())
                # Live: each new commit shows up on the secondary.
                for _ in range(20):
                    await asyncio.to_thread(work.commit_random, 1)
                    await wait_equal_tid(primary, secondary, timeout=10, target=db.storage.lastTransaction())
                last = db.storage.lastTransaction().hex()
                for _ in range(250):  # the Ack is on its way
                    status = primary.status()
                    if status["secondaries"][0]["acked_tid"] == last:
                        break
                    await asyncio.sleep(0.02)
                assert status["secondaries"][0]["node"] == "dst"
                assert status["secondaries"][0]["acked_tid"] == last
                assert status["secondaries"][0]["lag_transactions"] == 0
                assert secondary.status()["lag_seconds"] == 0.0
            # The secondary is gone; the primary goes on committing.
            await asyncio.to_thread(work.commit_random, 30)
            async with running_secondary(tmp_path, tls_dir, primary.port) as (secondary, _):
                await wait_equal_tid(primary, secondary, target=db.storage.lastTransaction())

    asyncio.run(scenario())
    work.close()
    db.close()
    # 151 initial, then 20 live and 30 while the secondary was away (a random
    # undo that conflicts commits nothing, hence the margin).
    assert assert_equal(tmp_path).transactions > 185


def test_small_batches_are_applied_on_the_loop_and_the_rest_in_a_thread(tmp_path, tls_dir, monkeypatch):
    """Small batches skip the thread hop, small blobs too; big blobs, many blobs and big transactions
    keep the loop free."""
    monkeypatch.setattr("replicator.applier.MEMORY_TEMP", 1 << 20)
    (tmp_path / "src-blobs").mkdir()
    db = ZODB.DB(FileStorage(str(tmp_path / "src.fs"), blob_dir=str(tmp_path / "src-blobs")))
    work = Workload(db, seed=3, blobs=False)
    work.commit_random(30)
    calls: list[tuple[bool, set[str], int]] = []  # (on the loop's thread, kinds of events, blob records)

    async def scenario() -> None:
        loop_thread = threading.get_ident()
        async with running_primary(tmp_path, tls_dir) as primary:
            async with running_secondary(tmp_path, tls_dir, primary.port) as (secondary, _):
                real = secondary.applier.apply

                def spy(events, **kw):
                    calls.append((threading.get_ident() == loop_thread, {type(e).__name__ for e in events},
                                  sum(isinstance(e, Record) and e.blob_size is not None for e in events)))
                    return real(events, **kw)

                async def commit(write) -> list[tuple[bool, set[str], int]]:
                    before = len(calls)
                    await asyncio.to_thread(write)
                    await asyncio.to_thread(work.commit, "blobs")
                    await wait_equal_tid(primary, secondary, target=db.storage.lastTransaction())
                    return calls[before:]

                secondary.applier.apply = spy
                await wait_equal_tid(primary, secondary, target=db.storage.lastTransaction())
                assert calls and all(on_loop for on_loop, _, _ in calls)
                small = await commit(lambda: work.write_blob("b", 5000))
                assert [on_loop for on_loop, kinds, _ in small if "BlobChunk" in kinds] == [True]
                # A blob file bigger than a batch on the loop may take long to fsync once complete.
                big = await commit(lambda: work.write_blob("big", INLINE_APPLY_BYTES + 1))
                assert {on_loop for on_loop, kinds, _ in big if "BlobChunk" in kinds} == {False}
                many = await commit(lambda: [work.write_blob(f"m{i}", 100) for i in range(INLINE_BLOBS + 1)])
                assert [on_loop for on_loop, _, blobs in many if blobs] == [False]
                before = len(calls)
                await asyncio.to_thread(work.big_transaction, 3)  # 6 records of 512 KB: past 1 MB
                await wait_equal_tid(primary, secondary, target=db.storage.lastTransaction())
                # The end of the big one (its vote copies 3 MB back from disk) is not applied on the loop.
                assert [on_loop for on_loop, kinds, _ in calls[before:] if "TxnEnd" in kinds] == [False]

    asyncio.run(scenario())
    work.close()
    db.close()
    assert_equal(tmp_path)


def test_diverged_secondary_is_refused_and_left_untouched(tmp_path, tls_dir):
    db, work = make_source(tmp_path, 20)
    work.close()
    db.close()
    # A secondary with a history of its own.
    other = ZODB.DB(FileStorage(str(tmp_path / "dst.fs"), blob_dir=str(tmp_path / "dst-blobs")))
    with other.transaction() as conn:
        conn.root()["mine"] = 1
    other.close()
    assert_refused_and_untouched(tmp_path, tls_dir, "not in this primary's history|newer")


def assert_refused_and_untouched(tmp_path: Path, tls_dir: Path, match: str) -> None:
    """The secondary on dst.fs is refused as diverged (``match``), and dst.fs is left as it was."""
    before = (tmp_path / "dst.fs").read_bytes()

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir) as primary:
            async with running_secondary(tmp_path, tls_dir, primary.port, expect_failure=True) as (_, task):
                with pytest.raises(DivergenceError, match=match):
                    await asyncio.wait_for(task, 20)

    asyncio.run(scenario())
    assert (tmp_path / "dst.fs").read_bytes() == before


def test_secondary_with_another_transaction_under_the_same_tid_is_refused(tmp_path, tls_dir):
    """The fork sits in the secondary's newest transaction itself: same TID, other content."""
    db, work = make_source(tmp_path, 20)
    with db.transaction() as conn:
        conn.root()["marker"] = "AAAA-the-primary's"
    work.close()
    db.close()
    # The secondary holds the primary's history, but its copy of the last
    # transaction says something else (same length, same TID).
    data = (tmp_path / "src.fs").read_bytes()
    assert data.count(b"AAAA-the-primary's") == 1
    (tmp_path / "dst.fs").write_bytes(data.replace(b"AAAA-the-primary's", b"BBBB-the-primary's"))
    shutil.copytree(tmp_path / "src-blobs", tmp_path / "dst-blobs")
    assert_refused_and_untouched(tmp_path, tls_dir, "differs from the primary's transaction with the same TID")


def test_stalled_secondary_does_not_grow_primary_memory(tmp_path, tls_dir):
    """A secondary that stops reading: the primary's session blocks in send, reading no further."""
    import aiohttp

    from replicator.protocol import PROTOCOL_VERSION, Hello
    from replicator.protocol.framing import encode_event
    from replicator.transport import client_ssl_context

    db, work = make_source(tmp_path, 10)
    for _ in range(40):
        work.big_transaction(1, record_size=64 * 1024)
    work.close()
    db.close()

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir, batch_bytes=64 * 1024) as primary:
            t = tls(tls_dir, "secondary")
            ssl_ctx = client_ssl_context(t.ca, t.cert, t.key)
            async with aiohttp.ClientSession() as http:
                ws = await http.ws_connect(f"https://127.0.0.1:{primary.port}/replicate", ssl=ssl_ctx,
                                           max_msg_size=1 << 27)
                await ws.send_bytes(encode_event(Hello(PROTOCOL_VERSION, "stalled", b"\0" * 8, None)))
                await ws.receive()  # Welcome; then read nothing more
                await asyncio.sleep(2.0)
                stats = next(iter(primary.sessions.values()))
                # 40 MB are waiting; the primary may have pushed socket buffers' worth, no more.
                assert stats.bytes_sent < 16 << 20, stats.bytes_sent
                await ws.close()

    asyncio.run(scenario())


def test_a_reconnecting_secondary_acknowledges_what_it_holds(tmp_path, tls_dir):
    """A commit waiting for a secondary whose Ack the connection lost is released by its Hello.

    The secondary already holds the commit durably when it connects, so no
    batch and no Ack follow; before, the commit waited out its timeout.
    """
    db, work = make_source(tmp_path, 5)
    head = db.storage.lastTransaction()

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir) as primary:
            async with running_secondary(tmp_path, tls_dir, primary.port) as (secondary, _):
                await wait_equal_tid(primary, secondary, target=head)
        # A new primary over the same file knows of no Ack (as after a lost one).
        async with running_primary(tmp_path, tls_dir, sync_count=1) as primary:
            assert primary.acked_by_node == {}
            waiting = asyncio.create_task(primary.wait_replicated(head, 1, timeout=10))
            await asyncio.sleep(0.1)
            assert not waiting.done()
            async with running_secondary(tmp_path, tls_dir, primary.port):
                assert await waiting, "the secondary holds the transaction, but the commit was not released"
                assert primary.acked_by_node == {"dst": head}

    asyncio.run(scenario())
    work.close()
    db.close()


@pytest.mark.parametrize("sync_count", [0, 1])
def test_acknowledgements_are_held_back_only_when_nobody_waits(tmp_path, tls_dir, sync_count):
    """Asynchronous: at most one Ack per ``ACK_DELAY``, and the last one still comes.
    Synchronous (commits wait for Acks): one per durable batch, none held back."""
    from replicator.primary import ACK_DELAY

    db, work = make_source(tmp_path, 5)

    async def scenario() -> tuple[int, float]:
        async with running_primary(tmp_path, tls_dir, sync_count=sync_count) as primary:
            async with running_secondary(tmp_path, tls_dir, primary.port) as (secondary, _):
                await wait_equal_tid(primary, secondary, target=db.storage.lastTransaction())
                acks = []
                note_ack = primary._note_ack
                primary._note_ack = lambda node, tid: (acks.append(tid), note_ack(node, tid))
                loop = asyncio.get_running_loop()
                start = loop.time()
                for _ in range(40):  # one commit at a time: each its own batch, mostly
                    await asyncio.to_thread(work.commit_random, 1)
                    await asyncio.sleep(0.005)
                last = db.storage.lastTransaction()
                while primary.acked_by_node.get("dst") != last:
                    assert loop.time() - start < 30, "the last Ack never came"
                    await asyncio.sleep(0.005)
                assert acks == sorted(acks) and acks[-1] == last
                return len(acks), loop.time() - start

    count, elapsed = asyncio.run(scenario())
    work.close()
    db.close()
    held_back_bound = elapsed / ACK_DELAY + 2
    if sync_count:
        assert count > held_back_bound, (count, elapsed)
    else:
        assert count <= held_back_bound, (count, elapsed)


def test_a_secondary_saves_its_index_as_it_goes_so_a_crash_does_not_cost_a_rescan(tmp_path, tls_dir,
                                                                                   monkeypatch, caplog):
    """FileStorage saves its index only when it closes; opened after a crash it reads again
    everything applied since.  The secondary saves it every so many bytes applied, with
    everything durable, so that a copy of its files taken while it runs (what a crash leaves)
    opens from an index that covers nearly all of it, and holds the primary's transactions."""
    monkeypatch.setattr(applier_module, "INDEX_SAVE_BYTES", 64 << 10)
    monkeypatch.setattr(applier_module, "INDEX_SAVE_RATIO", 0)  # every 64 KiB, whatever the index's size
    closed_source(tmp_path, 150)
    crashed = tmp_path / "crashed"
    crashed.mkdir()

    async def scenario() -> int:
        async with running_primary(tmp_path, tls_dir) as primary:
            async with running_secondary(tmp_path, tls_dir, primary.port) as (secondary, _):
                await wait_equal_tid(primary, secondary)
                await asyncio.sleep(0.2)  # the last batch's fsync, and the save after it if due
                # What a kill -9 would leave: the files as they are, never closed.
                for name in ("dst.fs", "dst.fs.index"):
                    shutil.copyfile(tmp_path / name, crashed / name)
                shutil.copytree(tmp_path / "dst-blobs", crashed / "dst-blobs")
                return (crashed / "dst.fs").stat().st_size

    size = asyncio.run(scenario())
    assert size > 4 * (64 << 10), f"the source is too small to test saves every 64 KiB ({size} bytes)"
    saved_up_to = fsIndex.load(str(crashed / "dst.fs.index"))["pos"]
    assert size - saved_up_to < 64 << 10, (saved_up_to, size)
    caplog.clear()
    FileStorage(str(crashed / "dst.fs"), blob_dir=str(crashed / "dst-blobs")).close()
    assert not [r for r in caplog.records if "Ignoring index" in r.getMessage()], caplog.text
    result = verify(str(tmp_path / "src.fs"), str(crashed / "dst.fs"), str(tmp_path / "src-blobs"),
                    str(crashed / "dst-blobs"))
    assert result.equal, result


def test_a_catch_up_says_how_it_goes_and_when_it_is_over(tmp_path, tls_dir, monkeypatch, caplog):
    """An initial sync logs its progress (here after every durable batch) and, once caught up,
    what it took; a node that then only follows new commits logs neither."""
    import replicator.secondary as secondary_module

    db, work = make_source(tmp_path, 300)
    last = db.storage.lastTransaction()
    count = sum(1 for _ in db.storage.iterator())
    monkeypatch.setattr(secondary_module, "CATCH_UP_REPORT_INTERVAL", 0.0)
    monkeypatch.setattr(secondary_module, "CATCH_UP_REPORTED_AFTER", 0.0)
    caplog.set_level(logging.INFO, logger="replicator.secondary")

    def lines(start: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith(start)]

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir) as primary:
            async with running_secondary(tmp_path, tls_dir, primary.port) as (secondary, _):
                await wait_equal_tid(primary, secondary, target=last)
                caught = lines("caught up")
                assert len(caught) == 1, caplog.text
                assert re.fullmatch(
                    rf"caught up with primary p at {re.escape(tid_repr(last))}: {count} transaction\(s\) and "
                    rf"{re.escape(size_text(secondary.progress.bytes_received))} received in \S+ \(\S+ \S+/s\)",
                    caught[0]), caught[0]
                for line in lines("catching up"):  # one per durable batch before the last
                    assert re.fullmatch(r"catching up with primary p: \d+ transaction\(s\) and .* received in the "
                                        r"last \S+ \(.*/s\); applied up to .*, the primary at .*", line), line
                caplog.clear()
                work.commit_random(3)
                await wait_equal_tid(primary, secondary, target=db.storage.lastTransaction())
                assert not lines("caught up") and not lines("catching up"), caplog.text

    try:
        asyncio.run(scenario())
    finally:
        db.close()


def test_a_catching_up_secondary_knows_the_primary_head_from_heartbeats(tmp_path, tls_dir):
    """While a secondary catches up, the primary's new commits show in its head (and so in its
    lag) at once, not only once it received them: heartbeats go out during the stream too."""
    db, work = make_source(tmp_path, 300)

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir) as primary:
            # Slowed down, so that the catch-up lasts some heartbeat intervals (0.2 s here).
            async with running_secondary(tmp_path, tls_dir, primary.port, max_rate=4 << 20) as (secondary, _):
                old_head = db.storage.lastTransaction()
                await asyncio.wait_for(until(lambda: secondary.progress.connected), 10)
                await asyncio.to_thread(work.commit_random, 1)
                new_head = db.storage.lastTransaction()
                await asyncio.wait_for(until(lambda: secondary.progress.head_tid == new_head), 30)
                # Known while it still catches up (about 24 MB at 4 MiB/s), not only once it got there.
                assert secondary.progress.applied_tid < old_head, "the new head showed only at the end of the catch-up"
                assert secondary.status()["lag_seconds"] > 0
                await wait_equal_tid(primary, secondary, target=new_head)

    try:
        asyncio.run(scenario())
    finally:
        db.close()


async def until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.01)
