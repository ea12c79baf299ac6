"""One connected secondary per node name; a reconnecting secondary replaces its own silent connection.

Real Primary and Secondary objects over mutual TLS on 127.0.0.1, with real
FileStorage files.  The silent old connection is a real WebSocket that said
Hello and then stopped reading, which is what the primary sees of a
secondary whose link broke without a FIN.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import aiohttp
import pytest

from replicator.errors import RejectedError
from replicator.metrics import render_metrics
from replicator.protocol import PROTOCOL_VERSION, Connection, Goodbye, Hello, Reject, Role, Welcome
from replicator.status import render
from replicator.tid import Z64
from replicator.transport import client_ssl_context, connect_ws
from tests.helpers import until
from tests.integration.test_replication import (
    assert_equal,
    make_source,
    running_primary,
    running_secondary,
    wait_equal_tid,
)


def run_logged(scenario, caplog, logger: str, db, work) -> None:
    """Run ``scenario()`` with ``logger``'s INFO lines captured; close the source after."""
    try:
        with caplog.at_level(logging.INFO, logger=logger):
            asyncio.run(scenario())
    finally:
        work.close()
        db.close()


def test_a_second_secondary_under_a_taken_name_is_refused_until_the_first_leaves(tmp_path, tls_dir, caplog):
    db, work = make_source(tmp_path, 40)

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir) as primary:
            async with running_secondary(tmp_path, tls_dir, primary.port, name="dst") as (first, _):
                await wait_equal_tid(primary, first, target=db.storage.lastTransaction())
                # Another storage, another process's worth of secondary, the same node name.
                async with running_secondary(tmp_path, tls_dir, primary.port, name="dr",
                                             node="dst") as (second, task):
                    await until(lambda: second.progress.last_error is not None, what="the refusal")
                    error = second.progress.last_error
                    assert "duplicate" in error and "another secondary named 'dst'" in error, error
                    assert "node name of its own" in error
                    # Which connection holds the name: its address and port, and certificate.
                    held_by = primary.status()["secondaries"][0]["peer"]
                    assert re.fullmatch(r"127\.0\.0\.1:\d+ \(certificate secondary\)", held_by), held_by
                    assert f"(from {held_by})" in error
                    # Counted, for alerting on it.
                    assert primary.status()["refusals"]["duplicate"] >= 1
                    metrics = render_metrics(primary.status).decode()
                    assert re.search(r'^replicator_refused_secondaries_total\{code="duplicate"\} [1-9]', metrics,
                                     re.M), metrics
                    text = render([{**primary.status(), "url": "https://p/status"}], time.time())
                    assert re.search(r"^  refused +[1-9]\d* duplicate \(since start; .*0 dropped as silent$", text,
                                     re.M), text
                    # Refused, not stopped: it keeps trying; nothing was applied to it.
                    await until(lambda: primary.refusals["duplicate"] >= 3, what="more attempts")
                    assert not task.done()
                    assert second.progress.applied_tid == Z64
                    listed = primary.status()["secondaries"]
                    assert [s["node"] for s in listed] == ["dst"]
                    # The first one goes on replicating meanwhile.
                    await asyncio.to_thread(work.commit_random, 3)
                    await wait_equal_tid(primary, first, target=db.storage.lastTransaction())
                    await first.stop_following()
                    # The name is free: the second one gets in on its next attempt.
                    await wait_equal_tid(primary, second, target=db.storage.lastTransaction())
                    assert [s["node"] for s in primary.status()["secondaries"]] == ["dst"]

    run_logged(scenario, caplog, "replicator.primary", db, work)
    assert_equal(tmp_path, "dr")
    # Each attempt is counted; the log says it once (then every few minutes at most).
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refusing secondary")]
    assert len(refused) == 1, refused
    # Nor does a line per attempt say its session ended: only the two sessions served end.
    ended = [r.getMessage() for r in caplog.records if r.getMessage().startswith("session with")]
    assert len(ended) == 2, ended
    # It names the node as it named itself, and the certificate it came with.
    assert re.match(r"refusing secondary 'dst' from 127\.0\.0\.1:\d+ \(certificate secondary\): ", refused[0]), refused


