"""Packing while replicating: on the primary, on a secondary, and with a secondary offline across a pack."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob, is_blob_record
from ZODB.FileStorage import FileStorage
from ZODB.serialize import referencesf

from replicator import packlog
from replicator import tailer as tailer_module
from replicator.errors import DivergenceError
from replicator.metrics import render_metrics
from replicator.protocol import PROTOCOL_VERSION, Connection, Hello, Role
from replicator.protocol.events import Ack, TxnEnd
from replicator.status import render
from replicator.tid import Z64, tid_repr
from replicator.verify import format_result, verify
from tests.integration.test_bad_input import raw_client
from tests.integration.test_replication import (
    assert_equal,
    make_source,
    running_primary,
    running_secondary,
    wait_equal_tid,
)


def current_state(path: Path, blob_dir: Path) -> dict[bytes, bytes]:
    """Every reachable object's current pickle (and blob bytes), walked from the root."""
    storage = FileStorage(str(path), blob_dir=str(blob_dir), read_only=True)
    try:
        state: dict[bytes, bytes] = {}
        todo = [b"\0" * 8]
        while todo:
            oid = todo.pop()
            if oid in state:
                continue
            data, serial = storage.load(oid)
            state[oid] = data
            if is_blob_record(data):
                with open(storage.loadBlob(oid, serial), "rb") as f:
                    state[oid] += f.read()
            todo.extend(referencesf(data))
        return state
    finally:
        storage.close()


def assert_same_current_state(tmp_path: Path) -> None:
    src = current_state(tmp_path / "src.fs", tmp_path / "src-blobs")
    dst = current_state(tmp_path / "dst.fs", tmp_path / "dst-blobs")
    assert src.keys() == dst.keys()
    assert src == dst


def test_pack_on_the_primary_while_streaming(tmp_path, tls_dir):
    db, work = make_source(tmp_path, 40, seed=11)

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir) as primary:
            async with running_secondary(tmp_path, tls_dir, primary.port) as (secondary, _):
                for _ in range(4):
                    await asyncio.to_thread(work.commit_random, 30)
                    # Pack up to now while the secondary may be mid-stream.
                    await asyncio.to_thread(db.pack, time.time())
                await asyncio.to_thread(work.commit_random, 10)
                await wait_equal_tid(primary, secondary, target=db.storage.lastTransaction())

    asyncio.run(scenario())
    work.close()
    db.close()
    assert_same_current_state(tmp_path)
    assert assert_equal(tmp_path).packed > 0  # packs are not replicated; verify compares across them


def test_a_pack_that_drops_the_newest_transactions_while_streaming(tmp_path, tls_dir):
    """Packed up to now, the newest transactions go too when nothing reaches their records."""
    db, work = make_source(tmp_path, 10, seed=12)

    def commit_orphans() -> None:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        for _ in range(3):
            conn.add(PersistentMapping())  # stored, but referenced by nothing
            tm.commit()
        conn.close()

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir) as primary:
            async with running_secondary(tmp_path, tls_dir, primary.port) as (secondary, _):
                await asyncio.to_thread(commit_orphans)
                newest = db.storage.lastTransaction()
                await wait_equal_tid(primary, secondary, target=newest)
                await asyncio.to_thread(db.pack, time.time())
                packed = [t.tid for t in db.storage.iterator()]
                assert packed[-1] < newest  # the pack dropped what the secondary holds
                await asyncio.to_thread(work.commit_random, 5)
                await wait_equal_tid(primary, secondary, target=db.storage.lastTransaction())
                assert primary.fatal is None

    asyncio.run(scenario())
    work.close()
    db.close()
    assert_same_current_state(tmp_path)


def test_pack_on_a_secondary_then_resume(tmp_path, tls_dir):
    db, work = make_source(tmp_path, 60, seed=12)

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir) as primary:
            async with running_secondary(tmp_path, tls_dir, primary.port) as (secondary, _):
                await wait_equal_tid(primary, secondary, target=db.storage.lastTransaction())
                # The secondary packs its own storage while it keeps applying.
                packing = asyncio.to_thread(secondary.storage.pack, time.time(), referencesf)
                await asyncio.gather(packing, asyncio.to_thread(work.commit_random, 20))
                await wait_equal_tid(primary, secondary, target=db.storage.lastTransaction())
                packed = [t for t in secondary.storage.iterator() if t.status == "p"]
                assert packed, "the secondary's pack marked nothing"
            # Its last transaction may now be packed; reconnecting must not raise a false alarm.
            await asyncio.to_thread(work.commit_random, 10)
            async with running_secondary(tmp_path, tls_dir, primary.port) as (secondary, _):
                await wait_equal_tid(primary, secondary, target=db.storage.lastTransaction())

    asyncio.run(scenario())
    work.close()
    db.close()
    assert_same_current_state(tmp_path)


