"""The one exception hierarchy of the replicator, grouped by who is to blame.

Callers decide between retrying and stopping by the *type* of an error, never
by its message.  Every error carries the fields an operator needs and a
``hint`` saying what to do about it.

- ``LocalProtocolError``: our own bug (we tried to send something invalid).
- ``RemoteProtocolError``: the peer broke the protocol; close and reconnect.
- ``IntegrityError``: a transaction's digest did not match; never applied.
- ``CorruptedSourceError``: the primary's ``Data.fs`` is damaged; stop, never ship.
- ``SourceReplacedError``: a pack replaced the ``Data.fs`` while one of its
  transactions was half shipped; end that stream, the secondary resumes.
- ``DivergenceError``: the two histories fork; stop and tell the operator.
- ``ConfigError``: bad configuration; lists every problem at once.
- ``UsageError``: a command the node it was aimed at cannot carry out (it is
  not the role the command is for, or the arguments contradict each other).
- ``StorageError``: the secondary's storage refused a write (full disk, ...);
  ``StorageInUseError``, its subclass, when another process holds the storage's lock
  (``FencedStorageInUseError`` when a fenced sidecar primary therefore cannot keep its fence).
- ``TransportError``: a peer could not be reached (refused, reset, timed out);
  ``TLSError``, its subclass, when the TLS handshake itself failed (certificates).
"""

from __future__ import annotations

__all__ = [
    "ReplicatorError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "IntegrityError",
    "ResumeError",
    "RejectedError",
    "CorruptedSourceError",
    "MissingBlobError",
    "SourceReplacedError",
    "DivergenceError",
    "ConfigError",
    "UsageError",
    "StorageError",
    "StorageInUseError",
    "FencedStorageInUseError",
    "EmptyReplicaError",
    "TransportError",
    "TLSError",
]


class ReplicatorError(Exception):
    """Base of every error the replicator raises on purpose."""

    hint: str = ""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        if hint:
            self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} (hint: {self.hint})"
        return self.message


class LocalProtocolError(ReplicatorError):
    """We tried to do something the protocol forbids: a bug on this side."""

    hint = "this is a bug in the replicator; please report it with the log"


class RemoteProtocolError(ReplicatorError):
    """The peer sent something the protocol forbids; the connection is closed."""

    hint = "check that both ends run compatible replicator versions"


class IntegrityError(RemoteProtocolError):
    """A transaction's content did not match the digest the primary sent."""

    hint = "the transaction was not applied; the secondary will reconnect and retry"


class ResumeError(RemoteProtocolError):
    """What a broken link left of a transaction could not be used to go on with it."""

    hint = "nothing was applied or lost: what was kept is dropped and the transaction is fetched whole"


class RejectedError(ReplicatorError):
    """The peer refused us with a reason (wrong version, diverged history, ...)."""

    def __init__(self, code: str, message: str, *, hint: str = "") -> None:
        super().__init__(f"rejected by peer ({code}): {message}", hint=hint)
        self.code = code
        self.reason = message
        self.fork_tid: bytes | None = None


