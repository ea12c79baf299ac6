"""Certificate roles: a monitor reads status only, an operator also controls, only a node replicates.

A real Primary over mutual TLS on 127.0.0.1 and real clients presenting
certificates of each role (``tls_dir`` has ``monitor`` and ``operator``),
through the same client code the commands use.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest

from replicator.config import Address, SecondaryConfig
from replicator.control import call
from replicator.errors import ConfigError, TLSError, UsageError
from replicator.transport import client_ssl_context, connect_ws
from tests.integration.test_failover import primary_on
from tests.integration.test_replication import closed_source, tls


@pytest.fixture
def source(tmp_path):
    return closed_source(tmp_path, 5)


async def _get(port: int, tls_dir, who: str, path: str) -> tuple[int, str]:
    t = tls(tls_dir, who)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"https://127.0.0.1:{port}{path}", ssl=client_ssl_context(t.ca, t.cert, t.key)) as r:
            return r.status, await r.text()


def test_what_each_role_may_ask_of_a_primary(source, tls_dir, caplog):
    async def scenario() -> None:
        async with primary_on(source, tls_dir, "src") as primary:
            port = primary.port
            for who in ("monitor", "operator", "secondary"):
                assert (await _get(port, tls_dir, who, "/status"))[0] == 200, who
                status, text = await _get(port, tls_dir, who, "/metrics")
                assert status == 200 and "replicator_info" in text, who

            # Fencing takes an operator's or a node's certificate.
            with pytest.raises(UsageError, match=r"HTTP 403\): the certificate 'monitor' has the role monitor, "
                                                 r"which may not change a node's state") as refused:
                await call(f"127.0.0.1:{port}", "POST", "/fence", tls(tls_dir, "monitor"))
            assert "--role operator" in refused.value.hint
            assert primary.fenced is None
            await call(f"127.0.0.1:{port}", "POST", "/fence", tls(tls_dir, "operator"))
            assert primary.fenced
            await call(f"127.0.0.1:{port}", "POST", "/unfence", tls(tls_dir, "operator"))
            assert primary.fenced is None

            # The database itself only goes to nodes.
            async with aiohttp.ClientSession() as http:
                for who in ("monitor", "operator"):
                    t = tls(tls_dir, who)
                    with pytest.raises(TLSError, match="refused this node's certificate for replication"):
                        await connect_ws(http, f"wss://127.0.0.1:{port}/replicate",
                                         client_ssl_context(t.ca, t.cert, t.key), max_msg_size=1 << 20)
                t = tls(tls_dir, "secondary")
                ws = await connect_ws(http, f"wss://127.0.0.1:{port}/replicate",
                                      client_ssl_context(t.ca, t.cert, t.key), max_msg_size=1 << 20)
                await ws.close()
            assert not primary.sessions and primary.bytes_sent == 0

    with caplog.at_level(logging.WARNING, logger="replicator"):
        asyncio.run(scenario())
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused ")]
    assert len(refusals) == 3, refusals
    assert any("GET /replicate" in r and "'operator' has the role operator" in r for r in refusals)


def test_a_node_will_not_start_with_a_certificate_of_another_role(tmp_path, tls_dir):
    (tmp_path / "x.fs").write_bytes(b"")
    config = SecondaryConfig(storage=str(tmp_path / "x.fs"), primary=Address("127.0.0.1", 1),
                             tls=tls(tls_dir, "monitor"))
    with pytest.raises(ConfigError, match="is a certificate of role monitor.*needs a node certificate"):
        config.validate()
    SecondaryConfig(storage=str(tmp_path / "x.fs"), primary=Address("127.0.0.1", 1),
                    tls=tls(tls_dir, "secondary")).validate()
