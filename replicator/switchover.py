"""Planned switchover: fence the primary, let the chosen secondary catch up, promote it.

Zero lost transactions: once the primary is fenced no commit can land
there, every committed transaction is already in its file, and the
secondary is promoted only after it acknowledged the primary's last one.
Last, the old primary becomes a secondary of the new one in place; the
switchover succeeds only once it says it is one, or, for a sidecar primary
(which cannot, and whose ZEO server is stopped), with the next step to take.
"""

from __future__ import annotations

import asyncio
import time

from .config import TLSPaths
from .control import Refusal, call, describe_node
from .errors import OperationError, ReplicatorError, UsageError
from .tid import tid_repr

__all__ = ["run_switchover"]

#: Seconds the old primary may take, once it accepted its demotion, to say it is a secondary.
DEMOTION_TIMEOUT = 30.0


def check_nodes(old: str, new: str, source: dict, target: dict) -> None:
    """Raise ``UsageError`` unless ``old`` is a primary and ``new`` a secondary streaming from it.

    Checked before anything is fenced: a switchover aimed at the wrong
    nodes must leave both as they were.
    """
    if source.get("role") == "secondary" and target.get("role") == "primary":
        raise UsageError(f"--primary {old} is {describe_node(source)} and --to {new} is {describe_node(target)}: "
                         "the two arguments may be swapped",
                         hint="replicator switchover --primary CURRENT-PRIMARY --to SECONDARY-TO-PROMOTE")
    if target.get("role") != "secondary":
        raise UsageError(f"--to {new} is not a secondary: it is {describe_node(target)}",
                         hint="--to takes the --listen address of the secondary to promote")
    if source.get("role") != "primary":
        raise UsageError(f"--primary {old} is not a primary: it is {describe_node(source)}",
                         hint="--primary takes the --listen address of the current primary")
    if source.get("stale") or source.get("superseded"):
        raise UsageError(f"--primary {old} is {describe_node(source)}, superseded by a newer epoch: it is "
                         "not the primary any more", hint="replicator status shows which node is")
    streaming = {s.get("node") for s in source.get("secondaries", [])}
    if target.get("node") not in streaming:
        state = "connected" if target.get("connected") else "not connected"
        raise UsageError(f"--to {new} ({target.get('node')}) is not streaming from --primary {old} "
                         f"({source.get('node')}): it follows {target.get('primary')}, {state}; nothing was "
                         "fenced", hint=f"check `replicator status {old} {new}`; a switchover promotes a "
                         "secondary connected to the primary")


#: What to do once a node that no ZEO server serves (a plain ``replicator secondary``) is promoted.
NO_ZEO_NEXT = ("Next: {node} takes writes only through a ZEO server, and none serves its storage (it runs as a "
               "plain `replicator secondary`): stop it and start a ZEO server on its storage with "
               "<replicated-primary> (or run it as `replicator secondary --zeo` next time, which promotes in "
               "place).")


def former_primary_line(promoted: dict) -> str:
    """What ``promote`` could tell the former primary: a warning line when it could not.

    A former primary that was not told of the new epoch, and still runs (a
    sidecar's ZEO server, say), takes commits the new history never gets
    until a node of the new epoch reaches it.
    """
    former = promoted.get("former_primary")
    if not former:
        return ""
    if former.get("told"):
        return f"\nthe former primary at {former['address']} was told of epoch {promoted.get('epoch')}: " \
               f"{former.get('detail')}"
    return (f"\nWARNING: the former primary at {former['address']} was not told of epoch {promoted.get('epoch')} "
            f"({former.get('detail')}). If it, or a ZEO server on its storage, still runs, stop it now: it may "
            "take commits this history never gets. Before it serves again, make it a secondary of this node "
            "(see Emergency promotion in the README).")


def next_step_after_promotion(promoted: dict) -> str:
    """The line to add when the promoted node cannot take writes by itself; empty otherwise."""
    if promoted.get("serves_zeo") is False:
        return "\n" + NO_ZEO_NEXT.format(node=promoted.get("node"))
    return ""


