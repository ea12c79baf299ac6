"""GET /metrics over mutual TLS: Prometheus text that agrees with GET /status."""

from __future__ import annotations

import asyncio
import logging
import time

import ZODB
from prometheus_client.parser import text_string_to_metric_families
from ZODB.FileStorage import FileStorage

from replicator.config import Address, PrimaryConfig, SecondaryConfig
from replicator.control import call
from replicator.secondary import Secondary
from replicator.status import render
from replicator.tid import tid_time
from replicator.transport import client_ssl_context
from replicator.wrappers import PrimaryStorage
from tests.helpers import free_port
from tests.integration.test_replication import make_source, running_primary, tls, wait_equal_tid


async def scrape_text(port: int, tls_dir) -> str:
    import aiohttp

    t = tls(tls_dir, "secondary")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"https://127.0.0.1:{port}/metrics",
                            ssl=client_ssl_context(t.ca, t.cert, t.key)) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            return await resp.text()


async def scrape(port: int, tls_dir) -> dict[str, list]:
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(await scrape_text(port, tls_dir)):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict, name: str, **labels) -> float:
    matching = [s.value for s in samples[name] if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matching) == 1, (name, labels, samples.get(name))
    return matching[0]


def test_primary_and_secondary_metrics_agree_with_status(tmp_path, tls_dir):
    db, work = make_source(tmp_path, 30)

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir) as primary:
            config = SecondaryConfig(storage=str(tmp_path / "dst.fs"), blob_dir=str(tmp_path / "dst-blobs"),
                                     primary=Address("127.0.0.1", primary.port), listen=Address("127.0.0.1", 0),
                                     tls=tls(tls_dir, "secondary"), node="dst").validate()
            secondary = Secondary(config)
            await secondary.open()
            task = asyncio.create_task(secondary.run())
            try:
                await wait_equal_tid(primary, secondary, target=db.storage.lastTransaction())
                for _ in range(100):  # the Ack is on its way
                    if primary.status()["secondaries"][0]["lag_transactions"] == 0:
                        break
                    await asyncio.sleep(0.02)
                p = await scrape(primary.port, tls_dir)
                s = await scrape(secondary.port, tls_dir)
                status = primary.status()
                assert value(p, "replicator_info", role="primary") == 1
                assert value(p, "replicator_transactions") == status["transactions"]
                assert value(p, "replicator_secondary_lag_transactions", secondary="dst") == 0
                assert value(p, "replicator_secondaries") == 1
                assert value(p, "replicator_sent_bytes_total") == status["bytes_sent"] > 0
                assert value(s, "replicator_info", role="secondary") == 1
                assert value(s, "replicator_connected") == 1
                assert value(s, "replicator_lag_seconds") == 0
                assert value(s, "replicator_applied_transactions_total") == secondary.progress.txns_applied > 0
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await secondary.close()

    asyncio.run(scenario())
    work.close()
    db.close()


def test_synchronous_replication_is_visible_in_metrics(tmp_path, tls_dir):
    """An embedded primary with sync-count 1 and no secondary degrades (fallback async) and says so."""
    base = FileStorage(str(tmp_path / "p.fs"))
    config = PrimaryConfig(storage=str(tmp_path / "p.fs"), listen=Address("127.0.0.1", 0),
                           tls=tls(tls_dir, "primary"), node="p", sync_count=1, sync_timeout=0.3,
                           sync_fallback="async")
    storage = PrimaryStorage(base, config.validate())
    db = ZODB.DB(storage)  # creating the root commits once: it times out and degrades
    try:
        with db.transaction() as conn:
            conn.root()["x"] = 1
        with db.transaction() as conn:
            conn.root()["x"] = 2  # degraded: returns without waiting again (no second timeout)
        assert storage.sync_stats["timeouts"] == 1
        samples = asyncio.run(scrape(storage.port, tls_dir))
        assert value(samples, "replicator_sync_required") == 1
        assert value(samples, "replicator_sync_degraded") == 1
        assert value(samples, "replicator_sync_timeouts_total") >= 1
        assert value(samples, "replicator_sync_commits_total", mode="asynchronous") >= 2
        status = asyncio.run(call(f"127.0.0.1:{storage.port}", "GET", "/status", tls(tls_dir, "secondary")))
        assert status["sync"]["degraded"] is True
    finally:
        db.close()


