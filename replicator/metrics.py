"""``GET /metrics``: the node's status in Prometheus' text format.

Nothing is counted on the hot path: at each scrape the metrics are read off
the same status dictionary ``GET /status`` returns (primary, secondary,
promoted secondary, embedded primary with synchronous replication), so the
two always agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["render_metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _StatusCollector(Collector):
    def __init__(self, status: Callable[[], dict]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        s = self._status()
        role = s.get("role", "unknown")
        info = InfoMetricFamily("replicator", "This node: role, name, storage and protocol version.")
        info.add_metric([], {"role": role, "node": str(s.get("node")), "storage": str(s.get("storage")),
                             "protocol_version": str(s.get("protocol_version"))})
        yield info
        yield _gauge("replicator_epoch", "Epoch of this node's history (promotions so far).", s.get("epoch"))
        yield _gauge("replicator_last_transaction_timestamp_seconds",
                     "Commit time of this node's newest transaction (absent while it has none).",
                     s.get("last_tid_time") or None)
        yield _gauge("replicator_transactions", "Committed transactions in the primary's file.",
                     s.get("transactions"))
        yield _counter("replicator_sent_bytes", "Bytes streamed to secondaries.", s.get("bytes_sent"))
        yield _counter("replicator_received_bytes", "Bytes received from the primary.", s.get("bytes_received"))
        yield _counter("replicator_resumed_bytes", "Bytes of transactions cut off by a broken link that were kept, not fetched again.",
                       s.get("resumed_bytes"))
        yield _counter("replicator_applied_transactions", "Transactions applied from the primary.",
                       s.get("transactions_applied"))
        yield _gauge("replicator_lag_seconds", "How far this secondary's newest transaction is behind the "
                     "primary's, in commit time (from the primary's first one while empty). Disconnected: at "
                     "least the time since the primary was last heard from (see replicator_lag_exact). "
                     "Absent while unknown.", s.get("lag_seconds"))
        yield _gauge("replicator_lag_exact", "1 while replicator_lag_seconds is measured against the "
                     "primary's current head (connected), 0 while it is an estimate.",
                     None if "lag_exact" not in s else int(bool(s["lag_exact"])))
        yield _gauge("replicator_primary_last_heard_timestamp_seconds", "When this secondary last received "
                     "a message from its primary.", s.get("last_heard_at"))
        yield _gauge("replicator_connected", "1 while this secondary is connected to its primary.",
                     None if "connected" not in s else int(bool(s["connected"])))
        yield _gauge("replicator_fenced", "1 while this primary accepts no writes.",
                     None if "fenced" not in s else int(bool(s["fenced"])))
        yield _gauge("replicator_stale", "1 once this primary learned of a newer epoch.",
                     None if "stale" not in s else int(bool(s["stale"])))
        yield _gauge("replicator_storage_writer", "Sidecar primary: 1 while another process (its ZEO server) "
                     "has the storage open for writing, 0 while none does (the database takes no writes, "
                     "unless this node is fenced: then it holds the storage itself). Absent for an embedded "
                     "primary, and where the system does not show file locks.",
                     int(bool(s.get("writer"))) if s.get("sidecar") and s.get("writer_known") else None)
        yield _gauge("replicator_error", "1 while the node reports an error.",
                     int(bool(s.get("error") or s.get("last_error"))))
        peers = s.get("secondaries") or []
        lag_s = GaugeMetricFamily("replicator_secondary_lag_seconds", "Per connected secondary: commit-time "
                                  "lag of its acknowledged transaction.", labels=["secondary"])
        lag_t = GaugeMetricFamily("replicator_secondary_lag_transactions", "Per connected secondary: "
                                  "transactions not yet acknowledged.", labels=["secondary"])
        sent = CounterMetricFamily("replicator_secondary_sent_bytes", "Per connected secondary: bytes "
                                   "streamed in this session.", labels=["secondary"])
        expiry = GaugeMetricFamily("replicator_secondary_certificate_expiry_timestamp_seconds", "Per connected "
                                   "secondary: when the certificate it presented expires.", labels=["secondary"])
        for peer in peers:
            name = str(peer.get("node"))
            if peer.get("lag_seconds") is not None:
                lag_s.add_metric([name], float(peer["lag_seconds"]))
            if peer.get("lag_transactions") is not None:
                lag_t.add_metric([name], float(peer["lag_transactions"]))
            sent.add_metric([name], float(peer.get("bytes_sent") or 0))
            if peer.get("certificate_not_after") is not None:
                expiry.add_metric([name], float(peer["certificate_not_after"]))
        yield from (lag_s, lag_t, sent, expiry)
        yield _gauge("replicator_secondaries", "Connected secondaries.", len(peers))
        yield _gauge("replicator_recorded_packs", "Packs whose dropped transactions this primary keeps a "
                     "record of: a secondary away across them can resume.", s.get("recorded_packs"))
        if "refusals" in s:
            refused = CounterMetricFamily("replicator_refused_secondaries", "Secondaries this primary refused "
                                          "at their handshake, by reason (duplicate: a node name already "
                                          "connected; diverged, ahead, packed, version, stale, behind, "
                                          "corrupted: see docs/protocol.md).", labels=["code"])
            for code, count in sorted(_with_zeros(s.get("refusals"), REFUSAL_CODES).items()):
                refused.add_metric([str(code)], float(count))
            yield refused
        yield _counter("replicator_silent_secondaries_dropped", "Sessions dropped because the secondary's "
                       "host stopped answering.", s.get("silent_secondaries_dropped"))
        if "refused_tls_connections" in s:
            refused_tls = CounterMetricFamily("replicator_refused_tls_connections", "TLS connections this node "
                                              "refused at their handshake, by reason (certificate: its "
                                              "certificate failed the check; no_certificate; refused_by_client: "
                                              "the client refused this node's; not_tls; closed; timeout; other).",
                                              labels=["reason"])
            for reason, count in sorted(_with_zeros(s.get("refused_tls_connections"), TLS_REFUSAL_REASONS).items()):
                refused_tls.add_metric([str(reason)], float(count))
            yield refused_tls
        tls = s.get("tls")
        if tls:
            yield _gauge("replicator_tls_certificate_expiry_timestamp_seconds", "When this node's certificate "
                         "(the one it presents now) expires.", tls.get("not_after"))
            yield _gauge("replicator_tls_ca_expiry_timestamp_seconds", "When the first of the CA "
                         "certificates in this node's CA file expires.", tls.get("ca_not_after"))
            yield _gauge("replicator_tls_reload_failed", "1 while this node's TLS files changed on disk but "
                         "cannot be used (it keeps presenting the certificate it has).",
                         int(bool(tls.get("reload_error"))))
            yield _counter("replicator_tls_reloads", "Changed TLS files (a renewed certificate, a new CA "
                           "file) loaded without a restart.",
                           tls.get("reloads"))
            yield _gauge("replicator_tls_revoked_certificates", "Certificates the revocation lists in this "
                         "node's CA file revoke (`replicator certs revoke`): the same on every node once "
                         "each has loaded the new ca.pem.", tls.get("revoked", 0))
        sync = s.get("sync")
        if sync:
            yield _gauge("replicator_sync_required", "Synchronous replication: acknowledgements each commit "
                         "waits for (0: asynchronous).", sync.get("count"))
            yield _gauge("replicator_sync_degraded", "1 while synchronous replication has fallen back to "
                         "asynchronous.", int(bool(sync.get("degraded"))))
            commits = CounterMetricFamily("replicator_sync_commits", "Commits by how they returned.",
                                          labels=["mode"])
            commits.add_metric(["synchronous"], float(sync.get("synced_commits", 0)))
            commits.add_metric(["asynchronous"], float(sync.get("async_commits", 0)))
            yield commits
            yield _counter("replicator_sync_timeouts", "Commits whose wait for acknowledgements went past "
                           "sync-timeout (each counted once).", sync.get("timeouts"))
            yield _gauge("replicator_sync_waiting", "Commits waiting past sync-timeout now (sync-fallback "
                         "wait): their clients are held.", sync.get("waiting"))


#: Every code a primary refuses a secondary with, and every reason a node refuses a TLS
#: connection for: each is exported from the start, at 0, so that an alert on
#: ``increase(...)`` sees the first refusal (a series born at 1 has no increase).
REFUSAL_CODES = ("duplicate", "diverged", "ahead", "behind", "packed", "version", "stale", "corrupted",
                 "loop", "self", "foreign", "identity")
TLS_REFUSAL_REASONS = ("certificate", "no_certificate", "refused_by_client", "not_tls", "closed", "timeout",
                       "busy", "other")


def _with_zeros(counts: dict | None, known: tuple[str, ...]) -> dict:
    return {**dict.fromkeys(known, 0), **(counts or {})}


def _gauge(name: str, documentation: str, value: object) -> Metric:
    family = GaugeMetricFamily(name, documentation)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        family.add_metric([], float(value))
    return family


def _counter(name: str, documentation: str, value: object) -> Metric:
    family = CounterMetricFamily(name, documentation)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        family.add_metric([], float(value))
    return family


def render_metrics(status: Callable[[], dict]) -> bytes:
    """The Prometheus text exposition of ``status()``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatusCollector(status))
    return generate_latest(registry)
