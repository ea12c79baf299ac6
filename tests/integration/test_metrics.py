"""GET /metrics over mutual TLS: Prometheus text that agrees with GET /status."""

from __future__ import annotations

import asyncio

import ZODB
from prometheus_client.parser import text_string_to_metric_families
from ZODB.FileStorage import FileStorage

from replicator.config import Address, PrimaryConfig, SecondaryConfig
from replicator.control import call
from replicator.secondary import Secondary
from replicator.transport import client_ssl_context
from replicator.wrappers import PrimaryStorage
from tests.integration.test_replication import make_source, running_primary, tls, wait_equal_tid


async def scrape(port: int, tls_dir) -> dict[str, list]:
    import aiohttp

    t = tls(tls_dir, "secondary")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"https://127.0.0.1:{port}/metrics",
                            ssl=client_ssl_context(t.ca, t.cert, t.key)) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
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