def test_a_secondary_left_out_of_sync_names_is_named_when_commits_are_not_acknowledged(
        tmp_path, tls_dir, caplog):
    """sync-names with a typo: the connected standby is not waited for, and the log says so."""
    base = FileStorage(str(tmp_path / "p.fs"))
    config = PrimaryConfig(storage=str(tmp_path / "p.fs"), listen=Address("127.0.0.1", 0),
                           tls=tls(tls_dir, "primary"), node="p", sync_count=1, sync_timeout=0.5,
                           sync_fallback="async", sync_names=("stanby",))
    storage = PrimaryStorage(base, config.validate())

    async def scenario() -> None:
        secondary = Secondary(SecondaryConfig(storage=str(tmp_path / "dst.fs"),
                                              primary=Address("127.0.0.1", storage.port),
                                              tls=tls(tls_dir, "secondary"), node="standby").validate())
        await secondary.open()
        task = asyncio.create_task(secondary.run())
        try:
            while not storage.primary.sessions:
                await asyncio.sleep(0.02)
            db = await asyncio.to_thread(ZODB.DB, storage)  # its first commit times out and degrades
            await asyncio.to_thread(db.close)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await secondary.close()

    with caplog.at_level(logging.ERROR, logger="replicator"):
        asyncio.run(scenario())
    degraded = [r.getMessage() for r in caplog.records if "DEGRADED" in r.getMessage()]
    assert degraded and "not in sync-names, so not waited for: standby" in degraded[0], caplog.text


def test_a_disconnected_secondary_does_not_claim_to_be_current(tmp_path, tls_dir):
    """The primary goes away and commits on: the secondary cannot know how far behind it is, and says so."""
    db, work = make_source(tmp_path, 20)

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir) as primary:
            config = SecondaryConfig(storage=str(tmp_path / "dst.fs"), blob_dir=str(tmp_path / "dst-blobs"),
                                     primary=Address("127.0.0.1", primary.port), listen=Address("127.0.0.1", 0),
                                     tls=tls(tls_dir, "secondary"), node="dst", reconnect_min=0.05,
                                     reconnect_max=0.3)
            secondary = Secondary(config.validate())
            await secondary.open()
            task = asyncio.create_task(secondary.run())
            await wait_equal_tid(primary, secondary, target=db.storage.lastTransaction())
            assert secondary.status()["lag_seconds"] == 0.0
            assert secondary.status().get("lag_exact") is not False
        try:
            await asyncio.to_thread(work.commit_random, 30)  # unseen: nobody streams them
            for _ in range(500):
                if not secondary.progress.connected:
                    break
                await asyncio.sleep(0.02)
            assert not secondary.progress.connected
            await asyncio.sleep(1.2)
            status = secondary.status()
            assert status["connected"] is False
            assert status["lag_seconds"] >= 1.2
            assert status["lag_exact"] is False
            assert status["lag_last_known_seconds"] == 0.0
            s = await scrape(secondary.port, tls_dir)
            assert value(s, "replicator_connected") == 0
            assert value(s, "replicator_lag_exact") == 0
            assert value(s, "replicator_lag_seconds") >= 1.2
            assert value(s, "replicator_primary_last_heard_timestamp_seconds") == status["last_heard_at"]
            text = render([{**status, "url": "https://dst/status"}], now=time.time())
            assert "lag           unknown, disconnected: the primary was last heard from 1." in text, text
            assert "(this node 0.000s behind it then); reported as 1." in text, text
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await secondary.close()

    asyncio.run(scenario())
    work.close()
    db.close()


