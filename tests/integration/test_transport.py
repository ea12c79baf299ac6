"""Mutual TLS for real: aiohttp servers and clients on 127.0.0.1, certificates from ``certs``.

Each test runs its own event loop through ``asyncio.run`` (no pytest plugin)
and is bounded by ``_run``'s timeout so a hung handshake fails fast.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from replicator import certs, transport
from replicator.errors import ConfigError, TLSError, TransportError, UsageError

MAX_MSG = 1 << 20


@dataclass(frozen=True)
class PKI:
    ca: Path
    server: transport.TLSFiles
    client: transport.TLSFiles
    other: transport.TLSFiles      # another CA and a node certificate it signed
    misnamed: transport.TLSFiles   # cluster CA, but SANs that do not name 127.0.0.1


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    good = tmp_path_factory.mktemp("pki")
    bad = tmp_path_factory.mktemp("other")
    certs.init_ca(good)
    certs.init_ca(bad, common_name="Some other CA")

    def node(directory: Path, name: str, **kw) -> transport.TLSFiles:
        paths = certs.issue_node(directory, name, **kw)
        return transport.TLSFiles(directory / "ca.pem", paths.cert, paths.key)

    return PKI(good / "ca.pem", node(good, "primary"), node(good, "secondary-1"),
               node(bad, "intruder"), node(good, "elsewhere", hosts=("db.example.org",)))


def _run(coro, timeout: float = 15.0):
    async def bounded():
        async with asyncio.timeout(timeout):
            return await coro
    return asyncio.run(bounded())


def _nodelay(sock) -> bool:
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


def _app(seen: list[dict]) -> web.Application:
    """Echo WebSocket on /replicate plus /status, recording what the server saw."""

    async def replicate(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_MSG)
        await ws.prepare(request)
        seen.append({"peer": transport.peer_identity(request),
                     "nodelay": _nodelay(request.transport.get_extra_info("socket"))})
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"peer": transport.peer_identity(request)})

    app = web.Application()
    app.router.add_get("/replicate", replicate)
    app.router.add_get("/status", status)
    return app


class Server:
    """A running test server: ``async with Server(ctx) as srv`` gives ``srv.url``."""

    def __init__(self, ssl_context: ssl.SSLContext | None) -> None:
        self.ssl_context = ssl_context
        self.seen: list[dict] = []

    async def __aenter__(self) -> Server:
        self.runner, self.port = await transport.start_server(
            _app(self.seen), "127.0.0.1", 0, self.ssl_context, shutdown_timeout=1.0)
        scheme = "wss" if self.ssl_context else "ws"
        self.url = f"{scheme}://127.0.0.1:{self.port}/replicate"
        return self

    async def __aexit__(self, *exc) -> None:
        await transport.stop_server(self.runner)


async def _echo(url: str, ctx: ssl.SSLContext | None, payload: bytes = b"\x00txn" * 100) -> None:
    async with aiohttp.ClientSession() as session:
        ws = await transport.connect_ws(session, url, ctx, max_msg_size=MAX_MSG, timeout=5)
        try:
            assert _nodelay(ws.get_extra_info("socket"))
            await ws.send_bytes(payload)
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.BINARY and msg.data == payload
        finally:
            await ws.close()


async def _connect_fails(url: str, ctx: ssl.SSLContext | None) -> TransportError:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(TransportError) as info:
            ws = await transport.connect_ws(session, url, ctx, max_msg_size=MAX_MSG, timeout=5)
            await ws.close()
    return info.value


def _no_cert_context(ca: Path, version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.maximum_version = version
    return ctx


# -- the happy path -------------------------------------------------------------

def test_certified_client_echoes_over_wss_with_nodelay_on_both_sides(pki):
    async def main():
        async with Server(pki.server.server_context()) as srv:
            await _echo(srv.url, pki.client.client_context())
            # The server saw the client's certificate name and had Nagle off too.
            assert srv.seen == [{"peer": "secondary-1", "nodelay": True}]
            async with aiohttp.ClientSession() as session:
                status_url = srv.url.replace("wss://", "https://").replace("/replicate", "/status")
                async with session.get(status_url, ssl=pki.client.client_context()) as resp:
                    assert await resp.json() == {"peer": "secondary-1"}
    _run(main())


def test_large_message_within_limit(pki):
    async def main():
        async with Server(pki.server.server_context()) as srv:
            await _echo(srv.url, pki.client.client_context(), os.urandom(MAX_MSG - 16))
    _run(main())


def test_localhost_name_is_accepted(pki):
    async def main():
        async with Server(pki.server.server_context()) as srv:
            await _echo(srv.url.replace("127.0.0.1", "localhost"), pki.client.client_context())
    _run(main())


# -- the server refuses ---------------------------------------------------------

@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_client_without_certificate_is_refused_and_server_keeps_working(pki, version, caplog):
    async def main():
        async with Server(pki.server.server_context()) as srv:
            error = await _connect_fails(srv.url, _no_cert_context(pki.ca, version))
            assert isinstance(error, TLSError)
            assert "TLS handshake with 127.0.0.1" in str(error)
            assert srv.seen == []
            await _echo(srv.url, pki.client.client_context())
            assert [s["peer"] for s in srv.seen] == ["secondary-1"]
    with caplog.at_level(logging.WARNING):
        _run(main())
    # A refused stranger is not an error of ours: nothing at ERROR in the log.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_client_certificate_from_another_ca_is_refused(pki, version):
    async def main():
        async with Server(pki.server.server_context()) as srv:
            # The intruder trusts our CA (so it accepts our server) but its own
            # certificate comes from elsewhere.
            ctx = _no_cert_context(pki.ca, version)
            ctx.load_cert_chain(pki.other.cert, pki.other.key)
            error = await _connect_fails(srv.url, ctx)
            assert isinstance(error, TLSError)
            if version is ssl.TLSVersion.TLSv1_3:
                # Refused after the client's side of the handshake: the usual case between our nodes.
                assert "closed the connection before answering" in str(error)
                assert "probably refused this node's certificate" in error.hint
            else:
                assert "closed before the handshake ended" in str(error)
                assert "speaks only TLS 1.2, it refused this node's certificate" in error.hint
            assert srv.seen == []
            await _echo(srv.url, pki.client.client_context())
    _run(main())


@pytest.mark.parametrize("reads_first", [False, True])
def test_a_listener_that_drops_connections_is_not_blamed_on_the_certificate(pki, reads_first):
    """What accepts and closes at once (a proxy with nowhere to go) is said to, with a cause to check."""
    async def drop(reader, writer):
        if reads_first:
            await reader.read(100)
        writer.close()

    async def main():
        server = await asyncio.start_server(drop, "127.0.0.1", 0)
        try:
            port = server.sockets[0].getsockname()[1]
            error = await _connect_fails(f"wss://127.0.0.1:{port}/replicate", pki.client.client_context())
        finally:
            server.close()
            await server.wait_closed()
        assert isinstance(error, TLSError)
        assert "the connection was closed before the handshake ended" in str(error)
        assert "probably" not in error.hint
        assert "a proxy or firewall in between" in error.hint
    _run(main())


def test_plaintext_client_against_tls_port_fails(pki):
    async def main():
        async with Server(pki.server.server_context()) as srv:
            error = await _connect_fails(srv.url.replace("wss://", "ws://"), None)
            assert not isinstance(error, TLSError)
            assert "leave out --insecure" in error.hint
            assert srv.seen == []
            await _echo(srv.url, pki.client.client_context())
    _run(main())


def _tls11_client() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    return ctx


async def _tls_handshake(port: int, ctx: ssl.SSLContext) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    writer.close()
    await writer.wait_closed()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_1_1_client_is_refused(pki):
    async def main():
        # First prove this OpenSSL can speak TLS 1.1 at all (many builds cannot),
        # so that the refusal below is our server's doing, not the client's.
        lax = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        lax.set_ciphers("DEFAULT:@SECLEVEL=0")
        lax.minimum_version = ssl.TLSVersion.TLSv1
        lax.load_cert_chain(pki.server.cert, pki.server.key)
        probe = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=lax)
        try:
            await _tls_handshake(probe.sockets[0].getsockname()[1], _tls11_client())
        except (ssl.SSLError, OSError) as e:
            pytest.skip(f"this OpenSSL cannot negotiate TLS 1.1: {e}")
        finally:
            probe.close()
            await probe.wait_closed()
        ctx = pki.server.server_context()
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        async with Server(ctx) as srv:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await _tls_handshake(srv.port, _tls11_client())
    _run(main())


# -- the client refuses ---------------------------------------------------------

def test_server_certificate_from_another_ca_is_refused(pki):
    async def main():
        async with Server(pki.other.server_context()) as srv:
            error = await _connect_fails(srv.url, pki.client.client_context())
            assert isinstance(error, TLSError)
            assert error.address == f"127.0.0.1:{srv.port}"
            assert str(error).startswith(f"TLS handshake with 127.0.0.1:{srv.port} failed: "
                                         "certificate verify failed")
            assert "cluster CA" in error.hint
    _run(main())


def test_wrong_hostname_is_refused(pki):
    async def main():
        async with Server(pki.misnamed.server_context()) as srv:
            error = await _connect_fails(srv.url, pki.client.client_context())
            assert isinstance(error, TLSError)
            assert "mismatch" in str(error)
            assert "'127.0.0.1'" in error.hint
    _run(main())


def test_tls_client_against_plaintext_server(pki, monkeypatch):
    monkeypatch.setattr(transport, "_warned_insecure", set())

    async def main():
        async with Server(None) as srv:
            error = await _connect_fails(srv.url.replace("ws://", "wss://"),
                                         pki.client.client_context())
            assert isinstance(error, TLSError)
            assert "without TLS" in error.hint
    _run(main())


# -- other failures to connect ----------------------------------------------------

def test_connection_refused_is_a_plain_transport_error(pki):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        error = _run(_connect_fails(f"wss://127.0.0.1:{port}/replicate",
                                    pki.client.client_context()))
    assert type(error) is TransportError
    assert str(error).startswith(f"cannot connect to 127.0.0.1:{port}")


def test_unresolvable_host_name_is_named_as_such(pki):
    # .invalid never resolves (RFC 6761); the resolver's code is no errno ("Unknown error -2").
    error = _run(_connect_fails("wss://noprimary.invalid:8100/replicate", pki.client.client_context()))
    assert type(error) is TransportError
    assert str(error).startswith("cannot connect to noprimary.invalid:8100: the host name "
                                 "'noprimary.invalid' could not be resolved")
    assert "Unknown error" not in str(error) and "DNS" in error.hint


def test_silent_server_times_out_within_the_budget(pki):
    async def main():
        async def hold(reader, writer):
            await reader.read()  # never answers the TLS hello
            writer.close()
        server = await asyncio.start_server(hold, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with aiohttp.ClientSession() as session:
                start = asyncio.get_running_loop().time()
                with pytest.raises(TransportError, match="timed out after 0.3 s"):
                    await transport.connect_ws(session, f"wss://127.0.0.1:{port}/x",
                                               pki.client.client_context(),
                                               max_msg_size=MAX_MSG, timeout=0.3)
                assert asyncio.get_running_loop().time() - start < 2
        finally:
            server.close()
    _run(main())


def test_wrong_path_is_a_refused_upgrade(pki):
    async def main():
        async with Server(pki.server.server_context()) as srv:
            error = await _connect_fails(srv.url.replace("/replicate", "/nope"),
                                         pki.client.client_context())
            assert type(error) is TransportError and "HTTP 404" in str(error)
    _run(main())


@pytest.mark.parametrize("url,tls", [("wss://h:1/r", False), ("ws://h:1/r", True),
                                     ("https://h:1/r", True)])
def test_scheme_and_context_must_agree(pki, url, tls):
    async def main():
        async with aiohttp.ClientSession() as session:
            with pytest.raises(ConfigError):
                await transport.connect_ws(session, url, pki.client.client_context() if tls else None,
                                           max_msg_size=MAX_MSG)
    _run(main())


# -- one-shot requests (the control and status commands) ---------------------------------

def test_a_one_shot_request_says_address_and_reason(pki, monkeypatch):
    from replicator.config import TLSPaths
    from replicator.control import call

    monkeypatch.setattr(transport, "_warned_insecure", set())
    tls = TLSPaths(str(pki.ca), str(pki.client.cert), str(pki.client.key))

    async def main():
        async with Server(pki.server.server_context()) as srv:
            address = f"127.0.0.1:{srv.port}"
            assert (await call(address, "GET", "/status", tls))["peer"]
            with pytest.raises(TransportError) as info:
                await call(address, "GET", "/status", None, insecure=True)
            assert str(info.value).startswith(f"connection to {address} failed during GET /status: ")
            assert "leave out --insecure" in info.value.hint
            with pytest.raises(UsageError, match=rf"{address} has no GET /nothing \(HTTP 404\)"):
                await call(address, "GET", "/nothing", tls)
        async with Server(None) as srv:
            with pytest.raises(TLSError) as info:
                await call(f"127.0.0.1:{srv.port}", "GET", "/status", tls)
            assert "without TLS" in info.value.hint
            assert "SSLContext" not in str(info.value)
    _run(main())


# -- server lifecycle and insecure mode ------------------------------------------------

def test_busy_port_is_a_config_error(pki):
    async def main():
        async with Server(pki.server.server_context()) as srv:
            with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{srv.port}"):
                await transport.start_server(web.Application(), "127.0.0.1", srv.port, None)
    _run(main())


def test_stop_server_with_an_open_session_is_bounded_and_frees_the_port(pki):
    async def main():
        srv = Server(pki.server.server_context())
        await srv.__aenter__()
        async with aiohttp.ClientSession() as session:
            ws = await transport.connect_ws(session, srv.url, pki.client.client_context(),
                                            max_msg_size=MAX_MSG)
            start = asyncio.get_running_loop().time()
            await transport.stop_server(srv.runner)
            # shutdown_timeout=1.0, then the cancelled handler closes the socket.
            assert asyncio.get_running_loop().time() - start < 5
            msg = await ws.receive(timeout=5)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR)
            await ws.close()
        with socket.socket() as s:
            s.bind(("127.0.0.1", srv.port))
    _run(main())


def test_insecure_mode_warns_once_and_has_no_identity(pki, monkeypatch, caplog):
    monkeypatch.setattr(transport, "_warned_insecure", set())

    async def main():
        async with Server(None) as srv:
            await _echo(srv.url, None)
            await _echo(srv.url, None)
            assert srv.seen[0]["peer"].startswith("unauthenticated 127.0.0.1")
        async with Server(None):
            pass
    with caplog.at_level(logging.WARNING, logger="replicator.transport"):
        _run(main())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # one for the server side, one for the client side
    assert all("unauthenticated plaintext" in w for w in warnings)


# -- TLS files -------------------------------------------------------------------------

def test_contexts_are_mutual_tls_1_2_plus(pki):
    server = pki.server.server_context()
    client = pki.client.client_context()
    for ctx in (server, client):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert client.check_hostname
    # Only the cluster CA is trusted, not the system store.
    assert [c["subject"] for c in client.get_ca_certs()] == [
        ((("commonName", "ZODB replication CA"),),)]


@pytest.mark.parametrize("factory", [transport.server_ssl_context, transport.client_ssl_context])
def test_missing_files_are_all_listed(tmp_path, factory):
    with pytest.raises(ConfigError) as info:
        factory(tmp_path / "ca.pem", tmp_path / "n.pem", tmp_path / "n.key")
    assert info.value.problems == [f"CA file {tmp_path}/ca.pem: no such file",
                                   f"certificate {tmp_path}/n.pem: no such file",
                                   f"key {tmp_path}/n.key: no such file"]


def test_corrupt_files_are_all_listed(tmp_path, pki):
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    (tmp_path / "n.pem").write_bytes(b"\x00\x01 binary")
    (tmp_path / "n.key").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    files = transport.TLSFiles(tmp_path / "ca.pem", tmp_path / "n.pem", tmp_path / "n.key")
    with pytest.raises(ConfigError) as info:
        files.validate()
    problems = info.value.problems
    assert len(problems) == 3
    assert problems[0].startswith(f"CA file {tmp_path}/ca.pem: not a PEM certificate")
    assert problems[1].startswith(f"certificate {tmp_path}/n.pem: not a PEM certificate")
    assert problems[2].startswith(f"key {tmp_path}/n.key: not a PEM private key")


def test_mismatched_key_and_foreign_certificate(pki):
    # The intruder's certificate with our client's key, checked against our CA.
    files = transport.TLSFiles(pki.ca, pki.other.cert, pki.client.key)
    with pytest.raises(ConfigError) as info:
        files.client_context()
    text = str(info.value)
    assert f"key {pki.client.key} does not match certificate {pki.other.cert}" in text
    assert f"is not signed by the CA in {pki.ca}" in text


def test_node_certificate_given_as_ca(pki):
    with pytest.raises(ConfigError, match="is not a CA certificate"):
        transport.server_ssl_context(pki.client.cert, pki.server.cert, pki.server.key)


def test_encrypted_key_is_refused(tmp_path, pki):
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_pem_private_key(pki.client.key.read_bytes(), password=None)
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(ConfigError, match="encrypted"):
        transport.client_ssl_context(pki.ca, pki.client.cert, encrypted)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_key(tmp_path, pki):
    key = tmp_path / "n.key"
    key.write_bytes(pki.client.key.read_bytes())
    key.chmod(0)
    with pytest.raises(ConfigError, match="permission denied"):
        transport.client_ssl_context(pki.ca, pki.client.cert, key)


def test_world_readable_key_is_warned_about(tmp_path, pki, caplog):
    key = tmp_path / "n.key"
    key.write_bytes(pki.client.key.read_bytes())
    key.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="replicator.transport"):
        transport.client_ssl_context(pki.ca, pki.client.cert, key)
    assert "readable by other users" in caplog.text


def test_node_keys_from_certs_are_0600(pki):
    for files in (pki.server, pki.client):
        assert files.key.stat().st_mode & 0o777 == 0o600
