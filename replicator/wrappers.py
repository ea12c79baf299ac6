"""Storage wrappers that put replication inside any process that opens a ZODB storage.

``PrimaryStorage`` wraps the FileStorage a ZEO server (or a ``ZODB.DB``)
writes and serves its replication stream from the same process; because it
sees every ``tpc_finish``, it wakes the streaming sessions at once instead of
waiting for the file poller, which stays on as a slow safety net.

``SecondaryStorage`` wraps the FileStorage a secondary applies to and shows
it read-only to everyone else: a ZEO server on top of it serves a live,
read-only replica.  Each applied transaction is passed to the databases
registered with ``registerDB`` (ZEO's ``StorageServerDB`` or a
``ZODB.DB``'s adapter) inside ``tpc_finish``, before ``lastTransaction``
moves, which is the order ZODB's MVCC and ZEO's client caches rely on.

Each wrapper runs its service on an event loop of its own, in a daemon
thread: ZEO runs its own loop in its own threads, and ZODB calls storages
from any thread, so neither may block the other.  Both wrappers declare the
interfaces their base provides (``IStorage``, ``IStorageRestoreable``,
``IStorageIteration``, ``IStorageUndoable``, ``IStorageCurrentRecordIteration``,
``IExternalGC`` and, with a blob directory, ``IBlobStorageRestoreable``),
which is what ``ZODB.DB`` and ZEO's server inspect.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import NoReturn

import zope.interface
from ZODB.FileStorage import FileStorage
from ZODB.mvccadapter import MVCCAdapter
from ZODB.POSException import POSError, ReadOnlyError
from ZODB.utils import z64

from .config import PrimaryConfig, SecondaryConfig, parse_address
from .control import primary_routes
from .errors import ConfigError, EmptyReplicaError, ReplicatorError
from .nodelog import tag_node
from .primary import Primary
from .secondary import Secondary
from .storage import close_storage, correct_last_tid, has_blobs
from .tailer import Tailer
from .threads import name_os_thread
from .tid import tid_repr
from .zeosync import install_deferred_replies

__all__ = ["PrimaryStorage", "SecondaryStorage", "ServiceThread"]

log = logging.getLogger("replicator.wrappers")

#: How long ``close()`` waits for a service to finish the transaction it is applying.
STOP_TIMEOUT = 60.0
START_TIMEOUT = 60.0
#: How long a fence waits for a transaction in flight before it aborts it as abandoned.
SETTLE_TIMEOUT = 10.0
#: How long a database opened on an empty replica waits for the primary's first
#: transaction while nothing arrives (the wait goes on as long as bytes do).
FIRST_TRANSACTION_WAIT = 60.0
#: The system's name for a service's thread (``name_os_thread``).
OS_THREAD_NAME = "replication"
#: ... and for the threads of its blocking calls.
OS_WORKER_NAME = "replication io"


class ServiceThread:
    """Runs one asyncio service, ``main(ready)``, on its own event loop in a daemon thread.

    ``main`` calls ``ready()`` once it serves and then runs until cancelled.
    ``start()`` returns after ``ready()`` (or raises what ``main`` raised
    before it); ``stop()`` cancels ``main`` and waits for its cleanup.  An
    error after ``ready()`` is logged and kept in ``error``: the storage
    goes on serving reads, and the service's status says why it stopped.
    """

    def __init__(self, config: PrimaryConfig | SecondaryConfig,
                 main: Callable[[Callable[[], None]], Awaitable[None]]) -> None:
        role = "primary" if isinstance(config, PrimaryConfig) else "secondary"
        self.name = f"replication of {config.storage} ({role} node {config.node})"
        self.node = config.node  # its log lines begin with [node] (``nodelog``)
        self.error: BaseException | None = None
        self._main = main
        self._ready = threading.Event()
        self._started = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def start(self, timeout: float = START_TIMEOUT) -> None:
        if self._started:
            return
        self._started = True
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"{self.name} did not start within {timeout:.0f}s")
        if self.error is not None:
            raise self.error

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not loop.is_closed():
            # The loop may close between the check and the call; then there is nothing to cancel.
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:
                pass
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("%s did not stop within %.0fs", self.name, timeout)

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    def _run(self) -> None:
        # Shown by top -H and ps -L: what replication costs the embedding
        # process is this thread's CPU (its worker threads aside).
        name_os_thread(OS_THREAD_NAME)
        tag_node(self.node)  # before the loop: its tasks copy this thread's context
        try:
            asyncio.run(self._supervise())
        finally:
            self._ready.set()

    async def _supervise(self) -> None:
        self._loop = asyncio.get_running_loop()
        # Its blocking calls' threads too (asyncio.run shuts them down at the end).
        self._loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(
            thread_name_prefix=OS_THREAD_NAME, initializer=name_os_thread, initargs=(OS_WORKER_NAME,)))
        self._task = asyncio.current_task()
        try:
            await self._main(self._ready.set)
        except asyncio.CancelledError:
            pass
        except ReplicatorError as exc:
            self.error = exc
            if self._ready.is_set():  # before, ``start()`` raises it to its caller, who says it
                log.critical("%s stopped: %s", self.name, exc)
        except Exception as exc:  # a bug: keep it for status; the thread must not die silently
            self.error = exc
            log.exception("%s failed", self.name)


def _require_file_storage(base: object, role: str) -> FileStorage:
    if not isinstance(base, FileStorage):
        raise ConfigError(f"{role} wraps a FileStorage (<filestorage>), not {type(base).__name__}")
    return base


def _blob_dir(base: FileStorage) -> str | None:
    return str(base.blob_dir) if has_blobs(base) else None


def _refuse(reason: str) -> NoReturn:
    """Refuse a write on purpose (a secondary, or a fenced primary): ``ReadOnlyError`` to the caller.

    A ZEO client gets the plain ``ReadOnlyError``; ZEO's server would also
    log it twice with a traceback at ERROR, which ``_QuietRefusals`` turns
    into one line.
    """
    raise ReadOnlyError(reason)


def _expected_refusal(exc: BaseException | None) -> str | None:
    """What a ``ReadOnlyError`` refused that this node refuses on purpose; None for anything else.

    ``"commit"``: raised by ``_refuse``.  ``"register"``: ZEO's server
    refused a read-write client because a storage of ours is read-only now
    (a secondary, or a fenced primary), which is how a client listing several
    servers finds the one taking writes.  ``""``: ZEO's server refused a
    read-only client's ``tpc_abort`` for the same reason, nothing to say.
    """
    if not isinstance(exc, ReadOnlyError):
        return None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code is _refuse.__code__:
            return "commit"
        if frame.f_code.co_filename.endswith(os.path.join("ZEO", "StorageServer.py")):
            if frame.f_code.co_name == "register" and isinstance(frame.f_locals.get("storage"), _Wrapper):
                return "register"
            if (frame.f_code.co_name == "_check_tid"
                    and isinstance(getattr(frame.f_locals.get("self"), "storage", None), _Wrapper)):
                return ""
        tb = tb.tb_next
    return None


class _QuietRefusals(logging.Filter):
    """On ZEO's server loggers: what this node refuses on purpose is expected, not an error.

    ZEO's server logs every exception of a vote but conflicts at ERROR with
    a traceback, twice (``While voting`` and ``'vote' raised exception``),
    and a read-write client's registration on a read-only storage once, so
    a switchover (the commits its fence catches, the clients that register
    again) filled the old primary's log with tracebacks.  Each becomes at
    most one INFO line of ours; any other error keeps ZEO's lines.
    """

    def __init__(self, say: set[str]) -> None:
        super().__init__()
        self.say = say  # the refusals whose record on this logger is the one to put in our own words

    def filter(self, record: logging.LogRecord) -> bool:
        what = _expected_refusal(record.exc_info[1] if record.exc_info else None)
        if what is None:
            return True
        if what in self.say:
            if what == "commit":
                log.info("refused a commit (its client gets ReadOnlyError): %s", record.exc_info[1])  # type: ignore[index]
            else:
                log.info("refused a ZEO client's read-write registration: this node takes no writes now "
                         "(a client that lists other servers tries them)")
        return False


def _quiet_zeo_refusals() -> None:
    """Install ``_QuietRefusals`` on ZEO's server loggers, once per process."""
    for name, say in (("ZEO.StorageServer", {"commit"}), ("ZEO.asyncio.server", {"register"})):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietRefusals) for f in logger.filters):
            logger.addFilter(_QuietRefusals(say))