def test_a_secondary_never_connected_reports_its_lag_as_unknown(tmp_path, tls_dir):
    async def scenario() -> None:
        config = SecondaryConfig(storage=str(tmp_path / "dst.fs"), blob_dir=str(tmp_path / "dst-blobs"),
                                 primary=Address("127.0.0.1", free_port()), listen=Address("127.0.0.1", 0),
                                 tls=tls(tls_dir, "secondary"), node="dst", reconnect_min=0.05,
                                 reconnect_max=0.3).validate()
        secondary = Secondary(config)
        await secondary.open()
        task = asyncio.create_task(secondary.run())
        try:
            await asyncio.sleep(0.3)
            status = secondary.status()
            assert status["connected"] is False
            assert status["lag_seconds"] is None
            assert status["lag_exact"] is False
            s = await scrape(secondary.port, tls_dir)
            assert value(s, "replicator_connected") == 0
            assert "replicator_lag_seconds" not in s
            text = render([{**status, "url": "https://dst/status"}], now=time.time())
            assert "  lag           unknown   applied 0 txns" in text, text
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await secondary.close()

    asyncio.run(scenario())


def test_an_empty_secondary_lag_counts_from_the_primary_first_transaction(tmp_path, tls_dir, monkeypatch):
    """Not from the all-zero TID (1970): an empty secondary is behind by the primary's history, not 56 years."""
    db, work = make_source(tmp_path, 20)
    first = next(iter(db.storage.iterator())).tid
    head = db.storage.lastTransaction()
    expected = round(tid_time(head) - tid_time(first), 6)
    gate = asyncio.Event()
    apply_loop = Secondary._apply_loop

    async def held_apply_loop(self, ws, conn, queue):
        await gate.wait()
        await apply_loop(self, ws, conn, queue)

    monkeypatch.setattr(Secondary, "_apply_loop", held_apply_loop)

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir) as primary:
            config = SecondaryConfig(storage=str(tmp_path / "dst.fs"), blob_dir=str(tmp_path / "dst-blobs"),
                                     primary=Address("127.0.0.1", primary.port), listen=Address("127.0.0.1", 0),
                                     tls=tls(tls_dir, "secondary"), node="dst").validate()
            secondary = Secondary(config)
            await secondary.open()
            task = asyncio.create_task(secondary.run())
            try:
                for _ in range(500):  # connected, and the stream is arriving, but nothing is applied
                    if secondary.progress.head_tid == head and secondary.status()["lag_seconds"] is not None \
                            and primary.status()["secondaries"] \
                            and primary.status()["secondaries"][0]["sent_tid"] == head.hex():
                        break
                    await asyncio.sleep(0.02)
                status = secondary.status()
                assert status["last_tid"] == "0" * 16
                assert status["lag_seconds"] == expected
                assert status["lag_exact"] is True
                peer = primary.status()["secondaries"][0]
                assert peer["acked_tid"] == "0" * 16
                assert peer["lag_seconds"] == expected
                s = await scrape(secondary.port, tls_dir)
                assert value(s, "replicator_lag_seconds") == expected
                assert "replicator_last_transaction_timestamp_seconds" not in s
                p = await scrape(primary.port, tls_dir)
                assert value(p, "replicator_secondary_lag_seconds", secondary="dst") == expected
                text = render([{**status, "url": "https://dst/status"}], now=time.time())
                assert f"  lag           {expected:.3f}s   applied 0 txns" in text, text

                gate.set()
                await wait_equal_tid(primary, secondary, target=head)
                assert secondary.status()["lag_seconds"] == 0.0
            finally:
                gate.set()
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await secondary.close()

    asyncio.run(scenario())
    work.close()
    db.close()


