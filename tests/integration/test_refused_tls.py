"""A node says which TLS connections it refused, and why, and the refused side says why too.

asyncio's server drops a failed handshake silently; the primary here runs
its own handshakes (``transport._Handshake``) to log and count them.  Real
Primary and Secondary nodes, real certificates (one made to expire while
the secondary runs) and real clients on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import os
import shutil
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from replicator import transport
from replicator.config import Address, SecondaryConfig
from replicator.secondary import Secondary
from replicator.status import render
from tests.helpers import until
from tests.integration.test_replication import closed_source, running_primary, tls


@pytest.fixture
def source(tmp_path):
    return closed_source(tmp_path, 3)


def short_lived(tls_dir: Path, name: str, lifetime: datetime.timedelta) -> None:
    """A node certificate ``name`` signed by the CA in ``tls_dir``, expiring ``lifetime`` from now
    (negative: expired already), written as ``name.pem`` and ``name.key``."""
    ca_cert = x509.load_pem_x509_certificate((tls_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((tls_dir / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=30)).not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),  # type: ignore[arg-type]
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    (tls_dir / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(tls_dir / f"{name}.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


async def attempt(port: int, context: ssl.SSLContext | None) -> None:
    """One connection: a TLS handshake with ``context``, or a plaintext HTTP request without."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        if context is None:
            writer.write(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(reader.read(100), 5)
        writer.close()
    except (ssl.SSLError, ConnectionError, TimeoutError):
        pass


def client(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def test_refused_connections_are_logged_counted_and_shown(source, tls_dir, foreign_tls_dir, tmp_path,
                                                          caplog, monkeypatch):
    own = Path(shutil.copytree(tls_dir, tmp_path / "tls"))
    short_lived(own, "lapsed", -datetime.timedelta(days=1))
    monkeypatch.setattr(transport, "HANDSHAKE_LOG_INTERVAL", 0.0)  # every line, until said otherwise

    async def scenario() -> None:
        async with running_primary(source, own) as primary:
            port, counts = primary.port, primary.refused_handshakes.counts
            ca = own / "ca.pem"
            await attempt(port, client(ca, own / "lapsed.pem", own / "lapsed.key"))
            await attempt(port, client(ca))  # no client certificate
            await attempt(port, client(ca, foreign_tls_dir / "secondary.pem", foreign_tls_dir / "secondary.key"))
            # A client of another cluster refuses this node's certificate first.
            await attempt(port, client(foreign_tls_dir / "ca.pem", foreign_tls_dir / "secondary.pem",
                                       foreign_tls_dir / "secondary.key"))
            await attempt(port, None)  # plaintext HTTP
            reader, writer = await asyncio.open_connection("127.0.0.1", port)  # a port check
            writer.close()
            await until(lambda: sum(counts.values()) == 6, timeout=10, what="six refusals")
            assert counts == {"certificate": 2, "no_certificate": 1, "refused_by_client": 1, "not_tls": 1,
                              "closed": 1}, counts

            # One line per host and reason a minute at most, with the count of the rest.
            monkeypatch.setattr(transport, "HANDSHAKE_LOG_INTERVAL", 0.5)
            for _ in range(3):
                await attempt(port, client(ca))
            await asyncio.sleep(0.6)
            await attempt(port, client(ca))

            status = primary.served_status()
            assert status["refused_tls_connections"]["no_certificate"] == 5
            text = render([{**status, "url": "p"}], time.time())
            assert "refused TLS   2 certificate, 5 no certificate, 1 not tls, 1 refused by client" in text, text
            assert "closed" not in text.split("refused TLS")[1]  # port checks are no news

            # Refused connections took nothing away: a node still gets in.
            t = tls(own, "secondary")
            await attempt(port, client(Path(t.ca), Path(t.cert), Path(t.key)))
            assert sum(counts.values()) == 10

    with caplog.at_level(logging.DEBUG, logger="replicator.transport"):
        asyncio.run(scenario())
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if "refused a TLS connection" in r.getMessage()]
    warnings = [m for level, m in lines if level == "WARNING"]
    assert any("certificate was refused (certificate has expired): renew it" in m for m in warnings), lines
    assert any("unable to get local issuer certificate" in m and "signed by this cluster's CA" in m
               for m in warnings), lines
    no_certificate = [m for m in warnings if "presented no client certificate" in m]
    assert len(no_certificate) == 2 and "(3 more from 127.0.0.1" in no_certificate[1], no_certificate
    assert any(level == "INFO" and "does not speak TLS" in m for level, m in lines), lines
    assert any("most likely refusing this node's certificate" in m for m in warnings), lines
    assert any(level == "DEBUG" and "closed before its handshake began" in m for level, m in lines), lines


@contextlib.asynccontextmanager
async def following(tmp_path: Path, port: int, node: str, tls_dir: Path):
    """A secondary ``node`` (its certificate from ``tls_dir``) following 127.0.0.1:``port``,
    retrying every 0.05-0.2 s, until the block ends."""
    config = SecondaryConfig(storage=str(tmp_path / "dst.fs"), blob_dir=str(tmp_path / "dst-blobs"),
                             primary=Address("127.0.0.1", port), node=node, reconnect_min=0.05,
                             reconnect_max=0.2, tls=tls(tls_dir, node)).validate()
    secondary = Secondary(config)
    await secondary.open()
    task = asyncio.create_task(secondary.run())
    try:
        yield secondary
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await secondary.close()


def test_a_secondary_whose_certificate_expired_says_so(source, tls_dir, tmp_path, caplog):
    own = Path(shutil.copytree(tls_dir, tmp_path / "tls"))
    short_lived(own, "brief", datetime.timedelta(seconds=3))

    async def scenario() -> None:
        async with running_primary(source, own) as primary:
            port = primary.port
        # The primary is gone; the secondary starts with a certificate valid a few seconds more.
        async with following(tmp_path, port, "brief", own) as secondary:
            await asyncio.sleep(max(0.0, secondary.credentials.not_after - time.time() + 0.5))
            async with running_primary(source, own, listen=Address("127.0.0.1", port)) as primary:
                await until(lambda: "the likely cause" in (secondary.progress.last_error or ""), timeout=15,
                            what="the secondary's diagnosis")
                assert primary.refused_handshakes.counts["certificate"] >= 1

    with caplog.at_level(logging.ERROR, logger="replicator.secondary"):
        asyncio.run(scenario())
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("the likely cause: this node's certificate" in m and "expired on" in m for m in errors), errors


def test_a_tls_failure_that_lasts_is_an_error_once_a_minute_not_once_a_retry(tmp_path, tls_dir, caplog):
    """Pointed at a port that speaks no TLS (the ZEO port, say), the secondary retries every
    0.05-0.2 s: the first failure is an ERROR with its hint, the same one then INFO."""
    async def scenario() -> None:
        async def not_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"\x00\x00\x00\x04ZEO5")  # what a ZEO server says first
            with contextlib.suppress(ConnectionError):
                await writer.drain()
                await reader.read(100)
            writer.close()

        server = await asyncio.start_server(not_tls, "127.0.0.1", 0)
        try:
            async with following(tmp_path, server.sockets[0].getsockname()[1], "secondary", tls_dir) as secondary:
                await until(lambda: secondary.link_log.failures >= 5, timeout=15, what="five failed attempts")
        finally:
            server.close()

    with caplog.at_level(logging.INFO, logger="replicator.secondary"):
        asyncio.run(scenario())
    tls_lines = [(r.levelname, r.getMessage()) for r in caplog.records if "TLS handshake with" in r.getMessage()]
    assert [level for level, _ in tls_lines].count("ERROR") == 1, tls_lines
    assert [level for level, _ in tls_lines].count("INFO") >= 4, tls_lines