class _Wrapper:
    """What both wrappers share: a base FileStorage and a service thread, closed in that order,
    and the roles the node takes in turn.

    Whichever way a node became the primary (it started as one, or a
    secondary of it was promoted), writes go through the stream server
    that serves it as the primary, ``_serving``: a fence or a newer epoch
    stops them there.  A demotion (POST /demote, after a switchover) makes
    the node a secondary of the new primary on the same port; a promotion
    makes it the primary again, any number of times.
    """

    _base: FileStorage
    _service: ServiceThread
    _closed: bool
    _dbs: list
    #: Follows another node (or did, until promoted): a ``SecondaryStorage``
    #: always, a ``PrimaryStorage`` once demoted.
    secondary: Secondary | None
    #: The stream server of this node while it is the primary (fenced or
    #: not), and the loop it runs on; None while it follows another node.
    _serving: Primary | None = None
    _serving_loop: asyncio.AbstractEventLoop | None = None

    #: ZEO's server serving this storage was started read-only (``read-only true`` in ``<zeo>``).
    _zeo_read_only = False

    def __len__(self) -> int:
        return len(self._base)

    def _note_server(self, db) -> None:
        """``registerDB``: a read-only ZEO server lets no client write, promoted or not; say so."""
        if getattr(getattr(db, "server", None), "read_only", False) and not self._zeo_read_only:
            self._zeo_read_only = True
            log.warning("the ZEO server serving %s is read-only (read-only true in its <zeo> section): its "
                        "clients can read, but none can write to it, even once this node is the primary; "
                        "leave read-only out for a primary or a standby (a replica refuses writes by itself "
                        "until it is promoted)", self._base.getName())

    def _promotion_blocker(self) -> str | None:
        """Why a promotion would leave this node taking no writes (see ``Secondary``)."""
        if self._zeo_read_only:
            return (f"the ZEO server serving {self._base.getName()} is read-only (read-only true in its <zeo> "
                    "section), so no client could write to it as the primary: remove read-only and restart "
                    "that server first (this node stays a secondary across the restart)")
        return None

    def _refuse_writes(self) -> None:
        """Raise ``ReadOnlyError`` unless this node takes writes now."""
        serving = self._serving
        if serving is None:
            following = self.secondary.config.primary if self.secondary is not None else "another node"
            _refuse(f"this node is a secondary: it follows the primary at {following}")
        if not serving.writable:
            # Fenced for a switchover, or superseded by a newer epoch.
            _refuse(f"this primary accepts no writes: {serving.fenced}")

    def isReadOnly(self) -> bool:
        """What ZEO asks as a client registers: a fenced primary takes read-only clients only,
        so that one listing several servers finds the one taking writes."""
        serving = self._serving
        return self._base.isReadOnly() or serving is None or not serving.writable

    def _serve_as_primary(self, primary: Primary) -> None:
        """``primary`` (called on its loop) serves this node as the primary from now on: writes
        go through it, its fences wait for the commit in flight and drop the ZEO clients."""
        self._settle_fences_of(primary)
        if self._fenced not in primary.fence_listeners:
            primary.fence_listeners.append(self._fenced)
        self._serving_loop = asyncio.get_running_loop()
        self._serving = primary

    def _fenced(self) -> None:
        """Fenced, or the fence undone: drop the ZEO clients, which register again, read-only
        while fenced (or with the new primary they list), read-write once it is undone."""
        _drop_clients(self._dbs)

    async def _promoted(self) -> None:
        """POST /promote: this node is the primary of a new epoch now, and takes writes.

        Every ZEO client connected to it registered read-only; dropping them
        closes their connections, and they come back read-write (and
        validate their caches) on their own.
        """
        assert self.secondary is not None and self.secondary.downstream is not None
        self._serve_as_primary(self.secondary.downstream)
        _drop_clients(self._dbs)
        if self._zeo_read_only:
            log.warning("%s is promoted to primary, but its ZEO server is read-only: no client can write to "
                        "it until that server is restarted without read-only", self._base.getName())
        else:
            log.warning("%s is writable: promoted to primary", self._base.getName())

    def _demoted(self, successor: Secondary) -> None:
        """POST /demote: ``successor`` follows the new primary from now on; this node is read-only.

        Called while the old stream server, fenced, still refuses writes.  The
        clients are dropped so that ZEO registers them again, read-only (or
        with a server they list that takes writes); invalidations flow from
        what ``successor`` applies.
        """
        self._serving = self._serving_loop = None
        self.secondary = successor
        _drop_clients(self._dbs)

    def tpc_begin(self, transaction, tid=None, status=" "):
        self._refuse_writes()
        result = self._base.tpc_begin(transaction, tid, status)
        try:
            # Fenced while this waited for the commit lock: the fence settled
            # without it (see _settle), so it must not commit.
            self._refuse_writes()
        except ReadOnlyError:
            self._base.tpc_abort(transaction)
            raise
        return result

    async def _settle(self) -> None:
        """Awaited by POST /fence: no commit can land once this returns."""
        await asyncio.to_thread(_wait_for_commit_in_flight, self._base)

    def _settle_fences_of(self, primary: Primary | None) -> None:
        """Make a fence of ``primary`` (the stream server of this node) wait for the commit in flight."""
        if primary is not None and self._settle not in primary.fence_settlers:
            primary.fence_settlers.append(self._settle)

    def close(self) -> None:
        """Stop the service (after the transaction it is applying), then close the base storage."""
        if self._closed:
            return
        self._closed = True
        self._service.stop()
        close_storage(self._base)


