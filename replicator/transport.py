"""Mutual-TLS WebSocket transport between replication nodes (aiohttp).

Every node holds a certificate signed by the cluster CA (see ``certs``), and
both ends of every connection check the other's: the server requires a
client certificate (``CERT_REQUIRED``), the client checks the server's
certificate *and* that it names the host it dialled.  Only the cluster CA is
trusted, never the system store, so a certificate from a public CA does not
open the door.  TLS 1.2 is the floor.

This module only opens and closes connections; the application (routes
``/replicate`` and ``/status``) belongs to the orchestration layer.

Latency: replication sends many small frames (acks, heartbeats, small
transactions), which Nagle's algorithm would delay by up to a round trip.
aiohttp sets ``TCP_NODELAY`` on every TCP connection it makes or accepts
(``BaseProtocol.connection_made``, TLS included); ``connect_ws`` sets it
again on the client socket so that the guarantee does not depend on that
detail, and the integration tests check both sides.

Errors: unusable files raise ``ConfigError`` listing every problem at once
(the operator fixes them all in one go); a failed connection raises
``TransportError`` (retry with backoff), or ``TLSError`` when the
certificates do not fit (retrying will not help until someone fixes them).
``request_error`` says the same of a single HTTP request (the control and
status commands), which nothing retries.
"""

from __future__ import annotations

import _ssl
import asyncio
import collections
import contextlib
import datetime
import logging
import os
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from yarl import URL

from .certs import is_ca, issued_by, load_certs, roles_from_uris
from .certs import read_file as _read
from .errors import ConfigError, TLSError, TransportError
from .protocol.events import printable
from .revocation import Revocations, load_crls
from .throttle import Throttle

try:  # Unix: the coalescing of reads on slow links needs FIONREAD
    import fcntl
    import termios
except ImportError:  # pragma: no cover
    fcntl = termios = None  # type: ignore[assignment]

__all__ = [
    "TLSFiles",
    "server_ssl_context",
    "client_ssl_context",
    "start_server",
    "RefusedHandshakes",
    "stop_server",
    "close_connections",
    "peer_chain",
    "peer_identity",
    "peer_address",
    "authorize",
    "ROLE_RIGHTS",
    "connect_ws",
    "ReceiveLimit",
    "ReadCoalescing",
    "request_error",
    "unresolved_host",
    "seconds_since_heard",
    "host_silence",
]

log = logging.getLogger(__name__)

MINIMUM_TLS = ssl.TLSVersion.TLSv1_2

_warned_insecure: set[str] = set()

#: Bytes of ``struct tcp_info`` read, and the offsets in it (the same since
#: Linux 2.6) of ``tcpi_probes`` (unanswered zero-window probes, a byte),
#: ``tcpi_unacked`` (segments sent and not yet acknowledged),
#: ``tcpi_last_data_recv`` and ``tcpi_last_ack_recv`` (ms ago).
_TCP_INFO_LEN, _PROBES, _UNACKED, _LAST_DATA_RECV, _LAST_ACK_RECV = 104, 3, 24, 52, 56


def _tcp_info(ws) -> bytes | None:
    sock = ws.get_extra_info("socket")
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None
    return info if len(info) >= _LAST_ACK_RECV + 4 else None


#: ``tcpi_bytes_received`` (a u64, since Linux 4.1) in ``struct tcp_info``;
#: it counts a FIN as one byte.
_BYTES_RECEIVED = 128
#: Fewer bytes than the smallest TLS ClientHello: the client sent no hello.
_HELLO_BYTES = 48


def _bytes_received(sock: socket.socket | None) -> int | None:
    """Payload bytes the connection received so far (None where the kernel does not say)."""
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _BYTES_RECEIVED + 8)
    except OSError:
        return None
    if len(info) < _BYTES_RECEIVED + 8:
        return None
    return int.from_bytes(info[_BYTES_RECEIVED:_BYTES_RECEIVED + 8], sys.byteorder)


