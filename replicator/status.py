"""``replicator status``: fetch ``GET /status`` from nodes and show it to people.

Each node answers with JSON describing itself (see ``Primary.status`` and
``Secondary.status``); this module only fetches and renders.
"""

from __future__ import annotations

import asyncio
import datetime

import aiohttp

from .config import TLSPaths
from .protocol.events import printable
from .transport import client_ssl_context, request_error

__all__ = ["alarms", "fetch_all", "node_alarms", "render", "size_text", "split_brain", "takes_writes"]


def _url(text: str, insecure: bool) -> str:
    from .control import check_scheme

    check_scheme(text, insecure)
    if "://" in text:
        base = text
    else:
        base = ("http://" if insecure else "https://") + text
    return base.rstrip("/") + ("" if base.rstrip("/").endswith("/status") else "/status")


async def fetch_all(targets: list[str], tls: TLSPaths | None, insecure: bool,
                    timeout: float = 5.0) -> list[dict]:
    """GET /status from every target at once; an unreachable one becomes an error entry."""
    ssl_ctx = None if insecure or tls is None else client_ssl_context(tls.ca, tls.cert, tls.key)

    async def one(session: aiohttp.ClientSession, target: str) -> dict:
        url = _url(target, insecure)
        try:
            async with session.get(url, ssl=ssl_ctx if ssl_ctx is not None else False) as resp:
                resp.raise_for_status()
                data = await resp.json()
                data["url"] = url
                return data
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return {"url": url, "unreachable": True, "error": str(request_error("GET", url, exc, timeout=timeout))}

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        return list(await asyncio.gather(*(one(session, t) for t in targets)))


