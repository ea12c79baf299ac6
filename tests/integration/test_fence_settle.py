"""POST /fence on an embedded primary answers only once no commit can land any more.

A switchover reads the head from the fence's answer and promotes the
secondary once it acknowledged that head, so a commit that finished after
the answer would exist only on the old primary.  A transaction whose client
went away at the fence must not keep the commit lock either: a demoted
node's applier needs it.  A switchover's fence (``clients=keep``) leaves the
ZEO clients connected; a plain one drops them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
import transaction
import ZODB
from ZEO.ClientStorage import ClientStorage
from ZEO.Exceptions import ClientDisconnected
from ZEO.StorageServer import StorageServer
from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileStorage
from ZODB.POSException import ReadOnlyError
from ZODB.utils import z64

from replicator import wrappers
from replicator.config import Address, PrimaryConfig, SecondaryConfig
from replicator.control import call
from replicator.errors import ReplicatorError
from replicator.secondary import Secondary
from replicator.wrappers import PrimaryStorage
from tests.helpers import wait_until
from tests.integration.test_replication import tls


@pytest.fixture
def primary(tmp_path, tls_dir):
    base = FileStorage(str(tmp_path / "p.fs"), create=True)
    config = PrimaryConfig(storage=str(tmp_path / "p.fs"), listen=Address("127.0.0.1", 0),
                           tls=tls(tls_dir, "primary"), node="p")
    storage = PrimaryStorage(base, config.validate())
    yield storage
    storage.close()


def vote_one(storage, oid_value: bytes = b"x") -> TransactionMetaData:
    """Begin, store and vote a transaction, as ZEO does before its client calls tpc_finish."""
    txn = TransactionMetaData()
    storage.tpc_begin(txn)
    storage.store(storage.new_oid(), z64, b"(c__builtin__\nobject\nq\x01)\x81q\x02." + oid_value, "", txn)
    storage.tpc_vote(txn)
    return txn


def fence(storage, tls_dir, query: str = "") -> dict:
    return asyncio.run(call(f"127.0.0.1:{storage.port}", "POST", f"/fence?reason=test{query}",
                            tls(tls_dir, "secondary")))


def test_fence_answers_after_the_commit_in_flight_landed(primary, tls_dir):
    txn = vote_one(primary)
    answer: dict = {}
    fencing = threading.Thread(target=lambda: answer.update(fence(primary, tls_dir)))
    fencing.start()
    time.sleep(0.5)
    assert fencing.is_alive(), "the fence answered while a voted transaction could still land"
    tid = primary.tpc_finish(txn)
    fencing.join(10)
    assert answer["last_tid"] == tid.hex(), "the head the fence reports misses the commit that landed"
    with pytest.raises(ReadOnlyError):
        primary.tpc_begin(TransactionMetaData())


def test_fence_aborts_a_transaction_its_client_abandoned(primary, tls_dir, monkeypatch):
    monkeypatch.setattr(wrappers, "SETTLE_TIMEOUT", 0.5)
    before = primary.lastTransaction()
    vote_one(primary)  # never finished nor aborted: its client went away
    answer = fence(primary, tls_dir)
    assert answer["last_tid"] == before.hex()
    base = primary._base
    assert base._commit_lock.acquire(timeout=1), "the abandoned transaction still holds the commit lock"
    base._commit_lock.release()
    assert primary.lastTransaction() == before


def test_a_transaction_waiting_for_the_commit_lock_at_the_fence_is_refused(primary, tls_dir):
    """It passed the check at its tpc_begin before the fence, then waited for the lock behind a
    voted commit; once it gets the lock the node is fenced, so it must not commit."""
    first = vote_one(primary)
    outcome: list = []

    def begin_second() -> None:
        txn = TransactionMetaData()
        try:
            primary.tpc_begin(txn)  # blocks on the commit lock the voted transaction holds
        except ReadOnlyError as exc:
            outcome.append(exc)
            return
        outcome.append(txn)
        primary.tpc_abort(txn)
    second = threading.Thread(target=begin_second)
    second.start()
    time.sleep(0.3)
    assert second.is_alive() and not outcome, "tpc_begin did not wait for the commit lock"
    answer: dict = {}
    fencing = threading.Thread(target=lambda: answer.update(fence(primary, tls_dir)))
    fencing.start()
    wait_until(lambda: primary._serving is not None and not primary._serving.writable, timeout=10)
    tid = primary.tpc_finish(first)
    second.join(10)
    fencing.join(10)
    assert outcome and isinstance(outcome[0], ReadOnlyError), f"began a transaction on a fenced primary: {outcome}"
    assert answer["last_tid"] == tid.hex() and primary.lastTransaction() == tid
    assert primary._base._commit_lock.acquire(blocking=False), "the refused transaction kept the commit lock"
    primary._base._commit_lock.release()


def test_a_switchover_fence_keeps_the_zeo_clients_and_a_plain_fence_drops_them(primary, tls_dir, caplog):
    server = StorageServer(("127.0.0.1", 0), {"1": primary})
    server.start_thread()
    db = None
    try:
        client = ClientStorage(server.addr, wait_timeout=2)
        db = ZODB.DB(client)
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        conn.root()["n"] = 1
        tm.commit()

        with pytest.raises(ReplicatorError, match="clients must be drop or keep"):
            fence(primary, tls_dir, "&clients=later")
        assert primary.primary.writable, "a refused fence request fenced the primary"

        fence(primary, tls_dir, "&clients=keep")
        # Still connected: the commit reaches the server, which refuses it
        # (a dropped client would meet ClientDisconnected after wait_timeout).
        conn.root()["n"] = 2
        caplog.clear()
        caplog.set_level(logging.INFO)
        with pytest.raises(ReadOnlyError, match="this primary accepts no writes: test"):
            tm.commit()
        tm.abort()
        assert client.is_connected()
        # An expected refusal: one line of ours, not ZEO's two ERROR tracebacks.
        # (The client's own side logs what it got, at ERROR: ZEO.asyncio.client.)
        zeo_errors = [r for r in caplog.records if r.name in ("ZEO.StorageServer", "ZEO.asyncio.server")
                      and r.levelno >= logging.ERROR]
        assert not zeo_errors, f"ZEO's server logged the refused commit as an error: {[r.getMessage() for r in zeo_errors]}"
        said = [r.getMessage() for r in caplog.records if r.name == "replicator.wrappers"]
        assert said == ["refused a commit (its client gets ReadOnlyError): this primary accepts no writes: "
                        "test"], said

        fence(primary, tls_dir)
        # Dropped; a fenced primary is read-only, so it cannot register read-write again.
        wait_until(lambda: not client.is_connected(), timeout=10, what="the client dropped by the fence")
        with pytest.raises(ClientDisconnected):
            conn.root()["n"] = 3
            tm.commit()
        tm.abort()
        # ZEO's server refuses it read-write while fenced: expected, one line again.
        wait_until(lambda: any("read-write registration" in r.getMessage() for r in caplog.records),
                   timeout=10, what="the client's refused registration")
        zeo_errors = [r for r in caplog.records if r.name in ("ZEO.StorageServer", "ZEO.asyncio.server")
                      and r.levelno >= logging.ERROR]
        assert not zeo_errors, f"ZEO's server logged a refusal as an error: {[r.getMessage() for r in zeo_errors]}"
    finally:
        if db is not None:
            db.close()
        server.close()


def test_a_demoted_primary_tells_its_secondaries_where_it_goes(primary, tls_dir, tmp_path, caplog):
    """Not 'primary stopping': it serves on at once, on the same port, following the new primary."""
    commit = vote_one(primary)
    primary.tpc_finish(commit)

    async def scenario() -> None:
        secondary = Secondary(SecondaryConfig(storage=str(tmp_path / "dst.fs"),
                                              primary=Address("127.0.0.1", primary.port),
                                              tls=tls(tls_dir, "secondary"), node="dst",
                                              reconnect_min=0.05, reconnect_max=0.2).validate())
        await secondary.open()
        task = asyncio.create_task(secondary.run())
        try:
            while secondary.progress.applied_tid != primary.lastTransaction():
                await asyncio.sleep(0.02)
            await asyncio.to_thread(primary.demote, "127.0.0.1:9")  # a new primary nobody runs here
            while not any("is demoted" in r.getMessage() for r in caplog.records):
                await asyncio.sleep(0.02)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await secondary.close()

    with caplog.at_level(logging.INFO, logger="replicator.secondary"):
        asyncio.run(asyncio.wait_for(scenario(), 30))
    said = next(r.getMessage() for r in caplog.records if "is demoted" in r.getMessage())
    assert ("primary said goodbye (shutdown): p is demoted by a switchover: it follows 127.0.0.1:9 from now on, "
            "and serves on at once on the same port") in said, said


def test_zeo_keeps_its_tracebacks_for_other_errors():
    """Only a refusal of ours is quietened: ZEO's own errors, ReadOnlyError included, keep their lines."""
    loggers = [logging.getLogger("ZEO.StorageServer"), logging.getLogger("ZEO.asyncio.server")]
    wrappers._quiet_zeo_refusals()
    wrappers._quiet_zeo_refusals()
    for logger in loggers:
        assert sum(isinstance(f, wrappers._QuietRefusals) for f in logger.filters) == 1, "installed twice"

    def record(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            import sys
            return logging.LogRecord("ZEO.StorageServer", logging.ERROR, __file__, 1, "While voting", (),
                                     sys.exc_info())

    def refused() -> logging.LogRecord:
        try:
            wrappers._refuse("this node takes no writes")
        except ReadOnlyError:
            import sys
            return logging.LogRecord("ZEO.StorageServer", logging.ERROR, __file__, 1, "While voting", (),
                                     sys.exc_info())
        raise AssertionError("not refused")

    for logger in loggers:
        assert logger.filter(record(ReadOnlyError("the storage itself is read-only")))
        assert logger.filter(record(OSError("disk full")))
        assert logger.filter(logging.LogRecord("ZEO.StorageServer", logging.ERROR, __file__, 1, "x", (), None))
        assert not logger.filter(refused())


def test_a_plain_read_only_storage_keeps_zeos_registration_error(tmp_path, caplog):
    """The same refusal by ZEO for a storage that is not ours is left as ZEO logs it."""
    FileStorage(str(tmp_path / "plain.fs")).close()
    wrappers._quiet_zeo_refusals()
    caplog.set_level(logging.INFO)
    server = StorageServer(("127.0.0.1", 0), {"1": FileStorage(str(tmp_path / "plain.fs"), read_only=True)})
    server.start_thread()
    client = None
    try:
        client = ClientStorage(server.addr, wait=False)

        def zeo_error() -> bool:
            return any(r.name == "ZEO.asyncio.server" and r.levelno >= logging.ERROR and r.exc_info
                       and isinstance(r.exc_info[1], ReadOnlyError) for r in caplog.records)
        wait_until(zeo_error, timeout=10, what="ZEO's own error for the refused registration")
        assert not any("read-write registration" in r.getMessage() for r in caplog.records)
    finally:
        if client is not None:
            client.close()
        server.close()
