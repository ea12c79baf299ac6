"""Control commands aimed at the wrong node: exit status 2, a message saying what the node is, nothing changed."""

from __future__ import annotations

import asyncio
import json
import subprocess

import pytest
import zc.lockfile
from ZODB.FileStorage import FileStorage

from replicator.config import TLSPaths
from replicator.control import Refusal, call
from replicator.errors import UsageError
from replicator.switchover import check_nodes
from tests.helpers import (
    REPLICATOR,
    free_port,
    sidecar_pair,
    start_primary,
    start_secondary,
    start_zeo,
    tls_args,
    wait_until,
)
from tests.integration.test_cli import make_fs
from tests.system.sysutil import get_status, try_status


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([REPLICATOR, *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tls_dir):
    """A sidecar primary ``primary`` and a secondary ``secondary`` streaming from it, with their ports."""
    tmp_path = tmp_path_factory.mktemp("pair")
    make_fs(tmp_path / "a.fs", [1, 2])
    with sidecar_pair(tmp_path, tls_dir, tmp_path / "a.fs") as (port, status_port, primary, secondary):
        yield port, status_port
    assert primary.proc.returncode == 0 and secondary.proc.returncode == 0


def test_promote_aimed_at_the_primary(pair, tls_dir):
    port, _ = pair
    result = run("promote", f"127.0.0.1:{port}", *tls_args(tls_dir, "secondary"))
    assert result.returncode == 2, result.stderr
    assert (f"replicator: error: 127.0.0.1:{port} is not a secondary: it is the primary primary (epoch 0); "
            "`replicator promote` takes the address of a secondary's --listen port") in result.stderr


def test_fence_aimed_at_a_secondary(pair, tls_dir):
    port, status_port = pair
    for undo in ((), ("--undo",)):
        result = run("fence", *undo, f"127.0.0.1:{status_port}", *tls_args(tls_dir, "secondary"))
        assert result.returncode == 2, result.stderr
        assert (f"127.0.0.1:{status_port} is not a primary: it is a secondary secondary following "
                f"127.0.0.1:{port}") in result.stderr
    assert get_status(status_port, tls_dir)["role"] == "secondary"


def test_switchover_with_the_arguments_swapped(pair, tls_dir):
    port, status_port = pair
    result = run("switchover", "--primary", f"127.0.0.1:{status_port}", "--to", f"127.0.0.1:{port}",
                 *tls_args(tls_dir, "secondary"))
    assert result.returncode == 2, result.stderr
    assert "the two arguments may be swapped" in result.stderr
    assert "--primary CURRENT-PRIMARY --to SECONDARY-TO-PROMOTE" in result.stderr
    assert get_status(port, tls_dir)["fenced"] is None  # nothing was fenced
    assert get_status(status_port, tls_dir)["connected"]


def test_switchover_to_the_primary_itself(pair, tls_dir):
    port, _ = pair
    result = run("switchover", "--primary", f"127.0.0.1:{port}", "--to", f"127.0.0.1:{port}",
                 *tls_args(tls_dir, "secondary"))
    assert result.returncode == 2, result.stderr
    assert f"--to 127.0.0.1:{port} is not a secondary: it is the primary primary" in result.stderr
    assert get_status(port, tls_dir)["fenced"] is None


def test_a_route_the_node_does_not_have_is_a_usage_error(pair, tls_dir):
    port, _ = pair
    paths = TLSPaths(str(tls_dir / "ca.pem"), str(tls_dir / "secondary.pem"), str(tls_dir / "secondary.key"))
    with pytest.raises(UsageError, match=rf"127.0.0.1:{port} has no POST /promote \(HTTP 404\)"):
        asyncio.run(call(f"127.0.0.1:{port}", "POST", "/promote", paths))
    with pytest.raises(UsageError, match=r"refused POST /demote \(HTTP 501\)"):
        asyncio.run(call(f"127.0.0.1:{port}", "POST", "/demote?primary=x:1", paths))


PRIMARY = {"role": "primary", "node": "p", "epoch": 3, "fenced": None, "stale": False,
           "secondaries": [{"node": "s"}]}
SECONDARY = {"role": "secondary", "node": "s", "primary": "p.example:8100", "connected": True}


def test_switchover_checks_before_fencing():
    check_nodes("p:1", "s:1", PRIMARY, SECONDARY)  # the right way round
    with pytest.raises(UsageError, match="may be swapped"):
        check_nodes("s:1", "p:1", SECONDARY, PRIMARY)
    with pytest.raises(UsageError, match="--primary s:1 is not a primary: it is a secondary s following"):
        check_nodes("s:1", "s:1", SECONDARY, SECONDARY)
    with pytest.raises(UsageError, match="superseded by a newer epoch"):
        check_nodes("p:1", "s:1", {**PRIMARY, "stale": True, "fenced": "superseded"}, SECONDARY)
    elsewhere = {**SECONDARY, "node": "t", "primary": "q.example:8100", "connected": False}
    with pytest.raises(UsageError, match=r"--to t:1 \(t\) is not streaming from --primary p:1 \(p\): it follows "
                                         r"q.example:8100, not connected; nothing was fenced"):
        check_nodes("p:1", "t:1", PRIMARY, elsewhere)


def test_a_sidecar_fence_needs_its_zeo_server_stopped_and_then_keeps_it_out(tmp_path, tls_dir):
    """A sidecar primary cannot refuse the commits of the ZEO server beside it: its fence is
    refused while that server has the storage open, and once fenced it holds the storage's
    lock, so that the server cannot open it and take writes until the fence is undone."""
    fs = tmp_path / "a.fs"
    zeo_port, port = free_port(), free_port()
    zeo = start_zeo(tmp_path, fs, None, zeo_port)
    primary = start_primary(tmp_path, fs, None, port, tls_dir)
    try:
        refused = run("fence", f"127.0.0.1:{port}", *tls_args(tls_dir, "secondary"))
        assert refused.returncode == 2, refused.stderr
        assert "not fenced" in refused.stderr and "runzeo" in refused.stderr, refused.stderr
        assert "stop it (the ZEO server), then fence" in refused.stderr
        # The switchover's fence says to run the switchover again, not to fence by hand.
        from tests.integration.test_replication import tls

        with pytest.raises(Refusal, match=r"stop it \(the ZEO server\), then run the switchover again"):
            asyncio.run(call(f"127.0.0.1:{port}", "POST", "/fence?reason=switchover&clients=keep",
                             tls(tls_dir, "secondary")))
        assert get_status(port, tls_dir)["fenced"] is None

        zeo.stop()
        fenced = run("fence", f"127.0.0.1:{port}", *tls_args(tls_dir, "secondary"))
        assert fenced.returncode == 0, fenced.stderr
        assert get_status(port, tls_dir)["fenced"]
        with pytest.raises(zc.lockfile.LockError):  # what a ZEO server started now would meet
            FileStorage(str(fs)).close()

        undone = run("fence", "--undo", f"127.0.0.1:{port}", *tls_args(tls_dir, "secondary"))
        assert undone.returncode == 0, undone.stderr
        assert get_status(port, tls_dir)["fenced"] is None
        FileStorage(str(fs)).close()  # writers may open it again
    finally:
        primary.stop()
        zeo.stop()
    assert primary.proc.returncode == 0


def test_promote_refuses_while_a_zeo_server_writes_beside_the_sidecar_primary(tmp_path, tls_dir):
    """The secondary is connected to a sidecar primary whose ZEO server still runs: promoting it
    would make two primaries.  Refused (exit 2, naming the writer) until the server stops."""
    make_fs(tmp_path / "a.fs", [1, 2])
    with sidecar_pair(tmp_path, tls_dir, tmp_path / "a.fs") as (port, status_port, _, _):
        zeo = start_zeo(tmp_path, tmp_path / "a.fs", None, free_port())
        try:
            status = get_status(port, tls_dir)
            assert status["takes_writes"] and status["writer"].startswith(f"process {zeo.pid} (runzeo"), status
            result = run("promote", f"127.0.0.1:{status_port}", *tls_args(tls_dir, "secondary"))
            assert result.returncode == 2, result.stderr
            assert f"written by process {zeo.pid} (runzeo" in result.stderr, result.stderr
            assert "would make two primaries" in result.stderr and "promote with --force" in result.stderr
            # Not "fence it first": a sidecar's fence is refused while that server runs.
            assert "Stop that ZEO server first" in result.stderr and "Fence it first" not in result.stderr
            assert get_status(status_port, tls_dir)["role"] == "secondary"
        finally:
            zeo.stop()
        status = get_status(port, tls_dir)
        assert status["writer"] is None and status["takes_writes"] is False
        result = run("promote", f"127.0.0.1:{status_port}", *tls_args(tls_dir, "secondary"))
        assert result.returncode == 0, result.stderr
        assert "is the primary of epoch 1" in result.stdout
        # A plain `replicator secondary`: nothing serves its storage to ZEO clients, which it says.
        assert "Next: secondary takes writes only through a ZEO server, and none serves its storage" \
            in result.stdout, result.stdout
        # The old primary was told of the new epoch: superseded for good, and as a sidecar it holds
        # its storage's lock, so its ZEO server cannot be started again beside the new primary.
        status = get_status(port, tls_dir)
        assert status["stale"] is True and status["fenced"], status
        with pytest.raises(zc.lockfile.LockError):
            FileStorage(str(tmp_path / "a.fs"))
        undo = run("fence", "--undo", f"127.0.0.1:{port}", *tls_args(tls_dir, "secondary"))
        assert undo.returncode == 2 and "superseded by a newer epoch" in undo.stderr, undo.stderr


def test_a_primary_fenced_before_a_promotion_in_its_place_cannot_be_unfenced(tmp_path, tls_dir):
    """An operator fences the primary, then promotes its standby by hand.  The old primary is told
    of the new epoch: its fence can no longer be undone, even after a restart, so `fence --undo`
    cannot make two primaries.  It goes on streaming to a secondary still following it, which
    is refused `promote`: that would begin a second history beside the new primary."""
    fs = tmp_path / "a.fs"
    make_fs(fs, [1, 2])
    with sidecar_pair(tmp_path, tls_dir, fs) as (port, status_port, primary, _):
        other_port = free_port()
        other = start_secondary(tmp_path, tmp_path / "c.fs", None, port, tls_dir, name="other",
                                status_port=other_port)
        try:
            wait_until(lambda: (try_status(other_port, tls_dir) or {}).get("connected"), timeout=30,
                       what="the other secondary connected")
            assert run("fence", f"127.0.0.1:{port}", *tls_args(tls_dir, "secondary")).returncode == 0
            promoted = run("promote", f"127.0.0.1:{status_port}", *tls_args(tls_dir, "secondary"))
            assert promoted.returncode == 0, promoted.stderr

            undo = run("fence", "--undo", f"127.0.0.1:{port}", *tls_args(tls_dir, "secondary"))
            assert undo.returncode == 2, undo.stderr
            assert "superseded by epoch 1 (seen from secondary) while it was fenced" in undo.stderr, undo.stderr
            assert "would make two primaries" in undo.stderr
            status = get_status(port, tls_dir)
            assert status["fenced"] and status["stale"] is False, status
            assert status.get("superseded") == "by epoch 1 (seen from secondary)", status
            record = json.loads((tmp_path / "a.fs.fence").read_text())
            assert record.get("superseded") == "by epoch 1 (seen from secondary)", record
            with pytest.raises(zc.lockfile.LockError):  # the sidecar still holds its storage's lock
                FileStorage(str(fs))

            # Still streaming: the other secondary stays connected to it ...
            assert get_status(other_port, tls_dir)["connected"]
            # ... and may not become a second primary beside the promoted one.
            refused = run("promote", f"127.0.0.1:{other_port}", *tls_args(tls_dir, "secondary"))
            assert refused.returncode == 2, refused.stderr
            assert "which was superseded by epoch 1 (seen from secondary)" in refused.stderr, refused.stderr
            assert "promote with --force" in refused.stderr
            assert get_status(other_port, tls_dir)["role"] == "secondary"
            text = run("status", f"127.0.0.1:{port}", *tls_args(tls_dir, "secondary"))
            assert "SUPERSEDED" in text.stdout and "its fence cannot be undone" in text.stdout, text.stdout
        finally:
            other.stop()

        # Restarted with its configuration unchanged (a reboot), it is still superseded.
        primary.stop()
        restarted = start_primary(tmp_path, fs, None, port, tls_dir)
        try:
            status = get_status(port, tls_dir)
            assert status["fenced"] and status["superseded"] == "by epoch 1 (seen from secondary)", status
            undo = run("fence", "--undo", f"127.0.0.1:{port}", *tls_args(tls_dir, "secondary"))
            assert undo.returncode == 2 and "would make two primaries" in undo.stderr, undo.stderr
            assert "then superseded by epoch 1 (seen from secondary)" in restarted.output()
        finally:
            restarted.stop()
        assert restarted.proc.returncode == 0
