"""A secondary whose host falls silent is dropped by the primary; a slow or busy one is not.

The first test's secondary is a real ``replicator secondary`` process in a
network namespace of its own, joined to the primary's by a veth pair, so
that the link can be slowed and cut (``tc tbf``, the cut a bucket too
small for any packet) the way a WAN or a partition does: packets vanish and
no FIN or RST ever comes.  It needs root, ``ip`` and ``tc``.  The
second stops a secondary process on loopback (SIGSTOP), which needs none of
that.  The primary is a real ``Primary`` in this process (its
``peer_timeout`` shortened), over mutual TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import ZODB
from ZODB.FileStorage import FileStorage

from replicator.certs import init_ca, issue_node
from replicator.config import Address, PrimaryConfig, TLSPaths
from replicator.primary import Primary
from replicator.verify import verify
from tests.helpers import REPLICATOR, Proc, tls_args, until

# The big records are stored on the root mapping itself, which ZODB warns about.
pytestmark = pytest.mark.filterwarnings("ignore:The <class 'persistent.mapping.PersistentMapping'>:UserWarning")

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("ip", "tc")),
    reason="needs root, ip and tc (a network namespace with a shaped veth pair)")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def netns():
    """A namespace ``ns`` with ``inner`` (10.x.y.2) inside, paired with ``outer`` (10.x.y.1) here."""
    n = os.getpid() % 250
    ns, outer, inner = f"rtest{os.getpid()}", f"rto{os.getpid()}", f"rti{os.getpid()}"
    near, far = f"10.231.{n}.1", f"10.231.{n}.2"
    try:
        _ip("netns", "add", ns)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot make a network namespace here: {exc.stderr.decode().strip()}")
    try:
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", ns)
        _ip("addr", "add", f"{near}/30", "dev", outer)
        _ip("link", "set", outer, "up")
        _ip("netns", "exec", ns, "ip", "addr", "add", f"{far}/30", "dev", inner)
        _ip("netns", "exec", ns, "ip", "link", "set", inner, "up")
        _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield {"ns": ns, "outer": outer, "inner": inner, "near": near, "far": far}
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", outer)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("netns", "del", ns)


def _rate(netns: dict, rate: str | None) -> None:
    """Limit what the primary sends to ``rate`` (``tc tbf``), or lift the limit."""
    cmd = (["tc", "qdisc", "replace", "dev", netns["outer"], "root", "tbf", "rate", rate, "burst", "32kbit",
            "latency", "2s"] if rate else ["tc", "qdisc", "del", "dev", netns["outer"], "root"])
    subprocess.run(cmd, check=True, capture_output=True)


def _silence(netns: dict, on: bool) -> None:
    """Drop (or stop dropping) everything the secondary's namespace sends: no FIN, no RST, nothing.

    A token bucket of one byte passes no packet, and the sender is not told.
    """
    qdisc = ["tc", "qdisc", *(("replace", "dev", netns["inner"], "root", "tbf", "rate", "8bit", "burst", "1",
                               "limit", "1") if on else ("del", "dev", netns["inner"], "root"))]
    subprocess.run(["ip", "netns", "exec", netns["ns"], *qdisc], check=True, capture_output=True)


def _primary_config(src: Path, tls_dir: Path, host: str) -> PrimaryConfig:
    """A primary of ``src`` on ``host`` whose limit for a silent secondary is 2 s."""
    return PrimaryConfig(storage=str(src), listen=Address(host, 0), node="p",
                         tls=TLSPaths(str(tls_dir / "ca.pem"), str(tls_dir / "primary.pem"),
                                      str(tls_dir / "primary.key")),
                         heartbeat_interval=0.5, peer_timeout=2.0).validate()


def _acked(primary: Primary, tid: bytes) -> bool:
    """One secondary is connected and acknowledged ``tid``."""
    listed = primary.status()["secondaries"]
    return len(listed) == 1 and listed[0]["acked_tid"] == tid.hex()


def _run(scenario, db: ZODB.DB, caplog) -> None:
    """``scenario(procs)`` with the replicator's INFO logs captured; then stop the processes it
    started (``procs``) and close ``db``, whatever happened."""
    procs: list[Proc] = []
    try:
        with caplog.at_level(logging.INFO, logger="replicator"):
            asyncio.run(scenario(procs))
    finally:
        for proc in procs:
            proc.stop()
        db.close()


def _commit(db: ZODB.DB, name: str, size: int) -> bytes:
    with db.transaction(note=name) as conn:
        conn.root()[name] = os.urandom(size)
    return db.storage.lastTransaction()


@needs_netns
def test_silent_host_dropped_slow_link_kept(tmp_path: Path, netns, caplog):
    tls_dir = tmp_path / "tls"
    init_ca(tls_dir)
    issue_node(tls_dir, "primary", hosts=(netns["near"],))
    issue_node(tls_dir, "secondary", hosts=(netns["far"],))
    src = tmp_path / "src.fs"
    db = ZODB.DB(FileStorage(str(src)))
    for i in range(5):
        _commit(db, f"small{i}", 2000)
    dst = tmp_path / "dst.fs"
    config = _primary_config(src, tls_dir, netns["near"])

    async def scenario(secondary: list[Proc]) -> None:
        primary = Primary(config)
        port = await primary.start()
        try:
            secondary.append(Proc(["ip", "netns", "exec", netns["ns"], REPLICATOR, "secondary", "--storage",
                                   str(dst), "--primary", f"{netns['near']}:{port}", "--node", "far",
                                   "--log-level", "info", *tls_args(tls_dir, "secondary")],
                                  tmp_path / "secondary.log"))

            await until(lambda: _acked(primary, db.storage.lastTransaction()), 60, "the first sync")
            since = primary.status()["secondaries"][0]["connected_at"]

            # A slow link: 2.5 MB at 4 Mbit/s take about 5 s, during which
            # the secondary has nothing to acknowledge (it acknowledges whole
            # transactions), more than twice the primary's peer_timeout.
            _rate(netns, "4mbit")
            big = await asyncio.to_thread(_commit, db, "big", 2_500_000)
            await until(lambda: _acked(primary, big), 60, "the big transaction over the slow link")
            listed = primary.status()["secondaries"]
            assert listed[0]["connected_at"] == since, "the slow secondary's session was dropped"
            _rate(netns, None)

            # The secondary's host falls silent: nothing it sends arrives.
            _silence(netns, True)
            cut = asyncio.get_running_loop().time()
            await until(lambda: not primary.status()["secondaries"], 15, "the silent secondary to be dropped")
            gone_after = asyncio.get_running_loop().time() - cut
            assert gone_after < 8, gone_after
            assert primary.status()["silent_secondaries_dropped"] == 1

            # Back again: its name is free, it reconnects and catches up.
            _silence(netns, False)
            last = await asyncio.to_thread(_commit, db, "after", 1000)
            await until(lambda: _acked(primary, last), 60, "the secondary to come back")
        finally:
            await primary.stop()

    _run(scenario, db, caplog)
    gone = [r for r in caplog.records if "is gone: its host acknowledged nothing" in r.getMessage()]
    assert len(gone) == 1 and gone[0].levelno == logging.WARNING, [r.getMessage() for r in gone]
    assert "secondary far" in gone[0].getMessage()
    result = verify(str(src), str(dst))
    assert result.equal, result


def test_a_stopped_secondary_is_kept_while_its_host_answers(tmp_path: Path, tls_dir: Path, caplog):
    """A secondary that reads nothing for a while (a pack of its storage, a slow disk) is not gone.

    Its receive window closes and the primary's kernel probes it at growing
    intervals (0.2, 0.4, 0.8, 1.6, 3.2 s...), each answered by the
    secondary's kernel: gaps of silence longer than the limit that mean
    nothing.  SIGSTOP makes such a secondary out of a real process; no
    network namespace is needed.
    """
    src = tmp_path / "src.fs"
    db = ZODB.DB(FileStorage(str(src)))
    _commit(db, "first", 1000)
    dst = tmp_path / "dst.fs"
    config = _primary_config(src, tls_dir, "127.0.0.1")

    async def scenario(procs: list[Proc]) -> None:
        primary = Primary(config)
        port = await primary.start()
        try:
            procs.append(Proc([REPLICATOR, "secondary", "--storage", str(dst), "--primary", f"127.0.0.1:{port}",
                               "--node", "busy", *tls_args(tls_dir, "secondary")], tmp_path / "secondary.log"))

            await until(lambda: _acked(primary, db.storage.lastTransaction()), 60, "the first sync")
            since = primary.status()["secondaries"][0]["connected_at"]
            os.kill(procs[0].pid, signal.SIGSTOP)
            try:
                # More than its socket buffers hold: its window closes.
                for i in range(12):
                    await asyncio.to_thread(_commit, db, f"big{i}", 4_000_000)
                # Far past the primary's limit and the probes' growing gaps, and
                # past the secondary's own 15 s without a message from the primary:
                # woken, it must read what came before it calls the primary silent.
                await asyncio.sleep(17)
                listed = primary.status()["secondaries"]
                assert [s["connected_at"] for s in listed] == [since], listed
                assert primary.status()["silent_secondaries_dropped"] == 0
            finally:
                os.kill(procs[0].pid, signal.SIGCONT)
            await until(lambda: _acked(primary, db.storage.lastTransaction()), 120, "the secondary to catch up")
            assert primary.status()["secondaries"][0]["connected_at"] == since
        finally:
            await primary.stop()

    _run(scenario, db, caplog)
    assert not [r for r in caplog.records if "is gone" in r.getMessage()]
    result = verify(str(src), str(dst))
    assert result.equal, result
