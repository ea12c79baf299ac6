"""The secondary: follows a primary and re-commits its transactions locally.

One reader task receives WebSocket messages, runs them through the sans-IO
``Connection`` and puts each message's stream events on a queue bounded by
the memory they take (``_BatchQueue``); when the queue is full the reader
stops reading and TCP pushes back on the primary.  One applier task hands each batch to the ``Applier`` (on the event
loop when the batch is small, else in a worker thread) and acknowledges the
last TID it made durable.  On any disconnect the
open transaction is aborted and the secondary reconnects with capped,
jittered exponential backoff, resuming from its own last TID: nothing lost,
nothing applied twice.  A refusal for diverged history stops it for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
from aiohttp import WSMsgType
from ZODB.FileStorage import FileStorage

from .applier import Applier, Invalidate
from .config import PrimaryConfig, SecondaryConfig, parse_address
from .control import call, primary_routes, secondary_routes
from .credentials import Credentials
from .epoch import adopt_epoch, load_epoch, record_database
from .errors import (
    ConfigError,
    DivergenceError,
    DurabilityError,
    RejectedError,
    RemoteProtocolError,
    ReplicatorError,
    StorageError,
    TLSError,
    TransportError,
)
from .primary import Primary, UpstreamAnswer
from .protocol import (
    INSTANCE_LEN,
    PROTOCOL_VERSION,
    Ack,
    BlobChunk,
    Connection,
    ConnectionState,
    Goodbye,
    Heartbeat,
    Hello,
    Record,
    Reject,
    Role,
    TxnBegin,
    Welcome,
)
from .rewind import explain_divergence, identities_from_json
from .status import size_text
from .storage import check_restore_support, close_storage, last_identity, open_file_storage
from .tailer import Tailer
from .threads import blocking
from .tid import Z64, tid_from_hex, tid_repr, tid_time
from .transport import ReadCoalescing, ReceiveLimit, connect_ws, host_silence, peer_chain, seconds_since_heard

__all__ = ["Secondary", "Backoff", "LinkLog"]

#: Seconds a relay waits for the primary it follows to answer about a secondary's position.
UPSTREAM_QUESTION_TIMEOUT = 10.0
#: After the disk filled up, the failed transaction is fetched again only once
#: this much more room is free where the storage or its blobs live...
FREE_SPACE_STEP = 1 << 20
#: ... or after this many seconds anyway (a raised quota does not show as free space).
FULL_DISK_RETRY = 600.0
#: Seconds between two looks at the free space meanwhile.
FREE_SPACE_LOOK = 1.0
#: After ``idle_timeout`` without a message, the secondary looks this long
#: more before it calls the primary silent (``_receive``).
STALL_LOOK = 1.0

log = logging.getLogger("replicator.secondary")

#: Seconds a goodbye to the primary may take to send (a closed window would hold it for ever).
GOODBYE_WAIT = 1.0
#: Said to the primary by a secondary that stops following to be promoted.
PROMOTION_GOODBYE = Goodbye("shutdown", "secondary stopping to be promoted")

#: Reject codes after which retrying cannot help: an operator must act.
FINAL_REJECTS = {"diverged", "ahead", "version", "packed", "stale", "foreign", "identity"}


#: What to do about a primary's Goodbye, by its code (others: ``TransportError``'s own hint).
GOODBYE_HINTS = {
    "shutdown": "the primary is stopping or restarting; this node reconnects and resumes",
    "corrupted": "the primary's file is damaged (its log names where); this node keeps everything before "
                 "it and resumes once the primary's file is repaired",
    "error": "the primary stopped on that error (its log says more); this node reconnects and resumes "
             "once the primary runs again",
    "packed": "nothing to do: this node reconnects and resumes from the packed file",
    "epoch": "nothing to do: this node reconnects at once and follows into the new epoch",
}


#: A batch of at most this many bytes is applied on the event loop itself.
#: A worker thread would keep the loop free, but while receiving and
#: applying run in two threads they pass the interpreter lock to and fro,
#: and an initial sync took 8.35 s and 9.1 CPU-s against 7.27 s and 7.5
#: (medians of 5 alternating runs).  Such a batch blocks the loop for
#: milliseconds.  Batches with blobs are applied there too (a sync took
#: 7.57 s against 8.47 with them in the thread, medians of 5 alternating
#: runs, 2026-11-30), unless a blob file to fsync may be big or they are
#: many (``_Batch.inline``).  The end of a transaction that
#: outgrew memory and anything during a pack of the replica go to the
#: thread (``Applier.may_stall``).
INLINE_APPLY_BYTES = 4 << 20
#: More blob files than this in one batch are placed (each fsynced, with its
#: directory) in the worker thread: about half a millisecond each here.
INLINE_BLOBS = 16


#: Memory a decoded event takes besides its bytes fields (a ``Record`` about 150 bytes, a
#: ``BlobChunk`` 90): what the apply queue counts for it (``_BatchQueue``).
EVENT_MEMORY = 160


@dataclass(slots=True)
class _Batch:
    """The stream events of one or more messages, waiting to be applied."""

    events: list
    size: int  # bytes received for them
    blobs: int = 0  # blob records among them
    #: Applying them may block for long: they carry bytes of a blob bigger
    #: than ``INLINE_APPLY_BYTES``, whose file is fsynced once complete.
    stall: bool = False
    #: What ``_BatchQueue`` counted for it while queued.
    weight: int = 0

    def add(self, other: _Batch) -> None:
        self.events.extend(other.events)
        self.size += other.size
        self.blobs += other.blobs
        self.stall = self.stall or other.stall

    @staticmethod
    def _quick(size: int, blobs: int, stall: bool) -> bool:
        return size <= INLINE_APPLY_BYTES and blobs <= INLINE_BLOBS and not stall

    @property
    def inline(self) -> bool:
        """Whether this batch is quick enough to apply on the event loop."""
        return self._quick(self.size, self.blobs, self.stall)

    def inline_with(self, other: _Batch) -> bool:
        """Whether this batch would still be ``inline`` with ``other`` added."""
        return self._quick(self.size + other.size, self.blobs + other.blobs, self.stall or other.stall)


class _BatchQueue(asyncio.Queue):
    """Batches received and not yet applied, bounded by the memory they take.

    A count of messages bounded nothing: a message may hold one 64 MiB
    record, or 65,536 one-byte blob chunks that take 6 MiB once decoded.
    Each batch counts its bytes plus ``EVENT_MEMORY`` per event; ``put``
    waits while the queue holds ``max_bytes`` or more, so an empty queue
    takes any batch, however big, and a full one holds at most ``max_bytes``
    plus one batch.  The end (``end()``, a ``None``) counts nothing and never
    waits: the applier may have stopped taking batches (its apply failed), and
    a session that waited for room to say "no more" would wait for ever.
    """

    def __init__(self, max_bytes: int) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self.bytes = 0
        self._ended = False

    def end(self) -> None:
        """Queue the end marker now, full or not: nothing is put after it."""
        self._ended = True
        self.put_nowait(None)

    def _put(self, item: _Batch | None) -> None:
        if item is not None:
            item.weight = item.size + EVENT_MEMORY * len(item.events)
            self.bytes += item.weight
        super()._put(item)

    def _get(self) -> _Batch | None:
        item = super()._get()
        if item is not None:
            self.bytes -= item.weight
        return item

    def full(self) -> bool:
        return not self._ended and self.bytes >= self.max_bytes


async def _next_batch(queue: asyncio.Queue, syncing: asyncio.Task | None) -> _Batch | None:
    """The next batch, or None (the end) as soon as the fsync in flight failed, for the applier's
    loop: a caught-up secondary may wait long for its next batch, and meanwhile a failed fsync
    must end the session (the loop's end raises it), not sit unseen until more comes."""
    if syncing is None or syncing.done() or not queue.empty():
        return await queue.get()
    getter = asyncio.ensure_future(queue.get())
    try:
        await asyncio.wait({getter, syncing}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not getter.done():
            getter.cancel()
    if syncing.done() and not syncing.cancelled() and syncing.exception() is not None:
        return None  # a batch taken meanwhile is dropped: it is fetched again
    if getter.done() and not getter.cancelled():
        return getter.result()
    return await queue.get()


class Backoff:
    """Capped, jittered exponential delays; ``reset()`` after a success."""

    def __init__(self, minimum: float, maximum: float) -> None:
        self.minimum, self.maximum = minimum, maximum
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.minimum * (2 ** self.attempt))
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


#: Longest wait for the primary's answer to a Hello while its host is there (seconds):
#: placing a secondary that was away during a pack may take the primary a scan of
#: the file the pack replaced.
WELCOME_WAIT = 600.0

#: While the primary stays unreachable, a WARNING says so at most this often (seconds).
OUTAGE_WARNING_INTERVAL = 60.0


async def _say_goodbye(ws: aiohttp.ClientWebSocketResponse, conn: Connection, goodbye: Goodbye) -> None:
    """Tell the primary why a streaming session ends (best effort, at most ``GOODBYE_WAIT``)."""
    if conn.state is ConnectionState.STREAMING and not ws.closed:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.send_bytes(conn.send(goodbye)), GOODBYE_WAIT)