def test_each_cause_of_a_refused_certificate_gets_its_own_line(caplog):
    """Another cluster's certificate, then an expired one, from the same host within the
    interval: each asks for another action, so the second is not swallowed by the first."""
    import ssl

    refused = transport.RefusedHandshakes()

    def cert_error(message: str) -> ssl.SSLCertVerificationError:
        error = ssl.SSLCertVerificationError(1, f"certificate verify failed: {message}")
        error.verify_message = message
        return error

    with caplog.at_level(logging.WARNING, logger="replicator.transport"):
        refused.add(("10.0.0.9", 5000), cert_error("unable to get local issuer certificate"))
        refused.add(("10.0.0.9", 5001), cert_error("certificate has expired"))
        refused.add(("10.0.0.9", 5002), cert_error("certificate has expired"))  # the same again: throttled
    lines = [r.getMessage() for r in caplog.records if "refused a TLS connection" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "signed by this cluster's CA" in lines[0] and "renew it" in lines[1], lines
    assert refused.counts["certificate"] == 3


def test_connections_that_never_begin_tls_are_bounded_and_do_not_keep_a_secondary_out(source, tls_dir, tmp_path,
                                                                                        caplog):
    """A flood of connections that never complete a handshake (a scan, a broken client, or
    worse) used to hold two descriptors each for a minute: 600 of them used up a ZEO server's
    1024 and its clients could not connect.  Past the bound from one host, a connection is
    closed at once and counted as ``busy``; a secondary from another host still gets in."""
    caplog.set_level(logging.WARNING, logger="replicator.transport")
    extra = 10

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir) as primary:
            flood = [await asyncio.open_connection("127.0.0.1", primary.port, local_addr=("127.0.0.2", 0))
                     for _ in range(transport.MAX_HANDSHAKES_PER_HOST + extra)]
            try:
                ended = 0
                for reader, _ in flood:
                    with contextlib.suppress(TimeoutError):
                        try:
                            if await asyncio.wait_for(reader.read(1), 0.2) == b"":
                                ended += 1
                        except ConnectionError:
                            ended += 1
                assert ended == extra
                assert primary.served_status()["refused_tls_connections"]["busy"] == extra
                async with following(tmp_path, primary.port, "secondary", tls_dir) as secondary:
                    await until(lambda: secondary.progress.applied_tid == primary.head_tid, timeout=20)
            finally:
                for _, writer in flood:
                    writer.close()

    asyncio.run(scenario())
    said = [r.getMessage() for r in caplog.records if "were in their TLS handshake" in r.getMessage()]
    assert said and "from 127.0.0.2" in said[0], said
    assert len(said) == 1, said  # once per host in five minutes, not once per connection