#: Methods of the base that ZEO's server calls for every commit or load.
_HOT_DELEGATES = ("store", "storeBlob", "tpc_vote", "tpc_abort", "getSize", "lastTransaction", "load",
                  "loadBefore", "loadSerial", "new_oid", "checkCurrentSerialInTransaction")


class PrimaryStorage(_Wrapper):
    """``base`` with a replication primary serving it; the whole storage API is ``base``'s.

    ``config``'s ``storage`` and ``blob_dir`` are replaced by ``base``'s own.
    The primary starts at construction (it only reads the file, which
    ``base`` has already created) and stops in ``close()``, which then
    closes ``base``.  Raises ``ConfigError`` for a base that is no
    FileStorage, and whatever ``Primary.start()`` raises (the port is taken,
    the certificates do not load).
    """

    def __init__(self, base: FileStorage, config: PrimaryConfig) -> None:
        _quiet_zeo_refusals()
        self._base = _require_file_storage(base, "a replicated primary")
        self.config = dataclasses.replace(config, storage=base.getName(), blob_dir=_blob_dir(base))
        self.primary: Primary | None = None
        self._closed = False
        #: Synchronous replication's counters, shown in GET /status.
        #: timeouts: commits that waited past sync-timeout (each once); waiting: those still
        #: waiting now (sync-fallback wait), whose clients are held.
        self.sync_stats = {"degraded": False, "synced_commits": 0, "async_commits": 0, "timeouts": 0,
                           "waiting": 0}
        self._dbs: list = []
        self._local = threading.local()
        #: Set once demoted: this node follows another primary (and may be promoted again).
        self.secondary: Secondary | None = None
        zope.interface.directlyProvides(self, zope.interface.providedBy(base))
        for name in _HOT_DELEGATES:
            # What ZEO calls on every commit, bound once: each call through
            # __getattr__ first fails an ordinary lookup, a few us apiece.
            if not hasattr(type(self), name) and hasattr(base, name):
                self.__dict__[name] = getattr(base, name)
        self._service = ServiceThread(self.config, self._serve)
        self._service.start()

    async def _serve(self, ready: Callable[[], None]) -> None:
        cfg = self.config
        primary = Primary(cfg, status_provider=self._status,
                          routes=primary_routes(lambda: primary, lambda: Tailer(cfg.storage, cfg.blob_dir).open(),
                                                self._demote_soon))
        primary.notifier.every_commit_notified = True  # tpc_finish, pack and copyTransactionsFrom
        await primary.start()
        self.primary = primary
        self._serve_as_primary(primary)
        try:
            ready()
            try:
                await primary.run_until_stopped()
            except ReplicatorError as exc:
                log.critical("replication of %s stopped for good: %s. The ZEO server goes on taking writes, which no "
                             "secondary receives; this node's port stays open to say so (`replicator status` shows "
                             "the error, replicator_error is 1) until the server is restarted", cfg.storage, exc)
                await primary.hold()
        finally:
            await primary.stop()

    @property
    def port(self) -> int | None:
        """The port the node listens on (useful with port 0), primary or demoted."""
        if self.secondary is not None:
            return self.secondary.port
        return self.primary.port if self.primary is not None else None

    def status(self) -> dict:
        """The primary's status (as GET /status reports it)."""
        if self.secondary is not None:
            return self.secondary.status()
        if self.primary is None:
            return {"role": "primary", "error": str(self._service.error)}
        return self._status()

    def _status(self) -> dict:
        assert self.primary is not None
        return {**self.primary.status(), **self._sync_status()}

    def _sync_status(self) -> dict:
        """Synchronous replication's settings and counters, in GET /status whenever this node is the primary."""
        return {"sync": {"count": self.config.sync_count, "names": list(self.config.sync_names),
                         "fallback": self.config.sync_fallback, **self.sync_stats}}

    def _notify(self) -> None:
        streaming = self.primary if self.secondary is None else self.secondary.downstream
        if streaming is not None:
            streaming.notifier.notify_threadsafe()

    # -- the storage API: everything is base's, commits also wake the sessions

    def __getattr__(self, name: str):
        # Only reached for names not defined here: the rest of base's API,
        # including optional methods ZODB and ZEO probe with hasattr().
        if name == "_base":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._base, name)


    def __repr__(self) -> str:
        return f"<PrimaryStorage {self._base.getName()!r} listening on {self.config.listen}>"

    @property
    def tryToResolveConflict(self):
        return self._base.tryToResolveConflict

    @tryToResolveConflict.setter
    def tryToResolveConflict(self, value) -> None:
        # ZEO's client-conflict-resolution replaces the method; FileStorage
        # calls its own attribute, so the replacement belongs on base.
        self._base.tryToResolveConflict = value

    def registerDB(self, db) -> None:
        self._dbs.append(db)
        self._note_server(db)
        if self.config.sync_count:
            # Under ZEO, wait for acknowledgements without blocking its server.
            install_deferred_replies(getattr(db, "server", None))
        register = getattr(self._base, "registerDB", None)
        if register is not None:
            register(db)

    def _demote_soon(self, upstream: str) -> None:
        # Called on the primary's own loop, which demote() stops: use a thread.
        threading.Thread(target=self.demote, args=(upstream,), name="demote", daemon=True).start()

    def demote(self, upstream: str) -> None:
        """Become a secondary of ``upstream`` (HOST:PORT) in place, after a switchover.

        The primary service stops (its port closes), and a secondary service
        starts on the same port, applying into the same storage, which stays
        read-only to clients; they are dropped so that ZEO registers them
        again read-only, and invalidations flow from what is applied.  Once
        promoted again, the secondary service serves this node as the
        primary, and its own demotions hand over to the next secondary
        (``Secondary.serve``, ``_demoted``).
        """
        cfg = self.config
        secondary_config = SecondaryConfig(
            storage=cfg.storage, blob_dir=cfg.blob_dir, primary=parse_address(upstream, "primary"),
            listen=cfg.listen if self.port is None else dataclasses.replace(cfg.listen, port=self.port),
            tls=cfg.tls, insecure=cfg.insecure, node=cfg.node, max_frame=cfg.max_frame)
        self._serving = self._serving_loop = None
        if self.primary is not None:
            self.primary.demoting(upstream)  # its goodbye tells its secondaries where it goes
        self._service.stop()
        self.primary = None
        self.secondary = Secondary(secondary_config, storage=self._base, invalidate=self._invalidate_dbs,
                                   on_promoted=self._promoted, on_demoted=self._demoted,
                                   promoted_status=self._sync_status, promotion_blocker=self._promotion_blocker)
        _drop_clients(self._dbs)
        self._service = ServiceThread(secondary_config, self._follow)
        self._service.start()
        log.warning("demoted: %s now follows %s", cfg.storage, upstream)

    async def _follow(self, ready: Callable[[], None]) -> None:
        assert self.secondary is not None
        await self.secondary.serve(ready)

    def _serve_as_primary(self, primary: Primary) -> None:
        super()._serve_as_primary(primary)
        if primary is not self.primary:  # a promotion: the stream server of a secondary
            primary.notifier.every_commit_notified = True
            cfg = self.config
            if cfg.sync_count:
                primary.notifier.batch_delay = 0.0  # synchronous commits are never held back
                # Its sessions from now on are welcomed as a synchronous primary's: their
                # secondaries acknowledge at once, not every quarter second (ACK_DELAY).
                primary.config = dataclasses.replace(
                    primary.config, sync_count=cfg.sync_count, sync_names=cfg.sync_names,
                    sync_timeout=cfg.sync_timeout, sync_fallback=cfg.sync_fallback)

    def _invalidate_dbs(self, tid: bytes, oids) -> None:
        _invalidate(self._dbs, tid, oids)

    def tpc_finish(self, transaction, f=None):
        tid = self._base.tpc_finish(transaction, f)
        # The transaction is on disk now: the sessions can read it at once.
        self._notify()
        if self.config.sync_count:
            future = self._replicated_future(tid)
            pending = getattr(self._local, "pending", None)
            if future is None:
                pass  # no primary serves this node: it could not have taken the commit
            elif pending is not None:
                pending.append(future)  # ZEO's server replies once it is done (zeosync)
            else:
                future.result()  # any other caller (a ZODB.DB in this process) waits here
        return tid

    @contextlib.contextmanager
    def deferred_replication(self) -> Iterator[list]:
        """Within this block, ``tpc_finish`` does not wait for acknowledgements itself.

        It appends the future of the wait to the yielded list instead; ZEO's
        server (see ``zeosync``) sends its client the reply when that future is
        done, so that its one event-loop thread never blocks.
        """
        pending: list = []
        self._local.pending = pending
        try:
            yield pending
        finally:
            self._local.pending = None

    def _replicated_future(self, tid: bytes) -> concurrent.futures.Future | None:
        """Done once ``tid`` is replicated, waited for on the loop of the stream server that serves
        this node as the primary (the first one, or a secondary's once promoted again)."""
        primary, loop = self._serving, self._serving_loop
        if primary is None or loop is None or loop.is_closed():
            log.error("commit %s: no primary serves this node, so nothing waits for its replication",
                      tid_repr(tid))
            return None
        return asyncio.run_coroutine_threadsafe(self._replicated(primary, tid), loop)

    async def _replicated(self, primary: Primary, tid: bytes) -> None:
        """Synchronous replication: done once enough secondaries made ``tid`` durable.

        Starts after the local commit is durable (and FileStorage's commit
        lock released).  On timeout the ``sync_fallback`` policy decides:
        ``wait`` keeps waiting, logging every timeout; ``async`` gives up and
        stays asynchronous until enough secondaries are connected again.
        """
        cfg = self.config
        names = frozenset(cfg.sync_names)
        if self.sync_stats["degraded"]:
            connected = {s.node for s in list(primary.sessions.values()) if not names or s.node in names}
            if len(connected) < cfg.sync_count:
                self.sync_stats["async_commits"] += 1
                return
            self.sync_stats["degraded"] = False
            log.warning("synchronous replication resumed: %d secondaries connected", len(connected))
        started = time.monotonic()
        held = False  # counted among the commits waiting past sync-timeout
        try:
            while True:
                if await primary.wait_replicated(tid, cfg.sync_count, names, cfg.sync_timeout):
                    self.sync_stats["synced_commits"] += 1
                    return
                if not held:
                    self.sync_stats["timeouts"] += 1
                waited = time.monotonic() - started
                if cfg.sync_fallback == "async":
                    self.sync_stats["degraded"] = True
                    self.sync_stats["async_commits"] += 1
                    log.error("synchronous replication DEGRADED to asynchronous: commit %s not acknowledged by "
                              "%d secondaries within %.1fs (%s); it returns unreplicated", tid_repr(tid),
                              cfg.sync_count, waited, _connected_text(primary, names))
                    return
                if not held:
                    held = True
                    self.sync_stats["waiting"] += 1
                log.error("commit %s still waits for %d %s to acknowledge it (%.0fs; %s); its client waits, "
                          "unless it gave up", tid_repr(tid), cfg.sync_count,
                          f"of the secondaries in sync-names ({', '.join(sorted(names))})" if names
                          else "secondaries", waited, _connected_text(primary, names))
        finally:
            if held:
                self.sync_stats["waiting"] -= 1

    def pack(self, *args, **kwargs):
        result = self._base.pack(*args, **kwargs)
        self._notify()
        return result

    def copyTransactionsFrom(self, *args, **kwargs):
        # FileStorage commits these through its own tpc_finish, not ours.
        result = self._base.copyTransactionsFrom(*args, **kwargs)
        self._notify()
        return result