def _when(seconds: float | None) -> str:
    if not seconds:
        return "-"
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def size_text(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def alarms(r: dict, now: float, max_lag: float | None = None) -> list[tuple[str, str]]:
    """The states an operator must not miss, as (flag, line): no writes, no synchronous commits,
    nothing replicated (a secondary stopped or disconnected, a primary nobody follows), a lag past
    ``max_lag`` seconds, a certificate about to expire. ``replicator status`` exits 8 on any."""
    found: list[tuple[str, str]] = []
    if r.get("stale"):
        found.append(("STALE", "takes no writes and streams to nobody: "
                                f"{r.get('fenced') or 'a newer epoch exists'}"))
    elif r.get("fenced") and r.get("superseded"):
        found.append(("SUPERSEDED", f"takes no writes for good: {r['fenced']}; then superseded "
                                     f"{r['superseded']}, so its fence cannot be undone"))
    elif r.get("fenced"):
        found.append(("FENCED", f"takes no writes: {r['fenced']}"))
    elif _writer_gone(r):
        found.append(("NO WRITER", "takes no writes: no process has the storage open for writing (its ZEO "
                                   "server is stopped), so there is nothing new to replicate"))
    sync = r.get("sync") or {}
    if sync.get("count") and sync.get("degraded"):
        found.append(("SYNC DEGRADED", "commits return unreplicated (asynchronous) until enough secondaries are "
                                        f"connected again (needs {_sync_quorum(sync)}): "
                                        f"{sync.get('async_commits', 0)} commits so far, "
                                        f"{sync.get('timeouts', 0)} timed out"))
    if sync.get("count") and sync.get("waiting"):
        found.append(("SYNC WAITING", f"{sync['waiting']} commit(s) wait past sync-timeout for acknowledgements "
                                       f"(needs {_sync_quorum(sync)}; fallback wait): their clients are held, and "
                                       "new commits queue behind them, until enough secondaries connect and "
                                       "acknowledge"))
    if r.get("role") == "secondary":
        if r.get("error"):
            found.append(("STOPPED", f"follows no primary until an operator acts: {r['error']}"))
        elif not r.get("connected"):
            why = r.get("last_error") or "no connection yet"
            found.append(("DISCONNECTED", f"not connected to its primary {r.get('primary')}, so nothing new is "
                                           f"replicated here: {why}"))
        lag = r.get("lag_seconds")
        if max_lag is not None and lag is not None and lag > max_lag:
            found.append(("LAGGING", f"{lag:.1f}s behind its primary (more than --max-lag {max_lag:g})"))
    elif r.get("role") == "primary" and not r.get("fenced") and not r.get("stale"):
        peers = r.get("secondaries") or []
        if not peers:
            found.append(("NO SECONDARY", "no secondary is connected: its commits are replicated nowhere"))
        for peer in peers:
            lag = peer.get("lag_seconds")
            if max_lag is not None and lag is not None and lag > max_lag:
                found.append(("LAGGING", f"secondary {peer.get('node')} is {lag:.1f}s behind "
                                          f"(more than --max-lag {max_lag:g})"))
    found.extend(("CERTIFICATE", text) for text in _certificate_alarms(r.get("tls") or {}, now))
    for peer in r.get("secondaries") or []:
        not_after = peer.get("certificate_not_after")
        if not_after is not None and (not_after - now) / 86400 < CERTIFICATE_ALARM_DAYS:
            days = (not_after - now) / 86400
            when = f"expired on {_day(not_after)}" if days <= 0 else \
                f"expires in {days:.0f} days ({_day(not_after)})"
            found.append(("CERTIFICATE", f"the certificate of secondary {peer.get('node')} {when}: renew it "
                                          "on that node"))
    return found


def _writer_gone(r: dict) -> bool:
    """A sidecar primary that can tell there is no ZEO server beside it (none has its storage open)."""
    return (r.get("role") == "primary" and bool(r.get("sidecar")) and bool(r.get("writer_known"))
            and not r.get("writer") and not r.get("fenced") and not r.get("stale"))


def takes_writes(status: dict) -> bool:
    """Whether a node's status says it takes writes; a node that does not say, its fence says."""
    takes = status.get("takes_writes")
    if takes is None:
        takes = not status.get("fenced") and not status.get("stale")
    return bool(takes)


def _primary_taking_writes(r: dict) -> bool:
    """A primary that takes writes; a promoted `replicator secondary` only through a ZEO server."""
    return (r.get("role") == "primary" and not r.get("fenced") and not r.get("stale")
            and r.get("serves_zeo", True) and takes_writes(r))


def _address(url: object) -> str:
    """HOST:PORT of a node's status URL, as the commands take it."""
    text = str(url)
    for prefix in ("https://", "http://"):
        text = text.removeprefix(prefix)
    return text.removesuffix("/status")


def split_brain(results: list[dict]) -> list[list[tuple[str, str]]]:
    """Per node, the alarm that another node given to the same command takes writes to the same
    database (its history then forks): both are flagged, the one of the older epoch named as
    the one to fence."""
    found: list[list[tuple[str, str]]] = [[] for _ in results]
    writers: dict[str, list[int]] = {}
    for i, r in enumerate(results):
        if not r.get("unreachable") and r.get("database") and _primary_taking_writes(r):
            writers.setdefault(r["database"], []).append(i)
    for indexes in writers.values():
        if len(indexes) < 2:
            continue
        newest = max(results[i].get("epoch") or 0 for i in indexes)
        for i in indexes:
            others = ", ".join(f"{results[j].get('node')} ({results[j].get('url')}, epoch {results[j].get('epoch')})"
                               for j in indexes if j != i)
            older = [results[j] for j in indexes if (results[j].get("epoch") or 0) < newest]
            advice = ("fence " + ", ".join(f"`replicator fence {_address(o.get('url'))} ...`" for o in older)
                      + f", of an older epoch than {newest}" if older else
                      "fence the one that should not be the primary (`replicator fence URL ...`)")
            found[i].append(("TWO PRIMARIES", f"{others} also takes writes to this database: clients of both "
                                              f"fork its history; {advice}, now"))
    return found


#: ``replicator status`` flags a certificate or CA expiring sooner than this.
CERTIFICATE_ALARM_DAYS = 30


def _certificate_alarms(tls: dict, now: float) -> list[str]:
    texts = []
    for what, key in (("this node's certificate", "not_after"), ("the CA", "ca_not_after")):
        if tls.get(key) is None:
            continue
        days = (tls[key] - now) / 86400
        if days <= 0:
            texts.append(f"{what} expired on {_day(tls[key])}: peers refuse its new connections; renew it")
        elif days < CERTIFICATE_ALARM_DAYS:
            texts.append(f"{what} expires in {days:.0f} days ({_day(tls[key])}): renew it")
    if tls.get("reload_error"):
        texts.append(f"its TLS files changed but were not loaded: {tls['reload_error']}")
    return texts


def _certificate_line(tls: dict, now: float) -> str | None:
    if not tls:
        return None
    days = (tls["not_after"] - now) / 86400
    renewed = f"; changed TLS files loaded {tls['reloads']} time(s)" if tls.get("reloads") else ""
    revoked = f"; its CA file revokes {tls['revoked']} certificate(s)" if tls.get("revoked") else ""
    return (f"  certificate   {tls.get('certificate')}, valid until {_day(tls['not_after'])} ({days:.0f} days)"
            f"{renewed}{revoked}")


def _day(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d")


def _sync_quorum(sync: dict) -> str:
    names = sync.get("names") or []
    return f"{sync.get('count')} of {', '.join(names)}" if names else f"{sync.get('count')}, any"


def _sync_line(sync: dict) -> str | None:
    if not sync.get("count") or sync.get("degraded"):
        return None
    return (f"  sync          each commit waits for secondaries' acknowledgements (needs {_sync_quorum(sync)}; "
            f"fallback {sync.get('fallback')}): {sync.get('synced_commits', 0)} synchronous, "
            f"{sync.get('async_commits', 0)} not, {sync.get('timeouts', 0)} timed out")


def _secondary_lag(r: dict, now: float) -> str:
    """A secondary's lag; disconnected, the primary's head is unknown, so it says what it knows."""
    lag = r.get("lag_seconds")
    if r.get("lag_exact", True) and lag is not None:
        return f"{lag:.3f}s"
    if r.get("connected") or r.get("last_heard_at") is None:
        return "unknown"
    ago = max(0.0, now - r["last_heard_at"])
    then = r.get("lag_last_known_seconds")
    return (f"unknown, disconnected: the primary was last heard from {ago:.1f}s ago"
            f"{f' (this node {then:.3f}s behind it then)' if then is not None else ''}"
            f"{f'; reported as {lag:.3f}s' if lag is not None else ''}")


def _peer_lag(s: dict) -> str:
    return "unknown" if s.get("lag_seconds") is None else f"{s['lag_seconds']:.3f}s"


def _followers(peers: list[dict]) -> list[str]:
    """The secondaries streaming from a node, one line each."""
    lines = [f"  secondaries   {len(peers)} connected"]
    for s in peers:
        lag_t = s.get("lag_transactions")
        lines.append(
            f"    - {s['node']} from {s['peer']}: acked {s['acked_tid']} "
            f"lag {_peer_lag(s)} / {lag_t if lag_t is not None else '?'} txns, "
            f"sent {size_text(s.get('bytes_sent'))}{' (deflated on the wire)' if s.get('compression') else ''}"
        )
    return lines


def _refused(r: dict) -> list[str]:
    """The secondaries a node serving others refused (by reason) or dropped as silent, and the
    TLS connections it refused, if any."""
    lines = []
    refused = r.get("refusals") or {}
    if refused or r.get("silent_secondaries_dropped"):
        counts = ", ".join(f"{count} {code}" for code, count in sorted(refused.items())) or "none"
        lines.append(f"  refused       {counts} (since start; this node's log names each); "
                     f"{r.get('silent_secondaries_dropped', 0)} dropped as silent")
    # Connections closed before their handshake (health checks, port scans) are no news.
    tls = {reason: n for reason, n in (r.get("refused_tls_connections") or {}).items()
           if reason not in ("closed", "timeout")}
    if tls:
        counts = ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in sorted(tls.items()))
        lines.append(f"  refused TLS   {counts} (connections refused at their handshake since start; "
                     "this node's log names each host)")
    return lines


def node_alarms(results: list[dict], now: float, max_lag: float | None = None) -> list[list[tuple[str, str]]]:
    """Each node's alarms: those across the nodes given together, then its own."""
    return [shared + ([] if r.get("unreachable") else alarms(r, now, max_lag))
            for r, shared in zip(results, split_brain(results), strict=True)]


def render(results: list[dict], now: float, max_lag: float | None = None) -> str:
    """A plain-text report, one block per node."""
    lines: list[str] = []
    for r, found in zip(results, node_alarms(results, now, max_lag), strict=True):
        if r.get("unreachable"):
            lines.append(f"{r['url']}: UNREACHABLE ({r['error']})")
            lines.append("")
            continue
        flags = "".join(f" [{flag}]" for flag in dict.fromkeys(flag for flag, _ in found))
        lines.append(f"{r['url']}: {r['role']} {r['node']}{flags}  storage {r['storage']}")
        lines.extend(f"  {flag:<13} {text}" for flag, text in found)
        lines.append(f"  last tid      {r['last_tid']}  committed {_when(r.get('last_tid_time'))}")
        if r["role"] == "primary":
            if r.get("promoted"):
                lines.append(f"  promoted      primary of epoch {r.get('epoch')} (was following {r.get('primary')})")
                if r.get("serves_zeo") and not (r.get("sync") or {}).get("count"):
                    # A standby's section has no sync-* options: say so, since it may replace a
                    # primary that had them.
                    lines.append("  sync          none: commits return without waiting for any secondary "
                                 "(sync-count belongs to a <replicated-primary> section; a standby promoted "
                                 "from <replicated-secondary> or `secondary --zeo` has none)")
            if r.get("transactions") is not None or not r.get("promoted"):
                epoch = "" if r.get("promoted") or r.get("epoch") is None else f"   epoch {r['epoch']}"
                lines.append(f"  transactions  {r.get('transactions') if r.get('transactions') is not None else '-'}"
                             f"   bytes streamed {size_text(r.get('bytes_sent'))}{epoch}")
            if r.get("sidecar") and not r.get("fenced") and not r.get("stale") and not _writer_gone(r):
                # A sidecar takes writes through the ZEO server beside it, if one runs (flagged if not).
                writer = (f"by {r['writer']}" if r.get("writer") else
                          "unknown: this system does not show which process has the storage open"
                          if r.get("writer_known") is False else
                          "none: no process has the storage open for writing (its ZEO server is stopped)")
                lines.append(f"  writes        {writer}")
            if r.get("recorded_packs"):
                lines.append(f"  packs         {r['recorded_packs']} recorded: a secondary away across them resumes")
            if r.get("error"):
                lines.append(f"  ERROR         {r['error']}")
            sync_line = _sync_line(r.get("sync") or {})
            if sync_line:
                lines.append(sync_line)
            lines.extend(_followers(r.get("secondaries", [])))
            lines.extend(_refused(r))
        else:
            state = "connected" if r.get("connected") else "DISCONNECTED"
            if r.get("connected") and r.get("compression"):
                state += ", stream deflated"
            if r.get("max_rate"):
                state += f", at most {size_text(r['max_rate'])}/s"
            lines.append(f"  primary       {r.get('primary')} ({r.get('primary_node') or '?'}) {state}")
            lines.append(f"  primary tid   {r.get('primary_last_tid')}")
            lines.append(f"  lag           {_secondary_lag(r, now)}   applied {r.get('transactions_applied')} "
                         f"txns, received {size_text(r.get('bytes_received'))}")
            # Refused for good (holding its port open to say so, inside a ZEO server), it is flagged
            # [STOPPED] above with its error.
            if not r.get("error") and r.get("last_error"):
                lines.append(f"  last error    {r['last_error']}")
            if r.get("secondaries"):  # a relay: secondaries follow this one
                lines.extend(_followers(r["secondaries"]))
            lines.extend(_refused(r))
        certificate = _certificate_line(r.get("tls") or {}, now)
        if certificate:
            lines.append(certificate)
        lines.append("")
    # What a node says of itself goes to a terminal: no escape sequence of its gets through.
    return "\n".join(printable(line) for line in lines).rstrip() + "\n"
