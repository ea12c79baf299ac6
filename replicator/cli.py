"""The ``replicator`` command: parses options and config files, wires services, maps errors to exit codes.

Every option of ``primary`` and ``secondary`` may also come from a TOML file
given with ``--config`` (keys are the option names with dashes, e.g.
``tls-ca = "tls/ca.pem"``); options on the command line win.

Exit codes: 0 success, 1 unexpected failure, 2 bad usage or configuration
(also a command aimed at the wrong node, a storage another process has open),
3 damaged source, 4 diverged history, 5 ``verify`` found a difference,
6 a node could not be reached (a secondary: only with ``--give-up-after``),
7 the local storage failed or an operation could not complete.
(``verify`` also exits 2 when it could not compare blob files: no blob
directories given.)
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import json
import logging
import signal
import sys
import time
import tomllib
from collections.abc import Callable
from typing import Any

import click

from . import __version__
from .config import PrimaryConfig, Problems, SecondaryConfig, TLSPaths
from .errors import (
    ConfigError,
    CorruptedSourceError,
    DivergenceError,
    OperationError,
    RejectedError,
    ReplicatorError,
    StorageError,
    StorageInUseError,
    TransportError,
    UsageError,
)

__all__ = ["main", "cli"]

log = logging.getLogger("replicator")

EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (ConfigError, 2),
    (UsageError, 2),
    (StorageInUseError, 2),
    (CorruptedSourceError, 3),
    (DivergenceError, 4),
    (RejectedError, 4),
    (TransportError, 6),
    (StorageError, 7),
    (OperationError, 7),
    (ReplicatorError, 1),
]


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Eager ``--config`` callback: the file's keys become the options' defaults."""
    if not value:
        return value
    try:
        with open(value, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise click.BadParameter(f"cannot read {value}: {exc}") from None
    # Keys are the long option names: ``primary = ...`` sets ``--primary``.
    known = {opt[2:]: p.name for p in ctx.command.params if p.name for opt in p.opts if opt.startswith("--")}
    defaults = {}
    unknown = []
    for key, val in data.items():
        name = known.get(key.replace("_", "-"))
        if name is not None and key != "config":
            defaults[name] = val
        else:
            unknown.append(key)
    if unknown:
        raise click.BadParameter(f"{value}: unknown keys {', '.join(sorted(unknown))}")
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _common(fn: Callable) -> Callable:
    options = [
        click.option("--config", type=click.Path(dir_okay=False), callback=_load_config, is_eager=True,
                     expose_value=False, help="TOML file with any of these options."),
        click.option("--storage", required=True, help="Path of the Data.fs file."),
        click.option("--blob-dir", default=None, help="Blob directory of the storage, if it has blobs."),
        click.option("--tls-ca", default=None, help="Cluster CA certificate (PEM)."),
        click.option("--tls-cert", default=None, help="This node's certificate (PEM)."),
        click.option("--tls-key", default=None, help="This node's private key (PEM)."),
        click.option("--insecure", is_flag=True, default=False,
                     help="Plaintext, unauthenticated: only on a trusted network."),
        click.option("--node", default=None,
                     help="Name of this node in logs, status and sync-names (default: the host name); each "
                          "secondary of a primary needs its own."),
        click.option("--log-level", default="INFO", show_default=True,
                     type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
                     help="Least severe messages to log (on stderr)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _tls(tls_ca: str | None, tls_cert: str | None, tls_key: str | None) -> TLSPaths | None:
    if not (tls_ca or tls_cert or tls_key):
        return None
    return TLSPaths(tls_ca or "", tls_cert or "", tls_key or "")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


#: Collect the youngest generation every this many net container allocations
#: (Python's default: 700).  A catching-up secondary builds and drops about
#: 200,000 event objects a GB; with the default its collector ran about 350
#: times and spent 0.35-0.41 s of a 10 s initial sync, with this 9 times and
#: 0.02-0.04 s (2026-11-30).  Only in the processes this CLI runs as services;
#: a ZEO server embedding the replicator keeps its own settings.
GC_THRESHOLD0 = 10_000


def _run(coro_factory: Callable[[], Any]) -> None:
    """Run a service until SIGINT/SIGTERM (SIGHUP reloads renewed TLS files); map our errors to exit codes."""
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD0, gen1, gen2)
    async def runner() -> None:
        task = asyncio.ensure_future(coro_factory())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        # SIGHUP, which would end the process: look for renewed certificates now.
        from .credentials import on_sighup

        on_sighup()
        try:
            await task
        except asyncio.CancelledError:
            log.info("stopped")

    try:
        asyncio.run(runner())
    except ReplicatorError as exc:
        _fail(exc)


def _fail(exc: BaseException) -> None:
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            text = str(exc)
            ctx = click.get_current_context(silent=True)
            if ctx is not None and ctx.parent is not None:
                # The errors' generic hint names no command; here it is known.
                command = " ".join(["replicator", *ctx.command_path.split()[1:]])
                text = text.replace("`replicator COMMAND --help`", f"`{command} --help`")
            click.echo(f"replicator: error: {text}", err=True)
            sys.exit(code)
    raise exc


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="replicator")
def cli() -> None:
    """Streaming, transaction-level replication for ZODB FileStorage over mutual TLS."""


@cli.command()
@_common
@click.option("--listen", default="127.0.0.1:8100", show_default=True,
              help="HOST:PORT to serve secondaries and GET /status on.")
@click.option("--poll-interval", type=float, default=0.01, show_default=True, metavar="SECONDS",
              help="How often to look for new commits in --storage while they come steadily; a commit "
                   "then waits up to that long before it is shipped (see --file-events for a quiet "
                   "file).")
@click.option("--batch-delay", type=float, default=PrimaryConfig.batch_delay, show_default=True,
              metavar="SECONDS",
              help="While the CPUs this process may run on are saturated (under 20% idle), look at "
                   "most every 10 ms; once that has lasted a second, twice as long every half "
                   "second it lasts, up to this many seconds. Fewer wake-ups, so more commits "
                   "for the server, for that much more lag. 0: always --poll-interval.")
@click.option("--file-events/--no-file-events", default=PrimaryConfig.file_events, show_default=True,
              help="While --storage is quiet, wait for the kernel to report a write (Linux inotify) "
                   "instead of looking every --poll-interval: an idle primary stays asleep, and the "
                   "first commit after a pause ships at once. Falls back to polling by itself where "
                   "writes go unreported (a network file system written by another host).")
def primary(storage, blob_dir, tls_ca, tls_cert, tls_key, insecure, node, log_level, listen,
            poll_interval, batch_delay, file_events) -> None:
    """Tail the Data.fs at --storage (written by a ZEO server or Zope) and stream it to secondaries."""
    _setup_logging(log_level)
    from .primary import Primary

    found = Problems()
    try:
        config = found.validate(PrimaryConfig(
            storage=storage, blob_dir=blob_dir, listen=found.address(listen, "--listen"),
            tls=_tls(tls_ca, tls_cert, tls_key), insecure=insecure, poll_interval=poll_interval,
            batch_delay=batch_delay, file_events=file_events, **({"node": node} if node else {}),
        ))
    except ConfigError as exc:
        _fail(exc)
    if insecure:
        log.warning("--insecure: the stream is plaintext and anyone who can reach %s may read it", listen)
    if config.blob_dir is None:
        from .storage import missing_blob_dir_hint

        nearby = missing_blob_dir_hint(config.storage)
        if nearby:
            # Said now: the error comes only when a secondary needs the first blob, hours later maybe.
            log.warning("no --blob-dir given, but %s: if it is this storage's, pass --blob-dir, or the primary "
                        "stops at the first blob record it has to ship", nearby)

    async def serve() -> None:
        from .control import primary_routes
        from .tailer import Tailer

        server = Primary(config, routes=primary_routes(lambda: server,
                                                       lambda: Tailer(config.storage, config.blob_dir).open(),
                                                       sidecar=True), sidecar=True)
        await server.start()
        try:
            await server.run_until_stopped()
        finally:
            await server.stop()

    _run(serve)


@cli.command()
@_common
@click.option("--primary", "primary_addr", required=True, help="HOST:PORT of the primary.")
@click.option("--listen", default=None, help="HOST:PORT to answer GET /status on (optional).")
@click.option("--zeo", "zeo_addr", default=None,
              help="HOST:PORT to serve the replica to read-only ZEO clients on (optional).")
@click.option("--zeo-storage", "zeo_storage", default="1", show_default=True, metavar="NAME",
              help="The storage name --zeo serves the replica under (a client's `storage=`, a "
                   "<zeoclient>'s `storage`): the name the primary's ZEO server gives the storage.")
@click.option("--compress/--no-compress", default=False, show_default=True,
              help="Ask the primary to deflate the stream: for a slow link (a WAN); costs CPU on both ends.")
@click.option("--give-up-after", type=float, default=SecondaryConfig.give_up_after, show_default=True,
              metavar="SECONDS",
              help="Exit with status 6 after this long without a usable connection to the primary "
                   "(for a supervisor that should take over). 0: keep retrying for ever.")
@click.option("--max-rate", default=None, metavar="BYTES/S",
              help="Take at most this much of the link from the primary, in bytes a second as the link "
                   "carries them: 500k, 5M, 1.5MiB/s (k, M, G count 1024s). For a WAN link shared with "
                   "other traffic; a catch-up takes longer. Default (or 0): as fast as the link goes.")
def secondary(storage, blob_dir, tls_ca, tls_cert, tls_key, insecure, node, log_level, primary_addr,
              listen, zeo_addr, zeo_storage, compress, give_up_after, max_rate) -> None:
    """Follow the primary at --primary and re-commit its transactions into the Data.fs at --storage.

    With --zeo, ZEO clients can read the replica as it follows (writes raise ReadOnlyError).
    """
    _setup_logging(log_level)
    from .secondary import Secondary

    found = Problems()
    try:
        unchecked = SecondaryConfig(
            storage=storage, blob_dir=blob_dir, primary=found.address(primary_addr, "--primary"),
            listen=found.address(listen, "--listen") if listen else None,
            tls=_tls(tls_ca, tls_cert, tls_key), insecure=insecure, compress=compress,
            give_up_after=give_up_after, max_rate=found.rate(max_rate, "--max-rate"),
            **({"node": node} if node else {}),
        )
        zeo = found.address(zeo_addr, "--zeo") if zeo_addr else None
        if not zeo_storage.strip():
            found.problems.append("--zeo-storage: give a storage name (ZEO clients ask for '1' unless told otherwise)")
        config = found.validate(unchecked)
    except ConfigError as exc:
        _fail(exc)

    async def follow() -> None:
        if zeo is not None:
            from .zeoserver import serve_replica

            await serve_replica(config, zeo, zeo_storage)
            return
        await Secondary(config).serve(advice=(
            "To take writes, stop it and start a ZEO server on the file with <replicated-primary> "
            "(or run `replicator secondary --zeo`, which promotes in place)"))

    _run(follow)


@cli.command()
@click.argument("urls", nargs=-1, required=True)
@click.option("--tls-ca", default=None, help="Cluster CA certificate (PEM).")
@click.option("--tls-cert", default=None, help="A certificate of the cluster to present.")
@click.option("--tls-key", default=None, help="Its private key.")
@click.option("--insecure", is_flag=True, default=False, help="Plain http.")
@click.option("--json", "as_json", is_flag=True, default=False,
              help="Print JSON: each node's own status, with the alarms found in it.")
@click.option("--max-lag", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Flag as lagging a secondary more than this many seconds behind its primary.")
def status(urls, tls_ca, tls_cert, tls_key, insecure, as_json, max_lag) -> None:
    """Show the status of the nodes at URLS (HOST:PORT or https://HOST:PORT).

    Exits 0 when every node answered and none shows an alarm, 6 when a node
    could not be reached, and 8 when one shows an alarm (flagged in brackets
    on its first line: fenced, stale, synchronous replication degraded, a
    secondary stopped or disconnected, a primary that no secondary follows,
    two nodes taking writes to one database, a lag past --max-lag, a
    certificate close to expiry).
    """
    from .status import fetch_all, node_alarms, render

    tls = None if insecure else _tls(tls_ca, tls_cert, tls_key)
    if tls is None and not insecure:
        _fail(ConfigError("--tls-ca, --tls-cert and --tls-key are required (or --insecure)"))
    try:
        results = asyncio.run(fetch_all(list(urls), tls, insecure))
    except ReplicatorError as exc:
        _fail(exc)
    now = time.time()
    found = node_alarms(results, now, max_lag)
    if as_json:
        shown = [r if r.get("unreachable") else {**r, "alarms": [{"flag": flag, "text": text} for flag, text in a]}
                 for r, a in zip(results, found, strict=True)]
        click.echo(json.dumps(shown, indent=2, sort_keys=True))
    else:
        click.echo(render(results, now=now, max_lag=max_lag))
    if any("error" in r and r.get("unreachable") for r in results):
        sys.exit(6)
    if any(found):
        sys.exit(8)


@cli.command()
@click.argument("storage_a")
@click.argument("storage_b")
@click.option("--blob-dir-a", default=None, help="Blob directory of STORAGE_A.")
@click.option("--blob-dir-b", default=None, help="Blob directory of STORAGE_B.")
def verify(storage_a, storage_b, blob_dir_a, blob_dir_b) -> None:
    """Compare two storages transaction by transaction; exit 0 only when equal.

    The storages are opened read-only; they may be in use by a replicator.
    Blob files are compared only with --blob-dir-a and --blob-dir-b: without
    them, storages whose records are equal but hold blobs exit 2, as the
    comparison is incomplete.
    """
    from .verify import format_result
    from .verify import verify as run_verify

    if (blob_dir_a is None) != (blob_dir_b is None):
        _fail(ConfigError("--blob-dir-a and --blob-dir-b go together: with one alone every blob would "
                          "differ (give both to compare blob files)"))
    # A storage in use has a stale index file; FileStorage says so on every
    # read-only open, which is expected here and not worth a warning.
    logging.getLogger("ZODB.FileStorage").setLevel(logging.ERROR)
    try:
        result = run_verify(storage_a, storage_b, blob_dir_a, blob_dir_b)
    except ReplicatorError as exc:
        _fail(exc)
    click.echo(format_result(result))
    # Equal records with blob files left out are not a verified replica.
    sys.exit(0 if result.complete else 2 if result.equal else 5)


def _tls_options(fn: Callable) -> Callable:
    for option in reversed([
        click.option("--tls-ca", default=None, help="Cluster CA certificate (PEM)."),
        click.option("--tls-cert", default=None, help="A certificate of the cluster to present."),
        click.option("--tls-key", default=None, help="Its private key."),
        click.option("--insecure", is_flag=True, default=False, help="Plain http."),
    ]):
        fn = option(fn)
    return fn


def _control(target: str, method: str, path: str, tls_ca, tls_cert, tls_key, insecure, *, role: str,
             what: str) -> dict:
    from .control import node_command

    try:
        return asyncio.run(node_command(target, method, path, _tls(tls_ca, tls_cert, tls_key), insecure=insecure,
                                        role=role, what=what))
    except ReplicatorError as exc:
        _fail(exc)
        raise  # unreachable: _fail exits


@cli.command()
@click.argument("node")
@click.option("--force", is_flag=True, default=False,
              help="Promote even while NODE is connected to a primary that still takes writes (one about "
                   "to be shut down): for a while both take commits.")
@_tls_options
def promote(node, force, tls_ca, tls_cert, tls_key, insecure) -> None:
    """Make the secondary at NODE (HOST:PORT of its --listen) the primary of a new epoch.

    It first applies everything it received from its primary, then stops
    following it. Do this only when the old primary is gone or fenced:
    while NODE is connected to a primary that takes writes, it refuses
    (exit status 2) unless --force.
    """
    result = _control(node, "POST", "/promote?force=1" if force else "/promote", tls_ca, tls_cert, tls_key,
                      insecure, role="secondary", what="`replicator promote`")
    from .switchover import former_primary_line, next_step_after_promotion

    click.echo(f"{result['node']} is the primary of epoch {result['epoch']} from transaction {result['last_tid']}"
               + former_primary_line(result) + next_step_after_promotion(result))


@cli.command()
@click.argument("node")
@click.option("--undo", is_flag=True, default=False, help="Accept writes again (unfence).")
@_tls_options
def fence(node, undo, tls_ca, tls_cert, tls_key, insecure) -> None:
    """Stop (or with --undo resume) writes on the embedded primary at NODE; streaming goes on.

    Its ZEO clients are disconnected; they register again, read-only or with
    a server they list that takes writes. (`switchover` keeps them until the
    new primary is promoted.)
    """
    result = _control(node, "POST", "/unfence" if undo else "/fence", tls_ca, tls_cert, tls_key, insecure,
                      role="primary", what="`replicator fence`")
    state = f"fenced ({result['fenced']})" if result.get("fenced") else "accepting writes"
    click.echo(f"{result['node']}: {state}; last transaction {result['last_tid']}")


@cli.command()
@click.option("--primary", "old", required=True, help="HOST:PORT of the current primary.")
@click.option("--to", "new", required=True, help="HOST:PORT (--listen) of the secondary to promote.")
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for it to catch up.")
@_tls_options
def switchover(old, new, timeout, tls_ca, tls_cert, tls_key, insecure) -> None:
    """Planned switchover: fence the primary, wait until the secondary has everything, promote it."""
    from .switchover import run_switchover

    try:
        report = asyncio.run(run_switchover(old, new, _tls(tls_ca, tls_cert, tls_key), insecure, timeout))
    except ReplicatorError as exc:
        _fail(exc)
    click.echo(report)


@cli.command()
@click.option("--storage", required=True, help="The diverged node's Data.fs (its processes stopped).")
@click.option("--blob-dir", default=None, help="Its blob directory.")
@click.option("--primary", "primary_addr", required=True, help="HOST:PORT of the new primary.")
@click.option("--dry-run", is_flag=True, default=False, help="Only say where the histories fork.")
@_tls_options
def rewind(storage, blob_dir, primary_addr, dry_run, tls_ca, tls_cert, tls_key, insecure) -> None:
    """Truncate a diverged node to the last transaction it shares with the primary.

    The transactions after that point (the orphans) are first copied into a
    separate FileStorage next to --storage, with their blobs; nothing is deleted
    before it is saved. Afterwards the node can follow the primary.
    """
    from .rewind import rewind_node

    try:
        report = asyncio.run(rewind_node(storage, blob_dir, primary_addr, _tls(tls_ca, tls_cert, tls_key),
                                         insecure, dry_run=dry_run))
    except ReplicatorError as exc:
        _fail(exc)
    click.echo(report)


def _with_force_option(exc: ConfigError, warning: str = "") -> ConfigError:
    """The certs module's advice about existing files, in the command line's terms."""
    from .certs import FORCE_HINT

    if exc.hint == FORCE_HINT:
        exc.hint = "give --force to replace existing files" + warning
    return exc


#: ``certs revoke --reason`` (``revocation.REASONS``, not imported here: the CLI starts without cryptography).
REASON_WORDS = ("key-compromise", "superseded", "cessation-of-operation", "affiliation-changed")


@cli.group()
def certs() -> None:
    """Create and inspect the cluster's TLS certificates."""


@certs.command("init")
@click.option("--dir", "directory", default="tls", show_default=True, help="Where to write the files.")
@click.option("--node", "nodes", multiple=True, default=("primary", "secondary"), show_default=True,
              help="Node certificates to issue (repeat).")
@click.option("--host", "hosts", multiple=True, default=("localhost", "127.0.0.1"), show_default=True,
              help="Host names and IP addresses every node certificate made here is valid for (repeat); "
                   "nodes on hosts of their own: one --node here, then `certs issue` for each other node "
                   "with its own --host.")
@click.option("--days", type=click.IntRange(min=1), default=825, show_default=True,
              help="How long the node certificates are valid (the CA: ten years).")
@click.option("--force", is_flag=True, default=False, help="Overwrite existing files.")
def certs_init(directory, nodes, hosts, days, force) -> None:
    """Create a cluster CA and a certificate for each node."""
    from .certs import init_ca, issue_node

    try:
        init_ca(directory, force=force)
        for name in nodes:
            issue_node(directory, name, hosts=tuple(hosts), force=force, days=days)
    except ConfigError as exc:
        _fail(_with_force_option(exc, "; a new CA leaves every certificate the old one signed unusable"))
    except ReplicatorError as exc:
        _fail(exc)
    click.echo(f"CA and certificates for {', '.join(nodes)} written to {directory}/ "
               f"(keys are readable by their owner only)")


@certs.command("issue")
@click.argument("name")
@click.option("--dir", "directory", default="tls", show_default=True,
              help="Where the CA is (ca.pem, ca.key) and the files are written.")
@click.option("--host", "hosts", multiple=True, default=("localhost", "127.0.0.1"), show_default=True,
              help="Host names and IP addresses the certificate is valid for (repeat): every name "
                   "and address peers dial to reach this node.")
@click.option("--role", type=click.Choice(["node", "operator", "monitor"]), default="node", show_default=True,
              help="What its holder may ask of a node: node (a primary or secondary: everything), operator "
                   "(status and the control commands: promote, fence, switchover, rewind; not the data), "
                   "monitor (reading status and /metrics only, e.g. for Prometheus).")
@click.option("--days", type=click.IntRange(min=1), default=825, show_default=True,
              help="How long it is valid (never past the CA's own expiry).")
@click.option("--force", is_flag=True, default=False,
              help="Overwrite existing files (renewing a certificate: a running node loads the new "
                   "files within a minute, or at once on SIGHUP).")
def certs_issue(name, directory, hosts, role, days, force) -> None:
    """Issue one more certificate signed by the CA in --dir.

    NAME is the node's (or operator's, or monitor's) name: the files are
    NAME.pem and NAME.key, and nodes log it as the client's identity.
    """
    from .certs import issue_node

    try:
        issue_node(directory, name, hosts=tuple(hosts), force=force, role=role, days=days)
    except ConfigError as exc:
        _fail(_with_force_option(exc))
    except ReplicatorError as exc:
        _fail(exc)
    click.echo(f"{directory}/{name}.pem and {directory}/{name}.key written (role {role})")


@certs.command("renew")
@click.argument("name")
@click.option("--dir", "directory", default="tls", show_default=True,
              help="Where the CA (ca.pem, ca.key) and the certificate to renew (NAME.pem) are.")
@click.option("--days", type=click.IntRange(min=1), default=825, show_default=True,
              help="How long the new one is valid (never past the CA's own expiry).")
def certs_renew(name, directory, days) -> None:
    """Replace NAME's certificate and key with new ones for the same hosts and role.

    Copy the two files to the node in place of the old ones: it loads them
    within a minute (at once on SIGHUP), without a restart.
    """
    from .certs import describe, renew_node

    try:
        old = describe(f"{directory}/{name}.pem")
        paths = renew_node(directory, name, days=days)
        new = describe(paths.cert)
    except ReplicatorError as exc:
        _fail(exc)
    click.echo(f"{paths.cert} and {paths.key} written: role {', '.join(new.roles)}, hosts "
               f"{', '.join(new.dns_names + new.ip_addresses)}, valid until {new.not_after:%Y-%m-%d} "
               f"(the old one: until {old.not_after:%Y-%m-%d})")


@certs.command("new-ca")
@click.option("--dir", "directory", default="tls", show_default=True,
              help="Where the cluster's CA is (ca.pem, ca.key) and its certificates.")
@click.option("--days", type=click.IntRange(min=1), default=3650, show_default=True,
              help="How long the new CA is valid.")
def certs_new_ca(directory, days) -> None:
    """Begin moving the cluster to a new CA, without stopping any node.

    Makes a new CA: ca.key signs with it from now on, and ca.pem holds the
    new CA and the old one, so that nodes given it trust both (the old CA
    waits in ca-previous.pem and ca-previous.key). The output says the next
    steps; `certs drop-old-ca` is the last.
    """
    from .certs import new_ca

    try:
        done = new_ca(directory, days=days)
    except ReplicatorError as exc:
        _fail(exc)
    names = [path.stem for path in done.unrenewed]
    click.echo(f"new CA {done.new.subject.rfc4514_string()}, valid until {done.new.not_valid_after_utc:%Y-%m-%d}; "
               f"{done.ca_file} now holds it and the old CA.\nNext:\n"
               f"  1. copy {done.ca_file} to every node (each trusts both CAs within a minute, at once on "
               "SIGHUP);\n"
               f"  2. renew every certificate under the new CA and put it in place on its node: "
               + ("; ".join(f"replicator certs renew {name} --dir {directory}" for name in names)
                  if names else f"replicator certs renew NAME --dir {directory}")
               + " (and any certificate issued outside this directory);\n"
               f"  3. replicator certs drop-old-ca --dir {directory}, and copy {done.ca_file} to every node "
               "again.")


@certs.command("drop-old-ca")
@click.option("--dir", "directory", default="tls", show_default=True,
              help="Where the cluster's CA is (ca.pem, ca.key) and its certificates.")
@click.option("--force", is_flag=True, default=False,
              help="Drop the old CA even though certificates in --dir are still signed by it only.")
def certs_drop_old_ca(directory, force) -> None:
    """End a move to a new CA: ca.pem keeps the new CA only.

    Copy the new ca.pem to every node: within a minute (at once on SIGHUP)
    each trusts the old CA no more and closes its open connections with
    peers whose certificates the old CA signed. Refused while certificates
    in --dir are still signed by the old CA only.
    """
    from .certs import drop_old_ca

    try:
        done = drop_old_ca(directory, force=force)
    except ReplicatorError as exc:
        _fail(exc)
    click.echo(f"{done.ca_file} now holds the CA {done.new.subject.rfc4514_string()} only (dropped: "
               f"{', '.join(c.subject.rfc4514_string() for c in done.old)}); the old CA's key is deleted. "
               f"Copy {done.ca_file} to every node."
               + (f" Still signed by the old CA, refused from now on: {', '.join(map(str, done.unrenewed))}."
                  if done.unrenewed else ""))


@certs.command("revoke")
@click.argument("cert", required=False)
@click.option("--dir", "directory", default="tls", show_default=True,
              help="Where the cluster's CA is (ca.pem, ca.key) and its certificates.")
@click.option("--serial", help="Revoke by serial number (hexadecimal, as `certs show` prints it) instead: "
                               "for a certificate of the signing CA whose file is gone.")
@click.option("--reason", type=click.Choice(list(REASON_WORDS)), default=None,
              help="Why, for the record in the revocation list (none by default).")
def certs_revoke(cert, directory, serial, reason) -> None:
    """Revoke one certificate: nodes given the new ca.pem refuse it and close its connections.

    CERT is a name in --dir (CERT.pem) or a certificate file. The revocation
    list of the CA that signed it, in ca.pem, lists it from now on; copy
    ca.pem to every node: within a minute (at once on SIGHUP) each refuses
    new connections made with it and closes the open ones. To give the node
    a new certificate: `certs renew CERT` (a new key too).
    """
    from .certs import revoke

    number = None
    if serial is not None:
        try:
            number = int(serial.replace(":", ""), 16)
        except ValueError:
            _fail(ConfigError(f"--serial {serial!r} is not a hexadecimal serial number"))
    try:
        done = revoke(directory, cert, serial=number, reason=reason)
    except ReplicatorError as exc:
        _fail(exc)
    what = (f"{done.cert.subject.rfc4514_string()} (serial {done.serial:x})" if done.cert is not None
            else f"the certificate of serial {done.serial:x}")
    if done.already is not None:
        click.echo(f"{what} was already {done.already.words()}; {done.ca_file} is unchanged.")
        return
    click.echo(f"revoked {what}: the revocation list of {done.ca.subject.rfc4514_string()} in {done.ca_file} now "
               f"lists {done.listed} certificate(s). Copy {done.ca_file} to every node: within a minute (at once "
               "on SIGHUP) each refuses it and closes its open connections.")


@certs.command("show")
@click.argument("cert")
def certs_show(cert) -> None:
    """Print a certificate's subject, host names and expiry."""
    from .certs import describe

    try:
        info = describe(cert)
    except ReplicatorError as exc:
        _fail(exc)
    for key, value in (info.items() if isinstance(info, dict) else vars(info).items()):
        if key == "usable_until" or (key in ("intermediates", "other_cas", "revoked") and not value):
            continue
        if isinstance(value, (tuple, list)):
            value = ", ".join(str(v) for v in value) or "(none)"
        click.echo(f"{key}: {value}")
    left = ((info.usable_until or info.not_after) - datetime.datetime.now(datetime.UTC)).total_seconds() / 86400
    until = "" if info.usable_until in (None, info.not_after) else " (an intermediate CA expires first)"
    click.echo(f"valid_for: {'EXPIRED' if left <= 0 else f'{left:.0f} more days'}{until}")


def main() -> None:
    cli()