def test_secondary_offline_across_a_pack_that_keeps_its_position(tmp_path, tls_dir):
    db, work = make_source(tmp_path, 30, seed=13)

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir) as primary:
            async with running_secondary(tmp_path, tls_dir, primary.port) as (secondary, _):
                await wait_equal_tid(primary, secondary, target=db.storage.lastTransaction())
            # Offline: its last transaction is the primary's last too, so the
            # pack keeps it (its records are current) but marks it packed.
            await asyncio.to_thread(db.pack, time.time() + 1)
            await asyncio.to_thread(work.commit_random, 15)
            async with running_secondary(tmp_path, tls_dir, primary.port) as (secondary, _):
                await wait_equal_tid(primary, secondary, target=db.storage.lastTransaction())

    asyncio.run(scenario())
    work.close()
    db.close()
    assert_same_current_state(tmp_path)


def _offline_across_a_pack(tmp_path, tls_dir, *, blob: bool = False, before_reconnect=None,
                           refused: str | None = None, caplog=None) -> None:
    """A secondary goes offline; its last transaction is superseded, then dropped by a pack; it comes back.

    ``blob``: that transaction changes a blob (its revision's file goes to
    ``src-blobs.old``).  ``before_reconnect(db)`` runs after the pack.
    ``refused``: the refusal expected, else it must resume.
    """
    db, work = make_source(tmp_path, 5, seed=14)

    def change(n: int) -> None:
        with db.transaction() as c:
            if blob:
                with c.root()["blob"].open("w") as f:
                    f.write(b"revision %d" % n)
            else:
                c.root()["counter"] = n

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir) as primary:
            with db.transaction() as c:
                c.root()["counter"] = 0
                c.root()["blob"] = Blob(b"revision 0")
            async with running_secondary(tmp_path, tls_dir, primary.port) as (secondary, _):
                change(1)  # the secondary's last transaction: one record
                await wait_equal_tid(primary, secondary, target=db.storage.lastTransaction())
                last = secondary.storage.lastTransaction()
            change(2)  # supersedes it
            await asyncio.to_thread(work.commit_random, 5)
            await asyncio.to_thread(db.pack, time.time() + 1)
            assert not list(db.storage.iterator(last, last)), "the pack kept it"
            if before_reconnect is not None:
                before_reconnect(db)
            if refused is not None:
                async with running_secondary(tmp_path, tls_dir, primary.port, expect_failure=True) as (_, task):
                    with pytest.raises(DivergenceError, match=refused):
                        await asyncio.wait_for(task, 20)
                return
            await asyncio.to_thread(work.commit_random, 5)
            async with running_secondary(tmp_path, tls_dir, primary.port) as (secondary, _):
                await wait_equal_tid(primary, secondary, target=db.storage.lastTransaction())
                # Counted from where it resumed, not from the start of the file.
                deadline = time.monotonic() + 10
                while primary.status()["secondaries"][0]["lag_transactions"] != 0:
                    assert time.monotonic() < deadline, primary.status()["secondaries"]
                    await asyncio.sleep(0.05)

    with caplog.at_level(logging.INFO, logger="replicator"):
        asyncio.run(scenario())
    work.close()
    db.close()
    if refused is None:
        assert "which a pack of this primary dropped" in caplog.text
        assert_same_current_state(tmp_path)
        # The replica holds the packed transactions after its own unpacked ones.
        result = verify(str(tmp_path / "src.fs"), str(tmp_path / "dst.fs"), str(tmp_path / "src-blobs"),
                        str(tmp_path / "dst-blobs"))
        assert result.equal, format_result(result)
        assert result.dropped_a >= 1 and result.packed >= 1


def test_secondary_offline_across_a_pack_that_drops_its_position_resumes(tmp_path, tls_dir, caplog):
    """The file the pack replaced (Data.fs.old) shows the dropped transaction was the primary's."""
    _offline_across_a_pack(tmp_path, tls_dir, caplog=caplog)