def _disk_full(error: BaseException | None) -> OSError | None:
    """The "no space" (or quota) error behind a ``StorageError``, if that is what it is."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__cause__ or error.__context__
        seen += 1
    return None


def _free_bytes(path: str) -> int | None:
    """Bytes this process may still write on ``path``'s file system (None if it cannot say)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def _duration(seconds: float) -> str:
    """``45s``, ``2m05s``, ``3h07m``: how long, for people."""
    whole = int(seconds)
    if whole < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


#: While a secondary catches up, a line at most this often says how it goes (seconds).
CATCH_UP_REPORT_INTERVAL = 60.0
#: A catch-up that took at least this long ends with a line saying so (seconds).
CATCH_UP_REPORTED_AFTER = 5.0


class CatchUpLog:
    """Tells the operator how a catch-up goes: a line a minute while this node is behind the
    primary, and one once it caught up, with what it took.

    An initial sync over a slow link runs for hours; without these lines the
    log says nothing between "following primary" and the next outage, and a
    slow link looks like a stuck one.  Catch-ups shorter than
    ``CATCH_UP_REPORTED_AFTER`` (a secondary that is a few commits behind) log nothing.
    """

    def __init__(self, progress: _Progress) -> None:
        self.progress = progress
        self.started: tuple[float, int, int] | None = None  # when, transactions and bytes then
        self.last: tuple[float, int, int] = (0.0, 0, 0)  # the same at the last line

    def following(self, now: float) -> None:
        """Connected: a catch-up starts now if the primary is ahead (one under way goes on)."""
        p = self.progress
        if self.started is None and p.applied_tid < p.head_tid:
            self.started = self.last = (now, p.txns_applied, p.bytes_received)

    def applied(self, now: float) -> None:
        """Transactions were made durable: report if a line is due."""
        p = self.progress
        here = (now, p.txns_applied, p.bytes_received)
        behind = p.applied_tid < p.head_tid
        if self.started is None:
            if behind:
                self.started = self.last = here
            return
        if behind:
            if now - self.last[0] >= CATCH_UP_REPORT_INTERVAL:
                took, txns, size = now - self.last[0], here[1] - self.last[1], here[2] - self.last[2]
                log.info("catching up with primary %s: %d transaction(s) and %s received in the last %s "
                         "(%s/s); applied up to %s, the primary at %s", p.primary_node, txns, size_text(size),
                         _duration(took), size_text(int(size / max(took, 1e-3))), tid_repr(p.applied_tid),
                         tid_repr(p.head_tid))
                self.last = here
            return
        start, self.started = self.started, None
        took = now - start[0]
        if took >= CATCH_UP_REPORTED_AFTER:
            size = here[2] - start[2]
            log.info("caught up with primary %s at %s: %d transaction(s) and %s received in %s (%s/s)",
                     p.primary_node, tid_repr(p.applied_tid), here[1] - start[1], size_text(size), _duration(took),
                     size_text(int(size / max(took, 1e-3))))