def test_a_flood_from_many_hosts_makes_room_by_closing_its_oldest_connections(source, tls_dir, tmp_path, caplog):
    """Past the bound in all (a flood from more hosts than the bound per host keeps out), the
    oldest connection in its handshake is closed to make room, not the new one: a secondary
    whose handshake takes a few round trips still gets in."""
    caplog.set_level(logging.WARNING, logger="replicator.transport")
    per_host = transport.MAX_HANDSHAKES_PER_HOST
    hosts = transport.MAX_HANDSHAKES // per_host + 1  # one host more than the bound in all holds

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir) as primary:
            flood = [await asyncio.open_connection("127.0.0.1", primary.port, local_addr=(f"127.0.0.{2 + h}", 0))
                     for h in range(hosts) for _ in range(per_host)]
            try:
                async def closed(reader) -> bool:
                    try:
                        return await asyncio.wait_for(reader.read(1), 0.2) == b""
                    except ConnectionError:
                        return True
                    except TimeoutError:
                        return False

                ended = list(await asyncio.gather(*(closed(reader) for reader, _ in flood)))
                # The first host's, the oldest, made room for the last one's.
                assert ended == [True] * per_host + [False] * (len(flood) - per_host)
                assert primary.served_status()["refused_tls_connections"]["busy"] == per_host
                async with following(tmp_path, primary.port, "secondary", tls_dir) as secondary:
                    await until(lambda: secondary.progress.applied_tid == primary.head_tid, timeout=20)
            finally:
                for _, writer in flood:
                    writer.close()

    asyncio.run(scenario())
    said = [r.getMessage() for r in caplog.records if "were in their TLS handshake" in r.getMessage()]
    assert said and "this one the oldest" in said[0] and "from 127.0.0.2" in said[0], said


def test_a_connection_that_sends_no_request_is_closed(source, tls_dir, tmp_path, monkeypatch):
    """Past its handshake a connection is the web server's, which (aiohttp's default) waited an
    hour for a request: any certificate of the cluster, a monitor's, could hold a thousand idle
    connections, and the process's descriptors with them.  Idle or dribbling a header a byte at
    a time, it is closed after ``IDLE_CONNECTION_TIMEOUT``; a replication session (one long
    request) is not."""
    monkeypatch.setattr(transport, "IDLE_CONNECTION_TIMEOUT", 1.0)
    t = tls(tls_dir, "monitor")
    context = transport.client_ssl_context(t.ca, t.cert, t.key)

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir, heartbeat_interval=0.2) as primary:
            async with following(tmp_path, primary.port, "secondary", tls_dir) as secondary:
                idle = await asyncio.open_connection("127.0.0.1", primary.port, ssl=context)
                dribbling = await asyncio.open_connection("127.0.0.1", primary.port, ssl=context)
                began = time.monotonic()
                for part in (b"GET /sta", b"tus HTTP/1.1\r\n", b"Host: x\r\n"):
                    dribbling[1].write(part)
                    await asyncio.sleep(0.4)
                for reader, _ in (idle, dribbling):
                    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server
                assert time.monotonic() - began < 8
                await asyncio.sleep(1.5)  # the session outlives the timeout
                assert secondary.progress.connected
                assert [s["node"] for s in primary.status()["secondaries"]] == ["secondary"]
                for _, writer in (idle, dribbling):
                    writer.close()

    asyncio.run(scenario())