class CorruptedSourceError(ReplicatorError):
    """The source ``Data.fs`` is damaged at ``offset``; nothing from there on is shipped."""

    hint = ("check a copy of the file with `python -m ZODB.scripts.fstest COPY` (ZODB's `python -m "
            "ZODB.fsrecover` can salvage one), or promote a secondary: the secondaries keep every "
            "transaction before the damage")

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(f"{path}: damaged at offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


class SourceRewrittenError(CorruptedSourceError):
    """The file lost a transaction this process had read from it: truncated, or replaced by a
    file of another history (a restored backup), while it was followed."""

    hint = ("if the file was truncated or restored from a backup, the secondaries that received what it "
            "lost hold the more complete history: promote one of them (`replicator promote`) rather than "
            "restart this primary on this file; nothing was shipped that the file did not hold")

    def __init__(self, path: str, tid: str, nearest: str | None, offset: int, *,
                 fork_tid: bytes | None = None) -> None:
        before = f" (the newest one before it is {nearest})" if nearest else ""
        super().__init__(path, offset, f"transaction {tid}, read from this file before, is no longer in it"
                                       f"{before}: the file was truncated or replaced behind this process's back")
        #: The newest transaction before the lost one that the file still holds.
        self.fork_tid = fork_tid


class MissingBlobError(CorruptedSourceError):
    """A committed blob record's file is absent from the blob directory."""

    hint = ("restore the blob directory from a backup, or check that --blob-dir "
            "names the directory the storage uses")

    def __init__(self, path: str, offset: int, blob_path: str) -> None:
        super().__init__(path, offset, f"blob file {blob_path} is missing")
        self.blob_path = blob_path


class SourceReplacedError(ReplicatorError):
    """The source file was replaced (packed) while a transaction of it was half shipped.

    The pack removed blob files of revisions it dropped, one of them in the
    transaction under way.  Nothing is wrong with either node: the
    transaction is dropped unfinished and the stream starts again from the
    packed file.
    """

    hint = "nothing to do: the secondary reconnects and resumes from the packed file"


class DivergenceError(ReplicatorError):
    """The two nodes' histories differ; replication would corrupt one of them."""

    hint = ("the secondary has transactions the primary does not; keep its "
            "Data.fs aside and start it anew from an empty storage")

    def __init__(self, message: str, *, fork_tid: bytes | None = None, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.fork_tid = fork_tid


class ConfigError(ReplicatorError):
    """The configuration is unusable; ``problems`` lists every problem found."""

    hint = "see `replicator COMMAND --help` and the README's operator's guide"

    def __init__(self, problems: list[str] | str) -> None:
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("invalid configuration: " + "; ".join(self.problems))


class UsageError(ReplicatorError):
    """The command was aimed at the wrong node, or its arguments contradict each other.

    The operator's mistake, like a ``ConfigError``: nothing was changed.
    """

    hint = "see `replicator COMMAND --help` and the README's operator's guide"


class OperationError(ReplicatorError):
    """An operation on running nodes could not complete (a switchover's standby did not catch up).

    Not a bug and not a mistake in the command: the message says what state
    the nodes were left in and what to do next.
    """


class StorageError(ReplicatorError):
    """The local storage could not be read or written (full disk, permissions, ...)."""

    hint = "fix the storage problem; nothing was acknowledged that is not durable"


class DurabilityError(StorageError):
    """An fsync of the storage file failed: what was written since the last good one may not be on
    disk, whatever later fsyncs say (Linux reports a write-back error once, and may drop the pages).

    Not retried: the node stops replicating into the file, and its next start
    cuts the file back to where it was last known durable (``drop_unsynced_tail``).
    """

    hint = ("check the disk (the kernel log says more), then start this node again: it cuts the file back "
            "to its last durable transaction and fetches the rest from the primary again; nothing after "
            "that transaction was acknowledged")


class StorageInUseError(StorageError):
    """Another process has the FileStorage open (holds its ``.lock`` file): a deployment mistake."""

    hint = ("only one process may open a FileStorage for writing: stop the other one, or give this "
            "node a storage of its own")

    def __init__(self, path: str, lock_path: str, holder: str = "") -> None:
        held = f" (held by {holder})" if holder else ""
        super().__init__(f"{path} is in use: another process holds its lock {lock_path}{held}; it may be "
                         "another replicator, a ZEO server (runzeo) or a Zope instance with this storage open")
        self.path = path
        self.lock_path = lock_path
        self.holder = holder


class FencedStorageInUseError(StorageInUseError):
    """A sidecar primary that must start fenced cannot: another process has its storage open for writing.

    A sidecar keeps its fence by holding the storage's lock, so that no ZEO
    server can open the storage and take writes; with the lock taken by
    another process, the fence would be a fence in name only.
    """

    def __init__(self, path: str, lock_path: str, holder: str, *, fenced: str, fence_record: str,
                 undo: str, final: bool = False) -> None:
        held = holder or "another process"
        if final:
            # Superseded by a newer epoch: no undo, another node is the primary.
            then = ("another node is the primary now, and this node cannot take writes again: configure it "
                    "as a secondary of that primary (`replicator rewind` first if it took commits meanwhile: "
                    f"see the README's Emergency promotion); the record is {fence_record}")
        else:
            then = ("then start this primary again, while that process stays stopped: it holds the lock while "
                    "fenced. Only if this node is to take writes again, start this primary, undo the fence "
                    f"from another shell (`{undo}`), and start the ZEO server after; the fence is recorded in "
                    f"{fence_record}")
        StorageError.__init__(
            self, f"{path}: this primary was fenced ({fenced}) and must start fenced, holding the storage's "
                  f"lock so that nothing takes writes on it; but {held} holds that lock ({lock_path}): it has "
                  "the storage open for writing, and could take writes this primary cannot stop",
            hint=f"stop {held}: this node must not take writes (another node may be the primary now); {then}")
        self.path = path
        self.lock_path = lock_path
        self.holder = holder


class EmptyReplicaError(ReplicatorError):
    """A database was opened on a replica that holds no transaction, and none came in time.

    ``ZODB.DB`` creates the root object of an empty storage, which a replica
    must not do (the root is the primary's): the database waits for the
    primary's first transaction instead, and this says why it came to nothing.
    """

    hint = ("start the primary, or let `replicator secondary` copy the primary's history into this "
            "storage first; a replica that holds the primary's first transaction opens at once")


class TransportError(ReplicatorError):
    """The connection to ``address`` could not be opened or was lost: retry with backoff."""

    hint = "check that the peer is running and reachable; the connection is retried"

    def __init__(self, address: str, message: str, *, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.address = address


class TLSError(TransportError):
    """The TLS handshake with ``address`` failed: a certificate or CA does not fit.

    Retrying alone will not help until an operator fixes the certificates, so
    callers log it at ERROR rather than as a routine reconnect.
    """

    hint = ("both nodes need certificates signed by the same cluster CA, whose "
            "SubjectAltNames list the address that is dialled (replicator certs show)")
