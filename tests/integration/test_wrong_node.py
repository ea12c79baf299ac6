"""Control commands aimed at the wrong node: exit status 2, a message saying what the node is, nothing changed."""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from replicator.config import TLSPaths
from replicator.control import call
from replicator.errors import UsageError
from tests.helpers import (
    REPLICATOR,
    free_port,
    start_primary,
    start_secondary,
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
    port, status_port = free_port(), free_port()
    primary = start_primary(tmp_path, tmp_path / "a.fs", None, port, tls_dir)
    secondary = start_secondary(tmp_path, tmp_path / "b.fs", None, port, tls_dir, status_port=status_port)
    try:
        wait_until(lambda: (try_status(status_port, tls_dir) or {}).get("connected"), timeout=30,
                   what="the secondary connected")
        yield port, status_port
    finally:
        secondary.stop()
        primary.stop()
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


def test_a_route_the_node_does_not_have_is_a_usage_error(pair, tls_dir):
    port, _ = pair
    paths = TLSPaths(str(tls_dir / "ca.pem"), str(tls_dir / "secondary.pem"), str(tls_dir / "secondary.key"))
    with pytest.raises(UsageError, match=rf"127.0.0.1:{port} has no POST /promote \(HTTP 404\)"):
        asyncio.run(call(f"127.0.0.1:{port}", "POST", "/promote", paths))
    with pytest.raises(UsageError, match=r"refused POST /demote \(HTTP 501\)"):
        asyncio.run(call(f"127.0.0.1:{port}", "POST", "/demote?primary=x:1", paths))