class LinkLog:
    """Tells the operator when the link to the primary goes down, stays down and comes back.

    A secondary that cannot reach its primary retries for ever, so the log
    is the only place that says it is not replicating.  The first failure
    of an outage (to connect at all, or of a connection) is a WARNING;
    while the link stays down each retry is INFO, and a WARNING naming how
    long it has been down and the last reason repeats at most every
    ``interval`` seconds.  Those warnings are also at most that frequent
    across outages, so a link that flaps logs a warning a minute, not one a
    flap.  The reconnection is logged at WARNING when the outage was warned
    about (whoever saw it go down must see it come back), else at INFO.
    Every failure's line ends in ``reconnecting to HOST:PORT in Ns (reason)``, without the
    reason when the caller logged the failure itself.
    """

    def __init__(self, primary: str, interval: float = OUTAGE_WARNING_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.primary = primary
        self.interval = interval
        self.clock = clock
        #: When the current outage began (the first failure), None while connected.
        self.down_since: float | None = None
        #: Failed attempts in the current outage.
        self.failures = 0
        self._warned = False
        self._last_warning: float | None = None

    def failed(self, reason: str, delay: float, *, was_connected: bool, logged: bool = False,
               link_down: bool = True) -> None:
        """An attempt failed (``was_connected``: a connection that stood was lost); next one in ``delay`` s.

        ``logged``: the caller has already logged this failure at ERROR.
        ``link_down``: False when the link was fine and something else failed
        (the local storage): the retry is logged at INFO and no outage begins.
        """
        # A failure the caller logged already is not repeated on its retry's line.
        retry = f"reconnecting to {self.primary} in {delay:.2f}s" + ("" if logged else f" ({reason})")
        if not link_down:
            log.info("%s", retry)
            return
        now = self.clock()
        first = self.down_since is None
        if first:
            self.down_since, self.failures, self._warned = now, 0, False
        self.failures += 1
        due = self._last_warning is None or now - self._last_warning >= self.interval
        if logged or not due:
            log.info("%s", retry)
            if due:
                # An ERROR line said it already: it counts as this interval's warning.
                self._warned, self._last_warning = True, now
            return
        if first:
            headline = ("lost the connection to the primary" if was_connected else
                        "cannot connect to the primary: this secondary is not replicating")
        else:
            headline = (f"still no connection to the primary after {_duration(now - (self.down_since or now))} "
                        f"and {self.failures} attempts")
        self._warned, self._last_warning = True, now
        log.warning("%s; %s", headline, retry)

    def connected(self, node: str) -> None:
        """A connection stands (the primary ``node`` welcomed us); ends the outage, if there was one."""
        since = self.down_since
        if since is None:
            return
        down = _duration(self.clock() - since)
        log.log(logging.WARNING if self._warned else logging.INFO,
                "connected to the primary %s (%s) again after %s without a connection (%d failed attempt%s)",
                self.primary, node, down, self.failures, "" if self.failures == 1 else "s")
        self.down_since, self.failures, self._warned = None, 0, False


@dataclass
class _Progress:
    applied_tid: bytes = Z64
    applied_at: float = 0.0
    head_tid: bytes = Z64
    primary_node: str | None = None
    connected: bool = False
    connected_since: float | None = None
    #: Wall-clock time of the last message from the primary (None: none yet).
    last_heard_at: float | None = None
    #: The first transaction the primary streamed to this node while it was
    #: empty: an empty node's lag is measured from its commit time.
    first_tid: bytes | None = None
    bytes_received: int = 0
    txns_applied: int = 0
    last_error: str | None = None
    epoch: int = 0
    #: The stream from the primary is deflated (asked for with ``compress``, and agreed).
    compression: bool = False


class Secondary:
    """Keeps a local FileStorage equal to the primary's, transaction by transaction."""

    def __init__(self, config: SecondaryConfig, *, storage: FileStorage | None = None,
                 invalidate: Invalidate | None = None,
                 on_promoted: Callable[[], Awaitable[None]] | None = None,
                 on_demoted: Callable[[Secondary], None] | None = None,
                 promoted_status: Callable[[], dict] | None = None,
                 promotion_blocker: Callable[[], str | None] | None = None) -> None:
        """Follow the primary named in ``config``.

        ``storage``: an already open FileStorage to apply to (a storage
        wrapper's base, which its owner closes); by default the secondary
        opens ``config.storage`` itself.  ``invalidate(tid, oids)`` is called
        as each transaction finishes, before the storage's last TID moves.
        ``on_promoted()`` runs once POST /promote made this node the primary;
        ``on_demoted(successor)`` once POST /demote made it a secondary again,
        before its stream server closes: ``successor`` follows the new primary
        from then on (see ``serve``).  ``promoted_status()`` adds to GET
        /status while this node is the primary.  ``promotion_blocker()``
        says why a promotion would leave no writable server (a read-only
        ZEO server), or None: POST /promote then refuses unless forced.
        """
        self.config = config
        self.progress = _Progress()
        self.catch_up = CatchUpLog(self.progress)
        self.storage: FileStorage | None = storage
        self._owns_storage = storage is None
        self._invalidate = invalidate
        self.applier: Applier | None = None
        self.port: int | None = None
        self.started_at = time.time()
        #: The database its history belongs to (``epoch.py``), once known: in /status.
        self.database: bytes | None = None
        #: Serves our own storage onward (cascading) and GET /status, with --listen.
        self.downstream: Primary | None = None
        #: Set by ``stop_following()``: apply what was received, then stop (promotion).
        self._draining = asyncio.Event()
        #: Set when a batch became durable; the session's ack loop acknowledges it.
        self._ack_due = asyncio.Event()
        self._stopped = asyncio.Event()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._conn: Connection | None = None  # the protocol state of ``_ws``'s session
        self._told_uncompressed = False
        #: Why it stopped following for good, while ``serve(hold=True)`` keeps its port open.
        self.stopped: ReplicatorError | None = None
        #: Set once POST /promote made this node the primary of a new epoch.
        self.promoted = False
        #: The epoch record says this node follows a primary (``adopt_epoch``), checked once.
        self._following_recorded = False
        #: Set once the promotion's new epoch is recorded (after ``promoted``).
        self.promotion_done = asyncio.Event()
        self._on_promoted = on_promoted
        self._on_demoted = on_demoted
        self._promoted_status = promoted_status
        self.promotion_blocker = promotion_blocker
        #: ``serve()`` runs this node: it can hand over to a successor when demoted (POST /demote).
        self._demotable = False
        #: Set by POST /demote once promoted: HOST:PORT of the primary to follow instead.
        self.demoted_to: str | None = None
        #: Promoted while its former primary could not be told of the epoch: tells it when it is back.
        self._telling: asyncio.Task | None = None
        self._demotion = asyncio.Event()
        #: Says when the link to the primary goes down and comes back.
        self.link_log = LinkLog(str(config.primary))
        #: Since when (monotonic) and how many times applying failed in the
        #: local storage (a full disk), until a batch is durable again.
        self._storage_failing: tuple[float, int] | None = None
        #: Sent in each Hello: tells the primary a reconnection of this
        #: process from another secondary under the same node name.
        self.instance = os.urandom(INSTANCE_LEN)
        #: The TLS files, kept current (renewed certificates); shared with the relay.
        self.credentials: Credentials | None = None
        self._credentials_watch: asyncio.Task | None = None
        self._closing_untrusted: asyncio.Future | None = None
        #: The reading of the current connection on slow links (its counters are for tests and curious operators).
        self.coalescing: ReadCoalescing | None = None
        #: Why this node closed its link upstream: the primary's certificate's CA was dropped.
        self._untrusted: str | None = None
        #: The last TLS failure logged at ERROR, and when: the same one repeats
        #: at ERROR at most every OUTAGE_WARNING_INTERVAL, at INFO between.
        self._tls_logged: tuple[str, float] | None = None

    # -- lifecycle -------------------------------------------------------

    async def open(self) -> None:
        cfg = self.config
        # What can be found wrong before the storage file is created (the
        # next start would find an empty replica and its index).
        self._read_credentials()
        if self.storage is None:
            check_restore_support()
            self.storage = await asyncio.to_thread(open_file_storage, cfg.storage, cfg.blob_dir)
        storage: FileStorage = self.storage
        self.applier = Applier(storage, invalidate=self._invalidate)
        self.progress.applied_tid = self.applier.last_tid
        self.progress.epoch = (await blocking(load_epoch, storage.getName())).epoch
        if cfg.listen is not None:
            # Our own storage is a FileStorage file like any other: serve it
            # onward with the primary's machinery, woken on every apply.
            self.downstream = Primary(
                PrimaryConfig(storage=storage.getName(), blob_dir=cfg.blob_dir, listen=cfg.listen,
                              tls=cfg.tls, insecure=cfg.insecure, node=cfg.node, max_frame=cfg.max_frame,
                              poll_interval=1.0, file_events=False),
                status_provider=self.status,
                # /fence and /unfence act once promoted (a primary then); /identities always.
                routes=[*secondary_routes(lambda: self, self._on_promoted),
                        *primary_routes(lambda: self._downstream(),
                                        lambda: Tailer(storage.getName(), cfg.blob_dir).open(),
                                        self._demote if self._demotable else None)],
                relay=True, upstream=self._upstream, credentials=self.credentials,
                upstream_answer=self._ask_upstream)
            self.downstream.own_instance = self.instance
            self.downstream.upstream_node = lambda: self.progress.primary_node
            self.port = await self.downstream.start()
        log.info("secondary %s opened %s at %s", cfg.node, cfg.storage, tid_repr(self.progress.applied_tid))

    def _check_loop(self, welcome: Welcome) -> None:
        """``TransportError`` (retried) if the node that welcomed us follows this one: a loop."""
        followers = {s.node for s in list(self.downstream.sessions.values())} if self.downstream else set()
        if welcome.node in followers:
            raise TransportError(str(self.config.primary), (
                f"{welcome.node}, which this node ({self.config.node}) follows, follows this node too: each "
                "follows the other, with no primary, and neither takes writes"),
                hint="point one of them at the primary (a node restarted with its configuration from before "
                     "a promotion, say)")

    async def _ask_upstream(self, tid: bytes) -> UpstreamAnswer | None:
        """What the primary this node follows says of ``tid`` (for its relay's refusals); None if
        it cannot be asked now."""
        cfg = self.config
        primary = str(cfg.primary)
        try:
            status = await call(primary, "GET", "/status", cfg.tls, insecure=cfg.insecure,
                                timeout=UPSTREAM_QUESTION_TIMEOUT)
            found = identities_from_json(await call(primary, "GET", f"/identities?tids={tid.hex()}", cfg.tls,
                                                    insecure=cfg.insecure, timeout=UPSTREAM_QUESTION_TIMEOUT))
            head = tid_from_hex(str(status["last_tid"]))
        except (ReplicatorError, KeyError, ValueError) as exc:
            log.info("could not ask the primary %s about transaction %s: %s", primary, tid_repr(tid), exc)
            return None
        return UpstreamAnswer(found.get(tid), head, source=status.get("role") == "primary",
                              node=str(status.get("node")))

    def _upstream(self) -> str:
        """The primary this node follows, as its relay's refusals name it."""
        p = self.progress
        name = f"the primary {self.config.primary}"
        if p.primary_node is not None:
            name += f" ({p.primary_node})"
        if not p.connected:
            return f"{name}, to which it is not connected now"
        return f"{name}, which last reported its newest transaction as {tid_repr(p.head_tid)}"

    def keep_telling(self, tell: Coroutine[Any, Any, None]) -> None:
        """Run ``tell`` (``control._keep_telling``) until it ends or this node closes."""
        if self._telling is not None:
            self._telling.cancel()
        self._telling = asyncio.create_task(tell, name="tell-former-primary")

    async def close(self) -> None:
        if self._telling is not None:
            self._telling.cancel()
            self._telling = None
        if self._credentials_watch is not None:
            self._credentials_watch.cancel()
            self._credentials_watch = None
        if self.downstream is not None:
            if self.demoted_to is not None:
                self.downstream.demoting(self.demoted_to)
            await self.downstream.stop()
            self.downstream = None
        if self.applier is not None:
            # What a broken link left of a transaction: the next start resumes it.
            await asyncio.to_thread(self.applier.save_kept)
            # The storage may go on without this node's applier (demoted again, a new one follows).
            self.applier.detach()
        if self.storage is not None and self._owns_storage:
            await asyncio.to_thread(close_storage, self.storage)
        self.storage = None

    async def run(self) -> None:
        """Follow the primary until cancelled; raise on a refusal retrying cannot cure."""
        cfg = self.config
        backoff = Backoff(cfg.reconnect_min, cfg.reconnect_max)
        url_scheme = "ws" if cfg.insecure else "wss"
        url = f"{url_scheme}://{cfg.primary}/replicate"
        credentials = self._read_credentials()
        # Each connection gets the context of the TLS files in use at that moment.
        contexts = None if credentials is None else credentials.client_context
        forget = None if credentials is None else credentials.on_trust_narrowed(self._close_untrusted)
        try:
            await self._follow(url, contexts, backoff)
        finally:
            if forget is not None:
                forget()
            if self.applier is not None:
                # A transaction kept open for the next connection holds the
                # storage's commit lock: a promotion drops it, a stop keeps
                # its blob files for the next start (close(), save_kept).
                # Quick (an abort, a few renames): done here even while cancelled.
                try:
                    if self._draining.is_set():
                        self.applier.discard_kept()
                    else:
                        self.applier.release_suspended(keep=True)
                except StorageError as exc:
                    log.error("%s", exc)
            self._stopped.set()

    def _close_untrusted(self) -> None:
        """A CA was taken out of the CA file, or a certificate revoked: close the link if the primary's
        certificate chain went through it."""
        ws = self._ws
        tls = ws.get_extra_info("ssl_object") if ws is not None and not ws.closed else None
        if ws is None or tls is None or self.credentials is None:
            return
        reason = self.credentials.untrusted(peer_chain(tls))
        if reason is not None:
            log.warning("closing the connection to the primary at %s: %s", self.config.primary, reason)
            self._untrusted = reason
            self._closing_untrusted = asyncio.ensure_future(ws.close())

    def _read_credentials(self) -> Credentials | None:
        """The TLS files (None: plaintext), read once and then checked for renewal until ``close()``."""
        cfg = self.config
        if self.credentials is None and cfg.tls is not None and not cfg.insecure:
            self.credentials = Credentials(cfg.tls.ca, cfg.tls.cert, cfg.tls.key)
        if self.credentials is not None and self._credentials_watch is None:
            self._credentials_watch = asyncio.create_task(self.credentials.watch(), name="tls-files")
        return self.credentials

    async def _began_newest_epoch(self) -> str | None:
        """If this node began the newest epoch it knows (it was promoted, and is restarted with a
        secondary's configuration), words that say so, and what to do; else None."""
        if self.storage is None:
            return None
        epochs = await blocking(load_epoch, self.storage.getName())
        if not epochs.history or epochs.history[-1].node != self.config.node or epochs.epoch == 0:
            return None
        return (f"this node ({self.config.node}) began epoch {epochs.epoch} itself ({self.config.storage}.epoch "
                "says so): it was promoted, and is the primary, but was started again with a secondary's "
                "configuration, so no node takes writes. Start it as the primary: a ZEO server with "
                "<replicated-primary> on this storage, or runzeo and `replicator primary` beside it (the "
                "README's failover runbook); if another node was promoted since, point this one at it")

    async def _divergence(self, exc: RejectedError) -> DivergenceError:
        """The refusal, with where the histories fork and how many transactions are orphaned."""
        message = f"primary refused this secondary ({exc.code}): {exc.reason}"
        fork_tid, hint = exc.fork_tid, ""
        if exc.code == "stale":
            hint = ("this node's storage is intact and stays as it is: point --primary (or `primary` in "
                    "its configuration) at the current primary, the node that began the newest epoch, and "
                    "it resumes from its own last transaction")
            if self.storage is not None:
                epochs = await blocking(load_epoch, self.storage.getName())
                if epochs.history and epochs.history[-1].node != self.config.node:
                    hint += f" (this node last followed {epochs.history[-1].node!r}, in epoch {epochs.epoch})"
            began = await self._began_newest_epoch()
            if began is not None:
                hint = began
        elif exc.code == "foreign":
            hint = (f"this node's storage is intact and stays as it is: point --primary (or `primary` in its "
                    f"configuration) at the primary of the database it replicates; {self.config.primary} "
                    "serves another one")
        elif exc.code == "packed":
            hint = ("this node's history cannot be checked past the primary's packs; keep its Data.fs aside "
                    "and start it anew from an empty storage (keeping the primary's Data.fs.old, ZODB's "
                    "pack-keep-old, lets a secondary resume across one pack)")
        if exc.code in ("diverged", "ahead") and self.storage is not None:
            cfg = self.config
            fork = await explain_divergence(self.storage.getName(), cfg.blob_dir, str(cfg.primary), cfg.tls,
                                            cfg.insecure)
            if fork is not None and fork.orphans:
                fork_tid = fork.fork_tid
                message += f"; {fork.describe()}"
                blobs = f" --blob-dir {cfg.blob_dir}" if cfg.blob_dir else ""
                # rewind takes a primary: past a relay (a secondary this node follows), its primary.
                target, relayed = str(cfg.primary), ""
                with contextlib.suppress(ReplicatorError, TypeError, ValueError):
                    status = await call(target, "GET", "/status", cfg.tls, insecure=cfg.insecure,
                                        timeout=UPSTREAM_QUESTION_TIMEOUT)
                    if status.get("role") == "secondary" and status.get("primary"):
                        target = str(status["primary"])
                        relayed = f", the primary of the relay {cfg.primary} this node follows,"
                hint = (f"if {cfg.primary} is the right upstream, stop this node and run `replicator rewind "
                        f"--storage {self.storage.getName()}{blobs} --primary {target}`{relayed} with the same "
                        f"--tls-* options (it saves the {fork.orphans} orphaned transaction(s) to a separate "
                        "file first), then start this node again")
                if fork_tid == Z64:  # nothing to rewind to (rewind refuses): only a fresh start
                    hint = (f"this node shares no transaction with {cfg.primary}: if that is the right "
                            "upstream, keep this node's Data.fs aside and start it anew from an empty storage")
                if exc.code == "ahead":
                    hint += (". But if the primary lost them instead (its Data.fs truncated or restored from a "
                             "backup), this node holds the more complete history: promote it rather than rewind")
        return DivergenceError(message, fork_tid=fork_tid, hint=hint)

    def _downstream(self) -> Primary:
        if self.downstream is None:
            raise ConfigError("this secondary has no --listen")
        return self.downstream

    async def serve(self, ready: Callable[[], None] | None = None, *, advice: str = "",
                    hold: bool = False) -> None:
        """Open, follow the primary until cancelled (or refused for good), then close.

        A node stopped for promotion goes on serving its stream and /status
        as the primary of its new epoch until cancelled, or until a
        switchover demotes it (POST /demote, once fenced).  It then follows
        the new primary, on the same port and storage, as a new
        ``Secondary`` (``on_demoted`` is told which), which serves here in
        turn: a node can be promoted and demoted any number of times.
        ``advice`` is logged at each promotion.  ``ready`` is called once
        the node is open and listening.  ``hold``: refused for good (a
        diverged history, a stale primary, ...), keep serving /status (its
        ``error`` says why) until cancelled, instead of raising: inside a ZEO
        server, which goes on serving the replica as it is, the port is how
        the stop is seen (``replicator status``, ``replicator_error``).
        """
        node: Secondary | None = self
        while node is not None:
            node = await node._serve_once(ready, advice, hold)
            ready = None

    async def _serve_once(self, ready: Callable[[], None] | None, advice: str,
                          hold: bool = False) -> Secondary | None:
        """``serve()`` as this node; the node that follows on once this one was demoted, if it was."""
        self._demotable = True
        await self.open()
        try:
            if ready is not None:
                ready()
            try:
                await self.run()
            except (DivergenceError, RejectedError, ConfigError, DurabilityError) as exc:
                if not hold:
                    raise
                self.stopped = exc
                self.progress.last_error = str(exc)
                log.critical("replication stopped for good: %s. The replica stays as it is, and this node's "
                             "status port (if any) says so, until it is reconfigured and restarted", exc)
                await asyncio.Event().wait()  # until cancelled
            if not self.stopped_on_request:
                return None
            await self.promotion_done.wait()  # the new epoch is on disk once it is set
            log.warning("promoted: %s is the primary of epoch %d and serves until stopped. %s",
                        self.config.storage, self.progress.epoch, advice)
            await self._demotion.wait()
            successor = self._successor()
            log.warning("demoted: %s follows %s now, on the same port", self.config.storage,
                        successor.config.primary)
            if self._on_demoted is not None:
                self._on_demoted(successor)  # while this node's stream server, fenced, still refuses writes
            return successor
        finally:
            await self.close()

    def _demote(self, upstream: str) -> None:
        """POST /demote, this node promoted and fenced: follow ``upstream`` (HOST:PORT) instead."""
        if self.promoted and self.demoted_to is None:
            self.demoted_to = upstream
            self._demotion.set()

    def _successor(self) -> Secondary:
        """A node following ``demoted_to`` on this one's port and storage (which it takes over)."""
        assert self.demoted_to is not None
        cfg = self.config
        listen = cfg.listen
        if listen is not None and self.port is not None:
            listen = replace(listen, port=self.port)  # the port bound, if it was 0
        config = replace(cfg, primary=parse_address(self.demoted_to, "primary"), listen=listen)
        successor = Secondary(config, storage=self.storage, invalidate=self._invalidate,
                              on_promoted=self._on_promoted, on_demoted=self._on_demoted,
                              promoted_status=self._promoted_status, promotion_blocker=self.promotion_blocker)
        successor._owns_storage, self._owns_storage = self._owns_storage, False
        return successor

    @property
    def stopped_on_request(self) -> bool:
        """``run()`` returned because ``stop_following()`` asked (a promotion under way or done)."""
        return self._draining.is_set()

    async def stop_following(self, timeout: float = 60.0) -> None:
        """Stop ``run()`` after applying every complete transaction already received.

        What the primary sent and this node received is applied first, so a
        promotion loses none of it; a transaction received only in part is
        aborted.  Returns once ``run()`` has returned.
        """
        self._draining.set()
        ws, conn = self._ws, self._conn
        if ws is not None:
            if conn is not None:  # planned: the primary logs it as such, not as a secondary it lost
                await _say_goodbye(ws, conn, PROMOTION_GOODBYE)
            await ws.close()
        await asyncio.wait_for(self._stopped.wait(), timeout)

    async def _follow(self, url: str, contexts: Callable[[], ssl.SSLContext] | None, backoff: Backoff) -> None:
        cfg = self.config
        down_since = time.monotonic()
        async with aiohttp.ClientSession() as http:
            while not self._draining.is_set():
                applied = self.progress.txns_applied
                kept = self.applier.kept_bytes if self.applier is not None else 0
                logged = False
                failure: BaseException | None = None
                try:
                    await self._session(http, url, None if contexts is None else contexts())
                    message = "primary closed the connection"
                except RejectedError as exc:
                    if exc.code == "self":
                        raise ConfigError(f"--primary {cfg.primary} is this node's own --listen port: it would "
                                          "follow itself; give the address of the primary's port") from None
                    if exc.code in FINAL_REJECTS:
                        self.progress.last_error = str(exc)
                        if exc.code == "version":
                            raise RejectedError(exc.code, exc.reason, hint="run the same replicator release on "
                                                "the primary and its secondaries; see Upgrading in the README") from None
                        if exc.code == "identity":
                            raise RejectedError(exc.code, exc.reason, hint="this node's storage is intact and "
                                                "stays as it is; it follows once started with the certificate "
                                                "of its node name (README, Certificates)") from None
                        raise await self._divergence(exc) from exc
                    message = str(exc)
                    if exc.code == "loop":  # what it follows follows it: is it the primary itself?
                        began = await self._began_newest_epoch()
                        if began is not None:
                            message += f"; {began}"
                except DurabilityError:
                    raise  # an fsync failed: retrying could acknowledge what is not on disk
                except StorageError as exc:
                    # A full disk may be freed; keep what is committed and retry.
                    # Not a link outage: the link worked, and the line that
                    # ends this trouble is about the storage (_make_durable).
                    log.error("local storage failed: %s", exc)
                    message = f"{type(exc).__name__}: {exc}"
                    logged, failure = True, exc
                    since, attempts = self._storage_failing or (time.monotonic(), 0)
                    self._storage_failing = (since, attempts + 1)
                except TLSError as exc:
                    # Certificates do not fit: retrying helps only once someone fixes them
                    # (renewed files are loaded as they come: Credentials).
                    expired = self.credentials.expired() if self.credentials is not None else None
                    message = str(exc) if expired is None else f"{exc}; the likely cause: {expired}"
                    now, logged_before = time.monotonic(), self._tls_logged
                    if (logged_before is None or logged_before[0] != message
                            or now - logged_before[1] >= OUTAGE_WARNING_INTERVAL):
                        log.error("%s", message)
                        self._tls_logged = (message, now)
                    else:
                        log.info("%s", message)
                    logged, failure = True, exc
                except (TimeoutError, TransportError, RemoteProtocolError, ConnectionError, aiohttp.ClientError) as exc:
                    message = f"{type(exc).__name__}: {exc}"
                    failure = exc
                    if self._untrusted is not None:  # this node closed it, and said why
                        message, logged = f"closed by this node: {self._untrusted}", True
                finally:
                    self._untrusted = None
                    self.progress.connected = False
                    if self.applier is not None:
                        # A link that broke mid-transaction leaves what it
                        # delivered kept for the next connection, unless this
                        # node stops following (or is promoted).
                        await blocking(self.applier.abort, keep=not self._draining.is_set())
                if self._draining.is_set():
                    return
                connected_since = self.progress.connected_since
                was_connected = connected_since is not None
                if connected_since is not None:
                    # A connection that got somewhere (it applied a transaction,
                    # kept more of a big one cut off, or lasted longer than the
                    # longest delay) makes the next attempt quick again.  One
                    # that failed at once, as each does while the disk is full,
                    # keeps backing off: otherwise it would fetch the same
                    # transaction again five times a second, and log it.
                    if (self.progress.txns_applied > applied
                            or (self.applier is not None and self.applier.kept_bytes > kept)
                            or time.monotonic() - connected_since > cfg.reconnect_max):
                        backoff.reset()
                    down_since = time.monotonic()
                    self.progress.connected_since = None
                self.progress.last_error = message
                delay = backoff.next_delay()
                if cfg.give_up_after:
                    left = cfg.give_up_after - (time.monotonic() - down_since)
                    if left <= 0:
                        # The last failure's own words; its hint, unless that says retrying goes on.
                        last, hint = message, ""
                        if isinstance(failure, ReplicatorError):
                            last = failure.message
                            hint = "" if failure.hint == TransportError.hint else failure.hint
                        raise TransportError(str(cfg.primary), f"no usable connection to {cfg.primary} for "
                                             f"{_duration(cfg.give_up_after)} (--give-up-after); the last "
                                             f"attempt: {last}", hint=hint or "is the primary running and "
                                             "reachable from here? start this node again once it is")
                    delay = min(delay, left)  # one last attempt when the time is up, not a backoff later
                full = _disk_full(failure)
                if full is None:
                    self.link_log.failed(message, delay, was_connected=was_connected, logged=logged,
                                         link_down=not isinstance(failure, StorageError))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._draining.wait(), delay)
                else:
                    await self._wait_for_room(full, delay)

    async def _wait_for_room(self, error: OSError, delay: float) -> None:
        """After a full disk, wait until there is more room before fetching the failed transaction
        again: retrying into the same space would fail the same way, and refetch it each time (over
        a WAN, perhaps a big blob every 30 s).  At least ``delay``; at most ``FULL_DISK_RETRY`` (a
        raised quota does not show in the free space)."""
        cfg = self.config
        places = sorted({os.path.dirname(os.path.abspath(cfg.storage))}
                        | ({os.path.abspath(cfg.blob_dir)} if cfg.blob_dir else set())
                        | ({os.path.dirname(error.filename)} if isinstance(error.filename, str) else set()))
        before = {place: _free_bytes(place) for place in places}
        log.info("waiting for more free space before fetching the transaction again (%s; at most %s): %s",
                 ", ".join(f"{place}: {size_text(free)} free" for place, free in before.items()),
                 _duration(FULL_DISK_RETRY), error)
        started = time.monotonic()
        wait = delay
        while not self._draining.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._draining.wait(), wait)
            wait = FREE_SPACE_LOOK
            waited = time.monotonic() - started
            grown = [place for place, free in before.items()
                     if free is not None and (_free_bytes(place) or 0) >= free + FREE_SPACE_STEP]
            if grown or waited >= FULL_DISK_RETRY:
                log.info("fetching the transaction again: %s", f"more room on {', '.join(grown)}" if grown
                         else f"no more room after {_duration(waited)}, trying anyway")
                return

    # -- one connection --------------------------------------------------

    async def _session(self, http: aiohttp.ClientSession, url: str, ssl_ctx: ssl.SSLContext | None) -> None:
        cfg = self.config
        assert self.applier is not None and self.storage is not None
        # The primary takes the last transaction named in the Hello as
        # acknowledged: it must be durable (a batch's fsync may have failed,
        # or the process before this one died before it).
        await blocking(self.applier.make_all_durable)
        identity = await blocking(last_identity, self.storage)
        last_tid = identity.tid if identity else Z64
        # A batch that failed half way committed (and made durable) what came
        # before the failure without reporting it: status shows it from here.
        self.progress.applied_tid = max(self.progress.applied_tid, last_tid)
        self.progress.txns_applied = max(self.progress.txns_applied, self.applier.committed)
        epochs = await blocking(load_epoch, self.storage.getName())
        epoch = epochs.epoch
        self.database = epochs.database
        offer = self.applier.resume_offer()
        conn = Connection(Role.SECONDARY, max_frame=cfg.max_frame)
        ws = self._ws = await connect_ws(http, url, ssl_ctx, max_msg_size=cfg.max_frame + (1 << 20),
                                         compress=cfg.compress)
        self._conn = conn
        self.progress.compression = bool(ws.compress)
        if cfg.compress and not ws.compress and not self._told_uncompressed:
            self._told_uncompressed = True
            log.warning("the primary at %s did not agree to compress the stream; it comes uncompressed",
                        cfg.primary)
        resume_tid, resume_bytes, resume_records = offer or (None, 0, 0)
        # Said to the primary when this node ends a working session itself, so that its
        # log tells a planned stop (INFO) from a lost secondary (WARNING).
        farewell: Goodbye | None = None
        try:
            await ws.send_bytes(conn.send(Hello(
                PROTOCOL_VERSION, cfg.node, last_tid, identity.digest if identity else None, epoch,
                identity.status if identity else " ", identity.meta if identity else None, self.instance,
                resume_tid, resume_bytes, resume_records, epochs.database)))
            welcome = await self._receive_welcome(ws, conn)
            self._check_loop(welcome)
            await self._check_epoch(welcome, epoch)
            if welcome.database is not None and welcome.database != epochs.database:
                # The primary placed this node's history in its own: its database is this one's.
                await blocking(record_database, self.storage.getName(), welcome.database)
                self.database = welcome.database
            self.applier.resume(welcome.resume_bytes, welcome.resume_records)
            self.progress.connected = True
            self.progress.connected_since = time.monotonic()
            self.progress.last_heard_at = time.time()
            self.progress.primary_node = welcome.node
            self.progress.head_tid = welcome.head_tid
            self.link_log.connected(welcome.node)
            log.info("following primary %s from %s (primary at %s)", welcome.node, tid_repr(last_tid),
                     tid_repr(welcome.head_tid))
            self.catch_up.following(time.monotonic())
            if offer is not None:
                if welcome.resume_records:
                    log.info("resuming transaction %s: the primary leaves out the %d record(s) received here "
                             "before%s", tid_repr(offer[0]), welcome.resume_records,
                             f", then {size_text(welcome.resume_bytes)} of the blob in part"
                             if welcome.resume_bytes else "")
                elif welcome.resume_bytes:
                    log.info("resuming transaction %s: the primary leaves out the %s of its blobs kept here",
                             tid_repr(offer[0]), size_text(welcome.resume_bytes))
                else:
                    log.info("the primary sends transaction %s whole: what was kept of it is dropped",
                             tid_repr(offer[0]))
            queue = _BatchQueue(cfg.queue_bytes)
            reader = asyncio.create_task(self._read_loop(ws, conn, queue), name="secondary-reader")
            applier = asyncio.create_task(self._apply_loop(ws, conn, queue), name="secondary-applier")
            self._ack_due.clear()
            acker = asyncio.create_task(self._ack_loop(ws, conn), name="secondary-acker")
            try:
                await asyncio.wait({reader, applier}, return_when=asyncio.FIRST_COMPLETED)
                if not applier.done():
                    # The connection ended (closed, Goodbye, promotion): apply the
                    # complete transactions already received before giving up on
                    # it; a primary that stopped for good (damage ahead) may never
                    # send them again.  A transaction received in part is aborted.
                    queue.end()
                    await applier
                    if self._draining.is_set():
                        return
            finally:
                for task in (reader, applier, acker):
                    task.cancel()
                await asyncio.gather(reader, applier, acker, return_exceptions=True)
            # The applier's failure (bad digest, full disk) says more than the
            # reader's (the socket closed because of it).
            for task in (applier, reader):
                error = None if task.cancelled() else task.exception()
                if error is not None:
                    raise error
        except asyncio.CancelledError:
            farewell = Goodbye("shutdown", "secondary stopping")
            raise
        except StorageError as exc:
            then = "it stops replicating" if isinstance(exc, DurabilityError) else "it retries"
            farewell = Goodbye("error", f"local storage failed: {exc}; {then}")
            raise
        finally:
            self._ws = self._conn = None
            if not ws.closed:
                if farewell is not None:
                    await _say_goodbye(ws, conn, farewell)
                await ws.close()

    async def _check_epoch(self, welcome: Welcome, ours: int) -> None:
        """Never follow an older epoch's primary; join a newer one's (the handshake checked history)."""
        if welcome.epoch < ours:
            rejected = RejectedError("stale", f"primary {welcome.node} is at epoch {welcome.epoch}, older than "
                                              f"this node's epoch {ours}: it is a stale primary; not following it")
            raise rejected
        if welcome.epoch > ours or not self._following_recorded:
            # Recorded in epoch 0 too: a node that followed another must not
            # start as a primary by mistake (``Primary`` refuses to).
            assert self.storage is not None
            await blocking(adopt_epoch, self.storage.getName(), welcome.epoch, welcome.node)
            self._following_recorded = True
            if welcome.epoch > ours:
                log.info("following primary %s into epoch %d", welcome.node, welcome.epoch)
        self.progress.epoch = welcome.epoch
        if self.downstream is not None:  # the secondaries this node relays to join it
            await self.downstream.move_to_epoch(welcome.epoch, f"following primary {welcome.node}")

    async def _receive_welcome(self, ws, conn: Connection) -> Welcome:
        """The primary's answer to our Hello: a ``Welcome``, or the refusal raised.

        The primary may take long to answer: to place a secondary that was
        away during a pack, it scans the file the pack replaced
        (``Data.fs.old``), minutes on a big storage.  So while the primary's
        host owes us nothing (it acknowledged the Hello; ``host_silence``),
        the wait goes on, up to ``WELCOME_WAIT``; a host that vanished
        leaves the Hello unacknowledged and is given up after ``idle_timeout``.
        """
        idle = self.config.idle_timeout
        started = time.monotonic()
        told = False
        while True:
            try:
                msg = await ws.receive(timeout=idle)
                break
            except TimeoutError:
                waited = time.monotonic() - started
                silence = host_silence(ws)
                if silence is None or silence >= idle or waited >= WELCOME_WAIT:
                    raise TransportError(str(self.config.primary), f"the primary did not answer our Hello within "
                                         f"{waited:.0f} s") from None
                if not told:
                    told = True
                    log.info("the primary at %s is still working on its answer to our Hello (after a pack it may "
                             "be reading the file the pack replaced); waiting for it", self.config.primary)
        if msg.type is not WSMsgType.BINARY:
            if ws.close_code == aiohttp.WSCloseCode.PROTOCOL_ERROR:
                # An older primary cannot read a newer Hello at all, so it
                # cannot refuse it by version either.
                raise TransportError(str(self.config.primary), "the primary closed the connection as a protocol "
                                     f"error before its Welcome: it may run an older release (this one speaks "
                                     f"protocol {PROTOCOL_VERSION})", hint="run the same replicator release on the "
                                     "primary and its secondaries; see Upgrading in the README")
            raise TransportError(str(self.config.primary), f"primary closed the connection before its Welcome ({msg.type.name})")
        conn.receive_data(msg.data)
        event = conn.next_event()
        if isinstance(event, Reject):
            rejected = RejectedError(event.code, event.message)
            rejected.fork_tid = event.fork_tid
            raise rejected
        if not isinstance(event, Welcome):
            raise RemoteProtocolError(f"expected Welcome, got {event!r:.80}")
        return event

    def _read_error(self, exc: BaseException | None) -> ReplicatorError:
        """What a WebSocket read error means: a message over the limit is the primary's fault."""
        if isinstance(exc, aiohttp.WebSocketError) and exc.code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG:
            return RemoteProtocolError(f"the primary sent a message over the {self.config.max_frame + (1 << 20)}-byte "
                                       f"limit (after decompression, if compressed): {exc}")
        return TransportError(str(self.config.primary), f"connection error: {exc}")

    async def _receive(self, ws):
        """The next message; ``TransportError`` once the link brought no data for ``idle_timeout``.

        One message may take longer than that on a slow link (a catch-up
        batch or blob chunk is up to 1 MiB, a record up to ``max_frame``,
        and the primary's heartbeats queue behind it): while the connection
        still receives data (Linux says when it last did), the wait goes on.
        A process that was itself stopped for that long takes one more look
        (``STALL_LOOK``) at what arrived before it blames the primary.
        """
        idle = self.config.idle_timeout
        while True:
            try:
                return await ws.receive(timeout=idle)
            except TimeoutError:
                pass
            try:
                # A process stopped or stalled for longer than `idle` (SIGSTOP, a
                # paused VM) wakes up to this timeout before it reads what came
                # meanwhile, which may even be received already: one more look.
                return await ws.receive(timeout=STALL_LOOK)
            except TimeoutError:
                quiet = seconds_since_heard(ws)
                if quiet is not None and quiet < idle:
                    continue  # bytes are arriving: a message longer than the link carries in `idle`
                raise TransportError(str(self.config.primary), f"nothing from the primary for {idle:g} s: the "
                                     "link or the primary is down (the primary sends a heartbeat every "
                                     "second while it has nothing else to send)") from None

    async def _read_loop(self, ws, conn: Connection, queue: asyncio.Queue) -> None:
        limit = ReceiveLimit(ws, self.config.max_rate) if self.config.max_rate else None
        coalescing = self.coalescing = ReadCoalescing(ws)
        try:
            await self._read_messages(ws, conn, queue, limit, coalescing)
        finally:
            coalescing.off()

    async def _read_messages(self, ws, conn: Connection, queue: asyncio.Queue, limit: ReceiveLimit | None,
                             coalescing: ReadCoalescing) -> None:
        big_blob = False  # the blob whose chunks come next is bigger than INLINE_APPLY_BYTES
        while True:
            msg = await self._receive(ws)
            if msg.type is WSMsgType.BINARY:
                size = len(msg.data)
                coalescing.message(size)
                if limit is not None and (wait := limit.delay(size)) > 0:
                    # Read on later: the kernel's buffer fills, the window closes and the
                    # primary's sending waits (its liveness check sees a host that answers).
                    await asyncio.sleep(wait)
                self.progress.bytes_received += size
                self.progress.last_heard_at = time.time()
                conn.receive_data(msg.data)
                batch = _Batch([], size)
                events = batch.events
                for event in conn.events():
                    # Records and chunks first: they are nearly all the events.
                    if isinstance(event, Record):
                        if event.blob_size is not None:
                            batch.blobs += 1
                            big_blob = event.blob_size > INLINE_APPLY_BYTES
                        events.append(event)
                    elif isinstance(event, BlobChunk):
                        batch.stall = batch.stall or big_blob
                        events.append(event)
                    elif isinstance(event, Heartbeat):
                        self.progress.head_tid = max(self.progress.head_tid, event.head_tid)
                        if event.head_tid == self.progress.applied_tid and self._storage_failing is None:
                            # Caught up over a link that works: whatever broke it is over (the log
                            # keeps it), though no transaction came since to say so (_make_durable).
                            self.progress.last_error = None
                    elif isinstance(event, Goodbye) and event.code == "stale":
                        raise RejectedError("stale", event.message)
                    elif isinstance(event, Goodbye):
                        goodbye = TransportError(str(self.config.primary),
                                                 f"primary said goodbye ({event.code}): {event.message}",
                                                 hint=GOODBYE_HINTS.get(event.code, ""))
                        if "(hint: " in event.message:
                            goodbye.hint = ""  # the primary's own advice is the better one
                        raise goodbye
                    else:
                        if isinstance(event, TxnBegin):
                            self.progress.head_tid = max(self.progress.head_tid, event.tid)
                            if self.progress.first_tid is None and self.progress.applied_tid == Z64:
                                self.progress.first_tid = event.tid
                        events.append(event)
                if events:
                    await queue.put(batch)
            elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                raise TransportError(str(self.config.primary), f"primary closed the connection ({ws.close_code})")
            elif msg.type is WSMsgType.ERROR:
                raise self._read_error(msg.data if isinstance(msg.data, BaseException) else ws.exception())
            else:
                raise RemoteProtocolError(f"unexpected {msg.type.name} message")

    async def _apply_loop(self, ws, conn: Connection, queue: asyncio.Queue) -> None:
        """Apply batches until cancelled, or until the ``None`` that ``stop_following`` queues.

        A batch that cannot take long (see ``INLINE_APPLY_BYTES``) is
        applied right here on the event loop; any other in a worker thread.
        The fsync that makes a batch durable runs in a second thread while
        the next batch is applied; each batch is acknowledged once its fsync
        returned, in order.
        """
        assert self.applier is not None
        applier = self.applier
        syncing: asyncio.Task | None = None
        last = False
        carried: _Batch | None = None  # taken from the queue, but too much to merge into the batch before
        try:
            while not last:
                if applier.index_save_due and not applier.in_transaction:
                    if syncing is not None:
                        await syncing  # the index saved must not name anything not yet durable
                        syncing = None
                    await blocking(applier.save_index)
                batch: _Batch | None
                if carried is not None:
                    batch, carried = carried, None
                else:
                    batch = await _next_batch(queue, syncing)
                if batch is None:
                    return
                # Merge what is already waiting, as long as the batch can still be applied
                # on the loop: fewer fsyncs while catching up.
                while not queue.empty() and len(batch.events) < 10_000:
                    more = queue.get_nowait()
                    if more is None:
                        last = True
                        break
                    if batch.inline and not batch.inline_with(more):
                        carried = more
                        break
                    batch.add(more)
                if batch.inline and not applier.may_stall:
                    tids = applier.apply(batch.events, durable=False)
                else:
                    tids = await blocking(applier.apply, batch.events, durable=False)
                if syncing is not None:
                    await syncing  # one fsync at a time, acknowledgements in order
                    syncing = None
                if tids:
                    syncing = asyncio.create_task(self._make_durable(ws, conn, tids))
        finally:
            if syncing is not None:
                # Whatever ends the loop, what was committed is made durable
                # (and acknowledged if the connection still stands).
                await asyncio.shield(syncing)
                await self._send_ack(ws, conn)

    async def _make_durable(self, ws, conn: Connection, tids: list[bytes]) -> None:
        assert self.applier is not None
        await blocking(self.applier.make_durable, tids)
        self.progress.applied_tid = tids[-1]
        self.progress.applied_at = time.time()
        self.progress.txns_applied += len(tids)
        self.progress.last_error = None  # whatever it was, transactions are applied again
        self.catch_up.applied(time.monotonic())
        if self._storage_failing is not None:
            since, attempts = self._storage_failing
            self._storage_failing = None
            # Whoever saw the storage fail (at ERROR) must see it work again.
            log.warning("local storage %s takes transactions again after %s (%d failed attempt%s)",
                        self.config.storage, _duration(time.monotonic() - since), attempts,
                        "" if attempts == 1 else "s")
        if self.downstream is not None:
            self.downstream.notifier.notify()
        self._ack_due.set()

    async def _ack_loop(self, ws, conn: Connection) -> None:
        """Acknowledge what became durable: at once, then at most once per ``Welcome.ack_delay``."""
        assert conn.welcome is not None
        delay = conn.welcome.ack_delay
        while True:
            await self._ack_due.wait()
            self._ack_due.clear()
            await self._send_ack(ws, conn)
            if delay:
                await asyncio.sleep(delay)

    async def _send_ack(self, ws, conn: Connection) -> None:
        """Acknowledge the newest durable TID if it is news to the primary."""
        tid = self.progress.applied_tid
        floor = conn.acked_tid or (conn.welcome.start_tid if conn.welcome else tid)
        # After a Goodbye or a close there is nobody to tell; the next
        # Hello reports the same position.
        if tid > floor and not ws.closed and conn.state is ConnectionState.STREAMING:
            with contextlib.suppress(ConnectionError):
                await ws.send_bytes(conn.send(Ack(tid)))  # send() moves conn.acked_tid first


    # -- /status ---------------------------------------------------------

    def status(self) -> dict:
        p = self.progress
        behind = p.head_tid > p.applied_tid
        if self.promoted and self.storage is not None:
            # The primary now: its clients' commits move the storage, not the applier;
            # /fence and a newer epoch stop its writes as they stop any primary's.
            serving = self.downstream
            return {**self._status(p, False), "last_tid": self.storage.lastTransaction().hex(),
                    "last_tid_time": tid_time(self.storage.lastTransaction()), "connected": False,
                    "fenced": serving.fenced if serving is not None else None,
                    "stale": serving.stale if serving is not None else False,
                    # Whether a ZEO server serves its storage (a node embedded in one, or --zeo):
                    # a plain `replicator secondary` promoted takes no writes by itself.
                    "serves_zeo": self._on_promoted is not None,
                    **(self._promoted_status() if self._promoted_status is not None else {})}
        return self._status(p, behind)

    def _lag(self, p: _Progress, behind: bool) -> dict:
        """``lag_seconds`` and how far to trust it.

        Connected, it is exact: the commit time of the primary's head (kept
        current by heartbeats) minus that of our newest transaction, or, with
        nothing applied yet, minus that of the primary's first transaction.
        Disconnected, the primary's head is unknown: anything committed since
        it was last heard from is unseen, so the figure is the larger of the
        lag behind the last head heard of and the time since then
        (``lag_exact`` false): not a measurement but how old the newest state
        this node can vouch for is, growing through an outage so that alerts
        fire.  None while that is unknown too (never heard from, or nothing
        applied yet and no transaction of the primary's seen).
        """
        known: float | None = 0.0
        if behind:
            since = p.applied_tid if p.applied_tid != Z64 else p.first_tid
            known = None if since is None else max(0.0, tid_time(p.head_tid) - tid_time(since))
        silent = None if p.last_heard_at is None else max(0.0, time.time() - p.last_heard_at)
        if p.connected or self.promoted:
            lag = known
        elif known is None or silent is None:
            lag = None
        else:
            lag = max(known, silent)
        return {"lag_seconds": None if lag is None else round(lag, 6),
                "lag_exact": (p.connected or self.promoted) and lag is not None,
                "lag_last_known_seconds": None if known is None else round(known, 6),
                "last_heard_at": p.last_heard_at}

    def _status(self, p: _Progress, behind: bool) -> dict:
        # A relay: the secondaries following this node, and those it refused or dropped.
        relayed = self.downstream.status() if self.downstream else {}
        return {
            "role": "primary" if self.promoted else "secondary",
            "promoted": self.promoted,
            "node": self.config.node,
            "storage": os.path.abspath(self.config.storage),  # read elsewhere: as typed, it may say nothing
            "protocol_version": PROTOCOL_VERSION,
            "started_at": self.started_at,
            "primary": str(self.config.primary),
            "primary_node": p.primary_node,
            "connected": p.connected,
            "last_tid": p.applied_tid.hex(),
            "last_tid_time": tid_time(p.applied_tid),
            "primary_last_tid": p.head_tid.hex(),
            **self._lag(p, behind),
            "transactions_applied": p.txns_applied,
            "bytes_received": p.bytes_received,
            # Bytes a broken link had delivered, which the primary then left out.
            "resumed_bytes": self.applier.resumed_bytes if self.applier is not None else 0,
            "compression": p.compression,
            "max_rate": self.config.max_rate,
            # What stopped the following; once promoted there is none to report (a stale alert).
            "last_error": None if self.promoted else p.last_error,
            # Refused for good and holding (``serve(hold=True)``): why.
            "error": None if self.stopped is None or self.promoted else str(self.stopped),
            "epoch": p.epoch,
            "database": None if self.database is None else self.database.hex(),
            "secondaries": relayed.get("secondaries", []),
            **({key: relayed[key] for key in ("refusals", "silent_secondaries_dropped")} if relayed else {}),
        }