def test_the_same_secondary_reconnecting_replaces_its_silent_connection(tmp_path, tls_dir, caplog):
    db, work = make_source(tmp_path, 20)

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir) as primary:
            instance = b"\x07" * 16
            ctx = client_ssl_context(tls_dir / "ca.pem", tls_dir / "secondary.pem", tls_dir / "secondary.key")
            async with aiohttp.ClientSession() as http:
                # A connection of "dst" that said Hello and then went silent.
                old = await connect_ws(http, f"wss://127.0.0.1:{primary.port}/replicate", ctx,
                                       max_msg_size=1 << 26)
                conn = Connection(Role.SECONDARY)
                await old.send_bytes(conn.send(Hello(PROTOCOL_VERSION, "dst", Z64, None, 0, " ", None,
                                                     instance)))
                conn.receive_data((await old.receive(timeout=10)).data)
                assert isinstance(conn.next_event(), Welcome)
                await until(lambda: len(primary.status()["secondaries"]) == 1, what="the old session")
                old_since = primary.status()["secondaries"][0]["connected_at"]

                # Another process under that name is refused while it stands...
                other = await connect_ws(http, f"wss://127.0.0.1:{primary.port}/replicate", ctx,
                                         max_msg_size=1 << 26)
                conn2 = Connection(Role.SECONDARY)
                await other.send_bytes(conn2.send(Hello(PROTOCOL_VERSION, "dst", Z64, None, 0, " ", None,
                                                        b"\x08" * 16)))
                conn2.receive_data((await other.receive(timeout=10)).data)
                refusal = conn2.next_event()
                assert isinstance(refusal, Reject) and refusal.code == "duplicate", refusal
                await other.close()

                # ...but the same process, back over a new connection, takes its place at once.
                async with running_secondary(tmp_path, tls_dir, primary.port, name="dst") as (secondary, _):
                    # Before its first Hello: its task starts at this block's first await.
                    secondary.instance = instance
                    await wait_equal_tid(primary, secondary, timeout=20, target=db.storage.lastTransaction())
                    listed = primary.status()["secondaries"]
                    assert len(listed) == 1 and listed[0]["connected_at"] > old_since, listed
                    # The old connection was ended by the primary, not left to time out
                    # (after what it had streamed to it before).
                    async def ended() -> aiohttp.WSMessage:
                        while (msg := await old.receive()).type is aiohttp.WSMsgType.BINARY:
                            pass  # what it streamed before, and heartbeats while it stays open
                        return msg

                    msg = await asyncio.wait_for(ended(), 15)
                    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                        aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR), msg
                    assert secondary.progress.last_error is None
                await old.close()

    run_logged(scenario, caplog, "replicator", db, work)
    assert any("connected again" in r.getMessage() and "dropping its previous connection" in r.getMessage()
               for r in caplog.records)
    assert_equal(tmp_path)


def test_a_lost_secondary_is_a_warning_that_says_why_and_a_goodbye_is_not(tmp_path, tls_dir, caplog):
    """An operator learns at once that a secondary went away, why, and when none is left: the
    primary's commits are then replicated nowhere.  A secondary that says goodbye (it is being
    stopped) ends its session quietly."""
    db, work = make_source(tmp_path, 5)

    async def session(http, ctx, port: int, node: str, goodbye: bool) -> None:
        ws = await connect_ws(http, f"wss://127.0.0.1:{port}/replicate", ctx, max_msg_size=1 << 26)
        conn = Connection(Role.SECONDARY)
        await ws.send_bytes(conn.send(Hello(PROTOCOL_VERSION, node, Z64, None, 0, " ", None, None)))
        conn.receive_data((await ws.receive(timeout=10)).data)
        assert isinstance(conn.next_event(), Welcome)
        if goodbye:
            await ws.send_bytes(conn.send(Goodbye("shutdown", "secondary stopping")))
        await ws.close()

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir) as primary:
            ctx = client_ssl_context(tls_dir / "ca.pem", tls_dir / "secondary.pem", tls_dir / "secondary.key")
            async with aiohttp.ClientSession() as http:
                await session(http, ctx, primary.port, "polite", goodbye=True)
                await until(lambda: not primary.sessions, what="the first session's end")
                await session(http, ctx, primary.port, "gone", goodbye=False)
                await until(lambda: not primary.sessions, what="the second session's end")
                await asyncio.sleep(0.2)

    run_logged(scenario, caplog, "replicator.primary", db, work)
    ended = [(r.levelname, r.getMessage()) for r in caplog.records
             if r.getMessage().startswith("session with") or r.getMessage().startswith("no secondary")]
    assert len(ended) == 3, ended  # two ends, one warning, and the primary's stop said nothing more
    assert ended[0][0] == "INFO" and re.fullmatch(
        r"session with secondary polite \(127\.0\.0\.1:\d+ \(certificate secondary\)\) ended at acked \S+.*: "
        r"it said goodbye \(shutdown\): secondary stopping; 0 secondaries still connected", ended[0][1]), ended
    assert ended[1][0] == "WARNING" and ended[1][1].startswith("session with secondary gone ("), ended
    assert ended[1][1].endswith(": it closed the connection without a goodbye; "
                                "0 secondaries still connected"), ended
    assert ended[2:] == [("WARNING", "no secondary is connected now: commits are replicated nowhere until one "
                                     "connects again")], ended