def test_resuming_across_a_pack_checks_the_dropped_blob_too(tmp_path, tls_dir, caplog):
    _offline_across_a_pack(tmp_path, tls_dir, blob=True, caplog=caplog)


def test_without_the_replaced_file_the_secondary_is_told_why(tmp_path, tls_dir, caplog, monkeypatch):
    """A second pack, or pack-keep-old off, leaves no Data.fs.old: with no record of the packs either,
    nothing shows the history was ours."""
    monkeypatch.setattr(packlog, "KEEP_PACKS", 0)
    _offline_across_a_pack(tmp_path, tls_dir, caplog=caplog,
                           before_reconnect=lambda db: os.remove(str(tmp_path / "src.fs.old")),
                           refused=r"packed past the secondary's position.*src\.fs\.old.*hint: this node's "
                                   r"history cannot be checked past the primary's packs")


def test_a_replaced_file_of_another_history_does_not_resume(tmp_path, tls_dir, caplog, monkeypatch):
    """Data.fs.old must hold the secondary's very transaction: one of another history is refused
    (with no record of the packs)."""
    monkeypatch.setattr(packlog, "KEEP_PACKS", 0)
    def other_history(db) -> None:
        old = tmp_path / "src.fs.old"
        os.remove(old)
        other = ZODB.DB(FileStorage(str(old)))  # same shape, different transactions
        with other.transaction() as c:
            c.root()["counter"] = 1
        other.close()

    _offline_across_a_pack(tmp_path, tls_dir, caplog=caplog, before_reconnect=other_history,
                           refused="packed past the secondary's position")


def test_a_secondary_away_across_two_packs_resumes_from_the_record_of_packs(tmp_path, tls_dir, caplog):
    """The second pack replaced the Data.fs.old that showed the secondary's last transaction; the
    primary's record of what each pack dropped shows it instead, through both packs."""
    db, work = make_source(tmp_path, 5, seed=15)

    def supersede(n: int) -> None:
        with db.transaction() as c:
            c.root()["counter"] = n

    async def pack_and_wait(primary, packs: int) -> None:
        await asyncio.to_thread(db.pack, time.time() + 1)
        deadline = time.monotonic() + 20
        while (primary.recorded_packs or 0) < packs:
            assert time.monotonic() < deadline, "the primary did not record the pack"
            await asyncio.sleep(0.05)

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir) as primary:
            supersede(0)
            async with running_secondary(tmp_path, tls_dir, primary.port) as (secondary, _):
                supersede(1)  # the secondary's last transaction: one record
                await wait_equal_tid(primary, secondary, target=db.storage.lastTransaction())
                last = secondary.storage.lastTransaction()
            supersede(2)  # supersedes it: the first pack drops it
            await asyncio.to_thread(work.commit_random, 3)
            await pack_and_wait(primary, 1)
            supersede(3)  # supersedes what followed it: the second pack drops that too
            await asyncio.to_thread(work.commit_random, 3)
            await pack_and_wait(primary, 2)
            old = FileStorage(str(tmp_path / "src.fs.old"), read_only=True)
            try:
                assert not list(old.iterator(last, last)), "Data.fs.old still shows it"
            finally:
                old.close()
            await asyncio.to_thread(work.commit_random, 3)
            async with running_secondary(tmp_path, tls_dir, primary.port) as (secondary, _):
                await wait_equal_tid(primary, secondary, target=db.storage.lastTransaction())
            status = primary.served_status()
            assert status["recorded_packs"] == 2
            assert "packs         2 recorded" in render([{**status, "url": "p"}], time.time())
            assert b"\nreplicator_recorded_packs 2.0\n" in render_metrics(primary.served_status)

    with caplog.at_level(logging.INFO, logger="replicator"):
        asyncio.run(scenario())
    work.close()
    db.close()
    assert "which a pack of this primary dropped (src.fs.dropped shows it was ours)" in caplog.text, caplog.text
    assert_same_current_state(tmp_path)
    result = verify(str(tmp_path / "src.fs"), str(tmp_path / "dst.fs"), str(tmp_path / "src-blobs"),
                    str(tmp_path / "dst-blobs"))
    assert result.equal, format_result(result)


