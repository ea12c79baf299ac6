"""Frozen configuration objects for the two roles, checked once, all problems at once."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field

from .errors import ConfigError

__all__ = ["Address", "TLSPaths", "PrimaryConfig", "SecondaryConfig", "parse_address"]


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, what: str, *, default_host: str = "127.0.0.1") -> Address:
    """``HOST:PORT``, ``:PORT`` or ``[v6]:PORT``; raise ``ConfigError`` naming ``what``."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ConfigError(f"{what}: expected HOST:PORT, got {text!r}")
    host = host.strip("[]") or default_host
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"{what}: port {port!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise ConfigError(f"{what}: port {number} out of range")
    return Address(host, number)


#: The most ``PrimaryConfig.batch_bytes``: at 64 bytes per event (``tailer.EVENT_COST``) plus one
#: small transaction of up to 1 MiB read whole, a message then holds at most about 57,000 frames,
#: under the ``MAX_MESSAGE_FRAMES`` a secondary takes.
MAX_BATCH_BYTES = 2 << 20

#: Bytes only: a lower-case b (bits) is refused rather than read eight times too large.
_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)(?:i?B)?(?:/s)?\s*")


def parse_rate(text: str | float | int | None, what: str) -> float | None:
    """Bytes a second from ``5M``, ``500k``, ``1.5MiB/s``, ``2000000`` (k, M, G: 1024s); None or 0: no limit.

    Raises ``ConfigError`` naming ``what``.
    """
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        match = _RATE.fullmatch(str(text))
        if match is None:
            raise ConfigError(f"{what}: expected bytes a second such as 500k, 5M or 1.5MiB/s, got {text!r}")
        value = float(match[1]) * 1024 ** " kmg".index(match[2].lower() or " ")
    if value < 0:
        raise ConfigError(f"{what}: must not be negative, got {text!r}")
    return value or None


@dataclass(frozen=True)
class TLSPaths:
    """The cluster CA and this node's certificate and key (PEM files)."""

    ca: str
    cert: str
    key: str


def _check_tls(tls: TLSPaths | None, insecure: bool, problems: list[str]) -> None:
    if insecure:
        return
    if tls is None:
        problems.append("TLS files are required (--tls-ca, --tls-cert, --tls-key); "
                        "pass --insecure only on a trusted network")
        return
    for name, path in (("--tls-ca", tls.ca), ("--tls-cert", tls.cert), ("--tls-key", tls.key)):
        if not path:
            problems.append(f"{name} is required")
        elif not os.path.isfile(path):
            problems.append(f"{name} {path}: no such file")
        elif name == "--tls-cert":
            _check_node_role(path, problems)


def _check_node_role(path: str, problems: list[str]) -> None:
    """A node's own certificate must have the ``node`` role (``certs.ROLES``): a primary
    may become a secondary in a switchover, and a secondary replicates."""
    from .certs import describe  # cryptography: only once files are there to read

    try:
        roles = describe(path).roles
    except ConfigError:
        return  # not PEM: the TLS context names the problem
    if "node" not in roles:
        problems.append(f"--tls-cert {path} is a certificate of role {', '.join(roles)}, for operators' "
                        "commands or monitoring: a primary or secondary needs a node certificate "
                        "(`replicator certs issue NAME`)")


def _holds_anything(directory: str) -> bool:
    with os.scandir(directory) as entries:
        return any(True for _ in entries)


def _check_node(node: str, problems: list[str]) -> None:
    """A node name goes into every peer's log lines and status: printable, and not too long."""
    from .protocol.events import unprintable

    bad = unprintable(node)
    if not node.strip():
        problems.append("--node: give this node a name (it names it in its peers' logs and status)")
    elif bad is not None:
        problems.append(f"--node {node!r}: a node name holds no control character ({bad!r})")
    elif len(node) > 256:
        problems.append(f"--node: at most 256 characters, not {len(node)}")


def _default_node() -> str:
    return socket.gethostname() or "node"


