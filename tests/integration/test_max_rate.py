"""--max-rate: a secondary on a shared WAN link takes no more of it than it is given.

A real primary and secondary over mutual TLS on 127.0.0.1; the limit holds
the secondary's reading, and TCP's window holds the primary back.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from replicator.config import MIN_RATE, Address, SecondaryConfig, parse_rate
from replicator.errors import ConfigError
from replicator.status import render
from tests.integration.test_replication import (
    assert_equal,
    closed_source,
    running_primary,
    running_secondary,
    wait_equal_tid,
)

RATE = 1 << 20


def test_a_catch_up_takes_no_more_of_the_link_than_max_rate(tmp_path, tls_dir):
    closed_source(tmp_path, 80)
    size = os.path.getsize(tmp_path / "src.fs") + sum(
        os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path / "src-blobs") for f in fs)
    assert size > 3 * RATE, size  # enough to tell a limit from none

    async def scenario() -> tuple[float, int]:
        async with running_primary(tmp_path, tls_dir) as primary:
            started = time.monotonic()
            async with running_secondary(tmp_path, tls_dir, primary.port, max_rate=float(RATE)) as (secondary, _):
                await wait_equal_tid(primary, secondary, timeout=120)
                took = time.monotonic() - started
                received = secondary.progress.bytes_received
                assert received >= 0.9 * size, (received, size)
                status = secondary.status()
                assert status["max_rate"] == RATE
                text = render([{**status, "url": "s"}], time.time())
                assert "connected, at most 1.0 MiB/s" in text, text
                return took, received

    took, received = asyncio.run(scenario())
    # The link carried at least the messages: at most one second's worth could go at full speed.
    assert took >= 0.9 * (received - RATE) / RATE, (took, received)
    assert_equal(tmp_path)


def test_max_rate_is_read_as_bytes_a_second():
    assert parse_rate("5M", "--max-rate") == 5 << 20
    assert parse_rate("500k", "--max-rate") == 500 << 10
    assert parse_rate("1.5MiB/s", "--max-rate") == 1.5 * (1 << 20)
    assert parse_rate("2000000", "--max-rate") == 2_000_000
    assert parse_rate("0", "--max-rate") is None and parse_rate(None, "--max-rate") is None
    for bad in ("fast", "-1", "5T", "10mb/s", "10Mbit"):  # a lower-case b would be bits: refused
        with pytest.raises(ConfigError, match="--max-rate: expected bytes a second"):
            parse_rate(bad, "--max-rate")
    with pytest.raises(ConfigError, match="too little to stream anything"):
        SecondaryConfig(storage="/tmp/x.fs", primary=Address("127.0.0.1", 1), insecure=True,
                        max_rate=MIN_RATE - 1).validate()