def test_the_record_of_packs_proves_only_what_a_pack_dropped(tmp_path, caplog):
    """Metadata must match, the chain must lead to the file's next transaction, a file that is not
    a pack of Data.fs.old is not recorded, only the newest packs are kept, a cut-short write is
    cut away."""
    from replicator.tailer import Tailer

    path = str(tmp_path / "Data.fs")
    db = ZODB.DB(FileStorage(path))
    identities = []

    def commit(n: int) -> None:
        with db.transaction() as c:
            c.root()["x"] = n
        with Tailer(path) as t:
            identities.append(t.identity(db.lastTransaction(), digest=False))

    for n in range(3):
        commit(n)
    first = identities[1]  # superseded: dropped by the first pack
    db.pack(time.time() + 1)
    assert packlog.record_pack(path) == 3 and packlog.record_pack(path) is None  # once per pack
    for n in range(3, 6):
        commit(n)
    db.pack(time.time() + 1)
    assert packlog.record_pack(path) == 3
    os.remove(path + ".old")
    with Tailer(path) as t:
        answer = t.resumes_across_pack(first)
        assert answer is not None and answer == (t.successor(first.tid)[0], "Data.fs.dropped")
        t.seek_after(first.tid, resume_at=answer[0])
        assert t.read_events()[0].tid == answer[0]
        import dataclasses
        assert t.resumes_across_pack(dataclasses.replace(first, meta=bytes(32))) is None

    # A cut-short write (no closing line) is ignored, then cut away by the next record.
    with open(path + ".dropped", "a") as f:
        f.write(f"T {identities[-1].tid.hex()} {'00' * 32} -\n")
    assert packlog.successor_of(path, identities[-1].tid, bytes(32), lambda tid: True) is None
    for n in range(6, 9):
        commit(n)
    db.pack(time.time() + 1)
    assert packlog.record_pack(path, keep=2) == 3
    text = (tmp_path / "Data.fs.dropped").read_text()
    assert text.count("\nP ") == 2 and "00" * 32 not in text, text  # the oldest pack gone, the cut line too
    with Tailer(path) as t:
        assert t.resumes_across_pack(first) is None  # its pack is no longer kept

    # A file that is not a pack of Data.fs.old (a backup of another history put back): nothing recorded.
    db.close()
    other = ZODB.DB(FileStorage(str(tmp_path / "other.fs")))
    with other.transaction() as c:
        c.root()["y"] = 1
    other.close()
    os.replace(tmp_path / "other.fs", path + ".old")
    with caplog.at_level(logging.INFO, logger="replicator"):
        assert packlog.record_pack(path) is None
        assert packlog.record_pack(path) is None  # noted: not walked again
    assert caplog.text.count("is not a pack of") == 1, caplog.text
    now = (tmp_path / "Data.fs.dropped").read_text()
    assert now.startswith(text) and now[len(text):].startswith("P ") and now.endswith(" 0\n"), now


def test_resuming_across_a_pack_compares_the_dropped_transaction_whole(tmp_path):
    """The dropped transaction's digest is recomputed from Data.fs.old and its blobs.old, not trusted."""
    import dataclasses
    import shutil

    from replicator.tailer import Tailer

    (tmp_path / "blobs").mkdir()
    db = ZODB.DB(FileStorage(str(tmp_path / "Data.fs"), blob_dir=str(tmp_path / "blobs")))
    with db.transaction() as c:
        c.root()["blob"] = Blob(b"revision 0")
    for n in (1, 2):
        with db.transaction() as c:
            with c.root()["blob"].open("w") as f:
                f.write(b"revision %d" % n)
        if n == 1:
            dropped = db.lastTransaction()
            with Tailer(str(tmp_path / "Data.fs"), str(tmp_path / "blobs")) as t:
                theirs = t.identity(dropped)
    db.pack(time.time() + 1)
    db.close()
    assert theirs is not None and (tmp_path / "blobs.old").is_dir()
    forged = dataclasses.replace(theirs, digest=bytes(32))
    with Tailer(str(tmp_path / "Data.fs"), str(tmp_path / "blobs")) as t:
        assert t.identity(dropped) is None, "the pack kept it"
        assert t.resumes_across_pack(theirs)
        # The scan of Data.fs.old is kept (not the file): the next handshake need not scan it again.
        assert tailer_module._old_scans[str(tmp_path / "Data.fs.old")][1][3] == 4
        assert not t.resumes_across_pack(forged)
        # Without blobs.old the revision's file is gone with the pack: the metadata decide.
        shutil.rmtree(tmp_path / "blobs.old")
        assert t.resumes_across_pack(forged)
        assert not t.resumes_across_pack(dataclasses.replace(theirs, meta=bytes(32)))
        assert not (tmp_path / "blobs.old").exists()  # looked for, not made
        os.remove(tmp_path / "Data.fs.old")
        assert not t.resumes_across_pack(theirs)


