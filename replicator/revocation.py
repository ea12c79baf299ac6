"""Revoked certificates: the certificate revocation lists (CRLs) kept in the CA file.

A node's certificate whose key leaked, or whose host is gone, must stop
opening connections long before it expires, and without moving the whole
cluster to a new CA.  ``replicator certs revoke`` adds it to its CA's CRL,
which lives in ``ca.pem`` beside the CA certificate (one PEM block more): the
file every node already has and looks at every minute, so revoking takes
no new setting and no restart.  Nodes given the new file refuse the
certificate at the TLS handshake (OpenSSL checks the leaf certificate
against its issuer's CRL, ``VERIFY_CRL_CHECK_LEAF``) and close their open
connections made with it (``credentials``).

What a node checks before it uses a CA file that holds CRLs (``problems``),
because OpenSSL, given an unusable CRL, would refuse every certificate of
its CA at the handshake instead: each CRL parses; one issued by a CA of the
file verifies with that CA's key; none is past its next update or before
its last.  A CRL of an issuer the file does not hold (an intermediate CA of
a PKI of your own) is left to OpenSSL, which checks it with the
intermediate of the peer's chain.  Once the file holds a CRL, OpenSSL wants
one for the issuer of every peer's certificate: ``certs new-ca`` therefore
writes an empty one for the new CA.

Only a peer's own (leaf) certificate is checked, at the handshake and on
open connections alike, which is all the CAs ``certs init`` makes need
(they sign node certificates directly).  An intermediate CA of a PKI of
your own is not revoked this way: take its root out of ``ca.pem``, or
revoke the certificates it signed.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

__all__ = ["Revoked", "Revocations", "load_crls", "crl_pems", "crl_signed_by", "REASONS"]

_CRL_PEM = re.compile(rb"-----BEGIN X509 CRL-----\r?\n.*?-----END X509 CRL-----\r?\n?", re.DOTALL)

#: ``--reason`` words and the CRL reason codes they stand for (RFC 5280, 5.3.1).
REASONS: dict[str, x509.ReasonFlags] = {
    "key-compromise": x509.ReasonFlags.key_compromise,
    "superseded": x509.ReasonFlags.superseded,
    "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
    "affiliation-changed": x509.ReasonFlags.affiliation_changed,
}
_REASON_WORDS = {flag: word for word, flag in REASONS.items()}


def crl_pems(data: bytes) -> list[bytes]:
    """The PEM blocks of CRLs in ``data`` (a CA file), in order."""
    return [m.group(0) if m.group(0).endswith(b"\n") else m.group(0) + b"\n" for m in _CRL_PEM.finditer(data)]


def load_crls(data: bytes | None, path: Path, problems: list[str]) -> list[x509.CertificateRevocationList]:
    """The CRLs in ``data`` (None: unreadable, reported already); each one that does not parse is a problem."""
    if data is None or b"-----BEGIN X509 CRL-----" not in data:
        return []
    crls = []
    blocks = crl_pems(data)
    for block in blocks:
        try:
            crls.append(x509.load_pem_x509_crl(block))
        except ValueError as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            problems.append(f"CA file {path}: a revocation list (X509 CRL block) does not parse ({reason})")
    if data.count(b"-----BEGIN X509 CRL-----") != len(blocks):
        problems.append(f"CA file {path}: a revocation list (X509 CRL block) has no END line")
    return crls


@dataclass(frozen=True)
class Revoked:
    """One revoked certificate, as its CA's CRL lists it."""

    serial: int
    #: The CA that revoked it (its subject), and when.
    issuer: str
    date: datetime.datetime
    #: The reason's word (``REASONS``), or None when the CRL gives none.
    reason: str | None

    def words(self) -> str:
        why = f", reason {self.reason}" if self.reason else ""
        return f"revoked by the CA {self.issuer} on {self.date:%Y-%m-%d %H:%M} UTC{why}"


class Revocations:
    """The revoked certificates a CA file lists, by issuer and serial number."""

    def __init__(self, crls: Sequence[x509.CertificateRevocationList] = (),
                 cas: Sequence[x509.Certificate] = (), path: Path | None = None,
                 problems: list[str] | None = None) -> None:
        """Index ``crls``; what makes one unusable goes to ``problems`` (and it is left out)."""
        problems = problems if problems is not None else []
        self.crls = len(crls)
        self._entries: dict[tuple[bytes, int], Revoked] = {}
        now = datetime.datetime.now(datetime.UTC)
        where = f"CA file {path}" if path is not None else "CA file"
        for crl in crls:
            issuer = crl.issuer.rfc4514_string()
            named = [ca for ca in cas if ca.subject == crl.issuer]
            if named and not any(crl_signed_by(crl, ca) for ca in named):
                problems.append(f"{where}: the revocation list of {issuer} does not verify with that CA's key "
                                "(damaged, or signed by another CA of the same name); revoke with `replicator "
                                "certs revoke` on the CA's machine and copy its ca.pem again")
                continue
            if crl.next_update_utc is not None and crl.next_update_utc < now:
                problems.append(f"{where}: the revocation list of {issuer} was due to be replaced on "
                                f"{crl.next_update_utc:%Y-%m-%d} (its next update); TLS refuses every "
                                "certificate of that CA while it is in the file")
                continue
            if crl.last_update_utc > now + datetime.timedelta(minutes=5):
                problems.append(f"{where}: the revocation list of {issuer} is dated "
                                f"{crl.last_update_utc:%Y-%m-%d %H:%M} UTC, in the future (check the clock)")
                continue
            key = crl.issuer.public_bytes()
            for entry in crl:
                self._entries.setdefault((key, entry.serial_number), Revoked(
                    entry.serial_number, issuer, entry.revocation_date_utc, _reason(entry)))

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        """Whether the CA file holds revocation lists, empty ones included."""
        return self.crls > 0

    def serials(self) -> frozenset[tuple[bytes, int]]:
        """What is revoked, as (issuer, serial) pairs: compare two files' to find what is new."""
        return frozenset(self._entries)

    def of(self, cert: x509.Certificate) -> Revoked | None:
        """Whether ``cert`` is revoked by its issuer's CRL in the file."""
        return self.of_serial(cert.issuer, cert.serial_number)

    def of_serial(self, issuer: x509.Name, serial: int) -> Revoked | None:
        """Whether the certificate ``issuer`` issued with that serial number is revoked."""
        return self._entries.get((issuer.public_bytes(), serial))

    def listed(self) -> list[Revoked]:
        """Every revoked certificate, by date."""
        return sorted(self._entries.values(), key=lambda r: (r.date, r.serial))


def crl_signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    """Whether ``ca``'s key signed ``crl``."""
    try:
        return crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]  # a CA's key signs
    except (TypeError, ValueError):
        return False


def _reason(entry: x509.RevokedCertificate) -> str | None:
    try:
        flag = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return None
    return _REASON_WORDS.get(flag, flag.value)