async def run_switchover(old: str, new: str, tls: TLSPaths | None, insecure: bool, timeout: float) -> str:
    # Nothing is fenced before both answer, within the switchover's own time (a hung node
    # would otherwise hold it for the TLS handshake's minute).
    source, target = await asyncio.gather(call(old, "GET", "/status", tls, insecure=insecure, timeout=timeout),
                                          call(new, "GET", "/status", tls, insecure=insecure, timeout=timeout))
    check_nodes(old, new, source, target)
    # Its ZEO clients stay connected (their commits are refused) until the
    # demotion below drops them: they then register again at once, and those
    # that list both servers find the new primary taking writes.
    fenced = await call(old, "POST", "/fence?reason=switchover&clients=keep", tls, insecure=insecure)
    head = fenced["last_tid"]
    deadline = time.monotonic() + timeout
    while True:
        status = await call(old, "GET", "/status", tls, insecure=insecure)
        head = status["last_tid"]  # a commit that was finishing when fenced may still land
        acked = {s["node"]: s["acked_tid"] for s in status.get("secondaries", [])}
        if acked.get(target["node"]) == head:
            break
        if time.monotonic() > deadline:
            raise OperationError(f"{new} did not catch up with {head} within {timeout:.0f}s; "
                                 f"{old} stays fenced, its ZEO clients connected but refused: unfence it "
                                 f"with `replicator fence --undo {old}`, or drop them with "
                                 f"`replicator fence {old}` if you promote another node by hand (each with "
                                 "this command's --tls-* options)")
        await asyncio.sleep(0.05)
    promoted = await call(new, "POST", "/promote", tls, insecure=insecure)
    if promoted.get("last_tid") != head:
        raise OperationError(f"{new} was promoted at {promoted.get('last_tid')}, not at the old primary's "
                             f"last transaction {head}: investigate before writing")
    done = (f"switched over: {promoted['node']} is the primary of epoch {promoted['epoch']} from "
            f"{tid_repr(bytes.fromhex(head))}; ")
    after = next_step_after_promotion(promoted)
    name = fenced["node"]
    try:
        await call(old, "POST", f"/demote?primary={new}", tls, insecure=insecure)
        await _demotion_done(old, tls, insecure)
    except ReplicatorError as exc:
        # Whatever failed, its clients must go: they register again, and
        # those that list the new primary's server find it taking writes.
        dropped = True
        try:
            await call(old, "POST", "/fence?reason=switchover", tls, insecure=insecure)
        except ReplicatorError:
            dropped = False
        restart = (f"Next: restart {name} as a secondary of {new} (its history is a prefix of the new primary's, "
                   "so it resumes where it stopped).")
        if isinstance(exc, Refusal) and exc.status == 501 and dropped:
            # A sidecar primary: it cannot, and its ZEO server was stopped before the fence.
            return (done + f"{name} is fenced, and stays so: it runs as a sidecar (`replicator primary`), which "
                    "cannot become a secondary in place.\n"
                    f"Next: stop {name}'s `replicator primary`, keep its ZEO server stopped, and start "
                    f"`replicator secondary --primary {new}` on its storage (with --zeo to serve its readers): "
                    "its history is a prefix of the new primary's, so it resumes where it stopped." + after)
        clients = ("its ZEO clients were dropped (those that list the new primary's server register there)"
                   if dropped else "its ZEO clients could not be dropped: they stay connected, their commits "
                   "refused")
        raise OperationError(done + f"{name} did not become its secondary ({exc.message}); it stays fenced and "
                             f"{clients}.\n" + restart + after) from exc
    return done + f"{name} now follows it as a secondary." + after


async def _demotion_done(old: str, tls: TLSPaths | None, insecure: bool) -> None:
    """Return once the node at ``old``, told to become a secondary, says it is one.

    It answers /demote before it acts (acting closes the port the request
    came in on), and its port changes hands meanwhile: no answer for a
    moment is expected.  Raises ``OperationError`` after ``DEMOTION_TIMEOUT``.
    """
    deadline = time.monotonic() + DEMOTION_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        try:
            status = await call(old, "GET", "/status", tls, insecure=insecure, timeout=5.0)
        except ReplicatorError as exc:
            last = f"no answer: {exc.message}"
            continue
        if status.get("role") == "secondary":
            return
        last = f"it is {describe_node(status)}"
    raise OperationError(f"{old} took its demotion but did not become a secondary within "
                         f"{DEMOTION_TIMEOUT:.0f}s ({last}); its log says why")