def test_pack_removing_a_blob_of_the_transaction_being_shipped(tmp_path, tls_dir, monkeypatch, caplog):
    """The pack removes the file of a blob revision it drops while that revision is being shipped.

    Blob files are opened before a transaction's first event, so this needs
    more blob records in one transaction than are opened early; the stream
    then ends and the secondary resumes from the packed file.  Before, the
    primary called its storage damaged and stopped.
    """
    monkeypatch.setattr(tailer_module, "EAGER_BLOBS", 0)
    (tmp_path / "src-blobs").mkdir()
    db = ZODB.DB(FileStorage(str(tmp_path / "src.fs"), blob_dir=str(tmp_path / "src-blobs")))
    conn = db.open()
    root = conn.root()
    root["keep"] = PersistentMapping()  # never changed again: this transaction outlives the pack
    root["b"] = b = Blob(b"revision 0")
    transaction.commit()
    root["a"] = Blob(os.urandom(2 << 20))  # shipped in several batches before b's record
    with b.open("w") as f:
        f.write(b"revision 1")  # dropped by the pack below
    transaction.commit()
    shipped = db.lastTransaction()
    records = [r.oid for r in db.storage.iterator(shipped, shipped).__next__()]
    assert records.index(root["a"]._p_oid) < records.index(b._p_oid), "b's record must come after a's"
    with b.open("w") as f:
        f.write(b"revision 2")
    transaction.commit()
    conn.close()

    open_blob, opened = tailer_module.Tailer._open_blob, []

    def pack_before_the_late_open(self, oid, h, rpos):
        if (oid, h.tid) == (b._p_oid, shipped):
            opened.append(rpos)
            if len(opened) == 2:  # the first pass looked; now it is to be streamed
                db.pack(time.time() + 1)
        return open_blob(self, oid, h, rpos)

    monkeypatch.setattr(tailer_module.Tailer, "_open_blob", pack_before_the_late_open)

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir, batch_bytes=64 << 10) as primary:
            async with running_secondary(tmp_path, tls_dir, primary.port) as (secondary, _):
                await wait_equal_tid(primary, secondary, target=db.storage.lastTransaction())
                assert primary.fatal is None

    with caplog.at_level(logging.INFO, logger="replicator"):
        asyncio.run(scenario())
    db.close()
    assert len(opened) >= 2
    assert f"packed while transaction {tid_repr(shipped)}" in caplog.text
    assert_same_current_state(tmp_path)