@dataclass(frozen=True)
class PrimaryConfig:
    storage: str
    listen: Address
    blob_dir: str | None = None
    tls: TLSPaths | None = None
    insecure: bool = False
    node: str = field(default_factory=_default_node)
    #: Payload bytes gathered into one WebSocket message while a secondary is behind
    #: (at most ``MAX_BATCH_BYTES``).
    batch_bytes: int = 1 << 20
    heartbeat_interval: float = 1.0
    #: A secondary whose host acknowledged nothing for this long (seconds;
    #: the primary's heartbeats keep its host answering) is gone: its
    #: session is dropped, and its node name free for its next connection.
    #: Never less than three heartbeat intervals (see ``silence_limit``).
    peer_timeout: float = 15.0
    #: How often the file's tail is looked at for new commits (sidecar mode).
    poll_interval: float = 0.01
    #: While the CPUs are saturated, commits wake the sessions at most every
    #: 10 ms, doubling every half second a lasting saturation goes on, up to this
    #: (seconds), so that they share a wake-up: the embedded primary's batch
    #: tick, and the sidecar's poll if longer than ``poll_interval``.
    batch_delay: float = 0.1
    #: Sidecar: while the file is quiet, sleep on inotify instead of looking every ``poll_interval``.
    file_events: bool = True
    max_frame: int = 64 << 20
    #: Synchronous replication (embedded primary only): commits wait for this
    #: many secondaries (of ``sync_names`` if any) to acknowledge them.
    sync_count: int = 0
    sync_names: tuple[str, ...] = ()
    sync_timeout: float = 10.0
    #: ``wait`` (never return an unreplicated commit) or ``async`` (degrade).
    sync_fallback: str = "wait"

    @property
    def silence_limit(self) -> float:
        """Seconds without an answer from a secondary's host before its session is dropped."""
        return max(self.peer_timeout, 3 * self.heartbeat_interval)

    def validate(self) -> PrimaryConfig:
        problems: list[str] = []
        _check_node(self.node, problems)
        if self.sync_count < 0:
            problems.append("sync-count must be 0 (asynchronous) or more")
        if self.sync_names and len(self.sync_names) < self.sync_count:
            problems.append(f"sync-count {self.sync_count} is more than the {len(self.sync_names)} sync-names")
        if self.sync_fallback not in ("wait", "async"):
            problems.append(f"sync-fallback must be 'wait' or 'async', not {self.sync_fallback!r}")
        if self.sync_timeout <= 0:
            problems.append("sync-timeout must be positive")
        if os.path.isdir(self.storage):
            problems.append(f"--storage {self.storage} is a directory; give the Data.fs file path")
        elif not os.path.isfile(self.storage):
            problems.append(f"--storage {self.storage}: no such file (the primary tails an existing Data.fs)")
        else:
            from .fsformat import MAGICS  # here: importing ZODB is not for every command's start

            magic = _file_start(self.storage, len(MAGICS[0]))
            if magic is not None and len(magic) == len(MAGICS[0]) and magic not in MAGICS:
                # A wrong path, not damage: no FileStorage starts this way.
                problems.append(f"--storage {self.storage} is not a FileStorage file (it begins with {magic!r}, "
                                f"not {MAGICS[0]!r}); give the Data.fs file path")
        if self.blob_dir is not None and not os.path.isdir(self.blob_dir):
            problems.append(f"--blob-dir {self.blob_dir}: no such directory")
        elif (self.blob_dir is not None and not os.path.isfile(os.path.join(self.blob_dir, ".layout"))
              and _holds_anything(self.blob_dir)):
            # A wrong directory (the one above it, say) would otherwise show as damage: blob files
            # missing from the storage, once a secondary asks for the first one.  (An empty one
            # is what a server that has not opened it yet leaves.)
            problems.append(f"--blob-dir {self.blob_dir} is not a ZODB blob directory (ZODB writes a .layout "
                            "file in every blob directory a storage uses, and this one holds other files "
                            "but none): give the blob-dir of the storage's <filestorage>")
        _check_tls(self.tls, self.insecure, problems)
        if self.poll_interval <= 0:
            problems.append(f"--poll-interval {self.poll_interval}: must be positive")
        if not 0 <= self.batch_delay <= 1:
            problems.append(f"batch-delay {self.batch_delay}: must be between 0 and 1 second")
        if not 1 <= self.batch_bytes <= MAX_BATCH_BYTES:
            # More would let a message of small records hold more frames than a secondary takes.
            problems.append(f"batch-bytes {self.batch_bytes}: must be between 1 and {MAX_BATCH_BYTES}")
        if self.heartbeat_interval <= 0:
            problems.append(f"heartbeat interval {self.heartbeat_interval}: must be positive")
        if self.peer_timeout <= 0:
            problems.append(f"peer timeout {self.peer_timeout}: must be positive")
        if problems:
            raise ConfigError(problems)
        return self