def test_a_secondary_being_stopped_says_goodbye(tmp_path, tls_dir, caplog):
    """Stopping a secondary (SIGTERM cancels its task) is planned: it tells the primary, whose
    log says so at INFO instead of warning of a lost secondary."""
    db, work = make_source(tmp_path, 5)

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir) as primary:
            async with running_secondary(tmp_path, tls_dir, primary.port, name="dst") as (secondary, _):
                await wait_equal_tid(primary, secondary, target=db.storage.lastTransaction())
            await until(lambda: not primary.sessions, what="the session's end")

    run_logged(scenario, caplog, "replicator.primary", db, work)
    ended = [r for r in caplog.records if r.getMessage().startswith("session with")]
    assert len(ended) == 1, [r.getMessage() for r in ended]
    assert ended[0].levelname == "INFO", ended[0].getMessage()
    assert ended[0].getMessage().endswith(": it said goodbye (shutdown): secondary stopping; "
                                          "0 secondaries still connected"), ended[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_a_name_in_sync_names_takes_the_certificate_of_that_name(tmp_path, tls_dir, caplog):
    """Any node certificate may name itself anything: under a name sync-names waits for, an
    impostor's acknowledgements would release commits the standby never got. It is refused
    for good (an operator must act), the real standby is served, and others are not bound."""
    db, work = make_source(tmp_path, 10)

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir, sync_count=1, sync_names=("standby",)) as primary:
            async with running_secondary(tmp_path, tls_dir, primary.port, name="impostor", node="standby",
                                         expect_failure=True) as (impostor, task):
                with pytest.raises(RejectedError) as refused:
                    await asyncio.wait_for(task, 20)
                assert refused.value.code == "identity"
                assert ("node name 'standby' is in this primary's sync-names, whose acknowledgements release "
                        "synchronous commits, so only the certificate issued for 'standby' may use it; this "
                        "secondary's certificate is 'secondary'") in str(refused.value), refused.value
                assert "`replicator certs issue standby`" in str(refused.value)
                assert impostor.progress.applied_tid == Z64 and not primary.acked_by_node
            assert primary.refusals["identity"] == 1
            assert re.search(r'^replicator_refused_secondaries_total\{code="identity"\} 1',
                             render_metrics(primary.status).decode(), re.M)
            async with running_secondary(tmp_path, tls_dir, primary.port, name="standby",
                                         cert="standby") as (standby, _):
                await wait_equal_tid(primary, standby, target=db.storage.lastTransaction())
                await until(lambda: primary.acked_by_node.get("standby") == db.storage.lastTransaction(),
                            what="the standby's acknowledgement")
            # A name sync-names does not list is anybody's, as before.
            async with running_secondary(tmp_path, tls_dir, primary.port, name="dr") as (dr, _):
                await wait_equal_tid(primary, dr, target=db.storage.lastTransaction())

    run_logged(scenario, caplog, "replicator", db, work)
