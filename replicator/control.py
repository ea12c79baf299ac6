"""The control API on each node's HTTPS port, and the client side of it.

Routes (mutual TLS, like the stream; the POST routes take a certificate of
the role ``node`` or ``operator``, ``/identities`` any certificate of the
cluster: see ``transport.ROLE_RIGHTS``):

- ``POST /promote`` (secondary): stop following after applying everything
  received, start a new epoch, become the primary of that epoch (a fence
  recorded on its storage, from its days as a primary, is removed).
- ``POST /fence`` and ``POST /unfence`` (primary): stop / resume accepting
  writes, for a planned switchover; streaming goes on, so secondaries can
  catch up with the last commits.  ``/fence`` drops the ZEO clients of a
  primary inside a ZEO server, or with ``?clients=keep`` leaves them
  connected (their commits fail with ``ReadOnlyError``) until ``/demote``.
  Both answer once the fence is recorded beside the storage, or its record
  removed (``fencing``): a restart keeps the node as it was.
- ``POST /demote?primary=HOST:PORT`` (a fenced primary, embedded in a ZEO
  server or promoted from a secondary): become a secondary of that node in
  place, on the same port.  A sidecar primary cannot (HTTP 501).
- ``GET /identities?tids=HEX,HEX,...`` (any node): which of these
  transactions this node has, with their status and digests; a diverged
  node uses it to find where its history forks (``rewind``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from yarl import URL

from .config import TLSPaths, parse_address
from .epoch import begin_epoch
from .errors import ConfigError, ReplicatorError, SourceReplacedError, StorageInUseError, UsageError
from .fencing import clear_fence, fence_path
from .status import takes_writes
from .storage import lock_storage
from .threads import blocking
from .tid import tid_from_hex, tid_repr
from .transport import client_ssl_context, request_error

if TYPE_CHECKING:
    from .primary import Primary
    from .secondary import Secondary
    from .tailer import Tailer

__all__ = ["primary_routes", "secondary_routes", "call", "node_command", "describe_node", "identities_route",
           "Refusal"]

log = logging.getLogger("replicator.control")

#: Most TIDs one /identities request may ask about.
MAX_IDENTITIES = 1024


def identities_route(tailer_factory: Callable[[], Tailer]) -> web.RouteDef:
    # One look-up at a time: each reads and hashes whole transactions, blobs included, in a
    # worker thread, and the worker threads are also what a secondary's handshake waits for.
    one_at_a_time = asyncio.Semaphore(1)

    async def identities(request: web.Request) -> web.Response:
        raw = request.query.get("tids", "")
        try:
            # Each once: the same big transaction named hundreds of times was hashed as often.
            tids = list(dict.fromkeys(tid_from_hex(t) for t in raw.split(",") if t))
        except ValueError:
            raise web.HTTPBadRequest(text="tids must be comma-separated 16-digit hex TIDs") from None
        if len(tids) > MAX_IDENTITIES:
            raise web.HTTPBadRequest(text=f"at most {MAX_IDENTITIES} tids per request")

        def look_up_once() -> dict:
            with tailer_factory() as tailer:
                found = {}
                for tid in tids:
                    ident = tailer.identity(tid)
                    if ident is not None:
                        found[tid.hex()] = {"status": ident.status, "digest": ident.digest.hex(),
                                            "meta": ident.meta.hex()}
                return found

        def look_up() -> dict:
            try:
                return look_up_once()
            except SourceReplacedError:  # a pack ended during the look-up: again, in the packed file
                return look_up_once()
        async with one_at_a_time:
            found = await blocking(look_up)
        return web.json_response({"identities": found})
    return web.get("/identities", identities)


def primary_routes(get_primary: Callable[[], Primary], tailer_factory: Callable[[], Tailer],
                   demote: Callable[[str], None] | None = None, *, sidecar: bool = False) -> list[web.RouteDef]:
    """Routes of a primary's port; ``demote(HOST:PORT)`` makes it follow another node, in place.

    ``demote`` is called on the route's loop 0.2 s after the answer (it may
    stop the server that answered); without it ``/demote`` is refused with
    HTTP 501, saying why.  ``sidecar``: the commits come from another process
    (a ZEO server), which this one cannot stop.  Its fence then holds the
    storage's own lock, as a process that opens the storage for writing does:
    refused while a writer has it open (stop that first), and while held, no
    writer can open it, until ``/unfence`` or the end of this process.
    """
    async def demote_route(request: web.Request) -> web.Response:
        primary = get_primary()
        upstream = request.query.get("primary", "")
        if demote is None:
            if sidecar:
                raise web.HTTPNotImplemented(
                    text="this primary is a sidecar (`replicator primary`), beside a ZEO server it cannot "
                         "reconfigure: restart this node as a secondary of the new primary (<replicated-secondary> "
                         "in that server's configuration, or `replicator secondary`)")
            raise web.HTTPNotImplemented(text="this node cannot become a secondary in place; restart it as a "
                                              "secondary of the new primary")
        if primary.relay:
            raise web.HTTPConflict(text="this node is a secondary, not a primary: there is nothing to demote")
        if primary.writable:
            raise web.HTTPConflict(text="fence this primary first (replicator fence): it still takes writes")
        try:
            parse_address(upstream, "primary")
        except ConfigError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        status = primary.status()
        # After the reply: demoting stops the server this request came in on.
        asyncio.get_running_loop().call_later(0.2, demote, upstream)
        return web.json_response({**status, "demoting_to": upstream})

    async def fence(request: web.Request) -> web.Response:
        primary = get_primary()
        clients = request.query.get("clients", "drop")
        if clients not in ("drop", "keep"):
            raise web.HTTPBadRequest(text=f"clients must be drop or keep, not {clients!r:.40}")
        if sidecar and primary.storage_lock is None:
            try:
                primary.storage_lock = await blocking(lock_storage, primary.config.storage)
            except StorageInUseError as exc:
                again = ("run the switchover again" if request.query.get("reason") == "switchover"
                         else "fence")
                raise web.HTTPConflict(text=f"not fenced: {exc.message}. This primary runs beside that "
                                            "process and cannot stop its commits: stop it (the ZEO server), "
                                            f"then {again}; the fence then keeps it from opening the storage "
                                            "again") from None
        reason = request.query.get("reason", "fenced by an operator")
        superseded = request.query.get("epoch", "")
        try:
            if superseded.isdigit() and int(superseded) > primary.epoch:
                newer = request.query.get("node", "?")[:200]
                if primary.fenced is not None and not primary.stale:
                    # Fenced before that node was promoted (by hand, or a switchover): its fence
                    # stays for good, and it goes on streaming to the secondaries that follow it.
                    await primary.note_superseded(int(superseded), newer)
                else:
                    # A node of a newer epoch, promoted while connected here: fenced for good.
                    await primary.become_stale(int(superseded), newer)
            else:
                await primary.fence_durably(reason, keep_clients=clients == "keep")
        except OSError as exc:
            log.error("fenced, but the fence could not be recorded in %s: %s", fence_path(primary.config.storage),
                      exc)
            raise web.HTTPInternalServerError(
                text=f"fenced, but the fence could not be recorded in {fence_path(primary.config.storage)} "
                     f"({exc}): it holds only until this node's process stops") from None
        await primary.settle()  # the commit in flight, if any, has landed: the head is final
        return web.json_response(primary.status())

    async def unfence(request: web.Request) -> web.Response:
        primary = get_primary()
        if primary.stale:
            raise web.HTTPConflict(text="this node was superseded by a newer epoch; it cannot take writes again")
        if primary.superseded:
            raise web.HTTPConflict(text=(
                f"this node was superseded {primary.superseded} while it was fenced: another node is the "
                "primary now, and undoing this fence would make two primaries, each taking commits the other "
                "never gets. Make this node a secondary of the current primary instead"))
        try:
            await primary.unfence_durably()
        except OSError as exc:
            raise web.HTTPInternalServerError(
                text=f"still fenced: cannot remove the fence record {fence_path(primary.config.storage)}: "
                     f"{exc}") from None
        primary.release_storage_lock()
        return web.json_response(primary.status())

    return [web.post("/fence", fence), web.post("/unfence", unfence), web.post("/demote", demote_route),
            identities_route(tailer_factory)]


#: How long ``/promote`` waits for the answer of the primary it is connected to.
PRIMARY_QUESTION_TIMEOUT = 5.0


#: Most relays walked up to find the primary at the top of a chain.
MAX_CHAIN = 8

#: Longest wait between two tries to tell a former primary that could not be reached of the
#: new epoch (``_keep_telling``); the first comes after 1 s, each next one after twice as long.
TELL_RETRY_MAX = 30.0


async def _primary_above(node: Secondary, *, connected: bool = True) -> tuple[str, dict] | None:
    """The primary at the top of the chain ``node`` is connected to (through relays, if it
    follows one): its address and status; None if one of them cannot be asked now.

    ``connected=False``: asked even while ``node`` is not connected to it (after the promotion,
    to tell a former primary that is still reachable of the new epoch).
    """
    if connected and not node.progress.connected:
        return None
    address = str(node.config.primary)
    for _ in range(MAX_CHAIN):
        try:
            status = await call(address, "GET", "/status", node.config.tls, insecure=node.config.insecure,
                                timeout=PRIMARY_QUESTION_TIMEOUT)
        except ReplicatorError as exc:
            log.warning("could not ask %s, above this node, whether it takes writes: %s", address, exc)
            return None
        if status.get("role") == "primary":
            return address, status
        above = status.get("primary")
        if status.get("role") != "secondary" or not above:
            return None
        address = str(above)
    return None


async def _refuse_beside_a_writable_primary(node: Secondary) -> tuple[str, dict] | None:
    """HTTP 409 if ``node`` is connected (directly, or through relays) to a primary that still
    takes writes, or to one a promoted node superseded: promoting it would make two primaries,
    each taking commits the other never gets.  Otherwise that primary, if it could be asked
    (``_primary_above``).

    Asked only while connected: a primary that is gone (the failover this is
    for) cannot be asked, and is not.  A primary that does not answer in time
    is taken for gone too.  A sidecar primary takes writes while a ZEO server
    has its storage open; a fenced or stale one takes none.
    """
    found = await _primary_above(node)
    if found is None:
        return found
    address, status = found
    through = "" if address == str(node.config.primary) else f" (through {node.config.primary})"
    if status.get("superseded"):
        raise web.HTTPConflict(text=(
            f"not promoted: this node follows{through} {describe_node(status)} at {address}, which was superseded "
            f"{status['superseded']}: another node is the primary now, and promoting this one would begin a "
            "second history beside it, each taking commits the other never gets. Make this node a secondary of "
            "the current primary instead; if that primary is lost too, promote with --force"))
    if not takes_writes(status):
        return found
    writer = f", written by {status['writer']}," if status.get("writer") else ""
    first = (f"Stop that ZEO server first (a sidecar cannot refuse its commits; `replicator fence {address}` "
             "then keeps it from opening the storage again)" if status.get("sidecar")
             else f"Fence it first (`replicator fence {address}`)")
    raise web.HTTPConflict(text=(
        f"not promoted: this node is connected{through} to {describe_node(status)} at {address}{writer} which "
        "still takes writes; promoting this node would make two primaries, each taking commits the other "
        f"never gets. {first}, or run `replicator switchover` to fence and promote in one step; if it is "
        "going away anyway, promote with --force"))


async def _supersede(node: Secondary, found: tuple[str, dict] | None, epoch: int) -> dict:
    """Tell the primary above ``node`` (``found``), now that ``node`` began ``epoch``, that it was
    superseded: it fences itself for good, durably (a sidecar also takes its storage's lock),
    so that neither a restart nor ``fence --undo`` lets it take writes beside this node.

    Best effort: a primary that is gone is told when a node of the new epoch next meets it,
    or when it answers again at its address (``_keep_telling``, which ``promote`` starts).
    Not connected to it (the failover this is for), ``node`` still tries the address it
    followed, which may answer.  Returns what happened, for ``promote``'s answer:
    ``{"address", "told", "detail"}``.
    """
    if found is None:
        found = await _primary_above(node, connected=False)
    if found is None:
        return {"address": str(node.config.primary), "told": False,
                "detail": "it did not answer as a primary (gone, unreachable, or not the top of the chain)"}
    address, status = found
    if status.get("stale"):
        return {"address": address, "told": True, "detail": "it knew of a newer epoch already"}
    # Fenced already (a switchover, or an operator first), it is told all the same, so that its
    # fence cannot be undone; it keeps streaming to the secondaries that still follow it.
    try:
        await _tell(node, address, epoch)
    except ReplicatorError as exc:  # the promotion logs it, as it logs every former primary not told
        return {"address": address, "told": False, "detail": str(exc)}
    log.warning("the former primary at %s was told of epoch %d: it takes no writes any more", address, epoch)
    return {"address": address, "told": True, "detail": "it takes no writes any more"}


async def _tell(node: Secondary, address: str, epoch: int) -> None:
    """Tell the primary at ``address`` that ``node`` began ``epoch``: it fences itself for good."""
    await call(address, "POST", f"/fence?reason=superseded&epoch={epoch}&node={node.config.node}",
               node.config.tls, insecure=node.config.insecure, timeout=PRIMARY_QUESTION_TIMEOUT)


async def _keep_telling(node: Secondary, address: str, epoch: int) -> None:
    """Promoted while its former primary could not be told (the failover promote is for), tell
    it once it answers again at ``address``: restarted there with its old configuration, it
    would take commits beside this node, none of which this history ever gets.

    Ends once it is told, once it answers as anything but a primary of an older epoch (it came
    back as a secondary, say: nothing to tell), or once this node is demoted or closed.
    """
    delay = 1.0
    while node.promoted and node.demoted_to is None and node.progress.epoch == epoch:
        await asyncio.sleep(delay)
        delay = min(delay * 2, TELL_RETRY_MAX)
        try:
            status = await call(address, "GET", "/status", node.config.tls, insecure=node.config.insecure,
                                timeout=PRIMARY_QUESTION_TIMEOUT)
        except ReplicatorError:
            continue  # still gone
        if (status.get("role") != "primary" or status.get("stale") or status.get("node") == node.config.node
                or int(status.get("epoch") or 0) >= epoch):
            log.info("the former primary's address %s answers again, as %s %s in epoch %s: nothing to tell it "
                     "of epoch %d", address, status.get("role"), status.get("node"), status.get("epoch"), epoch)
            return
        try:
            await _tell(node, address, epoch)
        except ReplicatorError as exc:
            log.warning("the former primary at %s is back but could not be told of epoch %d: %s; trying again",
                        address, epoch, exc)
            continue
        log.warning("the former primary at %s came back and was told of epoch %d: it takes no writes any more",
                    address, epoch)
        return


def secondary_routes(get_secondary: Callable[[], Secondary],
                     on_promoted: Callable[[], Awaitable[None]] | None = None) -> list[web.RouteDef]:
    """Routes of a secondary's port; ``on_promoted`` runs after the epoch began (make storage writable)."""
    lock = asyncio.Lock()

    async def promote(request: web.Request) -> web.Response:
        node = get_secondary()
        force = request.query.get("force", "") in ("1", "true", "yes")
        async with lock:
            if node.promoted:
                status = node.status()
                if status.get("fenced"):  # promoting it again would not make it take writes
                    raise web.HTTPConflict(text=f"already the primary of epoch {status.get('epoch')}, and fenced "
                                                f"({status['fenced']}): `replicator fence --undo` makes it take "
                                                "writes again, if no other node does")
                return web.json_response(status)
            blocked = node.promotion_blocker() if node.promotion_blocker is not None else None
            if blocked and not force:
                raise web.HTTPConflict(text=f"not promoted: {blocked}; promote with --force to begin the "
                                            "epoch all the same")
            above = await _primary_above(node) if force else await _refuse_beside_a_writable_primary(node)
            await node.stop_following()
            if node.storage is None:
                raise web.HTTPConflict(text="the secondary's storage is closed")
            # Promotion is the operator's choice of this node: a fence it kept from its days as a
            # primary (demoted by a switchover) must not keep it from taking writes.
            removed = await blocking(clear_fence, node.storage.getName())
            if removed is not None:
                log.warning("removed the fence record %s (fenced since %s: %s): this node is promoted",
                            fence_path(node.storage.getName()), removed.since, removed.reason)
            state = await blocking(begin_epoch, node.storage.getName(), node.progress.applied_tid,
                                   node.config.node)
            node.promoted = True
            node.progress.epoch = state.epoch
            if node.downstream is not None:
                node.downstream.relay = False  # the source of its history now: it may refuse as one
                node.downstream.unfence()
            log.warning("PROMOTED: %s is the primary of epoch %d from %s", node.config.node, state.epoch,
                        tid_repr(node.progress.applied_tid))
            node.promotion_done.set()
            former = await _supersede(node, above, state.epoch)
            if not former["told"]:
                log.warning("the former primary at %s was not told of epoch %d (%s): if it, or a ZEO server on "
                            "its storage, still runs, stop it: until a node of this epoch reaches it, it may "
                            "take commits this history never gets. This node keeps trying to tell it",
                            former["address"], state.epoch, former["detail"])
                node.keep_telling(_keep_telling(node, former["address"], state.epoch))
            if on_promoted is not None:
                await on_promoted()  # may make the stream server a synchronous primary's
            if node.downstream is not None:
                # Its secondaries reconnect into the new epoch, welcomed as the primary's now are.
                await node.downstream.move_to_epoch(state.epoch, "promoted")
        return web.json_response(dict(node.status(), former_primary=former))

    return [web.post("/promote", promote)]


class Refusal(UsageError):
    """A node refused a control request (HTTP ``status``: 4xx, or 501 for what it cannot do at all)."""

    def __init__(self, message: str, *, status: int, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.status = status


def check_scheme(target: str, insecure: bool) -> None:
    """``UsageError`` for an ``http://`` address without ``--insecure``: nodes speak TLS."""
    if target.lower().startswith("http://") and not insecure:
        raise UsageError(f"{target} is a plaintext (http://) address, and nodes speak TLS",
                         hint="give HOST:PORT (or https://HOST:PORT) with the cluster certificates; --insecure "
                              "only for a node started with --insecure")


def _url(target: str, path: str, insecure: bool) -> str:
    check_scheme(target, insecure)
    base = target if "://" in target else ("http://" if insecure else "https://") + target
    return base.rstrip("/") + path


def _refusal(target: str, method: str, url: str, status: int, text: str) -> ReplicatorError:
    """What an HTTP error answer means: the node refusing what it was asked (the operator's
    mistake, ``UsageError``) or failing at it (``ReplicatorError``: look at its log)."""
    route = URL(url).path.lstrip("/")
    if status in (404, 405):
        return UsageError(f"{target} has no {method} /{route} (HTTP {status}): it is not a node of the "
                          "kind this command is for")
    if status == 403:  # the client certificate's role (transport.authorize)
        return Refusal(f"{target} refused {method} /{route} (HTTP 403): {text}", status=status,
                       hint="give this command an operator's or a node's certificate (--tls-cert, "
                            "--tls-key); `replicator certs issue NAME --role operator` makes one")
    if 400 <= status < 500 or status == 501:
        return Refusal(f"{target} refused {method} /{route} (HTTP {status}): {text}", status=status)
    return ReplicatorError(f"{method} {url}: HTTP {status}: {text}",
                           hint=f"the node failed; its log at {target} says why")


def describe_node(status: dict) -> str:
    """``the primary p (epoch 2)``, ``a secondary s following 10.0.0.1:8100``: what a /status says a node is."""
    name = status.get("node") or "?"
    if status.get("role") == "primary":
        promoted = ", promoted" if status.get("promoted") else ""
        fenced = ", fenced" if status.get("fenced") else ""
        return f"the primary {name} (epoch {status.get('epoch')}{promoted}{fenced})"
    if status.get("role") == "secondary":
        return f"a secondary {name} following {status.get('primary')}"
    return f"a node {name} of role {status.get('role')!r}"


async def node_command(target: str, method: str, path: str, tls: TLSPaths | None, *, insecure: bool,
                       role: str, what: str) -> dict:
    """A control request for a node of ``role`` (``primary``/``secondary``): first check that it is one.

    A node of the other role raises ``UsageError`` saying what the node is
    and that ``what`` (the command) wants a ``role``; nothing is asked of it.
    A promoted secondary is a primary (``promote`` on it again is harmless).
    """
    status = await call(target, "GET", "/status", tls, insecure=insecure)
    actual = status.get("role")
    if actual != role and not (role == "secondary" and status.get("promoted")):
        raise UsageError(f"{target} is not a {role}: it is {describe_node(status)}; {what} takes the "
                         f"address of a {role}'s --listen port")
    return await call(target, method, path, tls, insecure=insecure)


async def call(target: str, method: str, path: str, tls: TLSPaths | None, *, insecure: bool = False,
               timeout: float = 120.0) -> dict:
    """One control request; ``TransportError`` if the node cannot be reached, ``UsageError`` if it
    refuses (no such route, wrong state), ``ReplicatorError`` if it failed."""
    if tls is None and not insecure:
        raise ConfigError("--tls-ca, --tls-cert and --tls-key are required (or --insecure)")
    ssl_ctx = client_ssl_context(tls.ca, tls.cert, tls.key) if tls is not None and not insecure else False
    url = _url(target, path, insecure)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
            async with http.request(method, url, ssl=ssl_ctx) as resp:
                if resp.status >= 400:
                    if resp.content_type != "text/plain":  # not a node's refusal: another service's page
                        raise UsageError(f"{method} {url}: HTTP {resp.status} {resp.reason}",
                                         hint="is this the replicator's --listen address, and not another "
                                              "service's?")
                    raise _refusal(target, method, url, resp.status, (await resp.text()).strip())
                return await resp.json()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise request_error(method, url, exc, timeout=timeout) from exc