#: What a replica serves: everything that reads, nothing that writes.
_READ_METHODS = frozenset({
    "getName", "getSize", "sortKey", "history", "lastTransaction", "load", "loadBefore", "loadSerial",
    "getTid", "iterator", "record_iternext", "supportsUndo", "undoLog", "undoInfo", "temporaryDirectory",
    "loadBlob", "openCommittedBlobFile", "tpc_transaction", "cleanup", "blob_dir", "fshelper",
})


def _invalidate(dbs: list, tid: bytes, oids) -> None:
    """Tell every registered database which objects ``tid`` changed.

    ZEO sends the oids to its clients and keeps them for reconnecting ones;
    its own commits pass a list, and so do we.  An error here fails the
    transaction, which is applied again after a reconnect.
    """
    changed = list(oids)
    for db in dbs:
        db.invalidate(tid, changed)


def _connected_text(primary: Primary, names: frozenset[str]) -> str:
    """Which secondaries are connected, and which of them sync-names leaves out (a typo shows)."""
    connected = sorted({s.node for s in list(primary.sessions.values())})
    if not connected:
        return "no secondary connected"
    outside = [n for n in connected if names and n not in names]
    text = "connected: " + ", ".join(connected)
    if outside:
        text += f"; not in sync-names, so not waited for: {', '.join(outside)}"
    return text