class ReceiveLimit:
    """Holds a connection's reading to ``rate`` bytes a second on average (``--max-rate``).

    What counts is what the link carried: the kernel's count of bytes the
    connection received (TLS records, WebSocket framing, deflated), where
    Linux gives it; elsewhere the messages' sizes.  A token bucket of one
    second's worth, so that after a quiet spell the link carries at most a
    second's worth at full speed.  Reading less makes the kernel's buffer
    fill and TCP's window close, which holds the sender back.
    """

    def __init__(self, ws: Any, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._sock = ws.get_extra_info("socket")
        # From the connection's start: what came in before the first read counts too (and the
        # few kilobytes of the handshakes with it).
        self._count = None if _bytes_received(self._sock) is None else 0
        self._clock = clock
        self._at = clock()
        self._tokens = rate

    def delay(self, message_size: int) -> float:
        """Seconds to wait before reading on, after a message of ``message_size`` bytes."""
        now = self._clock()
        self._tokens = min(self.rate, self._tokens + (now - self._at) * self.rate)
        self._at = now
        used = message_size
        if self._count is not None:
            count = _bytes_received(self._sock)
            if count is not None:
                used, self._count = count - self._count, count
        self._tokens -= used
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


#: While a slow link brings a bulk stream, the socket wakes its reader once this
#: many bytes wait (``SO_RCVLOWAT``) instead of at every segment.
COALESCE_BYTES = 64 << 10
#: A bulk stream: messages of at least this size...
COALESCE_MESSAGE = 256 << 10
#: ...arriving at less than this rate (bytes a second); faster links bring
#: bigger reads anyway, and the loopback's are left exactly as they were.
COALESCE_RATE = 16 << 20
#: Seconds over which the link's rate is measured.
COALESCE_WINDOW = 0.25
#: How often bytes left waiting under the threshold are looked for; the
#: sender paused for two looks in a row means they are all there is.
COALESCE_GUARD = 0.01


class ReadCoalescing:
    """Fewer wake-ups for a secondary catching up over a slow link.

    A link slower than the CPU delivers a catch-up in segments of a few
    kilobytes, and each woke the event loop, decrypted and parsed what it
    could: about twice the CPU the same bytes cost over a fast link.  While
    messages are big and the link is what holds them back (it carried less
    than ``COALESCE_RATE`` over the last ``COALESCE_WINDOW``, and little
    waits unread: this process keeps up), the socket's ``SO_RCVLOWAT``
    makes it readable only once ``COALESCE_BYTES`` wait.  Bytes that stay
    under that (the end of a burst: a small message, a heartbeat) would
    wait for ever, so while it is on a timer looks at how many bytes are
    queued (``FIONREAD``) every ``COALESCE_GUARD`` seconds, and turns it off
    when that count stopped moving: they come at most two looks late
    (lowering the threshold wakes a reader waiting in ``epoll``).  A small
    message, or a fast one, turns it off too.  Linux only; elsewhere this
    does nothing.
    """

    def __init__(self, ws: Any, clock: Callable[[], float] = time.monotonic) -> None:
        sock = ws.get_extra_info("socket")
        self._sock = sock if (sock is not None and sys.platform == "linux" and fcntl is not None
                              and hasattr(socket, "SO_RCVLOWAT")) else None
        self._clock = clock
        self._window_at = clock()
        self._window_count = (_bytes_received(self._sock) or 0) if self._sock is not None else 0
        self._slow = False
        self._timer: asyncio.TimerHandle | None = None
        self._queued = -1
        self.on = False
        #: Times it was turned on, and turned off by the guard (bytes left under the threshold).
        self.turned_on = 0
        self.released = 0

    def message(self, size: int) -> None:
        """A message of ``size`` bytes arrived: a slow bulk stream or not.

        The link's rate is the kernel's count of bytes received over at
        least ``COALESCE_WINDOW`` seconds: a message's own pace says little,
        as one may complete from bytes read long before.
        """
        if self._sock is None:
            return
        now = self._clock()
        if now - self._window_at >= COALESCE_WINDOW:  # the kernel is asked a few times a second at most
            count = _bytes_received(self._sock)
            self._slow = count is not None and count - self._window_count < (now - self._window_at) * COALESCE_RATE
            self._window_at, self._window_count = now, count or 0
        if size >= COALESCE_MESSAGE and self._slow and self._queued_bytes() < COALESCE_BYTES:
            if not self.on and self._set(COALESCE_BYTES):
                self.on, self._queued = True, -1
                self.turned_on += 1
                self._timer = asyncio.get_running_loop().call_later(COALESCE_GUARD, self._guard)
        elif self.on:
            self.off()

    def off(self) -> None:
        """Every byte wakes the reader again (also when the connection ends)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.on:
            self.on = False
            self._set(1)

    def _queued_bytes(self) -> int:
        """Bytes received and not read yet (0 once the socket is closed)."""
        try:
            return int.from_bytes(fcntl.ioctl(self._sock.fileno(), termios.FIONREAD, bytes(4)),  # type: ignore[union-attr]
                                  sys.byteorder, signed=True)
        except (OSError, ValueError):
            return 0

    def _guard(self) -> None:
        self._timer = None
        queued = self._queued_bytes()
        if queued > 0 and queued == self._queued:
            self.released += 1
            self.off()  # the sender paused under the threshold: what waits is all there is
            return
        self._queued = queued
        self._timer = asyncio.get_running_loop().call_later(COALESCE_GUARD, self._guard)

    def _set(self, lowat: int) -> bool:
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)  # type: ignore[union-attr]
        except (OSError, ValueError):
            self._sock = None  # closed, or a socket that does not take it: leave it as it is
            return False
        return True


def _u32(info: bytes, offset: int) -> int:
    return int.from_bytes(info[offset:offset + 4], sys.byteorder)


def seconds_since_heard(ws) -> float | None:
    """Seconds since the WebSocket's TCP connection last received data; None where unknown.

    From the kernel's ``TCP_INFO``.  Data counts even while a message is
    still incomplete (TLS records included), so a slow link that still
    delivers is told from a dead one.
    """
    info = _tcp_info(ws)
    return None if info is None else _u32(info, _LAST_DATA_RECV) / 1000


def host_silence(ws) -> float | None:
    """Seconds the peer's host has owed us an answer; None where unknown.

    While the kernel waits for the peer to acknowledge data or a
    zero-window probe: the time since the peer last acknowledged or sent
    anything.  Otherwise 0: nothing is owed.  That is the case of a live
    peer whose receive window is closed (its process is busy and reads
    nothing): the kernel probes it at exponentially growing intervals and
    it answers each probe, so long gaps between its answers say nothing.
    A host that vanished leaves data or a probe unanswered.
    """
    info = _tcp_info(ws)
    if info is None:
        return None
    if not info[_PROBES] and not _u32(info, _UNACKED):
        return 0.0
    return min(_u32(info, _LAST_DATA_RECV), _u32(info, _LAST_ACK_RECV)) / 1000


@dataclass(frozen=True)
class TLSFiles:
    """The cluster CA, this node's certificate and its private key (PEM paths)."""

    ca: Path
    cert: Path
    key: Path

    def __post_init__(self) -> None:
        for name in ("ca", "cert", "key"):
            object.__setattr__(self, name, Path(getattr(self, name)))

    def validate(self) -> None:
        """Raise ``ConfigError`` listing every problem with the three files."""
        problems = _check_files(self.ca, self.cert, self.key)
        if problems:
            raise ConfigError(problems)

    def server_context(self) -> ssl.SSLContext:
        return server_ssl_context(self.ca, self.cert, self.key)

    def client_context(self) -> ssl.SSLContext:
        return client_ssl_context(self.ca, self.cert, self.key)


def server_ssl_context(ca: str | os.PathLike[str], cert: str | os.PathLike[str],
                       key: str | os.PathLike[str]) -> ssl.SSLContext:
    """A TLS 1.2+ server context that demands a client certificate from the CA ``ca``.

    Raises ``ConfigError`` naming every unusable file.
    """
    return _context(ssl.Purpose.CLIENT_AUTH, Path(ca), Path(cert), Path(key))


def client_ssl_context(ca: str | os.PathLike[str], cert: str | os.PathLike[str],
                       key: str | os.PathLike[str]) -> ssl.SSLContext:
    """A TLS 1.2+ client context: presents ``cert``, trusts only ``ca``, checks host names.

    Raises ``ConfigError`` naming every unusable file.
    """
    return _context(ssl.Purpose.SERVER_AUTH, Path(ca), Path(cert), Path(key))


def _context(purpose: ssl.Purpose, ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    pems = read_tls_files(ca, cert, key)
    return context_from_pems(purpose, pems, (ca, cert, key))


#: The bytes of a CA file, a certificate and its key, read once: what was
#: checked is what OpenSSL loads, even while someone replaces the files.
TLSPems = tuple[bytes, bytes, bytes]


def read_tls_files(ca: Path, cert: Path, key: Path) -> TLSPems:
    """The three files' bytes; ``ConfigError`` listing every problem with them."""
    problems: list[str] = []
    pems = read_pems(ca, cert, key, problems)
    problems += check_pems(ca, cert, key, pems)
    if problems:
        raise ConfigError(problems)
    return pems  # type: ignore[return-value]  # no problems: none is None


def read_pems(ca: Path, cert: Path, key: Path, problems: list[str]) -> tuple[bytes | None, ...]:
    """The three files' bytes as they are now; an unreadable one is None, its reason in ``problems``."""
    return tuple(_read(path, what, problems) for path, what in ((ca, "CA file"), (cert, "certificate"),
                                                                (key, "key")))


def context_from_pems(purpose: ssl.Purpose, pems: TLSPems, paths: tuple[Path, Path, Path]) -> ssl.SSLContext:
    """A TLS 1.2+ context of mutual authentication made of checked bytes (``read_tls_files``)."""
    ca, cert, key = paths
    try:
        with pem_paths(*pems) as (ca_path, cert_path, key_path):
            # cafile given: create_default_context loads that CA and not the system store.
            context = ssl.create_default_context(purpose, cafile=ca_path)
            context.load_cert_chain(cert_path, key_path)
    except (ssl.SSLError, OSError) as e:  # our own checks passed, OpenSSL still objects
        raise ConfigError(f"TLS files {ca}, {cert}, {key}: OpenSSL refused them ({e})") from e
    context.minimum_version = MINIMUM_TLS
    context.verify_mode = ssl.CERT_REQUIRED
    # Strict X.509 (the default from Python 3.13 on): certificates that pass
    # here keep working after an upgrade.
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    if b"-----BEGIN X509 CRL-----" in pems[0]:
        # The CA file holds revocation lists (``revocation``; loaded with its certificates):
        # the peer's certificate must not be on its issuer's.
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    if purpose is ssl.Purpose.SERVER_AUTH:
        context.check_hostname = True
    return context


@contextlib.contextmanager
def pem_paths(*pems: bytes) -> Iterator[list[str]]:
    """Paths OpenSSL can open that hold exactly these bytes.

    OpenSSL loads certificates and keys from paths only.  On Linux they are
    memory files (``memfd_create``, opened through ``/proc``): the private
    key is never copied to a disk; elsewhere, or without ``/proc``, files
    in a private temporary directory, removed at once.
    """
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fds: list[int] = []
        try:
            for data in pems:
                fds.append(os.memfd_create("replicator-tls", os.MFD_CLOEXEC))
                _write_all(fds[-1], data)
            yield [f"/proc/self/fd/{fd}" for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="replicator-tls-") as directory:  # mode 0700
        paths = []
        for i, data in enumerate(pems):
            path = os.path.join(directory, str(i))
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
            paths.append(path)
        yield paths


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def check_pems(ca: Path, cert: Path, key: Path, pems: tuple[bytes | None, ...]) -> list[str]:
    """Every problem with the three files' bytes (None: unreadable, already reported), in words an
    operator can act on; the paths only name them."""
    ca_data, cert_data, key_data = pems
    problems: list[str] = []
    ca_certs = load_certs(ca_data, ca, "CA file", problems)
    chain = load_certs(cert_data, cert, "certificate", problems)
    private_key = None
    if key_data is not None:
        try:
            private_key = serialization.load_pem_private_key(key_data, password=None)
        except TypeError:  # cryptography's way of saying "needs a password"
            problems.append(f"key {key}: encrypted; the replicator needs an unencrypted "
                            "key file readable only by its user (mode 0600)")
        except (ValueError, UnsupportedAlgorithm) as e:
            problems.append(f"key {key}: not a PEM private key ({_short(e)})")
        else:
            with contextlib.suppress(OSError):
                mode = key.stat().st_mode & 0o777
                if mode & 0o077:
                    log.warning("private key %s is readable by other users (mode %o); "
                                "chmod 600 it", key, mode)
    revocations = Revocations(load_crls(ca_data, ca, problems), ca_certs, ca, problems)
    now = datetime.datetime.now(datetime.UTC)
    for ca_cert in ca_certs:
        if not is_ca(ca_cert):
            problems.append(f"CA file {ca}: {ca_cert.subject.rfc4514_string()} is not a CA "
                            "certificate (did you give a node certificate as the CA?)")
        elif ca_cert.not_valid_after_utc < now:
            problems.append(f"CA file {ca}: expired on {ca_cert.not_valid_after_utc:%Y-%m-%d}")
    if chain:
        leaf = chain[0]
        if leaf.not_valid_after_utc < now:
            problems.append(f"certificate {cert}: expired on {leaf.not_valid_after_utc:%Y-%m-%d}")
        elif leaf.not_valid_before_utc > now:
            problems.append(f"certificate {cert}: not valid before "
                            f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check the clock)")
        for inter in chain[1:]:
            if inter.not_valid_after_utc < now:
                problems.append(f"certificate {cert}: the intermediate CA {inter.subject.rfc4514_string()} "
                                f"in it expired on {inter.not_valid_after_utc:%Y-%m-%d}")
        revoked = revocations.of(leaf)  # the leaf only, as the handshake checks (``revocation``)
        if revoked is not None:
            problems.append(f"certificate {cert}: {leaf.subject.rfc4514_string()} (serial {revoked.serial:x}) "
                            f"was {revoked.words()}, in {ca}; peers refuse it: its holder needs a new "
                            "one (`replicator certs renew NAME`)")
        if private_key is not None and _spki(private_key.public_key()) != _spki(leaf.public_key()):
            problems.append(f"key {key} does not match certificate {cert} "
                            "(they were not issued together)")
        # Only a direct issuer is checked; a chain with intermediates is left to OpenSSL.
        if ca_certs and len(chain) == 1 and not any(issued_by(leaf, c) for c in ca_certs):
            problems.append(f"certificate {cert} ({leaf.subject.rfc4514_string()}) is not "
                            f"signed by the CA in {ca}; peers would refuse it")
    return problems


def _check_files(ca: Path, cert: Path, key: Path) -> list[str]:
    """Every problem with the three files, in words an operator can act on."""
    problems: list[str] = []
    pems = read_pems(ca, cert, key, problems)
    return problems + check_pems(ca, cert, key, pems)


def parse_certs(data: bytes, path: Path, what: str) -> list[x509.Certificate]:
    """The PEM certificates in ``data``; ``ConfigError`` if it holds none."""
    problems: list[str] = []
    certs = load_certs(data, path, what, problems)
    if problems:
        raise ConfigError(problems)
    return certs


def _short(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _spki(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def _warn_insecure(side: str) -> None:
    # Once per process and side: a reconnect loop must not drown the log, but
    # the operator must see it at least once.
    if side not in _warned_insecure:
        _warned_insecure.add(side)
        log.warning("insecure mode: replication %s traffic is unauthenticated plaintext; "
                    "anyone on the network can read or forge it", side)


# -- server ------------------------------------------------------------------

#: Seconds a client has to complete its TLS handshake (a third of asyncio's default: a few
#: round trips, which even a slow WAN link makes in a few seconds).
HANDSHAKE_TIMEOUT = 20.0
#: Connections at most in their TLS handshake at once, in all and from one host.  Beyond
#: the first, the oldest is closed to make room; beyond the second, the new one.  Each holds two descriptors (its socket and the probe
#: below) until its handshake ends: without a bound, anyone who can reach the port could use
#: up the process's descriptors, and inside a ZEO server its clients could not connect either.
MAX_HANDSHAKES = 128
MAX_HANDSHAKES_PER_HOST = 16
#: Seconds a connection may stay open without a request under way: from its handshake to its
#: first request's headers, and between requests.  aiohttp's own default is an hour, which let
#: any certificate of the cluster (a monitor's) hold a thousand idle connections, and the
#: process's file descriptors with them.  A replication session is one long request.  (Before
#: the first request only aiohttp 3.14.5 and later apply it: hence the bound in pyproject.toml.)
IDLE_CONNECTION_TIMEOUT = 20.0
#: Seconds between two log lines about TLS connections refused from one host for one reason.
HANDSHAKE_LOG_INTERVAL = 300.0


class RefusedHandshakes:
    """TLS connections this node's server refused, counted by reason and logged.

    asyncio's server drops a failed handshake without a word outside its
    debug mode, so an operator whose secondary is refused (an expired
    certificate, another cluster's CA, a plaintext client) would find
    nothing in the primary's log.  A failed certificate check is a WARNING,
    a client that does not speak TLS an INFO, a connection closed or timed
    out before its handshake (health checks, port scans) DEBUG; one line per
    host and reason every five minutes at most, saying how many more there were.
    """

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self._throttle = Throttle(HANDSHAKE_LOG_INTERVAL)

    def add(self, peer: Any, error: BaseException, received: int | None = None) -> None:
        """One refused connection; ``received``: bytes it had sent (a hello), if known."""
        reason, level, text = _handshake_failure(error, received)
        self.counts[reason] += 1
        host = str(peer[0]) if isinstance(peer, tuple) and peer else "an unknown address"
        # A refused certificate's cause (expired, another CA, ...) asks for its own action: each
        # cause gets its own line, not only the first one met in five minutes.
        unsaid = self._throttle.due((host, reason, text if reason == "certificate" else ""),
                                    HANDSHAKE_LOG_INTERVAL)
        if unsaid is None:
            return
        where = f"{host}:{peer[1]}" if isinstance(peer, tuple) and len(peer) > 1 else host
        log.log(level, "refused a TLS connection from %s: %s%s", where, text,
                Throttle.since(unsaid, f"from {host} for this reason"))


class TooManyHandshakes(Exception):
    """A connection closed at once: ``MAX_HANDSHAKES`` (or as many from its host) were under way."""


def _handshake_failure(error: BaseException, received: int | None = None) -> tuple[str, int, str]:
    """(reason for the counts, log level, words) of a failed server-side handshake."""
    if isinstance(error, TooManyHandshakes):
        return ("busy", logging.WARNING, f"closed before its handshake ended: {error} connections were in "
                "their TLS handshake (a flood of connections that never complete one?)")
    if isinstance(error, ssl.SSLCertVerificationError):
        message = error.verify_message or _short(error)
        advice = _verify_advice(message, "its", "is it signed by this cluster's CA (the one in --tls-ca)?")
        return "certificate", logging.WARNING, f"its certificate was refused ({message}): {advice}"
    if isinstance(error, TimeoutError):
        return "timeout", logging.DEBUG, f"no TLS handshake within {HANDSHAKE_TIMEOUT:.0f}s"
    reason = (getattr(error, "reason", None) or "").upper()
    if isinstance(error, ssl.SSLError) and "CERTIFICATE" in reason and "ALERT" not in reason:
        return ("no_certificate", logging.WARNING,
                "it presented no client certificate (a node needs --tls-cert and --tls-key; "
                "`curl` needs --cert and --key)")
    if "ALERT" in reason:
        # The client refused ours: the alert it sent names why.
        return ("refused_by_client", logging.WARNING,
                f"the client refused this node's certificate ({_short(error)}): does it trust this "
                "cluster's CA, and has this node's certificate expired?")
    if reason in ("HTTP_REQUEST", "WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "UNSUPPORTED_PROTOCOL",
                  "VERSION_TOO_LOW", "NO_SHARED_CIPHER", "NO_PROTOCOLS_AVAILABLE"):
        return ("not_tls", logging.INFO, f"it does not speak TLS 1.2 or later ({_short(error)}); "
                "a plaintext (--insecure) client?")
    if isinstance(error, (ConnectionError, EOFError, ssl.SSLEOFError)) or "EOF" in reason:
        if received is not None and received >= _HELLO_BYTES:
            # It sent its hello, got this node's certificate, and left without a word:
            # an asyncio client (a secondary) refusing a certificate sends no alert.
            return ("refused_by_client", logging.WARNING,
                    "the client closed the connection in the middle of the handshake, most likely "
                    "refusing this node's certificate: does it trust this cluster's CA (is it a node "
                    "of this cluster), does this node's certificate name the host name or address the "
                    "client dialled (`replicator certs show`), and has it expired?")
        return "closed", logging.DEBUG, f"closed before its handshake began ({_short(error)})"
    return "other", logging.INFO, f"TLS handshake failed ({type(error).__name__}: {_short(error)})"


class _Handshake(asyncio.Protocol):
    """Takes one accepted connection through its TLS handshake, then hands it to aiohttp.

    A refused handshake goes to ``RefusedHandshakes``.  What arrives between
    the handshake's end and the hand-over (the request may come in the same
    read) is kept and passed on, as is a close.
    """

    def __init__(self, handler_factory: Any, context: ssl.SSLContext, refused: RefusedHandshakes,
                 pending: dict[asyncio.Task, Any], hosts: collections.Counter[str]) -> None:
        # The context is the server's at the moment of the connection: a reload of the TLS
        # files (``credentials``) changes it for the connections that come after.
        self._factory, self._context, self._refused, self._pending = handler_factory, context, refused, pending
        #: Handshakes under way by host, shared by the server's connections (``MAX_HANDSHAKES_PER_HOST``).
        self._hosts = hosts
        self._handler: asyncio.Protocol | None = None
        self._early: list[bytes] = []
        self._eof = False
        self._lost: tuple[Exception | None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        hosts = self._hosts
        if hosts[host] >= MAX_HANDSHAKES_PER_HOST:
            transport.abort()  # type: ignore[attr-defined]
            self._refused.add(peer, TooManyHandshakes(f"{hosts[host]} from {host}"))
            return
        if len(self._pending) >= MAX_HANDSHAKES:
            # Make room by closing the oldest: a real client ends its handshake in a few round
            # trips, so the oldest is most likely one that never will (a flood from many hosts),
            # and refusing the newest instead would let such a flood keep every client out.
            oldest, oldest_peer = next(iter(self._pending.items()))
            del self._pending[oldest]
            oldest.cancel()
            self._refused.add(oldest_peer, TooManyHandshakes(f"{MAX_HANDSHAKES} in all, this one the oldest,"))
        hosts[host] += 1
        task = asyncio.get_running_loop().create_task(self._handshake(transport))  # type: ignore[arg-type]
        self._pending[task] = peer

        def done(task: asyncio.Task) -> None:
            self._pending.pop(task, None)
            hosts[host] -= 1
            if hosts[host] <= 0:
                del hosts[host]
        task.add_done_callback(done)

    async def _handshake(self, transport: asyncio.Transport) -> None:
        peer = transport.get_extra_info("peername")
        # A second descriptor of the socket, to ask the kernel what the client sent once
        # a failed handshake closed the transport's (Linux; a few microseconds).
        raw = transport.get_extra_info("socket")
        probe: socket.socket | None = None
        if raw is not None and hasattr(socket, "TCP_INFO"):
            with contextlib.suppress(OSError):
                probe = raw.dup()
        try:
            tls = await asyncio.get_running_loop().start_tls(
                transport, self, self._context, server_side=True, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except asyncio.CancelledError:
            transport.close()
            raise
        except Exception as e:  # start_tls closed the connection
            self._refused.add(peer, e, _bytes_received(probe))
            return
        finally:
            if probe is not None:
                probe.close()
        if tls is None:  # closed meanwhile
            return
        try:
            handler = self._factory()
            tls.set_protocol(handler)
            handler.connection_made(tls)
        except Exception:
            log.exception("could not hand a TLS connection from %s over to the web server", peer)
            tls.abort()
            return
        self._handler = handler
        if self._early:
            handler.data_received(b"".join(self._early))
            self._early.clear()
        if self._eof:
            handler.eof_received()
        if self._lost is not None:
            handler.connection_lost(self._lost[0])

    # Until the hand-over (afterwards the TLS transport calls the handler itself).

    def data_received(self, data: bytes) -> None:
        if self._handler is not None:
            self._handler.data_received(data)
        else:
            self._early.append(data)

    def eof_received(self) -> bool | None:
        if self._handler is not None:
            return self._handler.eof_received()
        self._eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handler is not None:
            self._handler.connection_lost(exc)
        else:
            self._lost = (exc,)

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()


#: A server's TLS context, or what gives the current one for each new connection.
ContextSource = ssl.SSLContext | Callable[[], ssl.SSLContext]


class _AuditedTLSSite(web.TCPSite):
    """A ``TCPSite`` that runs each TLS handshake itself (``_Handshake``), so that refusals are told,
    and with the context its source gives at that moment."""

    __slots__ = ("_refused", "_handshakes", "_hosts", "_source")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, ssl_context: ContextSource,
                 refused: RefusedHandshakes) -> None:
        self._source: Callable[[], ssl.SSLContext] = \
            ssl_context if callable(ssl_context) else lambda: ssl_context  # type: ignore[assignment,return-value]
        super().__init__(runner, host, port, ssl_context=self._source())
        self._refused = refused
        #: Handshakes under way, oldest first, with their peers' addresses.
        self._handshakes: dict[asyncio.Task, Any] = {}
        self._hosts: collections.Counter[str] = collections.Counter()

    async def start(self) -> None:
        self._runner._reg_site(self)  # what BaseSite.start does
        server, source = self._runner.server, self._source
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Handshake(server, source(), self._refused, self._handshakes, self._hosts),
            self._host, self._port, backlog=self._backlog, reuse_address=self._reuse_address,
            reuse_port=self._reuse_port)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port

    async def stop(self) -> None:
        for task in list(self._handshakes):
            task.cancel()
        await super().stop()


async def start_server(app: web.Application, host: str, port: int,
                       ssl_context: ContextSource | None, *,
                       shutdown_timeout: float = 5.0,
                       refused: RefusedHandshakes | None = None) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on ``host:port`` and return the runner and the bound port.

    ``port=0`` picks a free port (tests, and "any port" deployments that
    report it through ``/status``).  ``ssl_context=None`` is the explicit
    insecure mode and is logged as a warning; a function instead of a
    context is asked for the context of each new connection (renewed TLS
    files).  ``shutdown_timeout`` bounds how
    long ``stop_server`` waits for open connections before cancelling their
    handlers.  Raises ``ConfigError`` if the address cannot be bound.
    ``refused`` counts and logs the TLS handshakes the server refused (a
    fresh one by default).
    """
    if ssl_context is None:
        _warn_insecure("server")
    # No access log: /status may be polled every second and each replication
    # session is logged with its peer identity by the orchestration.
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=shutdown_timeout, keepalive_timeout=IDLE_CONNECTION_TIMEOUT)
    await runner.setup()
    try:
        site: web.TCPSite
        if ssl_context is None:
            site = web.TCPSite(runner, host, port)
        else:
            site = _AuditedTLSSite(runner, host, port, ssl_context=ssl_context,
                                   refused=refused if refused is not None else RefusedHandshakes())
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    log.info("listening on %s:%d (%s)", host, bound, "TLS" if ssl_context else "plaintext")
    return runner, bound


def peer_chain(tls: ssl.SSLObject | None) -> list[bytes]:
    """The peer's certificates (DER), leaf first, as its handshake verified them up to the trust anchor.

    Python gives the verified chain from 3.13 on, and privately since 3.10;
    where it does not, this is the leaf alone (or nothing before a handshake).
    """
    if tls is None:
        return []
    get = getattr(tls, "get_verified_chain", None)  # 3.13+: DER bytes
    if get is None:
        get = getattr(getattr(tls, "_sslobj", None), "get_verified_chain", None)  # 3.10-3.12
    if get is not None:
        try:
            chain = get()
        except (ssl.SSLError, ValueError):
            chain = None
        if chain:
            return [c if isinstance(c, bytes) else c.public_bytes(_ssl.ENCODING_DER) for c in chain]
    der = tls.getpeercert(binary_form=True)
    return [der] if der else []


def close_connections(runner: web.AppRunner, why: Callable[[list[bytes]], str | None], what: str) -> int:
    """Close every open connection of the server whose client certificate ``why`` names a reason for.

    For a CA taken out of the CA file: a handshake made while it was trusted
    does not outlive it.  ``why`` is given the peer's chain (``peer_chain``).  Each is logged as a WARNING (``what`` names the
    server's side: "secondary", "client"); returns how many were closed.
    """
    server = runner.server
    closed = 0
    for handler in list(server.connections if server is not None else ()):
        transport = handler.transport
        tls = transport.get_extra_info("ssl_object") if transport is not None else None
        if transport is None or tls is None or transport.is_closing():
            continue
        reason = why(peer_chain(tls))
        if reason is None:
            continue
        peername = transport.get_extra_info("peername")
        log.warning("closing the connection of %s %s: %s", what, peer_address(peername) or peername, reason)
        transport.abort()
        closed += 1
    return closed


def peer_address(peername: Any) -> str | None:
    """``HOST:PORT`` (``[v6]:PORT``) of a socket's ``peername``; None if it is not an IP address."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        host = str(peername[0])
        return f"[{host}]:{peername[1]}" if ":" in host else f"{host}:{peername[1]}"
    return None


async def stop_server(runner: web.AppRunner) -> None:
    """Stop accepting, close open connections (bounded by the shutdown timeout), free the port."""
    await runner.cleanup()


def peer_identity(request: web.BaseRequest) -> str:
    """The common name of the client's certificate, for logs and ``/status``.

    Without TLS (insecure mode) there is no identity, only an address, and the
    result says so.
    """
    transport = request.transport
    peercert = transport.get_extra_info("peercert") if transport is not None else None
    if not peercert:
        return f"unauthenticated {request.remote}"
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return f"certificate without common name from {request.remote}"


#: What a certificate of each role may ask of a node (``certs.ROLES``):
#: ``replicate`` (GET /replicate: the whole database), ``control`` (the POST
#: routes: promote, fence, unfence, demote) and ``read`` (every other GET:
#: /status, /metrics, /identities).
ROLE_RIGHTS: dict[str, frozenset[str]] = {
    "node": frozenset({"replicate", "control", "read"}),
    "operator": frozenset({"control", "read"}),
    "monitor": frozenset({"read"}),
}
_RIGHT_WORDS = {"replicate": "replicate the database", "control": "change a node's state",
                "read": "read a node's status"}


def _right(request: web.BaseRequest) -> str:
    if request.path == "/replicate":
        return "replicate"
    return "read" if request.method in ("GET", "HEAD") else "control"


def peer_roles(request: web.BaseRequest) -> frozenset[str] | None:
    """The roles of the client's certificate; None without TLS (insecure mode: no identity)."""
    transport = request.transport
    peercert = transport.get_extra_info("peercert") if transport is not None else None
    if not peercert:
        return None
    return roles_from_uris(str(value) for key, value in peercert.get("subjectAltName", ()) if key == "URI")


@web.middleware
async def authorize(request: web.Request, handler):
    """Refuse (HTTP 403, logged) what the client certificate's role does not allow (``ROLE_RIGHTS``)."""
    roles = peer_roles(request)
    right = _right(request)
    if roles is not None and not any(right in ROLE_RIGHTS.get(role, ()) for role in roles):
        needed = " or ".join(role for role, rights in ROLE_RIGHTS.items() if right in rights)
        # The path and method are the client's words: escaped, they cannot forge a log line.
        asked = printable(f"{request.method} {request.path}")
        text = (f"the certificate {peer_identity(request)!r} has the role {', '.join(sorted(roles))}, which may "
                f"not {_RIGHT_WORDS[right]} ({asked}); that takes a certificate of the role {needed}")
        log.warning("refused %s from %s: %s", asked, request.remote, text)
        raise web.HTTPForbidden(text=text)
    return await handler(request)


# -- client ------------------------------------------------------------------

async def connect_ws(session: aiohttp.ClientSession, url: str | URL,
                     ssl_context: ssl.SSLContext | None, *, max_msg_size: int,
                     heartbeat: float | None = None, timeout: float = 10.0,
                     headers: dict[str, str] | None = None,
                     compress: bool = False) -> aiohttp.ClientWebSocketResponse:
    """Open a WebSocket to ``url`` (``wss://`` with a context, ``ws://`` without).

    ``timeout`` is one budget for the whole operation (TCP connect, TLS
    handshake, HTTP upgrade).  ``max_msg_size`` bounds every received message;
    ``heartbeat`` enables pings so that a silently dead peer is noticed.
    ``compress`` offers permessage-deflate (RFC 7692); ``ws.compress`` says
    whether the server took it (0: it did not).

    Raises ``TLSError`` when the handshake fails on certificates,
    ``TransportError`` for every other failure to connect, and ``ConfigError``
    when the scheme and ``ssl_context`` disagree.
    """
    url = URL(url)
    address = f"{url.host}:{url.port}"
    if url.scheme not in ("ws", "wss"):
        raise ConfigError(f"replication URL {url}: scheme must be wss:// (or ws:// in insecure mode)")
    if (url.scheme == "wss") != (ssl_context is not None):
        raise ConfigError(f"replication URL {url}: "
                          + ("wss:// needs TLS files" if ssl_context is None
                             else "ws:// is plaintext; use wss:// with TLS files"))
    if ssl_context is None:
        _warn_insecure("client")
    try:
        async with asyncio.timeout(timeout):
            ws = await session.ws_connect(
                url, ssl=ssl_context if ssl_context is not None else True,
                max_msg_size=max_msg_size, heartbeat=heartbeat, autoping=True,
                headers=headers, timeout=aiohttp.ClientWSTimeout(ws_close=timeout),
                compress=15 if compress else 0)
    except TimeoutError:
        raise TransportError(address, f"connecting to {url} timed out after {timeout:g} s") from None
    except aiohttp.ClientConnectorCertificateError as e:
        raise _certificate_error(address, e.certificate_error) from e
    except aiohttp.WSServerHandshakeError as e:
        if e.status == 403:
            # The node's log names the role; retrying helps once the certificate is replaced.
            raise TLSError(address, f"{url} refused this node's certificate for replication (HTTP 403): its "
                           "role may not replicate", hint="a secondary needs a certificate of the role node "
                           "(`replicator certs show` prints a certificate's role; `replicator certs issue "
                           "NAME` makes one)") from e
        raise TransportError(address, f"{url} refused the WebSocket upgrade: HTTP {e.status} "
                             f"{e.message}", hint="check the URL path (normally /replicate)") from e
    except (aiohttp.ClientError, OSError) as e:
        raise _connect_error(url, address, e) from e
    sock = ws.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        # A socket the peer already closed refuses options; the next receive says so.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return ws


def _verify_advice(message: str, whose: str, otherwise: str) -> str:
    """What to do about a certificate (``whose``) that OpenSSL's check refused with ``message``."""
    if "CRL" in message:  # "unable to get certificate CRL", "CRL has expired", ...
        return (f"the CA file (--tls-ca) holds revocation lists, and none usable of the CA that signed {whose} "
                "certificate; `replicator certs revoke` on the CA's machine writes one for each CA, then copy "
                "its ca.pem to every node")
    if "revoked" in message:
        return (f"{whose} certificate is on the revocation list in this node's CA file (`replicator certs "
                "revoke`); the node needs a new one (`replicator certs renew NAME`)")
    if "expired" in message:
        return f"renew {whose} certificate (`replicator certs renew NAME`)"
    return otherwise


def _certificate_error(address: str, error: Exception) -> TLSError:
    """We refused the server's certificate."""
    reason = getattr(error, "verify_message", None) or _short(error)
    if "mismatch" in reason:
        hint = (f"the server's certificate does not list {address.rsplit(':', 1)[0]!r} in "
                "its SubjectAltNames; dial a listed name or reissue it with that host")
    elif "expired" in reason and "CRL" not in reason:
        hint = ("the server's certificate has expired; renew it (`replicator certs renew NAME`) "
                "and put it in place: the server loads it within a minute, no restart needed")
    else:
        hint = _verify_advice(reason, "the server's", "is the server's certificate signed by the cluster CA?")
    return TLSError(address, f"TLS handshake with {address} failed: certificate verify "
                    f"failed: {reason}", hint=hint)


#: The other reason a node's address may answer in a tongue other than the replicator's.
OTHER_SERVICE = ("is this address another service's, e.g. the ZEO port instead of the replication port "
                 "(the node's --listen)?")

#: What to do when a plaintext client met a node that speaks TLS.
TLS_INSTEAD = "leave out --insecure and give the cluster certificates (--tls-ca, --tls-cert, --tls-key)"

#: What to check when a request made once (``replicator status``, ``promote``, ...) finds no node.
ONE_SHOT_HINT = "check that the node is running and that this is its --listen address"


def request_error(method: str, url: str | URL, error: BaseException, *, timeout: float) -> TransportError:
    """Why one HTTP request to a node failed: the address and the reason, with a hint for a command run once.

    aiohttp's own texts are not shown: they name its SSL context object
    (``ssl:<ssl.SSLContext object at 0x...>``), which tells people nothing.
    """
    url = URL(url)
    address = f"{url.host}:{url.port}"
    what = f"{method} {url.path}"
    if isinstance(error, TimeoutError):
        return TransportError(address, f"{address} did not answer {what} within {timeout:g} s",
                              hint=ONE_SHOT_HINT)
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        return _certificate_error(address, error.certificate_error)
    if _not_http(error):
        return _connect_error(url, address, error, during=what)
    if isinstance(error, aiohttp.ContentTypeError):  # a ClientResponseError: test it first
        kind = error.headers.get("Content-Type", "no content type") if error.headers else "no content type"
        return TransportError(address, f"{address} answered {what} with {kind}, not JSON",
                              hint="is this the replicator's --listen address, and not another service's?")
    if isinstance(error, aiohttp.ClientResponseError):
        return TransportError(address, f"{address} answered {what} with HTTP {error.status} {error.message}",
                              hint="is this the replicator's --listen address, and not another service's?")
    return _connect_error(url, address, error, during=what, hint=ONE_SHOT_HINT)


def _connect_error(url: URL, address: str, error: BaseException, *, during: str = "the WebSocket handshake",
                   hint: str = "") -> TransportError:
    """``error`` from opening a connection to ``url``, in words; ``hint`` for a node that cannot be reached."""
    secure = url.scheme in ("wss", "https")
    ssl_error = _find_ssl_error(error)
    if ssl_error is not None:
        reason = getattr(ssl_error, "reason", None) or _short(ssl_error)
        text = reason.replace("_", " ").lower()
        if "alert" in text:  # the server sent a TLS alert: it refused us
            hint = ("the server refused this node's certificate; is it signed by the "
                    "cluster CA and does it carry clientAuth?")
            if "certificate required" in text:
                hint = "the server requires a client certificate; configure --tls-cert/--tls-key"
            elif "revoked" in text:
                hint = ("the server's CA file lists this node's certificate as revoked (`replicator certs "
                        "revoke`); give this node a new one (`replicator certs renew NAME`)")
        elif "wrong version" in text or "record layer" in text or "packet length" in text:
            # What answered does not speak TLS: a node in insecure mode, or
            # not a replication node at all (ZEO's port is a common mix-up).
            hint = f"is the server running without TLS (insecure mode)? Or {OTHER_SERVICE}"
        elif "protocol" in text:
            hint = f"the two ends share no TLS version (this side needs {MINIMUM_TLS.name} or newer)"
        else:
            hint = "check that both nodes use certificates from the same cluster CA"
        return TLSError(address, f"TLS handshake with {address} failed: {text}", hint=hint)
    os_error = error.os_error if isinstance(error, aiohttp.ClientConnectorError) else error
    connecting = os_error is not error  # it failed while connecting: TCP or the TLS handshake
    if secure and connecting and isinstance(os_error, ConnectionResetError | ConnectionAbortedError):
        # Closed before the handshake ended: a TLS 1.2 server refusing our
        # certificate looks like this, but so does anything that accepts
        # connections and drops them (a proxy or firewall, a server stopping);
        # two nodes of this release speak TLS 1.3, which refuses as below.
        hint = ("if the server speaks only TLS 1.2, it refused this node's certificate (is it signed "
                "by the cluster CA?); otherwise whatever listens there closes connections unanswered: "
                "a proxy or firewall in between, a server on its way down, or one flooded with "
                "connections (its log then says so)")
        return TLSError(address, f"TLS handshake with {address} failed: the connection was closed "
                        "before the handshake ended", hint=hint)
    if secure and isinstance(os_error, aiohttp.ServerDisconnectedError
                             | ConnectionResetError | ConnectionAbortedError):
        # TLS 1.3 checks the client's certificate after the client considers
        # the handshake done, and asyncio's TLS server drops a connection it
        # refuses without flushing the alert: the refusal arrives here as a
        # disconnect before the HTTP reply.
        hint = ("the server probably refused this node's certificate: is it signed by "
                "the cluster CA, does this node present one, and was it revoked (the server's log says "
                "which)?")
        return TLSError(address, f"TLS handshake with {address} failed: the server closed "
                        f"the connection before answering {during}", hint=hint)
    unresolved = unresolved_host(error)
    if unresolved is not None:
        return TransportError(address, f"cannot connect to {address}: {unresolved}", hint=RESOLUTION_HINT)
    if isinstance(error, aiohttp.ClientConnectorError):
        os_error = error.os_error
        if isinstance(os_error, socket.gaierror):  # its errno is getaddrinfo's, not an OS errno
            reason = os_error.strerror or _short(os_error)
        else:
            reason = os.strerror(os_error.errno) if os_error.errno else _short(os_error)
        return TransportError(address, f"cannot connect to {address}: {reason}", hint=hint)
    if _not_http(error):
        return TransportError(address, f"what answers at {address} does not speak HTTP (the first bytes of "
                              f"its answer to {during} were not an HTTP status line)",
                              hint=f"is the node running with TLS? Then {TLS_INSTEAD}. Or {OTHER_SERVICE}"
                              if not secure else OTHER_SERVICE)
    if not secure and isinstance(error, aiohttp.ClientResponseError | aiohttp.ServerDisconnectedError):
        hint = f"the node may require TLS: {TLS_INSTEAD}"
    detail = _short(error) if str(error) else type(error).__name__
    return TransportError(address, f"connection to {address} failed during {during}: {detail}", hint=hint)


def _not_http(error: BaseException) -> bool:
    """Whatever answered did not send an HTTP response aiohttp could parse (a ZEO server sends its own bytes)."""
    return (isinstance(error, aiohttp.ClientResponseError)
            and isinstance(error.__cause__, HttpProcessingError))


def _resolution_error(error: BaseException) -> socket.gaierror | None:
    """The name-resolution failure behind ``error`` (aiohttp's DNS error wraps one), if that is what it is."""
    inner = getattr(error, "os_error", None)
    for candidate in (inner, error, error.__cause__, error.__context__):
        if isinstance(candidate, socket.gaierror):
            return candidate
    return None


def unresolved_host(error: BaseException) -> str | None:
    """If ``error`` is a host name that could not be resolved, say so in words; else None.

    The resolver's errors carry negative codes of their own (``EAI_*``),
    which ``os.strerror`` knows nothing about ("Unknown error -2").
    """
    gai = _resolution_error(error)
    if gai is None:
        return None
    host = error.host if isinstance(error, aiohttp.ClientConnectorError) else None
    name = f"the host name {host!r}" if host else "the host name"
    return f"{name} could not be resolved ({gai.strerror or gai})"


RESOLUTION_HINT = "check the host name for typos, and that this machine resolves it (DNS or /etc/hosts)"


def _find_ssl_error(error: BaseException | None) -> ssl.SSLError | None:
    """The ``ssl.SSLError`` aiohttp wrapped (its chain or ``os_error``), if any."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        # aiohttp's ClientConnectorSSLError is itself an SSLError without
        # ``reason``; the one OpenSSL raised is its ``os_error``.
        inner = getattr(error, "os_error", None)
        if isinstance(inner, ssl.SSLError):
            return inner
        if isinstance(error, ssl.SSLError):
            return error
        error = error.__cause__ or error.__context__
    return None
