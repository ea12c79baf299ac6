"""The primary: serves the replication stream of one FileStorage to secondaries.

Each secondary gets a session with its own tailer positioned after the
secondary's last transaction.  The sender reads batches of events in a worker
thread (one thread hop per batch, not per record), encodes them through the
sans-IO ``Connection`` and awaits ``send_bytes``, which waits for the socket
to drain: a stalled secondary stops its session's reads and nothing else.  A
``ChangeNotifier`` wakes idle sessions when the file's tail moves (polling in
sidecar mode; an embedding storage can call ``notify()`` on commit instead).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web
from cryptography import x509
from ZODB.blob import FilesystemHelper

from . import packlog
from .applier import discard_leftovers, remove_orphans
from .config import Address, PrimaryConfig
from .cpuload import CpuPressure
from .credentials import EXPIRY_WARNING, Credentials
from .epoch import EpochRecord, load_epoch, record_database
from .errors import (
    CorruptedSourceError,
    DivergenceError,
    FencedStorageInUseError,
    RemoteProtocolError,
    ReplicatorError,
    SourceReplacedError,
    SourceRewrittenError,
    StorageInUseError,
)
from .fencing import FenceRecord, clear_fence, fence_path, load_fence, save_fence
from .fswatch import FileWatch
from .integrity import TxnIdentity
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import render_metrics
from .protocol import (
    PROTOCOL_VERSION,
    Ack,
    Connection,
    Goodbye,
    Heartbeat,
    Hello,
    Reject,
    Role,
    TxnEnd,
    Welcome,
)
from .status import size_text
from .storage import lock_storage, storage_writer, writers_visible
from .tailer import Tailer
from .threads import blocking
from .throttle import Throttle
from .tid import Z64, tid_repr, tid_time
from .transport import (
    RefusedHandshakes,
    authorize,
    close_connections,
    host_silence,
    peer_address,
    peer_chain,
    peer_identity,
    start_server,
    stop_server,
)

__all__ = ["Primary", "ChangeNotifier"]

log = logging.getLogger("replicator.primary")

#: Seconds between a sidecar's looks for the process that writes its storage (its ZEO server).
WRITER_LOOK = 5.0

HELLO_TIMEOUT = 10.0
#: Largest message a secondary may send: a Hello (under a kilobyte) or its
#: acknowledgements (a dozen bytes each).  The stream's own limit would let
#: one deflated message of 127 KB hold 64 MiB of acknowledgements, decoded
#: on the event loop for tens of seconds.
MAX_FROM_SECONDARY = 64 << 10
#: Seconds between two WARNINGs that one secondary's session ended, or that none is left.
LOST_LOG_INTERVAL = 60.0
#: Seconds between two log lines refusing one secondary node for one reason.
REFUSAL_LOG_INTERVAL = 300.0
#: Least time between two background refreshes of the head TID (one scan covers
#: every commit since).  /status, /metrics, a new session and a refusal look
#: afresh themselves, so only in-process readers of ``head_tid`` see it this old.
HEAD_REFRESH_INTERVAL = 0.25
#: How long a secondary may hold an acknowledgement back (``Welcome.ack_delay``)
#: when no commit waits for it: under load one acknowledgement then covers
#: tens of transactions instead of one per batch, each of which cost this
#: process a read, a decryption and a wake-up.  Status and switchover see
#: acknowledgements at most this much later.
ACK_DELAY = 0.25
#: A session this close to the end of the file reads inline instead of in a worker thread.
INLINE_READ_BYTES = 256 << 10
#: Under CPU saturation, the delay between the sessions' wake-ups is this
#: (seconds, or ``batch_delay`` if shorter) from the first saturated sample
#: on; once the saturation counts as lasting, it doubles every ``RAMP_STEP``
#: seconds up to ``batch_delay``.
FIRST_BATCH_DELAY = 0.01
RAMP_STEP = 0.5


def _remote_address(request: web.Request) -> str:
    """``HOST:PORT`` of the client (``[v6]:PORT``): tells apart two connections from one host."""
    transport = request.transport
    return peer_address(transport.get_extra_info("peername") if transport is not None else None) \
        or str(request.remote)


class SecondaryGoneError(Exception):
    """A secondary's host stopped answering; the message says which and for how long."""


def _last_identity(hello: Hello) -> TxnIdentity:
    """The identity of the secondary's last transaction, as its ``Hello`` gives it."""
    return TxnIdentity(hello.last_tid, hello.last_status, hello.last_digest or b"", hello.last_meta_digest or b"")