def _wait_for_commit_in_flight(base) -> None:
    """Once fenced, return when no transaction is in flight on ``base``.

    New transactions are refused from the moment of the fence (and one that
    got the commit lock after it aborts itself, see ``tpc_begin``); one that
    began before it (voted, its client about to call ``tpc_finish``) gets to
    finish, so the head the fence reports is final.  One still unfinished
    after ``SETTLE_TIMEOUT`` was left behind by a client that went away (a
    fence may drop the clients) and would hold the commit lock for ever,
    which a demoted node's applier needs: it is aborted.  It was never
    acknowledged to its client.
    """
    lock = base._commit_lock
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while not lock.acquire(timeout=0.05):
        if time.monotonic() < deadline:
            continue
        txn = base._transaction
        if txn is not None:
            log.warning("fenced: aborting a transaction still unfinished after %.0fs (its client went "
                        "away); it was never acknowledged", SETTLE_TIMEOUT)
            with contextlib.suppress(POSError):
                base.tpc_abort(txn)
        deadline = time.monotonic() + SETTLE_TIMEOUT
    lock.release()


def _drop_clients(dbs: list) -> None:
    """Make every registered database forget its cache; ZEO's server closes its clients' connections.

    Used when a node's writability changes: ZEO decides read-only or
    read-write when a client registers, so clients must register again.
    A ZEO server forgets a client only when its connection ends by itself,
    not when the server closes it (``invalidateCache``): the server would
    send every later invalidation to the closed connection (asyncio's
    ``socket.send() raised exception`` for each transaction a demoted node
    applies, for ever), and a transaction the client had under way would
    keep ZEO's commit lock.  So, on the server's loop once the connections
    are closed, each of those clients is told it is gone, as when it leaves:
    ZEO aborts what it had under way and forgets it.
    """
    for db in dbs:
        invalidate_cache = getattr(db, "invalidateCache", None)
        if invalidate_cache is None:
            continue
        invalidate_cache()
        # ZEO's StorageServerDB: the clients its server registered for this storage.
        server = getattr(db, "server", None)
        clients = getattr(server, "zeo_storages_by_storage_id", {}).get(getattr(db, "storage_id", None))
        for client in list(clients or ()):
            # Queued on the server's loop after the close invalidateCache queued there.
            client.call_soon_threadsafe(_forget_if_closed, client)


