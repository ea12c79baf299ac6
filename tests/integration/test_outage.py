"""A secondary that cannot reach its primary says so at WARNING, not too often, and says when it is back."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from replicator.config import Address, PrimaryConfig
from replicator.primary import Primary
from replicator.secondary import LinkLog
from tests.helpers import free_port
from tests.integration.test_replication import make_source, running_secondary, tls


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog) -> list[tuple[int, str]]:
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "replicator.secondary"]
    caplog.clear()
    return lines


def test_an_outage_warns_first_then_once_a_minute_and_when_it_ends(caplog):
    clock = Clock()
    link = LinkLog("primary.example:8100", interval=60.0, clock=clock)
    caplog.set_level(logging.INFO, logger="replicator.secondary")

    link.connected("p")  # the first connection is no news
    assert _lines(caplog) == []

    link.failed("TransportError: refused", 0.2, was_connected=False)
    [(level, text)] = _lines(caplog)
    assert level == logging.WARNING
    assert text == ("cannot connect to the primary: this secondary is not replicating; reconnecting to "
                    "primary.example:8100 in 0.20s (TransportError: refused)")

    for _ in range(5):  # retries within the minute: INFO only
        clock.now += 10
        link.failed("TransportError: refused", 10, was_connected=False)
    assert {level for level, _ in _lines(caplog)} == {logging.INFO}

    clock.now += 15  # 65 s down: a reminder, naming how long and why
    link.failed("TransportError: timed out", 30, was_connected=False)
    [(level, text)] = _lines(caplog)
    assert level == logging.WARNING
    assert text.startswith("still no connection to the primary after 1m05s and 7 attempts; reconnecting to "
                           "primary.example:8100 in 30.00s (TransportError: timed out)")

    clock.now += 30
    link.connected("p")
    [(level, text)] = _lines(caplog)
    assert level == logging.WARNING
    assert text == ("connected to the primary primary.example:8100 (p) again after 1m35s without a "
                    "connection (7 failed attempts)")


def test_a_flapping_link_warns_at_most_once_a_minute(caplog):
    clock = Clock()
    link = LinkLog("p:1", interval=60.0, clock=clock)
    caplog.set_level(logging.INFO, logger="replicator.secondary")
    link.failed("closed", 1.0, was_connected=True)
    assert [level for level, _ in _lines(caplog)] == [logging.WARNING]
    clock.now += 2
    link.connected("p")
    assert [level for level, _ in _lines(caplog)] == [logging.WARNING]  # it was warned about
    clock.now += 5
    link.failed("closed", 1.0, was_connected=True)  # again within the minute: INFO, and so is its end
    clock.now += 2
    link.connected("p")
    assert [level for level, _ in _lines(caplog)] == [logging.INFO, logging.INFO]
    clock.now += 60
    link.failed("closed", 1.0, was_connected=True)
    [(level, text)] = _lines(caplog)
    assert level == logging.WARNING and text.startswith("lost the connection to the primary; reconnecting")
    clock.now += 1
    link.connected("p")
    [(level, text)] = _lines(caplog)
    assert text.endswith("without a connection (1 failed attempt)"), text


def test_a_failure_already_logged_at_error_is_not_warned_again(caplog):
    clock = Clock()
    link = LinkLog("p:1", interval=60.0, clock=clock)
    caplog.set_level(logging.INFO, logger="replicator.secondary")
    link.failed("TLSError: certificate verify failed", 0.2, was_connected=False, logged=True)
    # Its retry's line does not say it again.
    assert _lines(caplog) == [(logging.INFO, "reconnecting to p:1 in 0.20s")]
    link.connected("p")
    assert [level for level, _ in _lines(caplog)] == [logging.WARNING]  # whoever saw the ERROR sees this
    # A full disk: each connection stands until the first write fails, logged at ERROR each time.
    for _ in range(3):
        clock.now += 5
        link.failed("StorageError: No space left on device", 5, was_connected=True, logged=True)
        link.connected("p")
    assert [level for level, _ in _lines(caplog)] == [logging.INFO] * 6  # not a warning per attempt


def test_a_real_secondary_warns_while_its_primary_is_away_and_when_it_is_back(tmp_path, tls_dir, caplog):
    db, work = make_source(tmp_path, 3)
    port = free_port()

    async def warnings_with(text: str, timeout: float = 20.0) -> str:
        for _ in range(int(timeout / 0.05)):
            found = [r.getMessage() for r in caplog.records
                     if r.levelno == logging.WARNING and r.name == "replicator.secondary" and text in r.getMessage()]
            if found:
                caplog.clear()
                return found[0]
            await asyncio.sleep(0.05)
        raise AssertionError(f"no WARNING with {text!r}: {caplog.text}")

    async def scenario() -> None:
        async with running_secondary(tmp_path, tls_dir, port, reconnect_min=0.05, reconnect_max=0.2) as (
                secondary, _task):
            secondary.link_log.interval = 1.0
            line = await warnings_with("cannot connect to the primary: this secondary is not replicating")
            assert f"reconnecting to 127.0.0.1:{port} in " in line and "Connection refused" in line
            line = await warnings_with("still no connection to the primary after ")
            assert "Connection refused" in line
            primary = Primary(PrimaryConfig(storage=str(tmp_path / "src.fs"), blob_dir=str(tmp_path / "src-blobs"),
                                            listen=Address("127.0.0.1", port), tls=tls(tls_dir, "primary"),
                                            node="p").validate())
            await primary.start()
            try:
                await warnings_with(f"connected to the primary 127.0.0.1:{port} (p) again after ")
                await asyncio.sleep(1.0)  # past the interval: the loss is news again
            finally:
                await primary.stop()
            line = await warnings_with("lost the connection to the primary; reconnecting to ")
            assert "primary said goodbye (shutdown)" in line

    with caplog.at_level(logging.INFO, logger="replicator"):
        asyncio.run(scenario())
    work.close()
    db.close()


def test_a_secondary_that_arrives_while_its_primary_stops_is_told_so_and_does_not_hold_the_stop(
        tmp_path, tls_dir, monkeypatch):
    """``stop()`` says goodbye to the sessions it knows, then closes the server: one that was
    still in its handshake then used to be served, and the server's clean-up waited out its
    timeout for it (a stop of ten seconds).  It is told the primary is stopping instead."""
    from tests.integration.test_failover import secondary_on, until

    db, work = make_source(tmp_path, 3)
    work.close()
    db.close()
    timings: dict[str, float] = {}

    async def scenario() -> None:
        primary = Primary(PrimaryConfig(storage=str(tmp_path / "src.fs"), blob_dir=str(tmp_path / "src-blobs"),
                                        listen=Address("127.0.0.1", 0), tls=tls(tls_dir, "primary"),
                                        node="p").validate())
        await primary.start()
        said_goodbye = primary._end_sessions

        async def then_a_secondary_arrives(goodbye) -> None:
            await said_goodbye(goodbye)
            # The secondary connects in the moment between the goodbyes and the server's close,
            # and stays until the stop is over.
            late, _ = await stack.enter_async_context(secondary_on(tmp_path, tls_dir, "late", primary.port))
            # Its Welcome comes before the goodbye, so it counts as connected for a moment:
            # wait for the goodbye's word, or for the session that must not be.
            await until(lambda: late.progress.last_error is not None or primary.sessions != {}, 20)
            timings["error"] = late.progress.last_error  # type: ignore[assignment]
            timings["served"] = primary.sessions != {}  # type: ignore[assignment]

        monkeypatch.setattr(primary, "_end_sessions", then_a_secondary_arrives)
        loop = asyncio.get_running_loop()
        async with contextlib.AsyncExitStack() as stack:
            began = loop.time()
            await primary.stop()
            timings["stop"] = loop.time() - began

    asyncio.run(scenario())
    assert "primary said goodbye (shutdown)" in str(timings["error"]), timings
    assert timings["served"] is False, timings
    # No timeout waited out: the secondary's own start and stop take well under one.
    assert timings["stop"] < 4.0, timings
