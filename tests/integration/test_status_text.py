"""``replicator status`` in text: a fenced primary and degraded synchronous replication are not missed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time

import ZODB
from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileStorage

from replicator.config import Address, PrimaryConfig
from replicator.status import alarms, render, split_brain
from replicator.wrappers import PrimaryStorage
from tests.helpers import (
    REPLICATOR,
    sidecar_pair,
    tls_args,
)
from tests.integration.test_cli import make_fs
from tests.integration.test_metrics import scrape, value
from tests.integration.test_replication import tls
from tests.system.sysutil import get_status


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([REPLICATOR, *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_an_embedded_primary_shows_fenced_and_sync_degraded(tmp_path, tls_dir):
    base = FileStorage(str(tmp_path / "p.fs"))
    config = PrimaryConfig(storage=str(tmp_path / "p.fs"), listen=Address("127.0.0.1", 0),
                           tls=tls(tls_dir, "primary"), node="p", sync_count=1, sync_names=("standby",),
                           sync_timeout=0.3, sync_fallback="async")
    storage = PrimaryStorage(base, config.validate())
    db = ZODB.DB(storage)  # creating the root commits once: no standby, it times out and degrades
    try:
        node = f"127.0.0.1:{storage.port}"
        shown = run("status", node, *tls_args(tls_dir, "secondary"))
        assert shown.returncode == 8, shown.stderr  # alarms: a monitoring check needs no parsing
        lines = shown.stdout.splitlines()
        assert lines[0] == (f"https://{node}/status: primary p [SYNC DEGRADED] [NO SECONDARY]  "
                            f"storage {tmp_path / 'p.fs'}")
        assert lines[1].startswith("  SYNC DEGRADED commits return unreplicated (asynchronous) until enough "
                                   "secondaries are connected again (needs 1 of standby): 1 commits so far, "
                                   "1 timed out"), shown.stdout
        assert "FENCED" not in shown.stdout

        fenced = run("fence", node, *tls_args(tls_dir, "secondary"))
        assert fenced.returncode == 0, fenced.stderr
        lines = run("status", node, *tls_args(tls_dir, "secondary")).stdout.splitlines()
        assert lines[0].startswith(f"https://{node}/status: primary p [FENCED] [SYNC DEGRADED]  storage ")
        assert lines[1] == "  FENCED        takes no writes: fenced by an operator"
        assert lines[2].startswith("  SYNC DEGRADED ")

        assert run("fence", "--undo", node, *tls_args(tls_dir, "secondary")).returncode == 0
        shown = run("status", node, *tls_args(tls_dir, "secondary")).stdout
        assert "FENCED" not in shown and "[SYNC DEGRADED]" in shown
    finally:
        db.close()


def test_an_embedded_primary_shows_commits_held_past_sync_timeout(tmp_path, tls_dir):
    """sync-fallback wait, no secondary: the commit is held; status and metrics say so, and count
    it as one timed-out commit however many times its wait timed out."""
    base = FileStorage(str(tmp_path / "p.fs"))
    config = PrimaryConfig(storage=str(tmp_path / "p.fs"), listen=Address("127.0.0.1", 0),
                           tls=tls(tls_dir, "primary"), node="p", sync_count=1, sync_timeout=0.2,
                           sync_fallback="wait")
    storage = PrimaryStorage(base, config.validate())
    t = TransactionMetaData()
    storage.tpc_begin(t)
    storage.tpc_vote(t)
    ended: list = []

    def finish() -> None:
        try:
            ended.append(storage.tpc_finish(t))
        except BaseException as exc:  # closing the storage ends the wait: the waiter is told so
            ended.append(exc)
    committing = threading.Thread(target=finish, daemon=True)
    committing.start()
    try:
        node = f"127.0.0.1:{storage.port}"
        deadline = time.monotonic() + 10
        while storage.sync_stats["waiting"] != 1:
            assert time.monotonic() < deadline, storage.sync_stats
            time.sleep(0.05)
        time.sleep(0.5)  # the wait times out again, twice or so
        shown = run("status", node, *tls_args(tls_dir, "secondary"))
        lines = shown.stdout.splitlines()
        assert "[SYNC WAITING]" in lines[0], shown.stdout
        assert ("  SYNC WAITING  1 commit(s) wait past sync-timeout for acknowledgements (needs 1, any; fallback wait)"
                in shown.stdout), shown.stdout
        assert "0 synchronous, 0 not, 1 timed out" in shown.stdout, shown.stdout
        samples = asyncio.run(scrape(storage.port, tls_dir))
        assert value(samples, "replicator_sync_waiting") == 1
        assert value(samples, "replicator_sync_timeouts_total") == 1
        assert committing.is_alive()
    finally:
        storage.close()  # ends the wait
        committing.join(10)
    assert storage.sync_stats["waiting"] == 0


def test_a_fenced_sidecar_primary_and_a_fenced_promoted_secondary(tmp_path, tls_dir):
    make_fs(tmp_path / "a.fs", [1, 2])
    with sidecar_pair(tmp_path, tls_dir, tmp_path / "a.fs") as (port, status_port, _, _):
        # No ZEO server beside it: the database takes no writes, an alarm a monitoring check must not miss.
        shown = run("status", f"127.0.0.1:{port}", *tls_args(tls_dir, "secondary"))
        assert shown.returncode == 8, shown.stdout + shown.stderr
        lines = shown.stdout.splitlines()
        assert lines[0] == f"https://127.0.0.1:{port}/status: primary primary [NO WRITER]  storage {tmp_path / 'a.fs'}"
        assert lines[1] == ("  NO WRITER     takes no writes: no process has the storage open for writing (its ZEO "
                            "server is stopped), so there is nothing new to replicate"), lines
        assert "  writes  " not in shown.stdout and "   epoch 0\n" in shown.stdout, shown.stdout
        assert value(asyncio.run(scrape(port, tls_dir)), "replicator_storage_writer") == 0
        # A process opens it for writing, as a ZEO server does (this one): named, and no alarm.
        writer = FileStorage(str(tmp_path / "a.fs"))
        try:
            shown = run("status", f"127.0.0.1:{port}", *tls_args(tls_dir, "secondary"))
            assert shown.returncode == 0, shown.stdout + shown.stderr
            assert "NO WRITER" not in shown.stdout and f"  writes        by process {os.getpid()} (" in shown.stdout
            assert value(asyncio.run(scrape(port, tls_dir)), "replicator_storage_writer") == 1
        finally:
            writer.close()
        # Both name the database their history belongs to: the same one.
        database = get_status(port, tls_dir)["database"]
        assert database and get_status(status_port, tls_dir)["database"] == database
        assert run("fence", f"127.0.0.1:{port}", *tls_args(tls_dir, "secondary")).returncode == 0
        shown = run("status", f"127.0.0.1:{port}", f"127.0.0.1:{status_port}", *tls_args(tls_dir, "secondary"))
        assert shown.returncode == 8, shown.stderr  # an alarm
        assert f"127.0.0.1:{port}/status: primary primary [FENCED]  storage" in shown.stdout
        as_json = run("status", f"127.0.0.1:{port}", f"127.0.0.1:{status_port}", "--json",
                      *tls_args(tls_dir, "secondary"))
        assert as_json.returncode == 8, as_json.stderr
        assert [node["alarms"] for node in json.loads(as_json.stdout)] == [
            [{"flag": "FENCED", "text": "takes no writes: fenced by an operator"}], []]
        assert "  FENCED        takes no writes: fenced by an operator\n" in shown.stdout
        assert "  writes  " not in shown.stdout  # the fence says it
        assert f"127.0.0.1:{status_port}/status: secondary secondary  storage" in shown.stdout

        promoted = run("promote", f"127.0.0.1:{status_port}", *tls_args(tls_dir, "secondary"))
        assert promoted.returncode == 0, promoted.stderr
        assert get_status(status_port, tls_dir)["fenced"] is None
        assert run("fence", f"127.0.0.1:{status_port}", *tls_args(tls_dir, "secondary")).returncode == 0
        assert get_status(status_port, tls_dir)["fenced"] == "fenced by an operator"
        shown = run("status", f"127.0.0.1:{status_port}", *tls_args(tls_dir, "secondary")).stdout
        assert f"127.0.0.1:{status_port}/status: primary secondary [FENCED]  storage" in shown
        assert "  promoted      primary of epoch 1" in shown


def test_a_standby_promoted_into_a_zeo_server_says_it_replicates_asynchronously():
    """It may replace a primary with sync-count: nothing else in its status would say it has none."""
    base = {"url": "https://standby:8101/status", "role": "primary", "node": "standby", "storage": "/d/Data.fs",
            "last_tid": "00" * 8, "last_tid_time": 0.0, "secondaries": [], "promoted": True, "epoch": 1,
            "primary": "old:8100"}
    shown = render([{**base, "serves_zeo": True}], now=time.time())
    assert "  sync          none: commits return without waiting for any secondary" in shown, shown
    # Not for a plain `replicator secondary` promoted (it serves no ZEO clients), nor with sync-* options.
    assert "  sync  " not in render([{**base, "serves_zeo": False}], now=time.time())
    synced = render([{**base, "serves_zeo": True, "sync": {"count": 1, "names": [], "fallback": "wait",
                                                            "synced_commits": 3}}], now=time.time())
    assert "sync          none" not in synced and "each commit waits" in synced, synced


def test_a_stale_primary_says_so_first():
    status = {"url": "https://old:8100/status", "role": "primary", "node": "old", "storage": "/d/Data.fs",
              "last_tid": "00" * 8, "last_tid_time": 0.0, "secondaries": [], "stale": True,
              "fenced": "superseded by epoch 2 (seen from new)", "epoch": 1}
    lines = render([status], now=time.time()).splitlines()
    assert lines[0] == "https://old:8100/status: primary old [STALE]  storage /d/Data.fs"
    assert lines[1] == "  STALE         takes no writes and streams to nobody: superseded by epoch 2 (seen from new)"
    assert "FENCED" not in "\n".join(lines)


def test_what_a_node_says_of_itself_cannot_drive_the_terminal():
    status = {"url": "https://old:8100/status", "role": "primary", "node": "old\x1b[2J\x1b[32mALL HEALTHY",
              "storage": "/d/Data.fs\rforged", "last_tid": "00" * 8, "last_tid_time": 0.0, "secondaries": [],
              "epoch": 1}
    shown = render([status], now=time.time())
    assert "\x1b" not in shown and "\r" not in shown, shown
    assert "primary old\\x1b[2J\\x1b[32mALL HEALTHY [NO SECONDARY]  storage /d/Data.fs\\rforged" in shown, shown


def test_a_sidecar_primary_names_the_process_that_takes_its_writes():
    status = {"url": "https://p:8100/status", "role": "primary", "node": "p", "storage": "/d/Data.fs",
              "last_tid": "00" * 8, "last_tid_time": 0.0, "secondaries": [], "epoch": 3, "transactions": 5,
              "sidecar": True, "writer": "process 42 (runzeo -C zeo.conf)", "takes_writes": True}
    shown = render([status], now=time.time())
    assert "  writes        by process 42 (runzeo -C zeo.conf)\n" in shown, shown
    assert "  transactions  5   bytes streamed " in shown and shown.split("transactions  5")[1].split("\n")[0]. \
        endswith("   epoch 3"), shown
    # An embedded primary takes its own writes: no such line.
    assert "  writes  " not in render([{**status, "sidecar": False, "writer": None}], now=time.time())
    # Where the system cannot show who holds the storage, nothing is claimed either way.
    unknown = {**status, "writer": None, "writer_known": False, "takes_writes": False}
    assert alarms(unknown, time.time()) == [("NO SECONDARY", "no secondary is connected: its commits are "
                                                             "replicated nowhere")]
    assert "  writes        unknown: this system does not show which process has the storage open\n" in \
        render([unknown], now=time.time())


def test_a_node_that_replicates_nothing_is_flagged():
    """Stopped or disconnected secondaries, a primary nobody follows and, past --max-lag, a lag:
    the first line flags each, a line says why, and ``replicator status`` exits 8."""
    now = time.time()
    secondary = {"url": "https://s:8101/status", "role": "secondary", "node": "s", "storage": "/d/Data.fs",
                 "last_tid": "00" * 8, "last_tid_time": 0.0, "primary": "p:8100", "connected": True,
                 "lag_seconds": 12.5}
    assert alarms(secondary, now) == []
    assert alarms(secondary, now, max_lag=20) == []
    assert alarms(secondary, now, max_lag=10) == [("LAGGING", "12.5s behind its primary (more than --max-lag 10)")]
    away = {**secondary, "connected": False, "last_error": "TransportError: connection refused"}
    lines = render([away], now).splitlines()
    assert lines[0] == "https://s:8101/status: secondary s [DISCONNECTED]  storage /d/Data.fs", lines
    assert lines[1] == ("  DISCONNECTED  not connected to its primary p:8100, so nothing new is replicated here: "
                        "TransportError: connection refused"), lines
    stopped = {**away, "error": "diverged: the primary's history differs"}
    lines = render([stopped], now).splitlines()
    assert lines[0].endswith(" [STOPPED]  storage /d/Data.fs"), lines
    assert lines[1] == "  STOPPED       follows no primary until an operator acts: diverged: the primary's history differs"
    assert sum("diverged" in line for line in lines) == 1, lines  # said once

    primary = {"url": "https://p:8100/status", "role": "primary", "node": "p", "storage": "/d/Data.fs",
               "last_tid": "00" * 8, "last_tid_time": 0.0, "secondaries": [], "epoch": 0}
    assert alarms(primary, now) == [("NO SECONDARY", "no secondary is connected: its commits are replicated nowhere")]
    # A fenced primary streams to secondaries only to hand over: having none is no news.
    assert [flag for flag, _ in alarms({**primary, "fenced": "fenced by an operator"}, now)] == ["FENCED"]
    followed = {**primary, "secondaries": [{"node": "s", "peer": "10.0.0.2:4000", "acked_tid": "00" * 8,
                                            "lag_seconds": 3.0, "lag_transactions": 9}]}
    assert alarms(followed, now) == [] and alarms(followed, now, max_lag=5) == []
    assert alarms(followed, now, max_lag=2) == [("LAGGING", "secondary s is 3.0s behind (more than --max-lag 2)")]


def test_two_nodes_taking_writes_to_one_database_are_both_flagged():
    """A split brain (a standby promoted while its old primary still takes writes) forks the
    history: shown together, each is flagged, and the one of the older epoch named to fence."""
    now = time.time()
    old = {"url": "https://old:8100/status", "role": "primary", "node": "old", "storage": "/d/Data.fs",
           "last_tid": "00" * 8, "last_tid_time": 0.0, "epoch": 0, "database": "03" * 8, "takes_writes": True,
           "secondaries": [{"node": "dr", "peer": "x", "acked_tid": "00" * 8}]}
    new = {**old, "url": "https://new:8101/status", "node": "new", "epoch": 1, "promoted": True,
           "primary": "old:8100"}
    lines = render([old, new], now).splitlines()
    assert lines[0] == "https://old:8100/status: primary old [TWO PRIMARIES]  storage /d/Data.fs", lines
    assert lines[1] == ("  TWO PRIMARIES new (https://new:8101/status, epoch 1) also takes writes to this database: "
                        "clients of both fork its history; fence `replicator fence old:8100 ...`, "
                        "of an older epoch than 1, now"), lines
    assert [flag for flag, _ in split_brain([old, new])[1]] == ["TWO PRIMARIES"]
    # Not for another database, a fenced node, one that takes no writes, or one node alone.
    assert split_brain([old, {**new, "database": "04" * 8}]) == [[], []]
    assert split_brain([old, {**new, "fenced": "fenced by an operator"}]) == [[], []]
    assert split_brain([old, {**new, "takes_writes": False}]) == [[], []]
    assert split_brain([old, {"url": "x", "unreachable": True, "error": "refused"}]) == [[], []]
    assert split_brain([old]) == [[]]


def test_status_names_each_storage_by_its_full_path(tmp_path, tls_dir, monkeypatch):
    """Status is read on another host: a path given relative to the node's directory says nothing there."""
    from replicator.config import SecondaryConfig
    from replicator.primary import Primary
    from replicator.secondary import Secondary

    monkeypatch.chdir(tmp_path)
    FileStorage("a.fs").close()

    async def scenario() -> tuple[dict, dict]:
        primary = Primary(PrimaryConfig(storage="a.fs", listen=Address("127.0.0.1", 0), tls=tls(tls_dir, "primary"),
                                        node="p").validate(), sidecar=True)
        await primary.start()
        try:
            secondary = Secondary(SecondaryConfig(storage="b.fs", primary=Address("127.0.0.1", primary.port),
                                                  tls=tls(tls_dir, "secondary"), node="s").validate())
            await secondary.open()
            try:
                return primary.status(), secondary.status()
            finally:
                await secondary.close()
        finally:
            await primary.stop()

    shown_primary, shown_secondary = asyncio.run(scenario())
    assert shown_primary["storage"] == str(tmp_path / "a.fs")
    assert shown_secondary["storage"] == str(tmp_path / "b.fs")
