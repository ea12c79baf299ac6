"""A fence survives a restart: the primary records it beside its storage and starts fenced again.

Without the record, a fenced old primary restarted with its configuration
unchanged (a reboot with its services enabled) came back writable beside the
node promoted in its place.  Real parts throughout: FileStorage files, mutual
TLS on loopback, the embedded primary (``PrimaryStorage``, what
``<replicated-primary>`` makes) in this process, and the sidecar
``replicator primary`` and ``runzeo`` as processes of their own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import zc.lockfile
import ZODB
from ZODB.FileStorage import FileStorage
from ZODB.POSException import ReadOnlyError

from replicator.config import Address, PrimaryConfig
from replicator.control import Refusal, call
from replicator.epoch import adopt_epoch
from replicator.errors import DivergenceError
from replicator.wrappers import PrimaryStorage
from tests.helpers import REPLICATOR, Proc, free_port, start_primary, start_zeo, tls_args, wait_until
from tests.integration.test_cli import make_fs
from tests.integration.test_failover import commit_to, primary_on, secondary_on
from tests.integration.test_replication import tls
from tests.system.sysutil import get_status


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([REPLICATOR, *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def commit(db: ZODB.DB, value: int) -> None:
    with db.transaction() as conn:
        conn.root()["v"] = value


def test_an_embedded_primary_fenced_and_restarted_stays_fenced_until_undone(tmp_path, tls_dir, caplog):
    fs = tmp_path / "p.fs"
    make_fs(fs, [1])
    config = PrimaryConfig(storage=str(fs), listen=Address("127.0.0.1", 0), tls=tls(tls_dir, "primary"),
                           node="p").validate()
    operator = tls(tls_dir, "operator")

    storage = PrimaryStorage(FileStorage(str(fs)), config)
    try:
        fenced = asyncio.run(call(f"127.0.0.1:{storage.port}", "POST", "/fence?reason=switchover", operator))
        assert fenced["fenced"] == "switchover"
    finally:
        storage.close()
    record = json.loads(Path(f"{fs}.fence").read_text())
    assert (record["reason"], record["node"], record["epoch"], record["stale"]) == ("switchover", "p", 0, False)
    assert record["at"].endswith("Z")

    # Restarted on the same storage, with the same configuration: fenced from the start, and says so.
    caplog.set_level(logging.WARNING, logger="replicator")
    storage = PrimaryStorage(FileStorage(str(fs)), config)
    db = ZODB.DB(storage)  # closes the storage as it closes
    try:
        node = f"127.0.0.1:{storage.port}"
        said = [r for r in caplog.records if r.levelno == logging.CRITICAL and "stays fenced" in r.getMessage()]
        assert said, caplog.text
        message = said[0].getMessage()
        assert "fenced since " in message and " UTC (switchover)" in message and f"{fs}.fence" in message
        assert (f"`replicator fence --undo {node} --tls-ca {tls_dir / 'ca.pem'} --tls-cert "
                f"{tls_dir / 'primary.pem'} --tls-key {tls_dir / 'primary.key'}`") in message
        status = asyncio.run(call(node, "GET", "/status", operator))
        assert status["fenced"] == "switchover" and not status["stale"]
        assert abs(status["fenced_since"] - time.time()) < 60
        assert storage.isReadOnly(), "a fenced primary told ZEO it takes read-write clients"
        with pytest.raises(ReadOnlyError, match="accepts no writes: switchover"):
            commit(db, 2)

        undone = asyncio.run(call(node, "POST", "/unfence", operator))
        assert undone["fenced"] is None
        assert not Path(f"{fs}.fence").exists()
        commit(db, 3)
    finally:
        db.close()

    # Undone for good: the next start takes writes.
    storage = PrimaryStorage(FileStorage(str(fs)), config)
    db = ZODB.DB(storage)
    try:
        assert storage.primary is not None and storage.primary.writable
        commit(db, 4)
    finally:
        db.close()


def test_a_stale_primary_restarted_is_still_stale_and_cannot_be_unfenced(tmp_path, tls_dir):
    """Superseded by a newer epoch (a secondary of it said so), stopped and started again: it still
    refuses writes and secondaries, and /unfence refuses, as before the restart."""
    commit_to(tmp_path / "a.fs", tmp_path / "a-blobs", 3, seed=61)
    # c: a copy of a's history that has followed a primary of epoch 1 since.
    shutil.copy(tmp_path / "a.fs", tmp_path / "c.fs")
    shutil.copytree(tmp_path / "a-blobs", tmp_path / "c-blobs")
    adopt_epoch(str(tmp_path / "c.fs"), 1, "b")
    operator = tls(tls_dir, "operator")
    a_fence = tmp_path / "a.fs.fence"

    async def scenario() -> None:
        async with primary_on(tmp_path, tls_dir, "a") as a:
            assert a.writable
            async with secondary_on(tmp_path, tls_dir, "c", a.port, expect_failure=True) as (_, task):
                with pytest.raises(DivergenceError, match="stale"):
                    await asyncio.wait_for(task, 10)
            assert a.stale
        record = json.loads(a_fence.read_text())
        assert record["stale"] is True and record["reason"] == "superseded by epoch 1 (seen from c)"

        async with primary_on(tmp_path, tls_dir, "a") as a:
            assert a.stale and not a.writable
            status = await call(f"127.0.0.1:{a.port}", "GET", "/status", operator)
            assert status["stale"] is True and status["fenced"] == "superseded by epoch 1 (seen from c)"
            with pytest.raises(Refusal, match="superseded by a newer epoch; it cannot take writes again"):
                await call(f"127.0.0.1:{a.port}", "POST", "/unfence", operator)
            assert a_fence.exists()

    asyncio.run(scenario())


def test_a_sidecar_primary_restarted_fenced_holds_the_storage_lock(tmp_path, tls_dir):
    fs = tmp_path / "a.fs"
    make_fs(fs, [1, 2])
    port = free_port()
    node = f"127.0.0.1:{port}"
    primary = start_primary(tmp_path, fs, None, port, tls_dir)
    try:
        fenced = run("fence", node, *tls_args(tls_dir, "operator"))
        assert fenced.returncode == 0, fenced.stdout + fenced.stderr
    finally:
        assert primary.stop() == 0, primary.output()[-3000:]
    assert Path(f"{fs}.fence").exists()

    primary = start_primary(tmp_path, fs, None, port, tls_dir)
    try:
        status = get_status(port, tls_dir)
        assert status["fenced"] == "fenced by an operator", status
        log = primary.output()
        assert "CRITICAL" in log and "stays fenced across this restart" in log, log[-3000:]
        assert "it holds the storage's lock" in log and f"replicator fence --undo {node} --tls-ca " in log
        # The lock is held: nothing (a ZEO server, here FileStorage itself) opens the storage for writing.
        with pytest.raises(zc.lockfile.LockError):
            FileStorage(str(fs))

        undone = run("fence", "--undo", node, *tls_args(tls_dir, "operator"))
        assert undone.returncode == 0, undone.stdout + undone.stderr
        assert not Path(f"{fs}.fence").exists()
        FileStorage(str(fs)).close()  # the lock is free again
    finally:
        assert primary.stop() == 0, primary.output()[-3000:]


@pytest.mark.parametrize("stale", [False, True], ids=["fenced", "superseded"])
def test_a_fenced_sidecar_will_not_start_beside_a_process_that_has_its_storage_open(tmp_path, tls_dir, stale):
    """It could not stop that process's writes: exit status 2, naming it and what to do (for a
    node superseded by a newer epoch, not an undo it would refuse)."""
    fs = tmp_path / "a.fs"
    make_fs(fs, [1])
    # As a switchover's fence of this sidecar recorded it before the sidecar was stopped,
    # or a promotion elsewhere told it of a newer epoch.
    reason = "superseded by epoch 3 (seen from b)" if stale else "switchover"
    Path(f"{fs}.fence").write_text(json.dumps({"reason": reason, "at": "2026-11-30T21:00:00Z",
                                               "node": "primary", "epoch": 0, "stale": stale}))
    zeo = start_zeo(tmp_path, fs, None, free_port())
    sidecar = None
    try:
        port = free_port()
        sidecar = Proc([REPLICATOR, "primary", "--storage", str(fs), "--listen", f"127.0.0.1:{port}",
                        "--node", "primary", *tls_args(tls_dir, "primary")], tmp_path / "sidecar.log")
        wait_until(lambda: not sidecar.alive(), timeout=15, what="the sidecar exited")
        assert sidecar.stop() == 2, sidecar.output()[-3000:]
        said = sidecar.output()
        assert (f"replicator: error: {fs}: this primary was fenced (since 2026-11-30 21:00:00 UTC: "
                f"{reason}) and must start fenced" in said), said
        assert f"but process {zeo.pid} (runzeo -C " in said and "it has the storage open for writing" in said, said
        assert f"stop process {zeo.pid} (runzeo" in said and "this node must not take writes" in said, said
        if stale:
            assert "fence --undo" not in said, said
            assert "this node cannot take writes again: configure it as a secondary of that primary" in said, said
        else:
            assert f"replicator fence --undo 127.0.0.1:{port} --tls-ca " in said, said
        assert Path(f"{fs}.fence").exists()
    finally:
        if sidecar is not None:
            sidecar.stop()
        zeo.stop()
