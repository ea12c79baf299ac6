"""Switchovers back and forth between two ZEO servers in one process: real TLS, real ZEO clients.

An embedded primary (``PrimaryStorage``, what ``<replicated-primary>`` makes)
and a replica (``SecondaryStorage``, what ``<replicated-secondary>`` and
``replicator secondary --zeo`` make) are each served by a ZEO
``StorageServer`` of their own, and swap roles with ``run_switchover``, the
code behind ``replicator switchover``.  A node that became the primary by a
promotion must be demoted in place as readily as the first primary, any
number of times; a synchronous primary that got its role back must answer
its clients' commits; and the ZEO clients a demotion drops must be
forgotten by their server, which otherwise sends every later invalidation to
their closed connections (asyncio's ``socket.send() raised exception``, once
per transaction, for ever).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import threading
import time
from pathlib import Path

import pytest
import transaction
import ZODB
from ZEO.ClientStorage import ClientStorage
from ZEO.Exceptions import ClientDisconnected
from ZEO.StorageServer import StorageServer
from ZODB.FileStorage import FileStorage
from ZODB.POSException import ReadOnlyError

from replicator.config import Address, PrimaryConfig, SecondaryConfig
from replicator.control import call
from replicator.errors import ReplicatorError
from replicator.switchover import run_switchover
from replicator.wrappers import PrimaryStorage, SecondaryStorage
from tests.helpers import (
    REPLICATOR,
    sidecar_pair,
    tls_args,
    wait_until,
)
from tests.integration.test_cli import make_fs
from tests.integration.test_replication import tls


class Pair:
    """The embedded primary ``p`` and the replica ``standby``, each behind a ZEO server of its own."""

    def __init__(self, tmp_path: Path, tls_dir: Path, standby_read_only: bool = False, **primary_options) -> None:
        self.tls = tls(tls_dir, "secondary")  # a node's certificate, as the commands are given
        base = FileStorage(str(tmp_path / "p.fs"))
        config = PrimaryConfig(storage=str(tmp_path / "p.fs"), listen=Address("127.0.0.1", 0),
                               tls=tls(tls_dir, "primary"), node="p", **primary_options).validate()
        self.storages: dict[str, PrimaryStorage | SecondaryStorage] = {"p": PrimaryStorage(base, config)}
        self.servers = {"p": StorageServer(("127.0.0.1", 0), {"1": self.storages["p"]})}
        self.servers["p"].start_thread()
        self.addr = {"p": f"127.0.0.1:{self.storages['p'].port}"}
        # A root object, made on the primary: a database opened on the replica must find one.
        db = ZODB.DB(ClientStorage(self.servers["p"].addr, wait_timeout=10))
        with db.transaction() as conn:
            conn.root()["n"] = 0
        db.close()
        replica = SecondaryStorage(FileStorage(str(tmp_path / "standby.fs")), SecondaryConfig(
            storage=str(tmp_path / "standby.fs"), primary=Address("127.0.0.1", self.storages["p"].port),
            listen=Address("127.0.0.1", 0), tls=tls(tls_dir, "standby"), node="standby").validate())
        self.storages["standby"] = replica
        # Registering the replica starts its secondary.
        self.servers["standby"] = StorageServer(("127.0.0.1", 0), {"1": replica}, read_only=standby_read_only)
        self.servers["standby"].start_thread()
        wait_until(lambda: replica.secondary.port, timeout=10, what="the replica listening")
        self.addr["standby"] = f"127.0.0.1:{replica.secondary.port}"
        wait_until(lambda: replica.lastTransaction() == self.storages["p"].lastTransaction(), timeout=20,
                   what="the replica caught up")

    def switchover(self, old: str, new: str) -> str:
        return asyncio.run(run_switchover(self.addr[old], self.addr[new], self.tls, False, 30.0))

    def status(self, name: str) -> dict:
        return asyncio.run(call(self.addr[name], "GET", "/status", self.tls))

    def following(self, old: str, new: str) -> None:
        """Wait until ``old`` says it is a secondary of ``new``, connected (its port changes hands
        meanwhile, and it reconnects into the new epoch)."""
        seen: list[dict] = [{}]

        def follows() -> bool:
            try:
                seen[0] = self.status(old)
            except ReplicatorError:
                return False
            return ((seen[0].get("role"), seen[0].get("primary"), seen[0].get("connected"))
                    == ("secondary", self.addr[new], True))
        try:
            wait_until(follows, timeout=10, interval=0.1)
        except TimeoutError:
            raise AssertionError(f"{old} does not follow {new}: {seen[0]}") from None

    def close(self) -> None:
        for server in self.servers.values():
            server.close()  # closes its storage too


@pytest.fixture
def make_pair(tmp_path, tls_dir):
    pairs: list[Pair] = []

    def make(standby_read_only: bool = False, **primary_options) -> Pair:
        pairs.append(Pair(tmp_path, tls_dir, standby_read_only, **primary_options))
        return pairs[-1]
    yield make
    for pair in pairs:
        pair.close()


class Client:
    """A ZODB database on ZEO servers (a client listing several registers with the one taking writes)."""

    def __init__(self, *addrs) -> None:
        self.storage = ClientStorage(list(addrs) if len(addrs) > 1 else addrs[0], wait_timeout=30)
        self.db = ZODB.DB(self.storage)
        self.tm = transaction.TransactionManager()
        self.conn = self.db.open(self.tm)

    def commit(self, value: int, timeout: float = 20.0) -> bytes:
        """Commit ``root['n'] = value``, retrying while no server takes writes; return its TID."""
        deadline = time.monotonic() + timeout
        while True:
            self.tm.begin()
            self.conn.root()["n"] = value
            try:
                self.tm.commit()
                return self.storage.lastTransaction()
            except (ReadOnlyError, ClientDisconnected) as exc:
                self.tm.abort()
                if time.monotonic() > deadline:
                    raise AssertionError(f"no server took the commit within {timeout:.0f}s: "
                                         f"{type(exc).__name__}: {exc}") from None
                time.sleep(0.05)

    def close(self) -> None:
        self.tm.abort()
        self.conn.close()
        self.db.close()


def test_each_node_is_demoted_in_place_however_it_became_the_primary(make_pair):
    """p -> standby -> p -> standby -> p: every old primary follows the new one on its own port,
    read-only, and the writer that lists both servers always finds the one that takes writes."""
    pair = make_pair()
    writer = Client(pair.servers["p"].addr, pair.servers["standby"].addr)
    try:
        tid = writer.commit(1)
        assert pair.storages["p"].lastTransaction() == tid
        for round, (old, new) in enumerate([("p", "standby"), ("standby", "p"), ("p", "standby"),
                                            ("standby", "p")], start=2):
            report = pair.switchover(old, new)
            assert "now follows it as a secondary" in report, f"switchover {old} -> {new}: {report}"
            pair.following(old, new)
            assert pair.storages[old].isReadOnly() and not pair.storages[new].isReadOnly()
            # However often it was a secondary before, its applier hooks the storage for group
            # commit again (the hooks of its last spell as a secondary went with that spell).
            assert pair.storages[old].secondary.applier._group is not None, f"round {round}: group commit off"
            tid = writer.commit(round)
            assert pair.storages[new].lastTransaction() == tid, f"round {round}: the commit missed {new}"
            wait_until(lambda old=old, tid=tid: pair.storages[old].lastTransaction() == tid, timeout=20,
                       what=f"{old}, demoted, following {new}")
    finally:
        writer.close()
    p, standby = pair.storages["p"], pair.storages["standby"]
    assert [t.tid for t in p.iterator()] == [t.tid for t in standby.iterator()]


def test_a_demoted_primary_keeps_its_fence_record_and_a_promotion_removes_it(make_pair, tmp_path, caplog):
    """The fence of a switchover is recorded beside the old primary's storage and stays there once
    it is demoted, so that, restarted with its old primary configuration, it would start fenced;
    switched back to, it is promoted, which removes the record, and it takes writes."""
    caplog.set_level(logging.WARNING, logger="replicator.secondary")
    pair = make_pair()
    p_fence, standby_fence = Path(f"{tmp_path / 'p.fs'}.fence"), Path(f"{tmp_path / 'standby.fs'}.fence")
    pair.switchover("p", "standby")
    pair.following("p", "standby")
    assert p_fence.exists() and not standby_fence.exists()
    # The promoted standby says how to make its new role last across a restart of its server,
    # on a line that names it: one server's log holds the lines of all its storages.
    promoted = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[standby] promoted: ")]
    assert promoted and "replace <replicated-secondary> by <replicated-primary>" in promoted[0], promoted
    pair.switchover("standby", "p")
    pair.following("standby", "p")
    assert standby_fence.exists() and not p_fence.exists()
    client = Client(pair.servers["p"].addr)
    try:
        tid = client.commit(5)
        assert pair.storages["p"].lastTransaction() == tid
    finally:
        client.close()


def test_a_synchronous_primary_switched_away_and_back_answers_its_commits(make_pair):
    """With sync-count 1 and the standby named, a commit on the node promoted back returns at once,
    acknowledged by the standby (which follows it again), not after sync-timeout nor never."""
    pair = make_pair(sync_count=1, sync_names=("standby",), sync_fallback="async", sync_timeout=3.0)
    p = pair.storages["p"]
    pair.switchover("p", "standby")
    pair.following("p", "standby")
    pair.switchover("standby", "p")
    pair.following("standby", "p")  # with sync-fallback async, a commit before that would not wait
    client = Client(pair.servers["p"].addr)
    synced = p.sync_stats["synced_commits"]
    outcome: list = []
    # The standby makes nothing durable until released: the commit must wait for it.
    applier = pair.storages["standby"].secondary.applier
    released = threading.Event()
    make_durable = applier.make_durable

    def held_make_durable(*args, **kwargs):
        released.wait(10)
        return make_durable(*args, **kwargs)
    applier.make_durable = held_make_durable

    def commit() -> None:
        try:
            outcome.append(client.commit(7))
        except BaseException as exc:  # reported below
            outcome.append(exc)
    committing = threading.Thread(target=commit, daemon=True)
    committing.start()
    committing.join(1.0)
    assert committing.is_alive() and not outcome, f"the commit returned before the standby acknowledged it: {outcome}"
    started = time.monotonic()
    released.set()
    committing.join(10)
    took = time.monotonic() - started
    assert outcome, "a commit on the primary switched back got no answer from its ZEO server within 10 s"
    assert isinstance(outcome[0], bytes), outcome[0]
    assert took < 1.5, f"the commit returned {took:.1f}s after the standby's release: it waited out sync-timeout"
    assert p.sync_stats["synced_commits"] == synced + 1 and not p.sync_stats["degraded"], p.sync_stats
    # Its secondaries are welcomed as a synchronous primary's: they acknowledge each commit at once,
    # not once a quarter second (which made every commit here take 250 ms instead of 5).
    assert p._serving is not None and p._serving.config.sync_count == 1
    wait_until(lambda: pair.storages["standby"].lastTransaction() == outcome[0], timeout=10)
    client.close()


def test_a_demoted_primary_forgets_the_zeo_clients_it_dropped(make_pair, caplog):
    """The ZEO client connected at the demotion is dropped and then goes away; the transactions the
    demoted node applies afterwards are sent to no connection."""
    caplog.set_level(logging.WARNING, logger="asyncio")
    pair = make_pair()
    client = Client(pair.servers["p"].addr, pair.servers["standby"].addr)
    client.commit(1)
    pair.switchover("p", "standby")
    pair.following("p", "standby")
    client.commit(2)  # on the standby now
    client.close()
    writer = Client(pair.servers["standby"].addr)
    try:
        for i in range(3, 23):
            tid = writer.commit(i)
    finally:
        writer.close()
    p = pair.storages["p"]
    wait_until(lambda: p.lastTransaction() == tid, timeout=20, what="the demoted node caught up")
    server = pair.servers["p"]
    # Every client is gone: a connection still registered is one the server closed itself.
    registered = server.zeo_storages_by_storage_id["1"]
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: not registered, timeout=5)
    assert not registered, (f"{len(registered)} ZEO client connection(s) closed at the demotion are still "
                            "registered with the server, which sends each of them every invalidation")
    sends = [r for r in caplog.records if r.name == "asyncio" and "socket.send()" in r.getMessage()]
    assert not sends, f"{len(sends)} sends on closed ZEO connections"


def test_a_fenced_promoted_replica_drops_its_clients_and_takes_them_back_read_only(make_pair, tmp_path):
    """A replica promoted by a switchover is a primary like the first: a plain fence drops its ZEO
    clients, and they come back read-only, instead of registering read-write and meeting
    ReadOnlyError on every commit.  Undoing the fence drops them again, so that they register
    read-write and can commit, instead of staying read-only until they happen to reconnect."""
    pair = make_pair()
    pair.switchover("p", "standby")
    standby = pair.storages["standby"]
    client = ClientStorage(pair.servers["standby"].addr, wait_timeout=30, read_only_fallback=True)
    try:
        assert not client.isReadOnly()
        asyncio.run(call(pair.addr["standby"], "POST", "/fence?reason=test", pair.tls))
        assert standby.isReadOnly(), "a fenced primary told ZEO it takes read-write clients"
        wait_until(lambda: client.is_connected() and client.isReadOnly(), timeout=15,
                   what="the client dropped by the fence, back read-only")
        asyncio.run(call(pair.addr["standby"], "POST", "/unfence", pair.tls))
        wait_until(lambda: client.is_connected() and not client.isReadOnly(), timeout=15,
                   what="the client, read-only while the node was fenced, back read-write after the undo")
        db = ZODB.DB(client)
        with db.transaction() as conn:
            conn.root()["n"] = 42
        assert pair.status("standby")["last_tid"] == client.lastTransaction().hex()
    finally:
        client.close()


def test_a_switchover_whose_old_primary_does_not_become_a_secondary_fails(make_pair, monkeypatch):
    """The old primary took /demote but never became a secondary: the switchover says so, with what
    it left (the new primary promoted, the old one fenced, its clients dropped) and what to do, and
    fails (exit status 7), instead of reporting success while clients wait on a fenced node."""
    from replicator import switchover
    from replicator.errors import OperationError

    monkeypatch.setattr(switchover, "DEMOTION_TIMEOUT", 1.0, raising=False)
    monkeypatch.setattr(PrimaryStorage, "demote", lambda self, upstream: None)
    pair = make_pair()
    client = Client(pair.servers["p"].addr, pair.servers["standby"].addr)
    try:
        client.commit(1)
        with pytest.raises(OperationError) as failed:
            pair.switchover("p", "standby")
        message = str(failed.value)
        assert message.startswith("switched over: standby is the primary of epoch 1"), message
        assert ("; p did not become its secondary (127.0.0.1:" in message
                and "took its demotion but did not become a secondary within 1s (it is the primary p" in message)
        assert "it stays fenced and its ZEO clients were dropped" in message, message
        assert f"Next: restart p as a secondary of {pair.addr['standby']}" in message, message
        tid = client.commit(2)  # the dropped client found the new primary
        assert pair.storages["standby"].lastTransaction() == tid
    finally:
        client.close()


def test_a_switchover_from_a_sidecar_primary_stops_at_the_demotion_and_says_why(tmp_path, tls_dir):
    """A sidecar (`replicator primary`, its ZEO server stopped for the fence) cannot become a
    secondary in place: the switchover promotes the standby, exits 0 and names the next step, as
    the README's failover runbook says, and the reason it gives is the sidecar's."""
    make_fs(tmp_path / "a.fs", [1, 2])
    with sidecar_pair(tmp_path, tls_dir, tmp_path / "a.fs") as (port, status_port, _, _):
        result = subprocess.run([REPLICATOR, "switchover", "--primary", f"127.0.0.1:{port}",
                                 "--to", f"127.0.0.1:{status_port}", *tls_args(tls_dir, "secondary")],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        out = result.stdout
        assert out.startswith("switched over: secondary is the primary of epoch 1"), out
        assert "primary is fenced, and stays so: it runs as a sidecar (`replicator primary`)" in out, out
        assert "HTTP 501" not in out, out
        assert (f"Next: stop primary's `replicator primary`, keep its ZEO server stopped, and start `replicator "
                f"secondary --primary 127.0.0.1:{status_port}` on its storage") in out, out


def test_a_standby_behind_a_read_only_zeo_server_is_promoted_only_when_forced(make_pair, caplog):
    """Promoted, it would take no writes: its ZEO server lets no client write (in a trial, a
    failover ended with no writable primary and no error)."""
    caplog.set_level(logging.INFO, logger="replicator")
    pair = make_pair(standby_read_only=True)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "read-only (read-only true"
              in r.getMessage()]
    assert len(warned) == 1 and "standby.fs" in warned[0], warned
    with pytest.raises(ReplicatorError, match=r"HTTP 409\): not promoted: the ZEO server serving .*standby.fs is "
                                              r"read-only .* remove read-only and restart that server first"):
        asyncio.run(call(pair.addr["standby"], "POST", "/promote", pair.tls))
    assert pair.status("standby")["role"] == "secondary"
    promoted = asyncio.run(call(pair.addr["standby"], "POST", "/promote?force=1", pair.tls))
    assert promoted["role"] == "primary" and promoted["epoch"] == 1
    assert any("promoted to primary, but its ZEO server is read-only" in r.getMessage() for r in caplog.records)
    assert not any(r.getMessage().endswith("is writable: promoted to primary") for r in caplog.records)


def test_a_demoted_primary_restarted_with_its_old_configuration_gives_one_consistent_verdict(
        make_pair, tmp_path, tls_dir, caplog):
    """Restarted as a primary after a switchover demoted it (its configuration not changed yet), the
    old primary is stale: it followed the new primary's epoch.  Its switchover fence is recorded
    too, but `fence --undo` refuses on a stale node, so the log must not offer it as a way out:
    one CRITICAL line, saying to configure the node as a secondary."""
    pair = make_pair()
    pair.switchover("p", "standby")
    pair.following("p", "standby")
    pair.servers.pop("p").close()
    caplog.set_level(logging.INFO, logger="replicator")
    caplog.clear()
    config = PrimaryConfig(storage=str(tmp_path / "p.fs"), listen=Address("127.0.0.1", 0),
                           tls=tls(tls_dir, "primary"), node="p").validate()
    again = PrimaryStorage(FileStorage(str(tmp_path / "p.fs")), config)
    try:
        assert again.isReadOnly() or again.status()["stale"], again.status()
        critical = [r.getMessage() for r in caplog.records if r.levelno >= logging.CRITICAL]
        assert len(critical) == 1, critical
        assert "Configure it as a secondary of standby " in critical[0], critical
        offered = [r.getMessage() for r in caplog.records if "fence --undo" in r.getMessage()]
        assert not offered, offered
        refused = subprocess.run([REPLICATOR, "fence", "--undo", f"127.0.0.1:{again.port}",
                                  *tls_args(tls_dir, "secondary")], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2, refused.stdout + refused.stderr
    finally:
        again.close()
