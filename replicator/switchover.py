"""Planned switchover: fence the primary, let the chosen secondary catch up, promote it.

Zero lost transactions: once the primary is fenced no commit can land
there, every committed transaction is already in its file, and the
secondary is promoted only after it acknowledged the primary's last one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from .config import TLSPaths
from .control import call, describe_node
from .errors import OperationError, ReplicatorError, UsageError
from .tid import tid_repr

__all__ = ["run_switchover"]


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
    if source.get("stale"):
        raise UsageError(f"--primary {old} is {describe_node(source)}, superseded by a newer epoch: it is "
                         "not the primary any more", hint="replicator status shows which node is")
    streaming = {s.get("node") for s in source.get("secondaries", [])}
    if target.get("node") not in streaming:
        state = "connected" if target.get("connected") else "not connected"
        raise UsageError(f"--to {new} ({target.get('node')}) is not streaming from --primary {old} "
                         f"({source.get('node')}): it follows {target.get('primary')}, {state}; nothing was "
                         "fenced", hint=f"check `replicator status {old} {new}`; a switchover promotes a "
                         "secondary connected to the primary")


async def run_switchover(old: str, new: str, tls: TLSPaths | None, insecure: bool, timeout: float) -> str:
    source, target = await asyncio.gather(call(old, "GET", "/status", tls, insecure=insecure),
                                          call(new, "GET", "/status", tls, insecure=insecure))
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
                                 f"`replicator fence {old}` if you promote another node by hand")
        await asyncio.sleep(0.05)
    promoted = await call(new, "POST", "/promote", tls, insecure=insecure)
    if promoted.get("last_tid") != head:
        raise OperationError(f"{new} was promoted at {promoted.get('last_tid')}, not at the old primary's "
                             f"last transaction {head}: investigate before writing")
    done = (f"switched over: {promoted['node']} is the primary of epoch {promoted['epoch']} from "
            f"{tid_repr(bytes.fromhex(head))}; ")
    try:
        await call(old, "POST", f"/demote?primary={new}", tls, insecure=insecure)
    except ReplicatorError as exc:
        # A sidecar primary cannot turn into a secondary in place.  Whatever
        # failed, its clients must go: they register again and find the new primary.
        with contextlib.suppress(ReplicatorError):
            await call(old, "POST", "/fence?reason=switchover", tls, insecure=insecure)
        return (done + f"{fenced['node']} is fenced ({exc.message}).\n"
                f"Next: restart {fenced['node']} as a secondary of {new} (its history is a prefix of the new "
                "primary's, so it resumes where it stopped).")
    return done + f"{fenced['node']} now follows it as a secondary."

