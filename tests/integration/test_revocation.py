"""A revoked certificate is refused and its connections closed, without a restart.

Real Primary and Secondary nodes over mutual TLS on 127.0.0.1, a private
copy of the session's CA whose ca.pem the test revokes certificates in, as
an operator copies the new file to each node; each node looks at its files
when the test says (as on SIGHUP), so that which side closes what is known.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import pytest

from replicator import credentials
from replicator.certs import issue_node, renew_node, revoke
from replicator.errors import ConfigError, TLSError
from replicator.metrics import render_metrics
from replicator.status import render
from replicator.transport import client_ssl_context, connect_ws
from tests.helpers import refused_at_handshake, until
from tests.integration.test_replication import (
    make_source,
    running_primary,
    running_secondary,
    tls,
    wait_equal_tid,
)


async def _status_connection(port: int, tls_dir, name: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection of ``name``'s certificate that read one /status and stays open."""
    paths = tls(tls_dir, name)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_ssl_context(paths.ca, paths.cert, paths.key))
    writer.write(b"GET /status HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    return reader, writer


def test_revoked_certificates_are_refused_and_their_connections_closed(tmp_path, own_tls, monkeypatch, caplog):
    monkeypatch.setattr(credentials, "CHECK_INTERVAL", 3600)
    db, work = make_source(tmp_path, 5)

    async def scenario() -> None:
        async with running_primary(tmp_path, own_tls) as primary, \
                running_secondary(tmp_path, own_tls, primary.port) as (secondary, _):
            await wait_equal_tid(primary, secondary)
            first_session = set(primary.sessions)
            reader, writer = await _status_connection(primary.port, own_tls, "tertiary")

            # 1. tertiary revoked: its open connection is closed, the secondary's session goes on.
            revoke(own_tls, "tertiary", reason="key-compromise")
            assert primary.credentials.check(asked=True)
            assert secondary.credentials.check(asked=True)
            async with asyncio.timeout(10):
                while await reader.read(1 << 16):
                    pass  # the rest of the answer, then the close
            writer.close()
            work.commit_random(2)
            await wait_equal_tid(primary, secondary)
            assert set(primary.sessions) == first_session
            # Status and /metrics say how many the loaded file revokes: an operator compares the nodes.
            assert primary.served_status()["tls"]["revoked"] == 1
            assert b"replicator_tls_revoked_certificates 1.0" in render_metrics(primary.served_status)
            assert "; its CA file revokes 1 certificate(s)" in render([{**primary.served_status(), "url": "p"}],
                                                                       time.time())

            # Our own client refuses to present a revoked certificate at all ...
            with pytest.raises(ConfigError, match="tertiary.pem: CN=tertiary .* was revoked by the CA"):
                await _status_connection(primary.port, own_tls, "tertiary")
            # ... and a client that does (plain OpenSSL) is refused at the handshake, counted and logged.
            refused = primary.refused_handshakes.counts["certificate"]
            await refused_at_handshake(primary, own_tls, "tertiary")

            # 2. The secondary's own certificate revoked: the primary closes its session and refuses
            # its reconnections; the secondary, given the same ca.pem, keeps what it has and says why.
            revoke(own_tls, "secondary")
            assert not secondary.credentials.check(asked=True)
            assert "was revoked by the CA" in secondary.credentials.reload_error
            assert primary.credentials.check(asked=True)
            await until(lambda: set(primary.sessions) != first_session, timeout=10,
                        what="the revoked secondary's session closed")
            await until(lambda: primary.refused_handshakes.counts["certificate"] >= refused + 2, timeout=10,
                        what="the secondary's reconnection refused")
            assert not primary.sessions

            # 3. Renewed (a new key and serial): it loads the files and replicates again.
            renew_node(own_tls, "secondary")
            assert secondary.credentials.check(asked=True)
            assert secondary.credentials.reload_error is None
            work.commit_random(2)
            await wait_equal_tid(primary, secondary)

            # 4. A client given the list refuses a revoked server at the handshake, and says why.
            revoke(own_tls, "primary")
            paths = tls(own_tls, "tertiary-renewed")
            async with aiohttp.ClientSession() as session:
                with pytest.raises(TLSError, match="certificate revoked") as refusal:
                    await connect_ws(session, f"wss://127.0.0.1:{primary.port}/replicate",
                                     client_ssl_context(paths.ca, paths.cert, paths.key), max_msg_size=1 << 20)
            assert "on the revocation list in this node's CA file" in (refusal.value.hint or "")
            # The secondary, looking at the file, closes its link to the primary.
            assert secondary.credentials.check(asked=True)
            await until(lambda: not primary.sessions, timeout=10, what="the secondary closes its link")

    issue_node(own_tls, "tertiary-renewed")
    try:
        with caplog.at_level(logging.INFO, logger="replicator"):
            asyncio.run(scenario())
    finally:
        work.close()
        db.close()
    messages = [r.getMessage() for r in caplog.records]
    closed = [m for m in messages if m.startswith("closing the connection")]
    assert any("of client" in m and "CN=tertiary" in m and "reason key-compromise" in m for m in closed), closed
    assert any("of client" in m and "CN=secondary" in m for m in closed), closed
    assert any("to the primary" in m and "CN=primary" in m and "was revoked" in m for m in closed), closed
    assert any("refused a TLS connection" in m and "certificate revoked" in m and "`replicator certs renew NAME`"
               in m for m in messages), messages
    assert any("revokes 1 more certificate(s)" in m for m in messages), messages