def _forget_if_closed(client) -> None:
    """On a ZEO server's loop: if the server closed this client's connection, disconnect the
    client as ZEO does when one leaves (abort what it had under way, unregister it)."""
    connection = getattr(client, "connection", None)
    if client.connected and getattr(connection, "closed", False):
        client.notify_disconnected()


def _writer(name: str):
    """A write method of the replica: ``ReadOnlyError`` until it is promoted."""
    def method(self, *args, **kwargs):
        if not self._writable:
            self._refuse_writes()  # says why: a secondary, or a fenced primary
            _refuse("this node takes no writes")
        return getattr(self._base, name)(*args, **kwargs)
    method.__name__ = name
    return method


class SecondaryStorage(_Wrapper):
    """A replica: ``base`` kept equal to the primary's storage, read-only to everyone else.

    Every write method raises ``ZODB.POSException.ReadOnlyError``, and
    ``isReadOnly()`` is true, so ZEO's server refuses read-write clients.
    ``pack`` is allowed: it only removes old revisions of this replica's own
    file, and the transactions it keeps are still the primary's (the
    handshake's digest leaves out what a pack changes).

    The secondary is not started at construction but at the first
    ``registerDB`` (what ZEO's server and ``ZODB.DB`` call as they take
    the storage) or by ``start()``: ZEO reads ``lastTransaction`` to seed its
    invalidation queue before registering, and a transaction applied in
    between would reach no client's cache.  With ``start=False`` it is never
    started here: the caller runs ``self.secondary`` on its own loop (the
    ``replicator secondary --zeo`` command does).  ``close()`` stops the
    secondary after the transaction it is applying, then closes ``base``.
    """

    def __init__(self, base: FileStorage, config: SecondaryConfig, *, start: bool = True) -> None:
        _quiet_zeo_refusals()
        self._base = _require_file_storage(base, "a replicated secondary")
        if base.isReadOnly():
            raise ConfigError(f"the replica's storage {base.getName()} is opened read-only; "
                              "the secondary must write to it")
        # Opened by its configuration's own section, not by us: a vote that a crash left
        # unfinished would otherwise name the last transaction, and the replica resume from it.
        correct_last_tid(base)
        self.config = dataclasses.replace(config, storage=base.getName(), blob_dir=_blob_dir(base))
        self.secondary: Secondary = Secondary(self.config, storage=base, invalidate=self._invalidate,
                                              on_promoted=self._promoted, on_demoted=self._demoted,
                                              promotion_blocker=self._promotion_blocker)
        self._dbs: list = []
        self._autostart = start
        self._closed = False
        zope.interface.directlyProvides(self, zope.interface.providedBy(base))
        self._service = ServiceThread(self.config, self._follow)

    def start(self) -> None:
        """Start following the primary, if not yet started (``registerDB`` does it too)."""
        self._service.start()

    async def _follow(self, ready: Callable[[], None]) -> None:
        # Refused for good, it keeps its status port open to say so: the ZEO server around it
        # goes on serving the replica as it is (read-only), and would otherwise look healthy.
        await self.secondary.serve(ready, hold=True, advice=(
            "ZEO clients may write to it now. Make it lasting before this server next restarts: in its "
            "configuration, replace <replicated-secondary> by <replicated-primary> (keep listen and the TLS "
            f"files; drop primary). Restarted as configured now, it would follow {self.config.primary} again"))

    @property
    def error(self) -> BaseException | None:
        """Why the secondary stopped for good (divergence, ...), if it did."""
        return self._service.error

    def status(self) -> dict:
        status = self.secondary.status()
        if self._service.error is not None:
            status["last_error"] = str(self._service.error)
        return status

    def _invalidate(self, tid: bytes, oids) -> None:
        _invalidate(self._dbs, tid, oids)

    # -- the storage API: reads are base's, writes are refused

    def registerDB(self, db) -> None:
        self._dbs.append(db)
        self._note_server(db)
        if self._autostart:
            try:
                self._service.start()
            except ReplicatorError as exc:
                # Said once, in the configuration's terms; under runzeo, the command's exit status
                # instead of ZEO's traceback (status 1).
                from .zconfig import section_failed

                raise section_failed("replicated-secondary", exc) from None
            if isinstance(db, MVCCAdapter) and self._base.lastTransaction() == z64:
                self._await_first_transaction()

    def _await_first_transaction(self) -> None:
        """A ``ZODB.DB`` registers (through its MVCC adapter) and is about to look for the root
        object, which it creates in a storage that has none: on an empty replica, wait until
        the primary's first transaction (the root's) is applied, or say why it does not come.

        ZEO's server creates no root, so its registration does not wait.
        """
        progress = self.secondary.progress
        name = self._base.getName()
        log.warning("the replica %s holds no transaction yet: the database waits for the primary's "
                    "first one (a replica creates no root object of its own)", name)
        received = progress.bytes_received
        deadline = time.monotonic() + FIRST_TRANSACTION_WAIT
        while self._base.lastTransaction() == z64:
            failure = None
            stopped = self._service.error or self.secondary.stopped
            if stopped is not None:
                failure = f"the replica {name} holds no transaction, and its secondary stopped: {stopped}"
            elif progress.bytes_received != received and progress.head_tid != z64:
                # Bytes of a primary that has transactions (heartbeats of an empty one do not count).
                received, deadline = progress.bytes_received, time.monotonic() + FIRST_TRANSACTION_WAIT
            elif time.monotonic() > deadline:
                if not progress.connected:
                    why = f"not connected to the primary at {self.config.primary}: {progress.last_error}"
                elif progress.head_tid == z64:
                    why = f"the primary at {self.config.primary} holds no transaction either"
                else:
                    why = f"connected to the primary at {self.config.primary}, but nothing arrived"
                failure = (f"the replica {name} holds no transaction after {FIRST_TRANSACTION_WAIT:.0f}s, "
                           f"so a database cannot open on it yet ({why})")
            if failure is not None:
                # The database will not open, and nothing else holds this storage: close it
                # (and its lock), so that the application may try again.
                self.close()
                raise EmptyReplicaError(failure)
            time.sleep(0.05)
        log.info("the replica %s holds the primary's first transaction: the database opens", name)

    @property
    def _writable(self) -> bool:
        """Promoted (POST /promote) and not demoted since: the storage takes writes, unless fenced."""
        return self._serving is not None

    def __getattr__(self, name: str):
        if name in _READ_METHODS or (name != "_base" and self.__dict__.get("_serving") is not None):
            return getattr(self._base, name)
        raise AttributeError(name)


    def __repr__(self) -> str:
        return f"<SecondaryStorage {self._base.getName()!r} following {self.config.primary}>"

    store = _writer("store")
    storeBlob = _writer("storeBlob")
    restore = _writer("restore")
    restoreBlob = _writer("restoreBlob")
    undo = _writer("undo")
    new_oid = _writer("new_oid")
    deleteObject = _writer("deleteObject")
    checkCurrentSerialInTransaction = _writer("checkCurrentSerialInTransaction")
    tpc_vote = _writer("tpc_vote")
    copyTransactionsFrom = _writer("copyTransactionsFrom")

    def tpc_finish(self, transaction, f=None):
        serving = self._serving
        if serving is None:
            self._refuse_writes()
            _refuse("this node takes no writes")
        tid = self._base.tpc_finish(transaction, f)
        serving.notifier.notify_threadsafe()
        return tid

    def tpc_abort(self, transaction) -> None:
        """Aborts only a transaction begun here (while promoted): ``base`` ignores any other, and the
        applier's own transactions are never passed here."""
        self._base.tpc_abort(transaction)

    def pack(self, *args, **kwargs):
        return self._base.pack(*args, **kwargs)

