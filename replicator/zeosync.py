"""Synchronous replication under a ZEO server, without freezing it.

ZEO 6 serves every client from one event-loop thread and calls the
storage's ``tpc_finish`` there; a ``tpc_finish`` that waited for the
secondaries' acknowledgements would stop the whole server (reads, new
connections, other clients) for a replication round trip, or for as long as
``sync-fallback wait`` holds a commit.  ZEO's own answer to "reply later" is
its ``Delay`` protocol (the vote uses it while a client waits for the commit
lock).  ``install_deferred_replies`` makes one server's client handlers
finish the commit at once, as before, but return a ``Delay`` that sends the
client its reply, and releases ZEO's commit lock, only when the commit is
replicated.  Other clients' reads go on meanwhile; their commits queue for
the lock as they would behind a slow commit.

This relies on two ZEO server internals (``create_client_handler`` and the
``Result``/``Delay`` reply objects); if they are not there, nothing is
installed and ``tpc_finish`` waits in place, which is correct but blocks.
"""

from __future__ import annotations

import concurrent.futures
import logging

__all__ = ["install_deferred_replies"]

log = logging.getLogger("replicator.zeosync")

try:  # ZEO is a dependency, but its server internals may change
    from ZEO.asyncio.server import Delay, Result
    from ZEO.StorageServer import StorageServer, ZEOStorage
except ImportError:  # pragma: no cover - depends on the installed ZEO
    StorageServer = None  # type: ignore[assignment,misc]


if StorageServer is not None:

    class _ReplicatedReply(Delay):
        """ZEO's reply to ``tpc_finish``, sent once the commit's replication ``future`` is done."""

        def __init__(self, result: Result, future: concurrent.futures.Future) -> None:
            self.result = result
            self.future = future

        def set_sender(self, msgid, protocol) -> None:
            reply, release = self.result.args

            def send() -> None:
                try:
                    protocol.send_reply(msgid, reply)
                finally:
                    release()  # ZEO's commit lock, whatever became of the client

            self.future.add_done_callback(lambda _future: protocol.call_soon_threadsafe(send))

    class _ReplicatingZEOStorage(ZEOStorage):
        def tpc_finish(self, id):
            defer = getattr(self.storage, "deferred_replication", None)
            if defer is None:
                return super().tpc_finish(id)
            with defer() as pending:
                result = super().tpc_finish(id)
            # Nothing to wait for (no commit, or no primary serving the
            # storage): the reply goes at once, or its client would wait for ever.
            if not pending or pending[0] is None or not isinstance(result, Result):
                return result
            return _ReplicatedReply(result, pending[0])


def install_deferred_replies(server: object) -> bool:
    """Make ``server`` (a ZEO ``StorageServer``) reply to commits once they are replicated."""
    if StorageServer is None or not isinstance(server, StorageServer):
        return False
    if getattr(server, "_replicator_deferred", False):
        return True

    def create_client_handler():
        return _ReplicatingZEOStorage(server, server.read_only)

    server.create_client_handler = create_client_handler  # type: ignore[method-assign]
    server._replicator_deferred = True  # type: ignore[attr-defined]
    log.info("synchronous replication: ZEO replies to each commit once it is replicated")
    return True