#: The least ``--max-rate``: heartbeats and acknowledgements must still get through.
MIN_RATE = 16 << 10


@dataclass(frozen=True)
class SecondaryConfig:
    storage: str
    primary: Address
    blob_dir: str | None = None
    tls: TLSPaths | None = None
    insecure: bool = False
    node: str = field(default_factory=_default_node)
    #: Optional HTTPS port answering GET /status.
    listen: Address | None = None
    #: Received but not yet applied: bytes, each event counted with what it takes decoded
    #: (``secondary._BatchQueue``); bounds the secondary's memory.
    queue_bytes: int = 8 << 20
    reconnect_min: float = 0.2
    reconnect_max: float = 30.0
    max_frame: int = 64 << 20
    #: No message from the primary for this long means the link is dead.
    idle_timeout: float = 15.0
    #: Stop (rather than retry) after this many seconds without a connection; 0 = never.
    give_up_after: float = 0.0
    #: Ask the primary to deflate the stream (WebSocket permessage-deflate), for slow links.
    compress: bool = False
    #: Receive at most this many bytes a second from the primary, as the link carries them
    #: (encrypted, deflated); None: as fast as they come.
    max_rate: float | None = None

    def validate(self) -> SecondaryConfig:
        problems: list[str] = []
        _check_node(self.node, problems)
        parent = os.path.dirname(os.path.abspath(self.storage))
        if os.path.isdir(self.storage):
            problems.append(f"--storage {self.storage} is a directory; give the Data.fs file path")
        elif not os.path.isdir(parent):
            problems.append(f"--storage {self.storage}: directory {parent} does not exist")
        _check_tls(self.tls, self.insecure, problems)
        if self.reconnect_min <= 0 or self.reconnect_max < self.reconnect_min:
            problems.append("reconnect delays must satisfy 0 < min <= max")
        if self.give_up_after < 0:
            problems.append(f"--give-up-after {self.give_up_after}: must be 0 (never) or more")
        if self.max_rate is not None and self.max_rate < MIN_RATE:
            problems.append(f"--max-rate {self.max_rate:g} bytes a second: too little to stream anything "
                            f"(at least {MIN_RATE // 1024} KiB a second)")
        if problems:
            raise ConfigError(problems)
        return self


def _file_start(path: str, n: int) -> bytes | None:
    """The first ``n`` bytes of ``path`` (fewer if shorter); None if it cannot be read (said elsewhere)."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return None


class Problems:
    """Parses a command's (or a configuration section's) values, gathering every ``ConfigError``
    so that all are reported at once."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def address(self, text: str, what: str) -> Address:
        try:
            return parse_address(text, what)
        except ConfigError as exc:
            self.problems += exc.problems
            return Address("127.0.0.1", 0)  # a stand-in, so the other values are still checked

    def rate(self, text: str | None, what: str) -> float | None:
        try:
            return parse_rate(text, what)
        except ConfigError as exc:
            self.problems += exc.problems
            return None

    def validate(self, config):
        """``config.validate()``; ``ConfigError`` with its problems and those gathered before."""
        try:
            config = config.validate()
        except ConfigError as exc:
            self.problems += exc.problems
        if self.problems:
            raise ConfigError(self.problems)
        return config