def test_secondaries_back_together_after_a_pack_share_one_scan_of_the_replaced_file(tmp_path, monkeypatch):
    """Two handshakes at once over one Data.fs.old: the second waits for the first's scan and reuses it."""
    import threading

    from replicator.fsfile import SourceFile
    from replicator.tailer import Tailer

    db = ZODB.DB(FileStorage(str(tmp_path / "Data.fs")))
    for n in range(3):
        with db.transaction() as c:
            c.root()["x"] = n
        if n == 1:
            dropped = db.lastTransaction()
            with Tailer(str(tmp_path / "Data.fs")) as t:
                theirs = t.identity(dropped)
    db.pack(time.time() + 1)
    db.close()
    old = str(tmp_path / "Data.fs.old")
    assert theirs is not None and os.path.exists(old)
    tailer_module._old_scans.pop(old, None)
    starts: list[int] = []
    scan = SourceFile.scan

    def slow_scan(self):  # a big file's scan, in miniature: long enough for the two to overlap
        if self.path == old:
            starts.append(self.scan_pos)
            time.sleep(0.3)
        return scan(self)

    monkeypatch.setattr(SourceFile, "scan", slow_scan)
    answers: list[tuple[bytes, str] | None] = []

    def handshake() -> None:
        with Tailer(str(tmp_path / "Data.fs")) as t:
            answers.append(t.resumes_across_pack(theirs))

    threads = [threading.Thread(target=handshake) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert [answer and answer[1] for answer in answers] == ["Data.fs.old", "Data.fs.old"]
    assert starts.count(4) == 1, starts  # one scan from the file's first transaction, not two


def test_a_pack_that_leaves_no_replaced_file_is_reported(tmp_path, tls_dir, caplog):
    """With pack-keep-old false, ZODB removes Data.fs.old as the pack ends: the primary cannot
    record what the pack dropped, and says so, with what it means for a secondary away."""
    caplog.set_level(logging.INFO, logger="replicator.primary")
    (tmp_path / "src-blobs").mkdir()
    db = ZODB.DB(FileStorage(str(tmp_path / "src.fs"), blob_dir=str(tmp_path / "src-blobs"), pack_keep_old=False))
    try:
        for n in range(3):
            with db.transaction() as c:
                c.root()["counter"] = n  # each supersedes the one before: a pack drops them

        async def scenario() -> None:
            # Not woken by the pack's writes, and the pack run on the primary's own event loop,
            # which it holds: the primary's next look finds the file replaced after ZODB removed
            # .old, never in the moment between (which it records; a look once a second still
            # fell in that moment now and then on a busy machine).
            async with running_primary(tmp_path, tls_dir, poll_interval=1.0, file_events=False) as primary:
                db.pack(time.time() + 1)
                deadline = time.monotonic() + 20
                while "no " + str(tmp_path / "src.fs") + ".old is left" not in caplog.text:
                    assert time.monotonic() < deadline, caplog.text
                    await asyncio.sleep(0.05)
                assert not primary.recorded_packs

        asyncio.run(scenario())
    finally:
        db.close()
    assert not (tmp_path / "src.fs.old").exists()
    warning = next(r for r in caplog.records if ".old is left" in r.getMessage())
    assert warning.levelno == logging.WARNING
    assert "a secondary that was away across this pack must start anew" in warning.getMessage()
    assert "pack-keep-old true" in warning.getMessage()


def test_lag_in_transactions_stays_right_across_a_pack(tmp_path, tls_dir):
    """A secondary that acknowledged a transaction in the middle, then a pack that dropped it and
    most others: the primary's lag_transactions counts what follows it in the packed file, not
    positions of the file before the pack (which made it 0)."""
    (tmp_path / "src-blobs").mkdir()
    db = ZODB.DB(FileStorage(str(tmp_path / "src.fs"), blob_dir=str(tmp_path / "src-blobs")))

    def commit(n: int) -> bytes:
        with db.transaction() as c:
            c.root()["counter"] = n  # supersedes the one before: a pack drops it
        return db.storage.lastTransaction()

    tids = [commit(n) for n in range(30)]

    async def lag(primary) -> int:
        await primary._refresh_head()
        return primary.status()["secondaries"][0]["lag_transactions"]

    async def scenario() -> tuple[int, int, int]:
        async with running_primary(tmp_path, tls_dir) as primary:
            http, ws = await raw_client(primary.port, tls_dir)
            async with http:
                conn = Connection(Role.SECONDARY)
                await ws.send_bytes(conn.send(Hello(PROTOCOL_VERSION, "lagging", Z64, None)))
                got: list[bytes] = []
                while tids[-1] not in got:
                    msg = await asyncio.wait_for(ws.receive(), 20)
                    conn.receive_data(msg.data)
                    got += [e.tid for e in conn.events() if isinstance(e, TxnEnd)]
                await ws.send_bytes(conn.send(Ack(tids[19])))  # 21 of the 31 (the root's creation first)
                deadline = time.monotonic() + 10
                while primary.status()["secondaries"][0]["acked_tid"] != tids[19].hex():
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
                before = await lag(primary)
                await asyncio.to_thread(db.pack, time.time() + 1)  # keeps only the last
                await asyncio.to_thread(commit, 30)
                await asyncio.to_thread(commit, 31)
                deadline = time.monotonic() + 10
                while primary.head_count != 3:
                    assert time.monotonic() < deadline, primary.head_count
                    await asyncio.sleep(0.02)
                after = await lag(primary)
                await ws.send_bytes(conn.send(Ack(tids[-1])))  # what was in flight across the pack
                deadline = time.monotonic() + 10
                while primary.status()["secondaries"][0]["acked_tid"] != tids[-1].hex():
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
                return before, after, await lag(primary)

    try:
        before, after, acked_more = asyncio.run(scenario())
    finally:
        db.close()
    assert before == 10  # 31 transactions, 21 acknowledged
    # The packed file: the last counter (each commit rewrote the root) and two new commits. The
    # acknowledged transaction was dropped, and none before it is left: all three are to come.
    assert after == 3
    assert acked_more == 2  # the last counter acknowledged: the two new commits are left
