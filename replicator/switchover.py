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
from .control import call
from .errors import ReplicatorError
from .tid import tid_repr

__all__ = ["run_switchover"]


async def run_switchover(old: str, new: str, tls: TLSPaths | None, insecure: bool, timeout: float) -> str:
    target = await call(new, "GET", "/status", tls, insecure=insecure)
    if target.get("role") != "secondary":
        raise ReplicatorError(f"{new} is not a secondary (role {target.get('role')})")
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
            raise ReplicatorError(f"{new} did not catch up with {head} within {timeout:.0f}s; "
                                  f"{old} stays fenced, its ZEO clients connected but refused: unfence it "
                                  f"with `replicator fence --undo {old}`, or drop them with "
                                  f"`replicator fence {old}` if you promote another node by hand")
        await asyncio.sleep(0.05)
    promoted = await call(new, "POST", "/promote", tls, insecure=insecure)
    if promoted.get("last_tid") != head:
        raise ReplicatorError(f"{new} was promoted at {promoted.get('last_tid')}, not at the old primary's "
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