def _leaf(error: BaseException) -> BaseException:
    """The first real exception inside (nested) exception groups."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


class ChangeNotifier:
    """Tells waiting sessions that the storage file may hold new commits.

    Each waiter parks on a future of its own, which ``notify()`` resolves:
    no task, lock or ``wait_for`` per wake-up (under load there are hundreds
    a second, and each used to cost the primary more than shipping a commit).
    """

    def __init__(self, path: str, poll_interval: float, batch_delay: float = 0.0,
                 pressure: CpuPressure | None = None) -> None:
        self.path = path
        self.poll_interval = poll_interval
        #: While ``pressure`` says the CPUs are saturated, ``notify_threadsafe``
        #: wakes the sessions at most this often (0: at every commit).
        self.batch_delay = batch_delay
        self.pressure = pressure if pressure is not None else (CpuPressure() if batch_delay else None)
        #: Wake-ups put off under CPU pressure (shown in /status): batch ticks
        #: that found commits, and the sidecar's looks at ``batch_delay``.
        self.batched_wakeups = 0
        self.version = 0
        self._waiters: set[asyncio.Future] = set()
        self._stamp: tuple[int, int, int] | None = None
        #: The stat of the look that made ``version`` (None if no look did):
        #: the sessions it wakes read up to its size without a stat of their own.
        self.looked: tuple[int, os.stat_result] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_scheduled = False  # a wake-up is on its way to the loop
        self._dirty = False  # a commit came since the last wake-up
        self._ticking = False  # a batch tick is armed on the loop
        #: Set by an embedding storage that calls ``notify_threadsafe`` after
        #: every commit: sessions need not look again by themselves for a
        #: commit they saw under way.
        self.every_commit_notified = False
        self._recheck = False  # a session stopped at a commit under way: the next look wakes it
        #: The sidecar's poller: times it went to sleep on file events, and looks those events woke.
        self.sleeps = 0
        self.event_wakeups = 0
        self.poller: _Poller | None = None  # while poll_forever runs

    def notify(self) -> None:
        """A commit happened: wake every waiting session (call from the event loop)."""
        self.version += 1
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def notify_threadsafe(self) -> None:
        """``notify()`` from another thread, e.g. a storage's ``tpc_finish`` under ZEO.

        Commits that come while a wake-up is already on its way share it:
        the sessions it wakes read everything committed by then.  While the
        CPUs are saturated, a wake-up arms a batch tick
        ``current_batch_delay()`` later, and commits until then only mark the notifier dirty: the
        tick wakes the sessions for all of them, with no signal from the
        committing thread to the loop.  Each signal costs the embedding
        server's CPUs a thread switch and a loop pass, whatever it ships.
        With idle CPUs every commit wakes the sessions at once.
        """
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        # Dekker-style hand-off with _tick: this sets _dirty and then reads
        # _ticking; _tick clears _ticking and then reads _dirty.  One of the
        # two sees the other's write, so no commit is left unannounced.
        self._dirty = True
        if self._ticking or self._wake_scheduled:
            return
        self._wake_scheduled = True
        loop.call_soon_threadsafe(self._scheduled_notify)

    def _scheduled_notify(self) -> None:
        self._wake_scheduled = False
        self._wake()

    def _wake(self) -> None:
        self._dirty = False  # before notify(): a commit after this is marked again
        self.notify()
        if not self._ticking and self._loop is not None:
            delay = self.current_batch_delay()
            if delay:
                self._ticking = True
                self._loop.call_later(delay, self._tick)

    def _tick(self) -> None:
        self._ticking = False
        if self._dirty:
            self.batched_wakeups += 1
            self._wake()  # arms the next tick while the CPUs stay saturated
        # else: no commit since; the next one wakes the sessions itself

    async def wait(self, seen: int, timeout: float) -> int:
        """Wait until ``version`` moves past ``seen`` or ``timeout``; return the version."""
        if self.version != seen:
            return self.version
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(timeout, _resolve, waiter)
        self._waiters.add(waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiters.discard(waiter)
        return self.version

    def recheck(self) -> None:
        """A session stopped at a commit under way: wake it at the next look, changed or not.

        The commit's finish flips one status byte, which need not change the
        file's size or its (coarse) mtime that ``_look`` compares.  Looking
        again on the poller's own timer, rather than on a timer of the
        session's, keeps one wake-up per look under load, when a commit is
        nearly always under way.
        """
        self._recheck = True

    def current_batch_delay(self) -> float:
        """Seconds the sessions' wake-ups are now put off by: 0 while the CPUs have idle time.

        From the first saturated sample (``CpuPressure.strained``) it is
        ``FIRST_BATCH_DELAY`` (at most ``batch_delay``): until a saturation
        has lasted long enough to count, a wake-up per commit would cost the
        server the most, a few hundred microseconds of its CPU each, while a
        sample that was a moderate load's peak holds commits back by 10 ms
        at most.  Once the saturation counts (``CpuPressure.saturated_for``),
        the delay doubles every ``RAMP_STEP`` seconds it lasts, up to
        ``batch_delay``.  Each wake-up costs the server's CPUs the same
        whatever it ships, so under a lasting saturation fewer of them give
        the server back more of its throughput.
        """
        if not self.batch_delay or self.pressure is None:
            return 0.0
        start = min(FIRST_BATCH_DELAY, self.batch_delay)
        lasted = self.pressure.saturated_for()
        if lasted is None:
            return start if self.pressure.strained() else 0.0
        return min(self.batch_delay, start * 2 ** min(int(lasted / RAMP_STEP), 16))

    def poll_delay(self) -> float:
        """Seconds to the next look: ``poll_interval``, or ``current_batch_delay()`` if longer
        (each look wakes this process, and that comes out of the server's
        throughput once the CPUs have no idle time)."""
        delay = self.current_batch_delay()
        if delay > self.poll_interval:
            self.batched_wakeups += 1
            return delay
        return self.poll_interval

    async def poll_forever(self, file_events: bool = False) -> None:
        """Look at the file every ``poll_delay()`` until cancelled; with
        ``file_events``, sleep on inotify instead while the file is quiet.

        Each look is a timer callback, not a task waking from a sleep: at
        100 looks a second, the task machinery cost more than the look.
        After ``QUIET_LOOKS`` looks in a row found nothing, the poller stops
        its timer and waits for the kernel to report a write to the file
        (``FileWatch``): an idle primary then wakes about once a second
        instead of 100 times, and the first commit after a pause ships at
        once instead of at the next look.  Every event wakes the sessions
        (a write is news even when the size and coarse mtime look the
        same, as a commit's finishing status byte does), so a commit seen
        under way is shipped at the write that finishes it.  A burst of
        events (commits closer than about one per poll interval) turns the
        timer back on: under load one look per interval costs less than a
        wake-up per write.  If the file changes without any event, twice in
        a row (a network file system changed by another host), the poller
        says so and polls from then on.
        """
        self._loop = loop = asyncio.get_running_loop()
        watch: FileWatch | None = None
        if file_events:
            try:
                watch = FileWatch(self.path)
            except OSError as exc:
                log.info("no file events for %s (%s): looking every %g s", self.path, exc, self.poll_interval)
        self.poller = poller = _Poller(self, loop, watch)
        poller.poll()
        try:
            await loop.create_future()  # until cancelled
        finally:
            poller.stop()
            self.poller = None

    def _look(self, *, news: bool = False) -> bool:
        """Stat the file; wake the sessions if it changed, a recheck is due, or ``news``."""
        try:
            # A stat of a local file does not block for long: no thread hop.
            st: os.stat_result | None = os.stat(self.path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)  # type: ignore[union-attr]
        except OSError:
            st, stamp = None, (0, 0, 0)  # mid-pack rename; the next look sees the new file
        if stamp != self._stamp or self._recheck or news:
            self._stamp = stamp
            self._recheck = False
            self.notify()
            self.looked = (self.version, st) if st is not None else None
            return True
        return False

    def stat_for(self, version: int) -> os.stat_result | None:
        """The stat of the look that made ``version``, if a look did."""
        looked = self.looked
        return looked[1] if looked is not None and looked[0] == version else None


#: Looks in a row that found nothing before the sidecar's poller sleeps on file events.
QUIET_LOOKS = 3
#: This many file events within two poll intervals turn the timer back on.
EVENT_BURST = 4
#: Seconds between the looks taken while sleeping on file events (a safety net).
SAFETY_LOOK = 1.0


class _Poller:
    """The sidecar's look timer, and its sleep on file events while the file is quiet."""

    def __init__(self, notifier: ChangeNotifier, loop: asyncio.AbstractEventLoop, watch: FileWatch | None) -> None:
        self.notifier = notifier
        self.loop = loop
        self.watch = watch
        self.timer: asyncio.TimerHandle | None = None
        self.quiet = 0  # looks in a row that found nothing
        self.sleeping = False  # on file events, with only the safety timer
        self.events: deque[float] = deque(maxlen=EVENT_BURST)
        self.unexplained = 0  # safety looks in a row that found a change no event announced

    def poll(self) -> None:
        """One timed look; then the next, or sleep on file events if the file has been quiet."""
        self.timer = None
        notifier = self.notifier
        try:
            self.quiet = 0 if notifier._look() else self.quiet + 1
        finally:
            if self.watch is not None and self.quiet >= QUIET_LOOKS and not notifier._recheck:
                self._sleep()
            else:
                self.timer = self.loop.call_later(notifier.poll_delay(), self.poll)

    def _sleep(self) -> None:
        watch = self.watch
        assert watch is not None
        watch.changed()  # forget the writes the looks have seen
        if self.notifier._look():  # one that came after the last look, before the kernel's queue was read
            self.quiet = 0
            self.timer = self.loop.call_later(self.notifier.poll_delay(), self.poll)
            return
        self.sleeping = True
        self.events.clear()
        self.loop.add_reader(watch.fd, self._on_event)
        self.timer = self.loop.call_later(SAFETY_LOOK, self._safety_look)
        self.notifier.sleeps += 1

    def _wake_up(self) -> None:
        """Back to timed looks."""
        assert self.watch is not None
        self.sleeping = False
        self.loop.remove_reader(self.watch.fd)
        if self.timer is not None:
            self.timer.cancel()
        self.quiet = 0
        self.timer = self.loop.call_later(self.notifier.poll_delay(), self.poll)

    def _on_event(self) -> None:
        assert self.watch is not None
        if self.watch.changed():
            self._news()

    def _news(self) -> None:
        watch = self.watch
        assert watch is not None
        self.notifier.event_wakeups += 1
        self.notifier._look(news=True)
        self.unexplained = 0
        now = self.loop.time()
        self.events.append(now)
        if watch.lost:
            self._give_up("the directory is gone from under the watch")
        elif len(self.events) == EVENT_BURST and now - self.events[0] < 2 * self.notifier.poll_interval:
            self._wake_up()  # a steady stream of commits: one look per interval costs less

    def _safety_look(self) -> None:
        watch = self.watch
        assert watch is not None
        self.timer = None
        notifier = self.notifier
        if watch.changed():
            self._news()  # events the loop had not handed to _on_event yet
        else:
            before = notifier._stamp
            notifier._look()  # also wakes a session waiting on a commit under way
            if notifier._stamp != before and not watch.changed():
                self.unexplained += 1
                if self.unexplained >= 2:
                    self._give_up("it changed twice without a file event (a network file system?)")
                    return
            else:
                self.unexplained = 0
        if self.sleeping and self.timer is None:
            self.timer = self.loop.call_later(SAFETY_LOOK, self._safety_look)

    def _give_up(self, why: str) -> None:
        log.warning("file events for %s stopped: %s; looking every %g s from now on",
                    self.notifier.path, why, self.notifier.poll_interval)
        if self.sleeping:
            self._wake_up()
        assert self.watch is not None
        self.watch.close()
        self.watch = None

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.watch is not None:
            if self.sleeping:
                self.loop.remove_reader(self.watch.fd)
            self.watch.close()


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


@dataclass
class SessionStats:
    """What /status reports for one connected secondary."""

    peer: str
    node: str = "?"
    connected_at: float = field(default_factory=time.time)
    sent_tid: bytes = Z64
    acked_tid: bytes = Z64
    acked_at: float = 0.0
    #: The first transaction sent to a secondary that came empty: its lag is
    #: measured from that commit time until it acknowledges one.
    first_sent_tid: bytes | None = None
    bytes_sent: int = 0
    txns_sent: int = 0
    #: The secondary asked for a deflated stream and gets one.
    compression: bool = False
    #: Position of sent_tid / acked_tid in the file (transactions up to them).
    sent_ordinal: int = 0
    acked_ordinal: int = 0
    #: Shipped but not yet acknowledged transactions, oldest first, with ordinals.
    in_flight: deque[tuple[bytes, int]] = field(default_factory=deque)
    #: ``Hello.instance``: the secondary process, across its reconnections.
    instance: bytes | None = None
    #: Ends the connection at once (a reconnection of the same process replaces it).
    abort: Callable[[], None] | None = None
    #: Set when a newer connection of the same secondary replaced this one.
    replaced: bool = False
    #: Why the session ended, for its last log line (None: this primary ended it, stopping,
    #: or nothing said why); ``quiet`` when it ended as planned (a goodbye), which is no warning.
    ended: str | None = None
    quiet: bool = False
    #: When the certificate it presented expires (Unix time), with TLS.
    certificate_not_after: float | None = None

    def as_dict(self, head_tid: bytes, head_count: int | None) -> dict:
        since = self.acked_tid if self.acked_tid != Z64 else self.first_sent_tid
        lag_s: float | None = 0.0
        if self.acked_tid < head_tid:
            lag_s = None if since is None else max(0.0, tid_time(head_tid) - tid_time(since))
        # Ordinals come from the file as it was when counted; a pack shrinks
        # the count, so this is clamped and exact again after a reconnect.
        pending = None if head_count is None else max(0, head_count - self.acked_ordinal)
        return {
            "peer": self.peer,
            "node": self.node,
            "certificate_not_after": self.certificate_not_after,
            "connected_at": self.connected_at,
            "sent_tid": self.sent_tid.hex(),
            "acked_tid": self.acked_tid.hex(),
            "acked_tid_time": tid_time(self.acked_tid),
            "lag_seconds": None if lag_s is None else round(lag_s, 6),
            "lag_transactions": pending,
            "compression": self.compression,
            "bytes_sent": self.bytes_sent,
            "transactions_sent": self.txns_sent,
        }


@dataclass(frozen=True)
class UpstreamAnswer:
    """What the primary a relay follows says of a downstream secondary's last TID."""

    #: Its transaction with that TID, if it has one.
    identity: TxnIdentity | None
    #: Its newest transaction now.
    head_tid: bytes
    #: It is the source of its chain (a primary), not a relay catching up itself.
    source: bool
    #: Its node name.
    node: str


def relay_verdict(node: str, upstream: str, head: bytes, theirs: TxnIdentity,
                  answer: UpstreamAnswer | None) -> Reject:
    """A relay (``node``, newest transaction ``head``) to a secondary whose last transaction
    ``theirs`` is newer than ``head``, knowing what the primary it follows says of it."""
    last = theirs.tid
    catching_up = (f"this node ({node}) relays the history of {upstream}, and its newest transaction "
                   f"{tid_repr(head)} is older than the secondary's last transaction {tid_repr(last)}")
    if answer is None:
        return Reject("behind", f"{catching_up}: it is probably still catching up with its own primary "
                                "(after a restart that lost an unsynced tail, say), which it could not ask")
    there = f"{answer.node}, the primary it follows"
    if answer.identity is not None:
        if answer.identity.matches(theirs):
            return Reject("behind", f"{catching_up}; {there}, has that transaction: this node is catching up")
        return Reject("diverged", f"the secondary's transaction {tid_repr(last)} differs from the transaction "
                                  f"with the same TID in the history of {there}: the histories fork at or "
                                  "before it", fork_tid=None)
    if answer.head_tid >= last:
        # Not there, though its history reaches past it: a fork, or a pack of it dropped the
        # transaction.  Once caught up this node can tell (as any primary does), not before.
        return Reject("behind", f"{catching_up}; {there}, does not have it either (a pack may have dropped "
                                "it): this node tells once it has caught up")
    if answer.source:
        return Reject("ahead", f"the secondary's last transaction {tid_repr(last)} is newer than the newest "
                               f"transaction {tid_repr(answer.head_tid)} of {there}, the source of this chain: "
                               "it has transactions this chain never had")
    return Reject("behind", f"{catching_up}; {there}, is a relay itself and older still: the chain is "
                            "probably catching up")


class Primary:
    """Serves ``/replicate`` (WebSocket) and ``/status`` (JSON) over HTTPS."""

    def __init__(self, config: PrimaryConfig, *, status_provider: Callable[[], dict] | None = None,
                 routes: Iterable[web.RouteDef] = (), relay: bool = False,
                 upstream: Callable[[], str] | None = None, credentials: Credentials | None = None,
                 upstream_answer: Callable[[bytes], Awaitable[UpstreamAnswer | None]] | None = None,
                 sidecar: bool = False) -> None:
        """``status_provider`` replaces ``status()`` for GET /status (a cascading secondary's);
        ``routes`` are more handlers on the same port (the control API).  ``relay``: this
        serves a secondary's storage onward (and its /status), in the epoch of the primary
        it follows; its logs say secondary.  ``upstream``: a relay's description of the
        primary it follows, for its refusals.  ``credentials``: the TLS files, already
        read by an owner who keeps them current (a relay's secondary); by default the
        primary reads ``config.tls`` and checks for renewed files itself.  ``upstream_answer``:
        a relay's question to the primary it follows about a TID (``relay_verdict``).
        ``sidecar``: the commits come from another process (a ZEO server beside this one), so
        a fence holds the storage's lock (``storage_lock``), also when it starts fenced."""
        self.config = config
        self.sidecar = sidecar
        #: A relay's: ``Hello.instance`` of the secondary process that owns it, refused as a peer.
        self.own_instance: bytes | None = None
        #: A relay's: the node name of the primary it follows (None until known), refused as a
        #: peer: each would follow the other, and neither take writes.
        self.upstream_node: Callable[[], str | None] | None = None
        self.upstream_answer = upstream_answer
        self.credentials = credentials
        self._owns_credentials = False
        self._forget_trust: Callable[[], None] | None = None
        self.relay = relay
        self.upstream = upstream
        self.role = "secondary" if relay else "primary"
        self.status_provider = status_provider
        self.routes = list(routes)
        #: The epoch this node's history is in (``epoch.py``); read at start.
        self.epoch = 0
        #: The database this node's history belongs to (``epoch.py``), once recorded: in
        #: /status, so that ``replicator status`` can tell two primaries of one database.
        self.database: bytes | None = None
        #: Why this node accepts no writes (drained for a switchover, or stale), if it does not.
        self.fenced: str | None = None
        #: Since when (Unix time) it is fenced; a fence recorded before a restart keeps its time.
        self.fenced_at: float | None = None
        #: One write or removal of the fence record (``fencing``) at a time.
        self._fence_io = asyncio.Lock()
        #: Called once a fence takes the clients away, and when a fence is undone (a
        #: storage wrapper drops its ZEO clients, which register again and find out
        #: who takes writes now).
        self.fence_listeners: list[Callable[[], None]] = []
        self._clients_dropped = False
        #: Awaited by ``settle()``: an embedding storage waits for the commit in flight.
        self.fence_settlers: list[Callable[[], Awaitable[None]]] = []
        #: A newer epoch exists elsewhere: this node must neither write nor stream.
        self.stale = False
        #: Why it is stale (shown to the secondaries it refuses).
        self.stale_reason = ""
        #: Fenced, then superseded by a node promoted in its place (``by epoch 2 (seen from b)``):
        #: it still streams to its secondaries, but its fence cannot be undone.
        self.superseded = ""
        #: A sidecar's fence holds the storage's lock (``zc.lockfile.LockFile``), so that no writer opens it.
        self.storage_lock: Any = None
        #: Newest TID each secondary node acknowledged, across its sessions.
        self.acked_by_node: dict[str, bytes] = {}
        #: Resolved on every acknowledgement; only synchronous commits wait on them.
        self._ack_waiters: set[asyncio.Future] = set()
        # Synchronous commits wait for their shipment: never put it off.
        self.notifier = ChangeNotifier(config.storage, config.poll_interval,
                                       batch_delay=0.0 if config.sync_count else config.batch_delay)
        self.sessions: dict[int, SessionStats] = {}
        self._sockets: dict[int, tuple[web.WebSocketResponse, Connection]] = {}
        #: Connections past their Hello, by the same keys (``sessions`` holds
        #: those past the handshake too): one secondary node name each.
        self._claims: dict[int, SessionStats] = {}
        self.head_tid = Z64
        self.head_count: int | None = None
        self.started_at = time.time()
        self.fatal: ReplicatorError | None = None
        #: Damage found ahead by the head scan; fatal once a session reaches it.
        self.damage_ahead: CorruptedSourceError | None = None
        #: Damage a session met behind the newest transaction (``_damage_is_behind``), the last one.
        self.damage_behind: CorruptedSourceError | None = None
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []
        self._head_tailer: Tailer | None = None
        #: Recording what a pack dropped (``packlog``), and whether another pack came meanwhile.
        self._pack_recording: asyncio.Task | None = None
        self._pack_again = False
        self._pack_seen = False  # a replacement of the file was seen since the last record
        self._replacements_seen = 0
        #: Packs the record holds (``packlog``): a secondary away across them can resume.
        self.recorded_packs: int | None = None
        self._head_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        #: What ``stop()`` tells the secondaries (a demotion says where this node goes).
        self.goodbye = Goodbye("shutdown", "primary stopping")
        self.bytes_sent = 0
        #: Secondaries refused at their Hello, by ``Reject`` code (/status, /metrics).
        self.refusals: collections.Counter[str] = collections.Counter()
        self._refusal_log = Throttle(REFUSAL_LOG_INTERVAL)
        self._expiry_log = Throttle(86400.0)
        #: A lost secondary (or none left) is a WARNING once a minute at most per node: a link
        #: that flaps, or a secondary whose disk is full, would otherwise warn at every retry.
        self._lost_log = Throttle(LOST_LOG_INTERVAL)
        #: Sessions dropped because the secondary's host fell silent.
        self.silent_dropped = 0
        #: TLS connections refused at their handshake (certificates), by reason.
        self.refused_handshakes = RefusedHandshakes()

    # -- lifecycle -------------------------------------------------------

    def _discard_secondary_leftovers(self, blob_dir: str) -> None:
        """Remove the blob files a secondary kept on this storage for a transaction it never committed.

        A secondary stopped while a big transaction was cut off leaves its
        blob files (with a manifest) for its next start, and a killed one
        leaves the file it was writing.  If the storage is a primary's now
        (a failover), nothing will take them over; nor the blob files a
        secondary killed while it kept a transaction open had placed under
        their final names (unless the file is damaged: its last transaction
        is then unknown).  A relay is a secondary: its storage's files are
        its own applier's.
        """
        fshelper = FilesystemHelper(blob_dir)
        files, size = discard_leftovers(fshelper.temp_dir)
        if files:
            log.warning("removed %d blob file(s) (%s) from %s that a secondary had kept to resume a "
                        "transaction cut off: this storage is a primary's now", files, size_text(size),
                        fshelper.temp_dir)
        if self.damage_ahead is None:
            remove_orphans(fshelper.temp_dir, self.head_tid, fshelper.getBlobFilename)

    async def start(self) -> int:
        """Open the source, bind the port; return the port actually bound."""
        cfg = self.config
        epochs = await asyncio.to_thread(load_epoch, cfg.storage)
        self.epoch = epochs.epoch
        self.database = epochs.database
        if not self.relay and epochs.history and epochs.history[-1].node != cfg.node:
            self._start_superseded(epochs.history[-1])
        # A relay serves a secondary's storage: a fence recorded there (a demoted
        # primary's) is for the day it is started as a primary again.
        # Stale by its epoch record: _start_superseded said why and what to do, and a
        # fence record's own advice (undo it, or that it streams on) no longer holds.
        stale_by_epoch = self.stale
        recorded = None if self.relay else await asyncio.to_thread(load_fence, cfg.storage)
        if recorded is not None:
            self._start_fenced(recorded)
        try:
            await self._start_serving()
        except BaseException:
            self.release_storage_lock()
            raise
        if recorded is not None and stale_by_epoch:
            log.info("%s: its fence since %s (%s) is recorded in %s as well; it stays", cfg.storage,
                     recorded.since, recorded.reason, fence_path(cfg.storage))
        elif recorded is not None:
            self._log_started_fenced(recorded)
        assert self.port is not None
        return self.port

    async def _start_serving(self) -> None:
        cfg = self.config
        self._head_tailer = Tailer(cfg.storage, cfg.blob_dir)
        await asyncio.to_thread(self._head_tailer.open)
        self._note_pack(seen=False)  # a pack made while no primary was running, if not recorded yet
        await self._refresh_head()
        if not self.relay and cfg.blob_dir:
            await asyncio.to_thread(self._discard_secondary_leftovers, cfg.blob_dir)
        # Every route checks the client certificate's role first (transport.ROLE_RIGHTS).
        app = web.Application(client_max_size=1 << 16, middlewares=[authorize])
        app.router.add_get("/replicate", self._handle_replicate)
        app.router.add_get("/status", self._handle_status)
        app.router.add_get("/metrics", self._handle_metrics)
        app.router.add_routes(self.routes)
        contexts = None
        if cfg.tls is not None and not cfg.insecure:
            if self.credentials is None:
                self.credentials = Credentials(cfg.tls.ca, cfg.tls.cert, cfg.tls.key)
                self._owns_credentials = True
            # Each connection gets the context of the TLS files in use at that moment.
            contexts = self.credentials.server_context
        self._runner, self.port = await start_server(app, cfg.listen.host, cfg.listen.port, contexts,
                                                     refused=self.refused_handshakes)
        if self.credentials is not None and contexts is not None:
            self._forget_trust = self.credentials.on_trust_narrowed(self._close_untrusted)
        if self._owns_credentials and self.credentials is not None:
            self._tasks.append(asyncio.create_task(self.credentials.watch(), name="tls-files"))
        self._tasks += [
            asyncio.create_task(self.notifier.poll_forever(
                file_events=cfg.file_events and not self.notifier.every_commit_notified), name="tail-poller"),
            asyncio.create_task(self._track_head(), name="head-tracker"),
        ]
        if self.sidecar and not self.relay:
            self._tasks.append(asyncio.create_task(self._watch_writer(), name="writer-watch"))
        logging.getLogger(f"replicator.{self.role}").info(
            "%s %s serving %s on %s:%s (%s); head %s", self.role, cfg.node, cfg.storage, cfg.listen.host,
            self.port, "INSECURE plaintext" if cfg.insecure else "mutual TLS", tid_repr(self.head_tid))

    def _start_fenced(self, record: FenceRecord) -> None:
        """Started on a storage whose fence was recorded (``fencing``): fenced from the start.

        A sidecar takes the storage's lock, as its live fence does, so that no
        ZEO server opens the storage for writing; a process that already has
        it open could take writes this one cannot stop, so it refuses to start
        (``FencedStorageInUseError``).
        """
        if record.stale and not self.stale:
            self.stale, self.stale_reason = True, record.reason
        if record.superseded and not self.superseded:
            self.superseded = record.superseded
        if self.fenced is None:
            self.fenced = record.reason
        self.fenced_at = record.at
        if self.sidecar and self.storage_lock is None:
            try:
                self.storage_lock = lock_storage(self.config.storage)
            except StorageInUseError as exc:
                raise FencedStorageInUseError(
                    exc.path, exc.lock_path, exc.holder, fenced=f"since {record.since}: {record.reason}",
                    fence_record=fence_path(self.config.storage), undo=self.undo_command(),
                    final=record.stale or bool(record.superseded)) from None

    def _log_started_fenced(self, record: FenceRecord) -> None:
        storage, path = self.config.storage, fence_path(self.config.storage)
        if record.stale:
            log.critical("%s: this primary was superseded by a newer epoch (%s; since %s) and stays so across "
                         "this restart, as %s records: it accepts no writes and streams to nobody. Configure it "
                         "as a secondary of the current primary. To make it the primary on purpose, run it as a "
                         "secondary and `replicator promote` it, which begins an epoch of its own and removes "
                         "that record", storage, record.reason, record.since, path)
            return
        held = ("; it holds the storage's lock, so that no ZEO server can open the storage for writing"
                if self.storage_lock is not None else "")
        if record.superseded:
            log.critical("%s: this primary has been fenced since %s (%s), then superseded %s, and stays so "
                         "across this restart, as %s records: it accepts no writes%s, and streams what it has to "
                         "its secondaries. Configure it as a secondary of the current primary", storage,
                         record.since, record.reason, record.superseded, path, held)
            return
        log.critical("%s: this primary has been fenced since %s (%s) and stays fenced across this restart, as "
                     "%s records: it accepts no writes%s. Another node may be the primary now. Only if none is "
                     "and this one is to take writes again: `%s`", storage, record.since, record.reason, path,
                     held, self.undo_command())

    def undo_command(self) -> str:
        """The command that undoes this node's fence, with this node's own TLS files."""
        cfg = self.config
        host = cfg.listen.host if cfg.listen.host not in ("", "0.0.0.0", "::") else "THIS-HOST"
        address = Address(host, self.port or cfg.listen.port)
        if cfg.tls is None or cfg.insecure:
            options = "--insecure"
        else:
            options = f"--tls-ca {cfg.tls.ca} --tls-cert {cfg.tls.cert} --tls-key {cfg.tls.key}"
        return f"replicator fence --undo {address} {options}"

    def _close_untrusted(self) -> None:
        """A CA was taken out of the CA file, or a certificate revoked: close the connections they made."""
        if self._runner is not None and self.credentials is not None:
            close_connections(self._runner, self.credentials.untrusted, "client")

    async def stop(self) -> None:
        self._stopping.set()
        if self._forget_trust is not None:
            self._forget_trust()
            self._forget_trust = None
        # Say goodbye first: otherwise the server's cleanup waits out its
        # shutdown timeout for every session handler still streaming.
        await self._end_sessions(self.goodbye)
        tasks = [*self._tasks, *([self._pack_recording] if self._pack_recording is not None else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._runner is not None:
            await stop_server(self._runner)
        if self._head_tailer is not None:
            await asyncio.to_thread(self._head_tailer.close)
        self.release_storage_lock()

    def release_storage_lock(self) -> None:
        """Let writers open the storage again (a sidecar's fence held its lock)."""
        lock, self.storage_lock = self.storage_lock, None
        if lock is not None:
            lock.close()

    async def run_until_stopped(self) -> None:
        """Serve until ``stop()``; raise the fatal error (source damage) if one stopped us."""
        await self._stopping.wait()
        if self.fatal is not None:
            raise self.fatal

    async def hold(self) -> None:
        """Stopped for good (``fatal``), go on answering until cancelled: ``/status`` and
        ``/metrics`` show the error, and every secondary is refused with it.

        For a primary inside a ZEO server, which goes on taking writes that no
        secondary receives: a closed port would make the node look merely
        unreachable (a sidecar exits instead, with status 3).
        """
        assert self.fatal is not None
        await self._end_sessions(Goodbye(*self._stopped_for_good()))
        await asyncio.Event().wait()

    def demoting(self, upstream: str) -> None:
        """This node is being demoted to follow ``upstream``: the goodbye of ``stop()`` says so."""
        self.goodbye = Goodbye("shutdown", f"{self.config.node} is demoted by a switchover: it follows "
                                           f"{upstream} from now on, and serves on at once on the same port "
                                           "(this node reconnects and resumes)")

    async def _end_sessions(self, goodbye: Goodbye) -> None:
        """Send every session ``goodbye`` and close it (a second or two each at most)."""
        for ws, conn in list(self._sockets.values()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.send_bytes(conn.send(goodbye)), 1.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2.0)

    def _stopped_for_good(self) -> tuple[str, str]:
        """The code and message a held primary (``hold``) gives its secondaries."""
        code = "corrupted" if isinstance(self.fatal, CorruptedSourceError) else "error"
        return code, f"primary {self.config.node} stopped replicating: {self.fatal}"

    async def _refresh_head(self) -> None:
        assert self._head_tailer is not None
        async with self._head_lock:  # one user of the head tailer at a time (it may be in a thread)
            try:
                if self._head_tailer.unscanned_bytes() <= INLINE_READ_BYTES:
                    tid, count = self._head_tailer.head()  # a few new headers: no thread hop
                else:
                    tid, count = await asyncio.to_thread(self._head_tailer.head)
            except SourceRewrittenError as exc:
                # Cut below what was read, with no session there to meet it: stop all the same.
                self._fail(exc)
                return
        self.head_tid, self.head_count = tid, count
        if self._head_tailer.replacements != self._replacements_seen:
            self._replacements_seen = self._head_tailer.replacements
            self._note_pack()
            await self._rebase_ordinals()
        damage = self._head_tailer.damage
        if damage is not None and self.damage_ahead is None:
            # Serve what comes before it; a session that reaches it stops us.
            self.damage_ahead = damage
            log.error("%s; transactions before it are still served", damage)

    async def _rebase_ordinals(self) -> None:
        """The file was replaced (a pack): count each session's transactions in the new one.

        A session counts the transactions it sent and that were acknowledged
        by their position in the file (``lag_transactions`` is the head's
        count minus the acknowledged one); a pack that dropped transactions
        before them moves every position, and drops some of them perhaps.
        The acknowledged and in-flight transactions of each session are
        counted again in the new file (in a thread: one walk over the
        headers from the first of them).  What was acknowledged or sent
        meanwhile keeps its old count, and is exact again at the next pack
        or reconnection.
        """
        assert self._head_tailer is not None
        head = self._head_tailer
        sessions = [(stats, [stats.acked_tid, *(tid for tid, _ in stats.in_flight)])
                    for stats in list(self.sessions.values())]
        if not sessions:
            return
        async with self._head_lock:
            try:
                found = await asyncio.to_thread(lambda: [head.counts_up_to(tids) for _, tids in sessions])
            except (OSError, ReplicatorError) as exc:
                log.info("cannot count the secondaries' positions in the packed file (%s); their "
                         "lag_transactions is exact again once they reconnect", exc)
                return
        for (stats, tids), counts in zip(sessions, found, strict=True):
            if stats.acked_tid != tids[0]:
                continue  # acknowledged more meanwhile: left for the next count
            count = dict(zip(tids, counts, strict=True))
            stats.acked_ordinal = count[tids[0]]
            stats.in_flight = deque((tid, count.get(tid, ordinal)) for tid, ordinal in stats.in_flight)
            if stats.in_flight and stats.sent_tid == stats.in_flight[-1][0]:
                stats.sent_ordinal = stats.in_flight[-1][1]
            elif not stats.in_flight and stats.sent_tid == stats.acked_tid:
                stats.sent_ordinal = stats.acked_ordinal

    def _damage_is_behind(self, exc: CorruptedSourceError) -> bool:
        """Damage in a transaction older than the newest (a missing blob file of an old
        revision, a damaged old record): the secondaries past it may go on receiving new
        commits; only those that still have to read it cannot.  Not a file that lost what was
        read from it, which makes every position in it doubtful."""
        return (not isinstance(exc, SourceRewrittenError) and self._head_tailer is not None
                and 0 < exc.offset < self._head_tailer.head_pos())

    def _note_damage_behind(self, exc: CorruptedSourceError, node: str | None) -> None:
        if self.damage_behind is None or self.damage_behind.offset != exc.offset:
            log.critical("%s; secondary %s cannot get past it and is refused until the file is repaired, "
                         "while the others go on receiving new commits", exc, node)
        self.damage_behind = exc
        self.refusals["corrupted"] = self.refusals.get("corrupted", 0) + 1

    def _note_pack(self, *, seen: bool = True) -> None:
        """The file was replaced, by a pack most likely: record what it dropped (``packlog``).

        In a thread, one record at a time; a pack seen meanwhile is recorded next.
        ``seen``: the file was seen replaced (not the look at start for a pack made meanwhile).
        """
        self._pack_seen = self._pack_seen or seen
        if self._pack_recording is None or self._pack_recording.done():
            self._pack_recording = asyncio.create_task(self._record_pack(), name="pack-record")
        else:
            self._pack_again = True

    async def _record_pack(self) -> None:
        path = self.config.storage
        while True:
            self._pack_again = False
            seen, self._pack_seen = self._pack_seen, False
            try:
                count = await asyncio.to_thread(packlog.record_pack, path)
            except (OSError, ReplicatorError) as exc:
                log.warning("cannot record what the pack dropped in %s: %s; a secondary away across this pack "
                            "and the next will have to start anew", packlog.log_path(path), exc)
            else:
                if count is not None:
                    log.info("recorded the %d transaction(s) the pack dropped in %s: a secondary away across "
                             "later packs too can resume", count, packlog.log_path(path))
                elif seen and not os.path.exists(path + ".old"):
                    log.warning("%s was replaced (by a pack, most likely) and no %s.old is left beside it (ZODB's "
                                "pack-keep-old false removes it): what the pack dropped cannot be recorded, so a "
                                "secondary that was away across this pack must start anew from an empty "
                                "storage. Keep pack-keep-old true (ZODB's default) in the <filestorage> section",
                                path, path)
            with contextlib.suppress(OSError):
                self.recorded_packs = await asyncio.to_thread(packlog.recorded_packs, path)
            if not self._pack_again:
                break

    async def _track_head(self) -> None:
        seen = -1
        while True:
            seen = await self.notifier.wait(seen, self.config.heartbeat_interval)
            await self._refresh_head()
            # The head serves /status, heartbeats and refusals; a few looks a
            # second are enough, and under load one look covers many commits.
            await asyncio.sleep(HEAD_REFRESH_INTERVAL)

    def fence(self, reason: str, *, keep_clients: bool = False) -> None:
        """Accept no more writes (an embedding storage checks ``writable``); streaming goes on.

        The fence listeners drop the embedding ZEO server's clients, so that
        they register again and find the node that takes writes, unless
        ``keep_clients``: a switchover keeps them until the new primary is
        promoted (``demote`` drops them then), because a client that
        registered again in between would find no server taking writes and
        ZEO's client retries only about every ten seconds.  A later fence
        without ``keep_clients`` drops them.
        """
        first = self.fenced is None
        self.fenced = reason
        if first:
            self.fenced_at = time.time()
            log.warning("fenced: no more writes on this node: %s", reason)
        if not keep_clients and not self._clients_dropped:
            self._clients_dropped = True
            for listener in self.fence_listeners:
                listener()

    async def fence_durably(self, reason: str, *, keep_clients: bool = False) -> None:
        """``fence()``, then record the fence beside the storage (``fencing``), so that this node
        starts fenced if it is restarted.  ``OSError`` if the record cannot be written: the
        fence then holds only until this process ends."""
        self.fence(reason, keep_clients=keep_clients)
        await self._record_fence()

    async def _record_fence(self) -> None:
        """Write the fence as it is now (a relay's is not recorded: its storage is a secondary's)."""
        if self.relay:
            return
        async with self._fence_io:
            if self.fenced is None:
                return  # undone meanwhile
            record = FenceRecord(self.fenced, self.fenced_at or time.time(), self.config.node, self.epoch,
                                 self.stale, self.superseded)
            await blocking(save_fence, self.config.storage, record)

    async def unfence_durably(self) -> None:
        """Remove the fence record, then ``unfence()``.  ``OSError`` if it cannot be removed:
        the node then stays fenced."""
        async with self._fence_io:
            if not self.relay:
                removed = await blocking(clear_fence, self.config.storage)
                if removed is not None:
                    log.info("removed the fence record %s", fence_path(self.config.storage))
            self.unfence()

    async def settle(self) -> None:
        """After ``fence()``: return once no commit can land any more, with the head up to date."""
        for settler in list(self.fence_settlers):
            await settler()
        await self._refresh_head()

    def unfence(self) -> None:
        """Take writes again.  The fence listeners drop the ZEO clients once more: ZEO decides
        read-only or read-write only as a client registers, so a client that came back
        read-only while this node was fenced (``read_only_fallback``) would stay read-only."""
        was_fenced = self.fenced is not None
        self.fenced = self.fenced_at = None
        self._clients_dropped = False
        if was_fenced:
            log.warning("fence undone: this node takes writes again")
            for listener in self.fence_listeners:
                listener()

    @property
    def writable(self) -> bool:
        return self.fenced is None and not self.stale

    async def move_to_epoch(self, epoch: int, why: str) -> None:
        """This node's history is in ``epoch`` from now on (``why``: its promotion, or a relay
        following a newer primary).

        New sessions hear it in their Welcome.  Open ones are closed with a
        Goodbye, so that their secondaries reconnect at once and join the
        epoch: a secondary that stayed in the old one would, if promoted
        itself, begin an epoch number this one already has.
        """
        if epoch == self.epoch:
            return
        self.epoch = epoch
        for ws, conn in list(self._sockets.values()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.send_bytes(conn.send(Goodbye(
                    "epoch", f"{self.config.node} is in epoch {epoch} now ({why}); reconnect to join it"))), 1.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2.0)

    async def note_superseded(self, epoch: int, node: str) -> None:
        """A node promoted in this fenced primary's place began ``epoch``: the fence stays for good,
        recorded, but this node goes on streaming what it has to its secondaries (a switchover's
        other secondaries follow it until it is demoted).  ``OSError`` if the record cannot be written."""
        assert self.fenced is not None
        if not self.superseded:
            # A switchover does this on purpose: WARNING, not CRITICAL (an emergency's alerts come
            # from the fence before it, and from the secondaries' refusals after).
            log.warning("node %s was promoted to epoch %d in place of this fenced primary (epoch %d): this "
                        "node's fence cannot be undone; it streams what it has and takes no writes", node, epoch,
                        self.epoch)
        self.superseded = f"by epoch {epoch} (seen from {node})"
        await self._record_fence()

    async def become_stale(self, epoch: int, node: str) -> None:
        """A newer epoch exists: fenced for good, and recorded so that a restart does not forget it
        (a node stale already has its record, or an epoch record that makes it stale at each start)."""
        first = not self.stale
        if first:
            log.critical("node %s is at epoch %d, this primary at %d: a newer primary was promoted; "
                         "this node accepts no more writes and streams to nobody", node, epoch, self.epoch)
        self.stale = True
        self.stale_reason = f"superseded by epoch {epoch} (seen from {node})"
        self.fence(self.stale_reason)
        if not first:
            return
        try:
            await self._record_fence()
        except OSError as exc:
            log.error("cannot record the fence in %s: %s; this node would take writes again after a restart",
                      fence_path(self.config.storage), exc)

    def _start_superseded(self, record: EpochRecord) -> None:
        """Started as a primary on a storage that followed another node's epoch: stale from the start.

        A node may be the primary only of an epoch it began itself (its
        promotion), or of epoch 0 if it never followed another node.  This
        storage's latest record says it followed ``record.node`` (any
        secondary, or a primary demoted by a switchover).  Taking writes
        here would fork the history: both nodes would commit, and nothing
        could fence either, since both are in the same epoch.
        """
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.at))
        if record.start_tid is None:
            reason = (f"this storage joined epoch {record.epoch} following node {record.node!r} ({when}), "
                      f"so this node ({self.config.node!r}) is a secondary, not a primary")
        else:
            reason = (f"epoch {record.epoch} of this storage was begun by node {record.node!r} ({when}), "
                      f"not by this node ({self.config.node!r})")
        self.stale, self.stale_reason = True, reason
        # A record this node wrote at its own promotion has a start; one it
        # wrote following a primary has none.
        renamed = (f"; if this node was renamed since it began epoch {record.epoch}, give it its old name "
                   f"again ({record.node!r})" if record.start_tid is not None else "")
        log.critical("%s: %s. It accepts no writes and streams to nobody. Configure it as a secondary of "
                     "%s (in a ZEO configuration: <replicated-secondary> instead of <replicated-primary>). "
                     "If %s is gone for good, run this node as its secondary and `replicator promote` it, "
                     "which begins a new epoch of its own%s", self.config.storage, reason, record.node,
                     record.node, renamed)
        self.fence(reason)

    async def wait_replicated(self, tid: bytes, count: int, names: frozenset[str] = frozenset(),
                              timeout: float | None = None) -> bool:
        """Wait until ``count`` secondaries (of ``names``, or any) acknowledged ``tid``; False on timeout."""
        def enough() -> bool:
            return sum(1 for node, acked in self.acked_by_node.items()
                       if acked >= tid and (not names or node in names)) >= count
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not enough():
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            waiter = loop.create_future()
            self._ack_waiters.add(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                return False
            finally:
                self._ack_waiters.discard(waiter)
        return True

    def _note_ack(self, node: str, tid: bytes) -> None:
        """Record an acknowledgement; wake synchronous commits waiting for one (if any)."""
        if tid > self.acked_by_node.get(node, Z64):
            self.acked_by_node[node] = tid
        for waiter in self._ack_waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._stopping.is_set():
            return  # stopping already: what breaks while sessions are ended is no news
        if self.fatal is None and isinstance(exc, ReplicatorError):
            self.fatal = exc
            log.critical("stopping replication: %s", exc)
        self._stopping.set()

    # -- /status ---------------------------------------------------------

    def status(self) -> dict:
        secondaries = []
        for stats in list(self.sessions.values()):
            secondaries.append(stats.as_dict(self.head_tid, self.head_count))
        return {
            "role": "primary",
            "node": self.config.node,
            "storage": os.path.abspath(self.config.storage),  # read elsewhere: as typed, it may say nothing
            "protocol_version": PROTOCOL_VERSION,
            "started_at": self.started_at,
            "last_tid": self.head_tid.hex(),
            "last_tid_time": tid_time(self.head_tid),
            "transactions": self.head_count,
            "bytes_sent": self.bytes_sent,
            "secondaries": secondaries,
            "epoch": self.epoch,
            "database": None if self.database is None else self.database.hex(),
            "fenced": self.fenced,
            "fenced_since": self.fenced_at if self.fenced is not None else None,
            "stale": self.stale,
            "superseded": self.superseded or None,
            **self._writes_status(),
            "batched_wakeups": self.notifier.batched_wakeups,
            # Seconds wake-ups are put off by now: 0 unless the CPUs have been saturated a while.
            "batch_delay_now": self.notifier.current_batch_delay(),
            # Whether the poller sleeps on file events while the file is quiet (sidecar).
            "file_events": self.notifier.poller is not None and self.notifier.poller.watch is not None,
            "file_event_wakeups": self.notifier.event_wakeups,
            "recorded_packs": self.recorded_packs,
            "error": str(self.fatal or self.damage_ahead or self.damage_behind or "") or None,
            "refusals": dict(self.refusals),
            "silent_secondaries_dropped": self.silent_dropped,
        }

    async def _watch_writer(self) -> None:
        """A sidecar replicates what the ZEO server beside it commits: say which process that is,
        and warn when it goes away (nothing new will come), as its status shows."""
        storage, known, first = self.config.storage, None, True
        while True:
            if self.storage_lock is not None:
                known = None  # fenced: this process holds the lock, and says so
            else:
                writer = await asyncio.to_thread(storage_writer, storage)
                if writer is None and known is not None:
                    log.warning("%s no longer has %s open for writing (its ZEO server stopped?): there is "
                                "nothing new to replicate until one opens it again", known, storage)
                elif writer is None and first:
                    log.info("no process has %s open for writing yet: this primary streams what its ZEO "
                             "server commits once one runs", storage)
                elif writer is not None and writer != known:
                    log.info("%s has %s open for writing%s", writer, storage, "" if first else " now")
                known = writer
            first = False
            await asyncio.sleep(WRITER_LOOK)

    def _writes_status(self) -> dict:
        """Whether this node takes writes: an embedding server's do while it is not fenced; a
        sidecar's, while another process (the ZEO server) has the storage open for writing."""
        if not self.sidecar:
            return {"sidecar": False, "takes_writes": self.writable and not self.relay}
        writer = None if self.storage_lock is not None else storage_writer(self.config.storage)
        return {"sidecar": True, "writer": writer, "writer_known": writers_visible(),
                "takes_writes": self.writable and writer is not None}

    def served_status(self) -> dict:
        """What GET /status returns: the node's status (its provider's), and its certificate's."""
        status = (self.status_provider or self.status)()
        if self.credentials is not None:
            status["tls"] = self.credentials.status()
            status["refused_tls_connections"] = dict(self.refused_handshakes.counts)
        return status

    async def _handle_status(self, request: web.Request) -> web.Response:
        await self._refresh_head()
        return web.json_response(self.served_status())

    async def _handle_metrics(self, request: web.Request) -> web.Response:
        await self._refresh_head()
        body = render_metrics(self.served_status)
        return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})

    # -- /replicate ------------------------------------------------------

    async def _handle_replicate(self, request: web.Request) -> web.StreamResponse:
        cfg = self.config
        # A secondary that asks for compression (a slow link) gets it; the others do not.
        ws = web.WebSocketResponse(max_msg_size=MAX_FROM_SECONDARY, compress=True, autoping=True)
        await ws.prepare(request)
        identity = peer_identity(request)
        # "(certificate NAME)": the name on its certificate, which is not its role.
        peer = (f"{_remote_address(request)} ({identity})" if request.transport is None
                or not request.transport.get_extra_info("peercert")
                else f"{_remote_address(request)} (certificate {identity})")
        stats = SessionStats(peer=peer, compression=bool(ws.compress))
        conn = Connection(Role.PRIMARY, max_frame=cfg.max_frame)
        tailer = Tailer(cfg.storage, cfg.blob_dir)
        key = id(ws)
        try:
            hello = await self._receive_hello(ws, conn)
            stats.node, stats.instance = hello.node, hello.instance
            stats.certificate_not_after = self._peer_certificate_expiry(request, hello.node)
            transport = request.transport
            stats.abort = transport.abort if transport is not None else None
            if self.own_instance is not None and hello.instance == self.own_instance:
                # A secondary whose --primary is its own --listen port: it would "follow" itself,
                # caught up for ever, while the real primary moves on.
                await ws.send_bytes(conn.send(Reject("self", f"this is {hello.node}'s own port: a node cannot "
                                                             "follow itself")))
                return ws
            above = self.upstream_node() if self.upstream_node is not None else None
            if self.relay and above is not None and hello.node == above:
                refusal = Reject("loop", f"{hello.node} is the node this one ({cfg.node}) follows: each would "
                                         "follow the other, with no primary, and neither would take writes; point "
                                         "one of them at the primary (a node restarted with its configuration "
                                         "from before a promotion, say)")
                self._log_refusal(hello.node, peer, refusal)
                await ws.send_bytes(conn.send(refusal))
                return ws
            if self.fatal is not None:  # stopped for good, held open to say so (``hold``)
                refusal = Reject(*self._stopped_for_good())
                self._log_refusal(hello.node, peer, refusal)
                await ws.send_bytes(conn.send(refusal))
                return ws
            await asyncio.to_thread(tailer.open)
            # Before the name is claimed and the epoch heard: a replica of another
            # database is told so, not that its name is taken or that this node was replaced.
            database, foreign = await self._foreign(tailer, hello)
            if foreign is not None:
                self._log_refusal(hello.node, peer, foreign)
                await ws.send_bytes(conn.send(foreign))
                return ws
            unbound = self._identity_refusal(hello, request, identity)
            if unbound is not None:
                self._log_refusal(hello.node, peer, unbound)
                await ws.send_bytes(conn.send(unbound))
                return ws
            duplicate = self._claim(key, stats, hello)
            if duplicate is not None:
                self._log_refusal(hello.node, peer, duplicate)
                await ws.send_bytes(conn.send(duplicate))
                return ws
            await self._refresh_head()  # the Welcome and any refusal name the newest TID
            reject = await self._position(tailer, hello, database)
            if reject is not None:
                self._log_refusal(hello.node, peer, reject)
                await ws.send_bytes(conn.send(reject))
                return ws
            resume_bytes, resume_records = await self._resume(tailer, hello, peer)
            # Synchronous commits wait for acknowledgements: then none is held back.
            ack_delay = 0.0 if cfg.sync_count else ACK_DELAY
            await ws.send_bytes(conn.send(Welcome(PROTOCOL_VERSION, cfg.node, self.epoch, hello.last_tid,
                                                  self.head_tid, ack_delay, resume_bytes, resume_records,
                                                  database)))
            stats.sent_tid = stats.acked_tid = hello.last_tid
            # The secondary holds its last transaction durably (it fsyncs
            # before saying hello): a commit still waiting for it, whose Ack
            # the connection lost, need not wait for the next batch.
            self._note_ack(hello.node, hello.last_tid)
            # Its last transaction may be one a pack dropped (the handshake checked).
            (ordinal,) = await blocking(tailer.counts_up_to, [hello.last_tid])
            stats.sent_ordinal = stats.acked_ordinal = ordinal
            if self._stopping.is_set():
                # ``stop()`` has said goodbye to the sessions it knew while this one was in its
                # handshake: served, it would hold the server's close for its whole timeout.
                await ws.send_bytes(conn.send(self.goodbye))
                return ws
            self.sessions[key] = stats
            self._sockets[key] = (ws, conn)
            log.info("secondary %s (%s) connected at %s", hello.node, peer, tid_repr(hello.last_tid))
            async with asyncio.TaskGroup() as group:
                sender = group.create_task(self._send_loop(ws, conn, tailer, stats))
                await self._ack_loop(ws, conn, stats)
                sender.cancel()
        except* RemoteProtocolError as group_exc:
            stats.ended = f"it broke the protocol: {_leaf(group_exc)}"
            if key not in self.sessions:  # before its session began: no line will say it
                log.warning("secondary %s broke the protocol: %s", peer, _leaf(group_exc))
            await ws.close(code=1002, message=b"protocol error")
        except* CorruptedSourceError as group_exc:
            exc = _leaf(group_exc)
            with contextlib.suppress(Exception):
                await ws.send_bytes(conn.send(Goodbye("corrupted", str(exc))))
            if isinstance(exc, CorruptedSourceError) and self._damage_is_behind(exc):
                self._note_damage_behind(exc, stats.node)
            else:
                self._fail(exc)
        except* SecondaryGoneError as group_exc:
            stats.ended = str(_leaf(group_exc))
            self.silent_dropped += 1
        except* (TimeoutError, ConnectionError) as group_exc:
            stats.ended = f"the connection broke: {_leaf(group_exc) or type(_leaf(group_exc)).__name__}"
            if key not in self.sessions:
                log.info("secondary %s disconnected: %s", peer, stats.ended)
        except* SourceReplacedError as group_exc:
            # A routine pack, not damage: the secondary drops the transaction
            # under way and reconnects, and the handshake finds its place in
            # the packed file.
            reason = getattr(_leaf(group_exc), "message", "the storage was packed")
            stats.ended, stats.quiet = f"ending the stream: {reason} (it resumes in the packed file)", True
            if key not in self.sessions:
                log.info("ending the stream to %s: %s", peer, reason)
            with contextlib.suppress(Exception):
                await ws.send_bytes(conn.send(Goodbye("packed", reason)))
        except* ReplicatorError as group_exc:
            # Configuration problems met while streaming (a blob record but no
            # --blob-dir): no secondary can be served until an operator acts.
            exc = _leaf(group_exc)
            with contextlib.suppress(Exception):
                await ws.send_bytes(conn.send(Goodbye("error", str(exc))))
            self._fail(exc)
        finally:
            served = self.sessions.pop(key, None) is not None
            self._sockets.pop(key, None)
            self._claims.pop(key, None)
            await asyncio.to_thread(tailer.close)
            if not ws.closed:
                await ws.close()
            if served:  # a refusal was logged as such (and not again at every retry)
                self._log_session_end(stats)
        return ws

    def _log_session_end(self, stats: SessionStats) -> None:
        """Say why a secondary's session ended and, when no secondary is left, that the
        primary's commits are replicated nowhere: an operator sees a lost secondary at once."""
        stopping = self._stopping.is_set()
        why = stats.ended or ("this node is stopping" if stopping else "the connection closed")
        still = len(self.sessions)
        left = f"{still} secondar{'y' if still == 1 else 'ies'} still connected"
        quiet = stats.quiet or (stopping and stats.ended is None)
        unsaid = None if quiet else self._lost_log.due(("lost", stats.node))
        log.log(logging.INFO if unsaid is None else logging.WARNING,
                "session with secondary %s (%s) ended at acked %s: %s; %s%s", stats.node, stats.peer,
                tid_repr(stats.acked_tid), why, left, Throttle.since(unsaid or 0, "of this node's sessions ended"))
        if not still and not quiet and not stopping and not self.relay and self.fenced is None and not self.stale:
            unsaid = self._lost_log.due("none left")
            log.log(logging.INFO if unsaid is None else logging.WARNING,
                    "no secondary is connected now: commits are replicated nowhere until one connects again%s",
                    Throttle.since(unsaid or 0))

    def _identity_refusal(self, hello: Hello, request: web.Request, identity: str) -> Reject | None:
        """Refuse a node name of ``sync-names`` from a certificate not issued for it.

        Any node certificate of the cluster may name itself anything, so an
        acknowledgement under a name waited for would release synchronous
        commits that the named standby never got. Such a name is bound to the
        certificate of that name: a failover then finds every commit that
        returned on the standby.
        """
        names = self.config.sync_names
        if hello.protocol_version != PROTOCOL_VERSION or hello.node not in names:
            return None
        transport = request.transport
        if transport is None or not transport.get_extra_info("peercert"):
            return None  # plaintext (--insecure): no identity to bind, as its warning at start-up says
        if identity == hello.node:
            return None
        return Reject("identity", f"node name {hello.node!r} is in this primary's sync-names, whose "
                                  f"acknowledgements release synchronous commits, so only the certificate "
                                  f"issued for {hello.node!r} may use it; this secondary's certificate is "
                                  f"{identity!r}: give it one of its own (`replicator certs issue "
                                  f"{hello.node}`, then --tls-cert and --tls-key), or another node name")

    def _claim(self, key: int, stats: SessionStats, hello: Hello) -> Reject | None:
        """Take the secondary's node name for this connection, or say why not.

        Node names identify secondaries everywhere (``sync-names``, status,
        metrics), so two connected secondaries never share one: with
        synchronous replication, a second node under the standby's name
        could acknowledge commits the standby never got.  A connection of
        the same node from the same process (``Hello.instance``) is that
        process back after a link failure that the older connection has not
        noticed yet: the older one is dropped at once.  Another process under
        a name in use is refused with ``duplicate``, which it retries: the
        other may be a connection of a node that is gone, which the primary
        drops once its host has been silent for ``silence_limit``
        (``_ack_loop``).  (No await here: the check and the claim are one
        step.)
        """
        if hello.protocol_version != PROTOCOL_VERSION:
            return None  # refused by version next
        for other_key, other in list(self._claims.items()):
            if other.node != hello.node:
                continue
            if hello.instance is not None and other.instance == hello.instance:
                log.info("secondary %s connected again (%s): dropping its previous connection (%s)",
                         hello.node, stats.peer, other.peer)
                other.replaced = True
                self._claims.pop(other_key, None)
                self.sessions.pop(other_key, None)
                if other.abort is not None:
                    other.abort()
                continue
            return Reject("duplicate", f"another secondary named {hello.node!r} is connected to this primary "
                                       f"(from {other.peer}): each secondary needs a node name of its own "
                                       "(--node, or node in its configuration file). This one retries; if "
                                       "that other one is gone, the primary drops it once its host has been "
                                       f"silent for {self.config.silence_limit:g} s, and lets this one in")
        self._claims[key] = stats
        return None

    def _peer_certificate_expiry(self, request: web.Request, node: str) -> float | None:
        """When the secondary's certificate expires; a WARNING (daily per node) when that is soon.

        A secondary without ``--listen`` has no status to scrape: its
        primary's status and metrics are where its certificate's expiry shows.
        """
        transport = request.transport
        chain = peer_chain(transport.get_extra_info("ssl_object") if transport is not None else None)
        try:
            certs = [x509.load_der_x509_certificate(der) for der in chain]
        except ValueError:
            return None
        if not certs:
            return None
        # The leaf and its intermediates; the trust anchor at the end of a verified chain is our own CA.
        first = min(certs[:-1] or certs, key=lambda c: c.not_valid_after_utc)
        not_after = first.not_valid_after_utc.timestamp()
        if not_after - time.time() < EXPIRY_WARNING.total_seconds():
            if self._expiry_log.due(node) is not None:
                what = ("a certificate that" if first is certs[0] else
                        f"a certificate through the intermediate CA {first.subject.rfc4514_string()}, which")
                log.warning("secondary %s presents %s expires on %s, in %.0f days: renew it "
                            "(`replicator certs renew NAME`) and put the files in place on that node, which "
                            "loads them without a restart", node, what,
                            time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(not_after)),
                            (not_after - time.time()) / 86400)
        return not_after

    def _log_refusal(self, node: str, peer: str, reject: Reject) -> None:
        """Count a refusal; log it, but the same one of the same node only every few minutes
        (a refused secondary retries every 30 s for as long as nobody fixes it)."""
        self.refusals[reject.code] += 1
        unsaid = self._refusal_log.due((node, reject.code))
        if unsaid is not None:
            log.warning("refusing secondary %r from %s: %s%s", node, peer, reject.message,
                        Throttle.since(unsaid, f"of {node!r} for this reason"))

    async def _receive_hello(self, ws: web.WebSocketResponse, conn: Connection) -> Hello:
        msg = await ws.receive(timeout=HELLO_TIMEOUT)
        if msg.type is WSMsgType.ERROR:
            raise RemoteProtocolError(f"bad WebSocket message: {ws.exception()}")
        if msg.type is not WSMsgType.BINARY:
            raise RemoteProtocolError(f"expected a binary Hello message, got {msg.type.name}")
        conn.receive_data(msg.data)
        event = conn.next_event()
        if not isinstance(event, Hello):
            raise RemoteProtocolError(f"expected Hello, got {event!r:.80}")
        return event

    def _database_of(self, tailer: Tailer) -> bytes | None:
        """The database this node's history belongs to (``epoch.py``): the one its epoch record
        names, or on a primary that has named none yet, its first transaction's TID, recorded now
        (a relay names the one its own primary told it)."""
        storage = self.config.storage
        state = load_epoch(storage)
        if state.database is not None or self.relay:
            self.database = state.database
            return state.database
        first = tailer.successor(Z64)
        if first is None:
            return None
        try:
            self.database = record_database(storage, first[0]).database
            return self.database
        except OSError as exc:  # the check it serves is one more safeguard: not worth a session
            log.warning("could not record which database %s holds in %s.epoch: %s", storage, storage, exc)
            return first[0]

    async def _foreign(self, tailer: Tailer, hello: Hello) -> tuple[bytes | None, Reject | None]:
        """This node's database, and a refusal if the secondary holds a replica of another one.

        Another database named is not enough: a node of this group may have
        recorded another name (one began its record after an upgrade, before
        it ever followed this one).  So the secondary is refused as foreign only
        if, besides, its last transaction is not one of ours, and then before
        its epoch is heard: a newer epoch of another database says nothing of
        this one, and must not fence it.
        """
        ours = await blocking(self._database_of, tailer)
        theirs, last = hello.database, hello.last_tid
        if ours is None or theirs is None or theirs == ours or last == Z64:
            return ours, None
        mine = await blocking(tailer.identity, last)
        if mine is not None and mine.matches(_last_identity(hello)):
            return ours, None
        return ours, Reject("foreign", f"secondary {hello.node} holds a replica of another database than this "
                                       f"primary's {self.config.storage}: its history began with transaction "
                                       f"{tid_repr(theirs)}, this one's with {tid_repr(ours)}, and its last "
                                       f"transaction {tid_repr(last)} is not in this primary's history. Nothing "
                                       "was changed on either node; check the secondary's --primary (the port "
                                       "of another storage's primary?)")

    async def _position(self, tailer: Tailer, hello: Hello, database: bytes | None) -> Reject | None:
        """Check the secondary's history against ours; seek after its last TID or say why not.

        The secondary's last transaction must be ours too: equal digests, or,
        when either side packed it (status ``p``), equal metadata, since a pack
        rewrites records but never a transaction's identity.  A newer epoch
        fences this primary for good, so it is taken only from a node that
        names this primary's ``database``: every node of the group learns it
        from its first Welcome, and one that names none (or another) is not
        of this group, unless its last transaction is ours.
        """
        if hello.protocol_version != PROTOCOL_VERSION:
            return Reject("version", f"secondary speaks protocol {hello.protocol_version}, "
                                     f"this primary speaks {PROTOCOL_VERSION}")
        if hello.epoch > self.epoch:
            if database is not None and hello.database != database and not (
                    # Its record names none yet (kept from before protocol 8), but it holds our history.
                    hello.database is None and hello.last_tid != Z64
                    and (mine := await blocking(tailer.identity, hello.last_tid)) is not None
                    and mine.matches(_last_identity(hello))):
                named = "names no database" if hello.database is None else \
                    f"names another database (one that began with {tid_repr(hello.database)})"
                return Reject("foreign", f"secondary {hello.node} says epoch {hello.epoch} began, newer than this "
                                         f"primary's {self.epoch}, but {named}: every node of this primary's "
                                         f"group names its database (which began with {tid_repr(database)}), so "
                                         "the claim is not taken, and this primary goes on as it was. Check the "
                                         "secondary's --primary and its storage")
            await self.become_stale(hello.epoch, hello.node)
        if self.stale:
            return Reject("stale", f"this primary ({self.config.node}, epoch {self.epoch}) accepts no "
                                   f"secondary: {self.stale_reason}; follow the current primary instead")
        last = hello.last_tid
        resume_at = None
        if last != Z64:
            ours = await blocking(tailer.identity, last)
            theirs = _last_identity(hello)
            if ours is None:
                across = None if last > self.head_tid else await blocking(tailer.resumes_across_pack, theirs)
                if across is None:
                    return await self._explain_missing(tailer, last, theirs)
                # A pack dropped it; the file it replaced, or the record of packs, shows it was ours.
                resume_at, proof = across
                log.info("secondary %s resumes after transaction %s, which a pack of this primary dropped "
                         "(%s shows it was ours), with %s", hello.node, tid_repr(last), proof, tid_repr(resume_at))
            elif not ours.matches(theirs):
                return Reject("diverged", f"secondary's transaction {tid_repr(last)} differs from the "
                                          "primary's transaction with the same TID: the histories fork "
                                          "at or before it", fork_tid=None)
            elif ours.digest != theirs.digest:
                log.info("secondary %s resumes over transaction %s, packed on %s", hello.node, tid_repr(last),
                         "both sides" if ours.status == theirs.status == "p" else
                         ("the primary" if ours.status == "p" else "the secondary"))
        try:
            await blocking(tailer.seek_after, last, resume_at=resume_at)
        except DivergenceError as exc:
            return Reject("diverged", exc.message, fork_tid=exc.fork_tid)
        return None

    async def _resume(self, tailer: Tailer, hello: Hello, peer: str) -> tuple[int, int]:
        """How many blob bytes, after how many records, of its first transaction the
        secondary need not get again ((0, 0): all of it), as ``Welcome`` orders them.

        A secondary whose link broke while it received a big transaction
        keeps what it got, and names it in its ``Hello``.  That is left out
        only if the transaction is the next one here; its digest still
        covers every byte, so the secondary commits nothing it kept that
        differs from ours.
        """
        records, count = hello.resume_records, hello.resume_bytes
        if hello.resume_tid is None or not (records or count):
            return 0, 0
        what = " and ".join(([f"{records} record(s)"] if records else [])
                            + ([f"{size_text(count)} of blobs"] if count else []))
        if await blocking(tailer.next_tid) != hello.resume_tid:
            log.info("secondary %s (%s) kept %s of transaction %s, which is not the next one here; "
                     "it is sent whole", hello.node, peer, what, tid_repr(hello.resume_tid))
            return 0, 0
        tailer.skip(records, count)
        log.info("secondary %s (%s) resumes transaction %s: the %s it got before are not sent again",
                 hello.node, peer, tid_repr(hello.resume_tid), what)
        return count, records

    async def _explain_missing(self, tailer: Tailer, last: bytes, theirs: TxnIdentity) -> Reject:
        """The secondary's last TID is not in our file: say precisely why it cannot resume.

        A relay whose head is older than the secondary's last transaction
        cannot tell by itself: it may have lost an unsynced tail in a crash
        that its own secondaries had already read, and gets it back from its
        primary.  So it asks that primary (``upstream_answer``): ``ahead``
        (final) when that primary is the chain's source and has nothing as
        new, so the chain will never reach it; ``diverged`` when it has a
        different transaction under that TID; otherwise ``behind``, which
        the secondary retries, and once caught up this node answers as any
        primary does.
        """
        if self.damage_ahead is not None and last > self.head_tid:
            # Our file is readable only up to the damage: nothing can be said
            # of the secondary's history beyond it, and nothing can be served.
            self._fail(self.damage_ahead)
            return Reject("corrupted", f"{self.damage_ahead.message}; the secondary's last transaction "
                                       f"{tid_repr(last)} lies beyond the damage")
        if last > self.head_tid and self.relay:
            upstream = self.upstream() if self.upstream is not None else "its primary"
            answer = await self.upstream_answer(last) if self.upstream_answer is not None else None
            return relay_verdict(self.config.node, upstream, self.head_tid, theirs, answer)
        if last > self.head_tid:
            return Reject("ahead", f"secondary's last transaction {tid_repr(last)} is newer than this "
                                   f"primary's newest {tid_repr(self.head_tid)}: it has transactions this "
                                   "primary never had")
        nxt = await blocking(tailer.successor, last)
        if nxt is not None and nxt[1] == "p":
            return Reject("packed", f"this primary was packed past the secondary's position: its transaction "
                                    f"{tid_repr(last)} was removed by a pack (all its records were "
                                    f"superseded), and the packed transactions after it, from "
                                    f"{tid_repr(nxt[0])}, cannot be checked against the secondary's "
                                    f"history: neither {self.config.storage}.old, the file the last pack "
                                    "replaced, nor the record this primary keeps of what its last "
                                    f"{packlog.KEEP_PACKS} packs dropped ({packlog.log_path(self.config.storage)}) "
                                    "holds it (packed more often while the secondary was away, packed while "
                                    "no primary was running, or pack-keep-old off). Start the secondary anew "
                                    "from an empty storage")
        return Reject("diverged", f"secondary's last transaction {tid_repr(last)} is not in this primary's "
                                  "history")

    async def _send_loop(self, ws: web.WebSocketResponse, conn: Connection, tailer: Tailer,
                         stats: SessionStats) -> None:
        cfg = self.config
        seen = -1
        last_sent = last_beat = time.monotonic()
        while True:
            if self.stale:
                await ws.send_bytes(conn.send(Goodbye("stale", f"primary {cfg.node} was superseded by a "
                                                               "newer epoch; follow the new primary")))
                await ws.close()
                return
            if tailer.pending_bytes() <= INLINE_READ_BYTES:
                # Caught up: a few small commits, read from the page cache in
                # well under a millisecond; a thread hop would cost more.  (A
                # read racing an aborted vote re-checks after CONFIRM_DELAY,
                # 50 ms, blocking the loop that long: rare, and bounded.)
                events = tailer.read_events(cfg.batch_bytes)
            else:
                events = await blocking(tailer.read_events, cfg.batch_bytes)
            if events:
                data = conn.send_stream(events)
                for event in events:
                    if type(event) is TxnEnd:
                        stats.sent_ordinal += 1
                        stats.in_flight.append((event.tid, stats.sent_ordinal))
                        if stats.sent_tid == Z64 and stats.first_sent_tid is None:
                            stats.first_sent_tid = event.tid
                        stats.sent_tid = event.tid
                        stats.txns_sent += 1
                await ws.send_bytes(data)
                stats.bytes_sent += len(data)
                self.bytes_sent += len(data)
                last_sent = time.monotonic()
                if not tailer.at_end:
                    if last_sent - last_beat >= cfg.heartbeat_interval and type(events[-1]) is TxnEnd:
                        # Catching up: the secondary learns the head from heartbeats, or it would
                        # take the last transaction it received for the head and report no lag.
                        await ws.send_bytes(conn.send(Heartbeat(self.head_tid, time.time())))
                        last_beat = last_sent
                    continue
                # That was all there is: wait for the next commit instead of looking again.
            now = time.monotonic()
            if now - last_sent >= cfg.heartbeat_interval:
                await ws.send_bytes(conn.send(Heartbeat(self.head_tid, time.time())))
                last_sent = last_beat = now
            timeout = max(0.0, cfg.heartbeat_interval - (now - last_sent))
            if tailer.commit_under_way and not self.notifier.every_commit_notified:
                # A commit is under way past the cursor (voted, not
                # finished): the poller's next look wakes us even if the
                # file's size and mtime stay the same.
                self.notifier.recheck()
            before, seen = seen, await self.notifier.wait(seen, timeout)
            if seen != before:  # woken by a look or a commit, not by the heartbeat's timeout
                tailer.offer_stat(self.notifier.stat_for(seen))

    async def _ack_loop(self, ws: web.WebSocketResponse, conn: Connection, stats: SessionStats) -> None:
        """Take the secondary's acknowledgements until it says goodbye, the
        connection ends, or its host stops answering.

        A secondary sends nothing while there is nothing to acknowledge, and
        a host that vanished (power cut, a network partition) sends no FIN:
        without a check the session would stay listed, and its node name
        taken, until TCP gives up after about a quarter of an hour.  The
        primary sends a heartbeat every second, so a live host has data to
        acknowledge at least that often; a slow link still delivering is not
        mistaken for a dead one, nor is a secondary too busy to read (a pack
        of its storage, a huge transaction), whose host answers the probes
        of its closed window (``host_silence``).
        """
        limit = self.config.silence_limit
        # The kernel is asked every third of the limit without a message (a
        # getsockopt), so a silent host is dropped within about 1.3 limits.
        # A first silent look is confirmed by a second one a moment later:
        # a probe of a closed window may just have gone out, and its answer
        # takes a round trip.
        look, confirm = limit / 3, min(2.0, limit / 4)
        silent_looks = 0
        while True:
            try:
                msg = await ws.receive(timeout=confirm if silent_looks else look)
            except TimeoutError:
                silence = host_silence(ws)
                if silence is None or silence < limit:
                    silent_looks = 0  # its host answers (or this platform cannot tell): still there
                    continue
                silent_looks += 1
                if silent_looks < 2:
                    continue
                raise SecondaryGoneError(f"secondary {stats.node} ({stats.peer}) is gone: its host acknowledged "
                                         f"nothing for {silence:.0f} s; dropping its session (it resumes from "
                                         "its last transaction when it connects again)") from None
            silent_looks = 0
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED) or stats.replaced:
                if msg.type is WSMsgType.CLOSE and not self._stopping.is_set():  # its close, not ours
                    stats.ended = "it closed the connection without a goodbye"
                return
            if msg.type is WSMsgType.ERROR:
                raise RemoteProtocolError(f"bad WebSocket message: {ws.exception()}")
            if msg.type is not WSMsgType.BINARY:
                raise RemoteProtocolError(f"unexpected {msg.type.name} message")
            conn.receive_data(msg.data)
            for event in conn.events():
                if isinstance(event, Ack):
                    stats.acked_tid = event.tid
                    stats.acked_at = time.time()
                    self._note_ack(stats.node, event.tid)
                    while stats.in_flight and stats.in_flight[0][0] <= event.tid:
                        stats.acked_ordinal = stats.in_flight.popleft()[1]
                elif isinstance(event, Goodbye):
                    # Stopping is planned; a storage failure on its side is news.
                    stats.ended = f"it said goodbye ({event.code}): {event.message}"
                    stats.quiet = event.code == "shutdown"
                    return
