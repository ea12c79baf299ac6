"""A running node's certificate: renewed without a restart, its expiry watched.

Node certificates live 825 days, and a primary may run inside the ZEO server
(``%import replicator``), where a restart to renew one would take the
database away from its clients.  So a node looks at its three TLS files
every ``CHECK_INTERVAL`` (and at once on SIGHUP, in the processes the CLI
runs): when their contents changed and form a usable set again (the same
checks as at start, the certificate's role, and OpenSSL loading them into a
scratch context), it makes its TLS contexts anew from them.  Connections
made from then on present the new certificate and trust exactly the CAs of
the new CA file; established ones keep theirs.  A changed set that is not usable
(a key that belongs to another certificate, another role's certificate)
changes nothing: it is looked at again ``SETTLE`` seconds later (the operator
may be copying the files one by one), then logged with its problems, and
status shows it until it is fixed.

A CA taken out of the CA file is trusted no more: new connections need a
certificate of a CA still in it, and open connections whose peer's
certificate chain went through the removed CA are closed (``on_trust_narrowed``
listeners: the node's server and its link upstream), so moving a cluster
to a new CA (``replicator certs new-ca``) needs no restart, and neither does
dropping a CA whose key leaked.  A certificate revoked in the CA file
(``revocation``) likewise: new connections refuse it at the handshake, and
open ones made with it are closed.

Each check also warns, at most once a day, while the node's certificate
or the CA expires in less than ``EXPIRY_WARNING``; ``/status`` and
``/metrics`` carry both dates for alerts.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import signal
import ssl
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from .certs import issued_by, roles_from_uris
from .errors import ConfigError
from .revocation import Revocations, load_crls
from .throttle import Throttle
from .transport import (
    TLSPems,
    check_pems,
    context_from_pems,
    parse_certs,
    read_pems,
    read_tls_files,
)

__all__ = ["Credentials", "check_all", "on_sighup", "CHECK_INTERVAL", "EXPIRY_WARNING"]

log = logging.getLogger(__name__)

#: Seconds between two looks at the TLS files of a running node.
CHECK_INTERVAL = 60.0
#: Seconds before a changed set of files that is not usable is looked at
#: again, and only then reported: an operator copying the files one by one
#: is not an error.
SETTLE = 2.0
#: Warn (daily) once the certificate or the CA expires in less than this.
EXPIRY_WARNING = datetime.timedelta(days=30)
_DAY = 86400.0
_SHA256 = hashes.SHA256()

#: Whether SIGHUP checks the files in this process (the CLI's services; in a
#: ZEO server SIGHUP is the server's own restart).
sighup_checks = False

#: Every node's credentials in this process, for SIGHUP.
_live: weakref.WeakSet[Credentials] = weakref.WeakSet()


class Credentials:
    """This node's CA file, certificate and key, and the TLS contexts made of them."""

    def __init__(self, ca: str | Path, cert: str | Path, key: str | Path) -> None:
        """Read and check the files; ``ConfigError`` naming every problem."""
        self.paths = (Path(ca), Path(cert), Path(key))
        pems = read_tls_files(*self.paths)
        problems = self._role_problems(pems)
        if problems:
            raise ConfigError(problems)
        self._pems = pems
        self._digest = _digest(pems)
        #: The TLS contexts made of the files in use, by purpose (made anew at each reload).
        self._contexts: dict[ssl.Purpose, ssl.SSLContext] = {}
        #: CAs taken out of the CA file since start, by fingerprint: their certificates' open
        #: connections are closed.
        self._dropped: dict[bytes, x509.Certificate] = {}
        #: Called after a reload that took a CA out of the CA file.
        self._trust_listeners: list[Callable[[], None]] = []
        #: The digest of a changed set that was not usable, reported once.
        self._refused: bytes | None = None
        #: The digest of a changed set not usable at first sight, looked at again after ``SETTLE``.
        self._unsettled: bytes | None = None
        #: Why the files on disk, changed, were not loaded (None once they are).
        self.reload_error: str | None = None
        self.loaded_at = time.time()
        self.reloads = 0
        #: The expiry warnings, daily.
        self._expiry_log = Throttle(_DAY)
        self._describe()
        _live.add(self)
        self._warn_expiry()

    # -- contexts --------------------------------------------------------

    def server_context(self) -> ssl.SSLContext:
        """A server context demanding client certificates from the CA, of the files in use now.

        Ask again for each connection: a reload makes new contexts.
        """
        return self._context(ssl.Purpose.CLIENT_AUTH)

    def client_context(self) -> ssl.SSLContext:
        """A client context checking the server's certificate and host name, of the files in use now.

        Ask again for each connection: a reload makes new contexts.
        """
        return self._context(ssl.Purpose.SERVER_AUTH)

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        context = self._contexts.get(purpose)
        if context is None:
            context = self._contexts[purpose] = context_from_pems(purpose, self._pems, self.paths)
        return context

    # -- trust -----------------------------------------------------------

    def on_trust_narrowed(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` after each reload that took a CA out of the CA file or revoked a certificate.

        It should close its open connections for which ``untrusted`` names a
        reason.  Returns a function that removes it.
        """
        self._trust_listeners.append(listener)
        return lambda: self._trust_listeners.remove(listener) if listener in self._trust_listeners else None

    def untrusted(self, chain: Sequence[bytes]) -> str | None:
        """Why a peer accepted earlier is no longer trusted, or None.

        ``chain``: the peer's certificates (DER), leaf first, as its
        handshake verified them up to the trust anchor (``peer_chain``); or
        the leaf alone where the interpreter does not give the chain.  No
        longer trusted: a CA of that chain was taken out of the CA file, and
        the file holds no certificate of the same name and key (a CA
        re-issued with its own key to extend it trusts what it trusted).
        With the leaf alone only its direct issuer can be judged, so one
        signed through an intermediate CA is left to its next handshake.
        Nor trusted: a peer whose certificate the CA file revokes.
        """
        if not chain or not (self._dropped or self._revocations):
            return None
        try:
            certs = [x509.load_der_x509_certificate(der) for der in chain]
        except ValueError:
            return None
        peer = certs[0]
        revoked = self._revocations.of(peer)  # the leaf only, as the handshake checks (``revocation``)
        if revoked is not None:
            return (f"its certificate {peer.subject.rfc4514_string()} (serial {revoked.serial:x}) was "
                    f"{revoked.words()}, per {self.paths[0]}")
        if not self._dropped:
            return None
        held = {_name_and_key(ca) for ca in self._cas}
        gone = {_name_and_key(ca): ca for ca in self._dropped.values() if _name_and_key(ca) not in held}
        if len(certs) > 1:
            for ca in certs[1:]:
                dropped = gone.get(_name_and_key(ca))
                if dropped is not None:
                    how = "signed by" if ca is certs[1] else "signed through"
                    return (f"its certificate {peer.subject.rfc4514_string()} was {how} the CA "
                            f"{dropped.subject.rfc4514_string()}, which {self.paths[0]} no longer holds")
            return None
        if any(issued_by(peer, ca) for ca in self._cas):
            return None
        for ca in gone.values():
            if issued_by(peer, ca):
                return (f"its certificate {peer.subject.rfc4514_string()} was signed by the CA "
                        f"{ca.subject.rfc4514_string()}, which {self.paths[0]} no longer holds")
        return None

    # -- checking --------------------------------------------------------

    async def watch(self, interval: float | None = None) -> None:
        """Check the files every ``interval`` seconds (``CHECK_INTERVAL``) until cancelled."""
        while True:
            wait = CHECK_INTERVAL if interval is None else interval
            await asyncio.sleep(SETTLE if self._unsettled is not None else wait)
            try:
                self.check()
            except Exception:  # never let this take the node down
                log.exception("checking the TLS files %s failed", ", ".join(map(str, self.paths)))

    def check(self, *, asked: bool = False) -> bool:
        """Load the files again if their contents changed; True if new ones were loaded.

        ``asked``: an operator asked (SIGHUP), so say so when nothing changed.
        """
        problems: list[str] = []
        raw = read_pems(*self.paths, problems)
        digest = _digest(raw)
        if digest == self._digest:
            self._unsettled = None
            if self.reload_error is not None:
                log.warning("the TLS files are back to those this node uses (%s, valid until %s)",
                            self.subject, _date(self.not_after))
            self._refused, self.reload_error = None, None
            if asked:
                log.info("TLS files unchanged: this node keeps the certificate %s, valid until %s",
                         self.subject, _date(self.not_after))
            self._warn_expiry()
            return False
        if digest == self._refused and not asked:
            return False
        problems += check_pems(*self.paths, raw)
        if not problems:
            problems = self._role_problems(raw) + self._name_problems(raw)  # type: ignore[arg-type]  # all read
        if not problems:
            try:
                context_from_pems(ssl.Purpose.CLIENT_AUTH, raw, self.paths)  # type: ignore[arg-type]
            except ConfigError as e:
                problems = e.problems
        if problems:
            if not asked and digest != self._unsettled:
                # Maybe caught between two files being replaced: look again soon before saying so.
                self._unsettled = digest
                return False
            self._refused, self._unsettled = digest, None
            self.reload_error = "; ".join(problems)
            log.warning("the TLS files changed but cannot be used, so this node keeps its certificate %s "
                        "(valid until %s) until they are fixed: %s", self.subject, _date(self.not_after),
                        self.reload_error)
            return False
        self._load(raw)  # type: ignore[arg-type]  # checked: all read
        return True

    def _load(self, pems: TLSPems) -> None:
        old_subject, old_serial, old_not_after, old_issuer = self.subject, self.serial, self.not_after, self.issuer
        old_cas = {c.fingerprint(_SHA256): c for c in self._cas}
        old_revoked = self._revocations.serials()
        contexts = {purpose: context_from_pems(purpose, pems, self.paths) for purpose in self._contexts}
        self._pems, self._digest, self._contexts = pems, _digest(pems), contexts
        self._refused, self._unsettled, self.reload_error = None, None, None
        self.loaded_at = time.time()
        self.reloads += 1
        self._expiry_log = Throttle(_DAY)  # the new certificate's dates are news
        self._describe()
        current = {c.fingerprint(_SHA256) for c in self._cas}
        renewed = (self.subject, self.serial) != (old_subject, old_serial)
        if renewed:
            log.info("loaded the renewed TLS files: this node's certificate is now %s, valid until %s%s "
                     "(was %s, until %s); new connections use it", self.subject, _date(self.not_after),
                     f", issued by {self.issuer} (a new CA)" if self.issuer != old_issuer else "",
                     old_subject, _date(old_not_after))
        if current != set(old_cas):
            log.info("loaded the changed CA file %s: new connections need certificates signed by %s",
                     self.paths[0], " or ".join(c.subject.rfc4514_string() for c in self._cas))
        elif not renewed:
            log.info("loaded the changed TLS files %s: the same certificate and CAs as before",
                     ", ".join(map(str, self.paths)))
        for fingerprint in current:
            self._dropped.pop(fingerprint, None)  # put back
        dropped = {f: c for f, c in old_cas.items() if f not in current}
        if dropped:
            self._dropped.update(dropped)
            log.warning("the CA file %s no longer holds %s: this node trusts it no more, and closes its open "
                        "connections with peers whose certificates it signed, directly or through an "
                        "intermediate CA", self.paths[0],
                        ", ".join(c.subject.rfc4514_string() for c in dropped.values()))
        revoked = self._revocations.serials() - old_revoked
        if revoked:
            log.warning("the CA file %s revokes %d more certificate(s) (serial %s): this node refuses them and "
                        "closes its open connections made with them", self.paths[0], len(revoked),
                        ", ".join(f"{serial:x}" for _, serial in sorted(revoked, key=lambda r: r[1])))
        if dropped or revoked:
            for listener in list(self._trust_listeners):
                try:
                    listener()
                except Exception:
                    log.exception("closing the connections %s no longer trusts failed", self.paths[0])
        self._warn_expiry()

    def _role_problems(self, pems: TLSPems) -> list[str]:
        leaf = parse_certs(pems[1], self.paths[1], "certificate")[0]
        try:
            uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
                .get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        roles = roles_from_uris(uris)
        if "node" in roles:
            return []
        return [f"certificate {self.paths[1]} is of role {', '.join(sorted(roles))}: a primary or secondary "
                "needs a node certificate (`replicator certs issue NAME`)"]

    def _name_problems(self, pems: TLSPems) -> list[str]:
        """A renewed certificate must still name every host and address the current one does:
        peers dial the node by them, and would refuse it otherwise."""
        lost = _names(parse_certs(self._pems[1], self.paths[1], "certificate")[0]) \
            - _names(parse_certs(pems[1], self.paths[1], "certificate")[0])
        if not lost:
            return []
        return [f"certificate {self.paths[1]} no longer lists {', '.join(sorted(lost))}, which the one in use "
                "does: peers that dial this node by that name would refuse it (renew with `replicator certs "
                "renew NAME`, which keeps the names, or issue it with every --host; to drop a name on "
                "purpose, restart the node)"]

    def _describe(self) -> None:
        chain = parse_certs(self._pems[1], self.paths[1], "certificate")
        leaf = chain[0]
        cas = parse_certs(self._pems[0], self.paths[0], "CA file")
        self.subject = leaf.subject.rfc4514_string()
        self.issuer = leaf.issuer.rfc4514_string()
        self.serial = leaf.serial_number
        # A file that holds intermediate CAs after the certificate works until the first of them expires.
        first = min(chain, key=lambda c: c.not_valid_after_utc)
        self.not_after = first.not_valid_after_utc.timestamp()
        self._cert_what = "certificate " + str(self.paths[1]) + (
            "" if first is leaf else f" (the intermediate CA {first.subject.rfc4514_string()} in it)")
        self.ca_not_after = min(c.not_valid_after_utc.timestamp() for c in cas)
        self._cas = cas
        #: The certificates the CA file revokes (checked usable by ``check_pems``).
        self._revocations = Revocations(load_crls(self._pems[0], self.paths[0], []), cas, self.paths[0])

    def _warn_expiry(self) -> None:
        now = time.time()
        for what, not_after, advice in (
                (self._cert_what, self.not_after,
                 "renew it (`replicator certs renew NAME`) and put the new files in place of the "
                 "old files: this node loads it within a minute" + (", or at once on SIGHUP" if sighup_checks
                                                                     else "")),
                ("CA " + str(self.paths[0]), self.ca_not_after,
                 "move the cluster to a new CA without a restart: `replicator certs new-ca`, whose "
                 "output says the next steps")):
            left = not_after - now
            if left >= EXPIRY_WARNING.total_seconds():
                continue
            if self._expiry_log.due(what) is None:
                continue
            if left <= 0:
                log.error("this node's %s expired on %s: peers refuse its new connections; %s",
                          what, _date(not_after), advice)
            else:
                log.warning("this node's %s expires on %s, in %.0f days: %s",
                            what, _date(not_after), left / _DAY, advice)

    def expired(self) -> str | None:
        """What has expired of this node's certificate and CA, if anything: why peers refuse it."""
        now = time.time()
        gone = [f"{what} expired on {_date(when)}" for what, when in
                (("this node's " + self._cert_what, self.not_after),
                 ("the CA " + str(self.paths[0]), self.ca_not_after)) if when <= now]
        if not gone:
            return None
        return ("; ".join(gone) + ": renew it (`replicator certs renew NAME`) and put the files in place; "
                "this node loads them within a minute")

    def status(self) -> dict:
        """For ``/status`` (and ``/metrics``): what is loaded and whether the files on disk are."""
        return {"certificate": self.subject, "certificate_file": str(self.paths[1]),
                "not_after": self.not_after, "ca_not_after": self.ca_not_after,
                "loaded_at": self.loaded_at, "reloads": self.reloads, "reload_error": self.reload_error,
                "revoked": len(self._revocations)}


def on_sighup() -> None:
    """Make SIGHUP check every node's TLS files in this process (the CLI's services)."""
    global sighup_checks
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, check_all)
    sighup_checks = True


def check_all() -> None:
    """Check every node's TLS files in this process now (SIGHUP)."""
    for credentials in list(_live):
        try:
            credentials.check(asked=True)
        except Exception:
            log.exception("checking the TLS files %s failed", ", ".join(map(str, credentials.paths)))


def _names(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return ({f"DNS:{d.lower()}" for d in san.get_values_for_type(x509.DNSName)}
            | {f"IP:{ip}" for ip in san.get_values_for_type(x509.IPAddress)})


def _name_and_key(cert: x509.Certificate) -> tuple[bytes, bytes]:
    """What makes two CA certificates the same CA to a verifier: subject and public key."""
    return cert.subject.public_bytes(), cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _digest(pems: tuple[bytes | None, ...]) -> bytes:
    h = hashlib.sha256()
    for data in pems:
        h.update(b"-" if data is None else len(data).to_bytes(8, "big") + data)
    return h.digest()


def _date(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