def test_the_example_alert_rules_use_metrics_the_nodes_export(tmp_path, tls_dir):
    """docs/prometheus-alerts.yml names only metrics (and labels) a primary with synchronous
    replication, its secondary and a sidecar primary really export: a renamed metric must not
    leave a silent alert."""
    import re
    from pathlib import Path

    import yaml

    rules = yaml.safe_load((Path(__file__).parents[2] / "docs" / "prometheus-alerts.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert len(exprs) >= 10 and all(rule.get("annotations", {}).get("summary")
                                    for group in rules["groups"] for rule in group["rules"])

    base = FileStorage(str(tmp_path / "p.fs"))
    config = PrimaryConfig(storage=str(tmp_path / "p.fs"), listen=Address("127.0.0.1", 0),
                           tls=tls(tls_dir, "primary"), node="p", sync_count=1, sync_timeout=5,
                           sync_fallback="async")
    storage = PrimaryStorage(base, config.validate())
    db = ZODB.DB(storage)

    # A sidecar's storage, for the metrics only a sidecar exports.
    FileStorage(str(tmp_path / "src.fs"), blob_dir=str(tmp_path / "src-blobs")).close()

    async def scenario() -> dict[str, dict[str, set]]:
        secondary = Secondary(SecondaryConfig(
            storage=str(tmp_path / "dst.fs"), primary=Address("127.0.0.1", storage.port),
            listen=Address("127.0.0.1", 0), tls=tls(tls_dir, "secondary"), node="dst").validate())
        await secondary.open()
        task = asyncio.create_task(secondary.run())
        try:
            await asyncio.to_thread(commit_once, db)  # waits for the secondary's acknowledgement
            exported: dict[str, dict[str, set]] = {}  # series names -> label -> values
            async with running_primary(tmp_path, tls_dir, sidecar=True) as sidecar:
                texts = [await scrape_text(port, tls_dir) for port in (storage.port, secondary.port, sidecar.port)]
            for text in texts:
                for family in text_string_to_metric_families(text):
                    # A counter's series is NAME_total, also while it has no sample yet.
                    exported.setdefault(family.name + ("_total" if family.type == "counter" else ""), {})
                    for sample in family.samples:
                        labels = exported.setdefault(sample.name, {})
                        for key, val in sample.labels.items():
                            labels.setdefault(key, set()).add(val)
            return exported
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await secondary.close()

    try:
        exported = asyncio.run(scenario())
    finally:
        db.close()
    for expr in exprs:
        for name, matchers in re.findall(r"\b(replicator_[a-z_]+)(\{[^}]*\})?", expr):
            assert name in exported, (name, expr, sorted(exported))
            for key, op, val in re.findall(r'(\w+)\s*(=~|=|!=)\s*"([^"]*)"', matchers):
                if name == "replicator_info":
                    assert val in exported[name][key], (name, key, val)
                elif op == "=~" and name.endswith("_total"):
                    # A counter an alert takes the increase of is there, at 0, before its first
                    # event: a series that appears at 1 has no increase to alert on.
                    for alternative in val.split("|"):
                        assert alternative in exported[name].get(key, set()), (name, key, alternative)


def commit_once(db) -> None:
    with db.transaction() as conn:
        conn.root()["x"] = conn.root().get("x", 0) + 1


def test_a_secondary_back_on_an_idle_primary_reports_no_error(tmp_path, tls_dir):
    """The error of a lost link ends once the secondary is back and caught up, even if nothing was
    committed since (an idle night): an alert on replicator_error must not fire for ever."""
    from replicator.metrics import render_metrics
    from tests.helpers import until
    from tests.integration.test_replication import closed_source, running_secondary

    closed_source(tmp_path, 3)

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir) as primary, \
                running_secondary(tmp_path, tls_dir, primary.port) as (secondary, _):
            await wait_equal_tid(primary, secondary)
            first = set(primary.sessions)
            for ws, _ in list(primary._sockets.values()):
                await ws.close()
            await until(lambda: secondary.progress.last_error is not None, timeout=10, what="the lost link")
            await until(lambda: primary.sessions and set(primary.sessions) != first, timeout=10,
                        what="the reconnection")
            await until(lambda: secondary.progress.last_error is None, timeout=10,
                        what="the error cleared by a heartbeat while caught up")
            assert b"\nreplicator_error 0.0\n" in render_metrics(secondary.status)

    asyncio.run(scenario())
