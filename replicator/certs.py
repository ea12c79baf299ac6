"""A tiny private certificate authority for one replication cluster.

Every node (primary or secondary) gets one certificate, signed by the
cluster CA, that it uses both as a TLS server (it may serve the stream
onward) and as a TLS client (it dials its upstream).  That is why node
certificates carry *both* the serverAuth and clientAuth extended key usages.

A certificate may also carry a *role*, as a SubjectAltName URI
``urn:zodb-replicator:role:NAME`` (``ROLES``): what its holder may ask of a
node.  ``node`` (what every node needs; a certificate without a role URI is
one) may do everything; ``operator`` may call the control routes (promote,
fence, switchover) and read status, but not replicate the database;
``monitor`` may only read (``/status``, ``/metrics``, ``/identities``), for
a Prometheus scraper that must not be able to download the data or fence
the primary.  ``transport.ROLE_RIGHTS`` is the rule.

Files live side by side in one directory::

    ca.pem  ca.key          the cluster CA (keep ca.key off the nodes if you can)
    <name>.pem <name>.key   one pair per node

Moving a cluster to a new CA (the old one expires, or its key leaked) takes
no restart: ``new_ca`` makes the new CA and a ``ca.pem`` that holds both,
which every node trusts once it is in place; the nodes' certificates are
then renewed under the new CA; ``drop_old_ca`` leaves the new CA alone in
``ca.pem``, and nodes given that file close their connections of
certificates the old one signed (``credentials``).  In between, the old CA
waits in ``ca-previous.pem`` and ``ca-previous.key``.

Revoking one certificate (its key leaked, its host is gone) is lighter:
``revoke`` adds it to its CA's revocation list (CRL), kept in ``ca.pem``
after the CA certificates (``revocation``), and nodes given that file
refuse it and close its connections.  ``new_ca`` and ``drop_old_ca`` carry
the lists along.

Keys are EC P-256: small, fast, and accepted by every TLS 1.2+ stack.  Private
keys are created with mode 0600 from the first byte (``O_EXCL`` plus an
explicit mode), never chmod-ed afterwards, so there is no window in which
another user can read them.  Existing files are never overwritten unless
``force=True``: silently replacing a CA would orphan every node certificate.

The certificates are built to pass OpenSSL's strict X.509 checks (Python
3.13 turns ``VERIFY_X509_STRICT`` on by default): critical basic
constraints, subject and authority key identifiers.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import ConfigError
from .revocation import REASONS, Revocations, Revoked, crl_pems, crl_signed_by, load_crls

__all__ = ["CertPaths", "CertInfo", "init_ca", "issue_node", "renew_node", "new_ca", "drop_old_ca", "describe",
           "revoke", "Revocation", "ROLES", "ROLE_URI_PREFIX", "roles_from_uris"]

CA_NAME = "ca"
#: Where ``new_ca`` keeps the CA it replaces until ``drop_old_ca``.
PREVIOUS_CA_NAME = "ca-previous"

# Clocks on freshly provisioned machines disagree; backdating by a few
# minutes avoids "certificate is not yet valid" right after issuing.
_BACKDATE = datetime.timedelta(minutes=5)

_EKU_NAMES = {ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
              ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth"}

#: Certificate roles, from most to least trusted (see the module's docstring).
ROLES = ("node", "operator", "monitor")
#: A role is a SubjectAltName URI: this prefix, then the role's name.
ROLE_URI_PREFIX = "urn:zodb-replicator:role:"


def roles_from_uris(uris: Iterable[str]) -> frozenset[str]:
    """The roles a certificate's SubjectAltName URIs grant: ``node`` when it names none.

    Role names this release does not know are kept (they grant nothing).
    """
    roles = frozenset(u[len(ROLE_URI_PREFIX):] for u in uris if u.startswith(ROLE_URI_PREFIX))
    return roles or frozenset({"node"})


# Node names become file names; keep them to a portable, unambiguous set.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class CertPaths:
    """Where a certificate and its private key were written."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class CertInfo:
    """What an operator wants to see about a certificate (``replicator certs show``)."""

    path: Path
    subject: str
    common_name: str | None
    issuer: str
    serial: int
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    not_before: datetime.datetime
    not_after: datetime.datetime
    is_ca: bool
    extended_key_usage: tuple[str, ...]
    sha256_fingerprint: str
    #: What its holder may ask of a node (``ROLES``); a CA's is empty.
    roles: tuple[str, ...] = ()
    #: The intermediate CAs the file holds after it (a PKI of your own), as "subject (until date)".
    intermediates: tuple[str, ...] = ()
    #: For a CA file: the other CAs it holds (while the cluster moves to a new CA).
    other_cas: tuple[str, ...] = ()
    #: When the first certificate of the file expires, intermediates included: when it stops working.
    usable_until: datetime.datetime | None = None
    #: For a CA file with revocation lists: each revoked certificate, as "serial (revoked on date, reason)".
    revoked: tuple[str, ...] = ()

    @property
    def sans(self) -> tuple[str, ...]:
        """All SubjectAltName entries, DNS names first, as ``DNS:x`` / ``IP:y``."""
        return (tuple(f"DNS:{d}" for d in self.dns_names)
                + tuple(f"IP:{i}" for i in self.ip_addresses))

    def expired(self, now: datetime.datetime | None = None) -> bool:
        now = now or datetime.datetime.now(datetime.UTC)
        return now >= self.not_after


def init_ca(directory: str | os.PathLike[str], *, common_name: str = "ZODB replication CA",
            days: int = 3650, force: bool = False) -> CertPaths:
    """Create the cluster CA (``ca.pem`` and ``ca.key``) in ``directory``.

    The directory is created if needed.  Raises ``ConfigError`` when the files
    already exist (unless ``force``) or the arguments are unusable.
    """
    directory = Path(directory)
    problems = _check_days(days)
    if not common_name.strip():
        problems.append("CA common name must not be empty")
    paths = CertPaths(directory / f"{CA_NAME}.pem", directory / f"{CA_NAME}.key")
    problems += _check_targets(paths, force)
    if problems:
        raise _refusal(problems)
    cert, key = _make_ca(common_name, days)
    _write(paths, cert, key)
    return paths


def _make_ca(common_name: str, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        # path_length=0: this CA signs node certificates, never other CAs.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


@dataclass(frozen=True)
class CARotation:
    """What ``new_ca`` or ``drop_old_ca`` did."""

    #: The CA file to copy to every node.
    ca_file: Path
    #: The CA that signs from now on.
    new: x509.Certificate
    #: The CAs replaced (``new_ca``) or taken out of the CA file (``drop_old_ca``).
    old: tuple[x509.Certificate, ...]
    #: Certificates in the directory still signed by an old CA (``new_ca``: all to renew).
    unrenewed: tuple[Path, ...] = ()


def new_ca(directory: str | os.PathLike[str], *, days: int = 3650,
           common_name: str | None = None) -> CARotation:
    """Begin moving the cluster in ``directory`` to a new CA, without stopping any node.

    Makes a new CA key and certificate; ``ca.key`` becomes the new key (what
    ``issue_node`` and ``renew_node`` sign with from now on) and ``ca.pem``
    holds the new CA and then the old one, so nodes given it trust both.
    The old CA goes to ``ca-previous.pem`` and ``ca-previous.key``.
    ``ConfigError`` if the CA in ``directory`` is not usable or a move is
    under way already (``ca.pem`` holds more than one CA).
    """
    directory = Path(directory)
    problems = _check_days(days)
    ca = _load_ca(directory, problems)
    bundle = _bundle(directory, problems)
    if len(bundle) > 1:
        problems.append(f"{directory / (CA_NAME + '.pem')} holds {len(bundle)} CA certificates: a move to a new "
                        "CA is under way; finish it with `replicator certs drop-old-ca` first")
    if problems or ca is None:
        raise ConfigError(problems)
    old_cert, old_key = ca
    now = datetime.datetime.now(datetime.UTC)
    if common_name is None:
        common_name = f"ZODB replication CA {now:%Y-%m-%d %H:%M:%S}"
    if not common_name.strip() or common_name == old_cert.subject.rfc4514_string().removeprefix("CN="):
        raise ConfigError(f"the new CA's common name {common_name!r} must be set and differ from the old one's")
    cert, key = _make_ca(common_name, days)
    crls = [block for block, _ in _lists(directory)]
    if crls:
        # Once the file holds revocation lists, TLS wants one of every CA that signs certificates.
        crls.append(_pem(_make_crl(cert, key, [], 1)))
    # The old CA first, so that a crash leaves it where it can be put back from.
    _write(CertPaths(directory / f"{PREVIOUS_CA_NAME}.pem", directory / f"{PREVIOUS_CA_NAME}.key"),
           old_cert, old_key)
    _write_file(directory / f"{CA_NAME}.key", _key_pem(key), 0o600)
    _write_file(directory / f"{CA_NAME}.pem", _cert_pem(cert) + _cert_pem(old_cert) + b"".join(crls), 0o644)
    return CARotation(directory / f"{CA_NAME}.pem", cert, (old_cert,), _signed_by_old(directory, cert))


def drop_old_ca(directory: str | os.PathLike[str], *, force: bool = False) -> CARotation:
    """End a move to a new CA: ``ca.pem`` keeps only the CA that signs now.

    Refuses (``ConfigError``) while certificates in ``directory`` are still
    signed by an old CA only, unless ``force``: nodes given the new file
    would refuse them.  ``ca-previous.pem`` and ``ca-previous.key`` are
    removed: nothing is signed with the old key any more.
    """
    directory = Path(directory)
    problems: list[str] = []
    ca = _load_ca(directory, problems)
    bundle = _bundle(directory, problems)
    if problems or ca is None:
        raise ConfigError(problems)
    if len(bundle) == 1:
        raise ConfigError(f"{directory / (CA_NAME + '.pem')} holds one CA only: there is no old CA to drop "
                          "(`replicator certs new-ca` begins a move to a new one)")
    new, old = bundle[0], tuple(bundle[1:])
    unrenewed = _signed_by_old(directory, new)
    if unrenewed and not force:
        error = ConfigError([f"{path} is still signed by the old CA" for path in unrenewed])
        error.hint = ("renew each (`replicator certs renew NAME`) and put it in place on its node first: nodes "
                      "given a CA file without the old CA refuse it; --force drops the old CA all the same")
        raise error
    kept = [block for block, crl in _lists(directory) if crl.issuer == new.subject]
    _write_file(directory / f"{CA_NAME}.pem", _cert_pem(new) + b"".join(kept), 0o644)
    for suffix in (".key", ".pem"):
        (directory / f"{PREVIOUS_CA_NAME}{suffix}").unlink(missing_ok=True)
    return CARotation(directory / f"{CA_NAME}.pem", new, old, unrenewed)


@dataclass(frozen=True)
class Revocation:
    """What ``revoke`` did."""

    #: The CA file to copy to every node.
    ca_file: Path
    #: The certificate revoked (None: revoked by serial number alone).
    cert: x509.Certificate | None
    serial: int
    #: The CA whose revocation list lists it.
    ca: x509.Certificate
    #: How it was revoked before, if it was (nothing was changed then).
    already: Revoked | None
    #: How many certificates that CA's list holds now.
    listed: int


def revoke(directory: str | os.PathLike[str], cert: str | os.PathLike[str] | None = None, *,
           serial: int | None = None, reason: str | None = None) -> Revocation:
    """Add a certificate to its CA's revocation list in ``directory``'s ``ca.pem``.

    ``cert``: a name in ``directory`` (``NAME.pem``) or a certificate file;
    or ``serial``, a serial number the signing CA (``ca.key``) issued, for a
    certificate whose file is gone.  ``reason``: a word of
    ``revocation.REASONS``.  The CA that signed it must have its key in
    ``directory`` (``ca.key``, or ``ca-previous.key`` while the cluster moves
    to a new CA).  Revoking one already revoked changes nothing.
    ``ConfigError`` naming every problem otherwise.
    """
    directory = Path(directory)
    problems: list[str] = []
    if (cert is None) == (serial is None):
        raise ConfigError("name the certificate to revoke, or give its serial number (not both)")
    if reason is not None and reason not in REASONS:
        raise ConfigError(f"unknown revocation reason {reason!r}: one of {', '.join(REASONS)}")
    signing = _load_ca(directory, problems)
    bundle = _bundle(directory, problems)
    target: x509.Certificate | None = None
    if cert is not None:
        path = directory / f"{cert}.pem"
        if not path.exists() and Path(cert).is_file():
            path = Path(cert)
        target = _load_cert(path, "certificate", problems)
        if target is not None and is_ca(target):
            problems.append(f"{path} is a CA certificate: to stop trusting a CA, move the cluster to a new one "
                            "(`replicator certs new-ca`, then `drop-old-ca`)")
    if problems or signing is None:
        raise ConfigError(problems)
    keys = [signing]
    if (directory / f"{PREVIOUS_CA_NAME}.pem").exists():  # a move to a new CA under way
        old = _load_ca(directory, [], PREVIOUS_CA_NAME)
        if old is not None:
            keys.append(old)
    if target is None:
        ca, key = signing
        number = int(serial)  # type: ignore[arg-type]  # given when cert is not
        if number <= 0:
            raise ConfigError(f"serial number {number} is not a certificate's (they are positive)")
    else:
        found = [(c, k) for c, k in keys if issued_by(target, c)]
        if not found:
            issuers = [c.subject.rfc4514_string() for c in bundle if issued_by(target, c)]
            raise ConfigError(f"{target.subject.rfc4514_string()} (serial {target.serial_number:x}) "
                              + (f"was signed by {issuers[0]}, whose key is not in {directory}" if issuers
                                 else f"was not signed by a CA of {directory}")
                              + ": only the CA that signed a certificate can revoke it")
        (ca, key), number = found[0], target.serial_number
    lists = _lists(directory)
    own = [crl for _, crl in lists if crl.issuer == ca.subject and crl_signed_by(crl, ca)]
    listed = Revocations(own, [ca])
    before = listed.of_serial(ca.subject, number)
    if before is not None:
        return Revocation(directory / f"{CA_NAME}.pem", target, number, ca, before, len(listed))
    # What the CA's lists hold (one, unless someone joined several by hand), and the new entry.
    entries = list({entry.serial_number: entry for crl in own for entry in crl}.values())
    new_entry = x509.RevokedCertificateBuilder().serial_number(number) \
        .revocation_date(datetime.datetime.now(datetime.UTC))
    if reason is not None:
        new_entry = new_entry.add_extension(x509.CRLReason(REASONS[reason]), critical=False)
    entries.append(new_entry.build())
    crl = _make_crl(ca, key, entries, max(map(_crl_number, own), default=0) + 1)
    others = [block for block, c in lists if c.issuer != ca.subject]
    _write_file(directory / f"{CA_NAME}.pem", b"".join(_cert_pem(c) for c in bundle) + b"".join(others)
                + _pem(crl), 0o644)
    return Revocation(directory / f"{CA_NAME}.pem", target, number, ca, None, len(entries))


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


def _make_crl(ca: x509.Certificate, key: ec.EllipticCurvePrivateKey, entries: list[x509.RevokedCertificate],
              number: int) -> x509.CertificateRevocationList:
    """The CA's revocation list of ``entries``, valid until the CA itself expires.

    Its next update is the CA's expiry, not a week or a month as on a public
    CA's list: a list past its next update makes TLS refuse every
    certificate of its CA, and nothing here would be there to renew it.
    """
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(ca.subject)
               .last_update(now - _BACKDATE)
               .next_update(ca.not_valid_after_utc)
               .add_extension(x509.CRLNumber(number), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                   ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value), critical=False))
    for entry in entries:
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(key, hashes.SHA256())


def _lists(directory: Path) -> list[tuple[bytes, x509.CertificateRevocationList]]:
    """The revocation lists in ``directory``'s ``ca.pem``, as PEM and parsed; ``ConfigError`` if one does
    not parse (rewriting the file would drop it unseen)."""
    problems: list[str] = []
    path = directory / f"{CA_NAME}.pem"
    data = read_file(path, "CA certificate", problems)
    crls = load_crls(data, path, problems)
    if problems:
        raise ConfigError(problems)
    return list(zip(crl_pems(data or b""), crls, strict=True))


def _bundle(directory: Path, problems: list[str]) -> list[x509.Certificate]:
    """Every certificate of ``ca.pem``, the signing CA first."""
    path = directory / f"{CA_NAME}.pem"
    return load_certs(read_file(path, "CA certificate", problems), path, "CA certificate", problems)


def load_certs(data: bytes | None, path: Path, what: str, problems: list[str]) -> list[x509.Certificate]:
    """The PEM certificates in ``data`` (None: unreadable, reported already); none, with the
    reason added to ``problems``, if it holds none."""
    if data is None:
        return []
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        problems.append(f"{what} {path}: not a PEM certificate ({reason})")
        return []


def _signed_by_old(directory: Path, ca: x509.Certificate) -> tuple[Path, ...]:
    """The leaf certificates in ``directory`` that ``ca`` did not sign."""
    found = []
    for path in sorted(directory.glob("*.pem")):
        if path.stem in (CA_NAME, PREVIOUS_CA_NAME):
            continue
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError):
            continue
        if is_ca(cert):
            continue
        if not issued_by(cert, ca):
            found.append(path)
    return tuple(found)


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``issuer`` signed ``cert`` (directly)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def is_ca(cert: x509.Certificate) -> bool:
    """Whether ``cert`` says it is a CA (basic constraints)."""
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def issue_node(directory: str | os.PathLike[str], name: str, *,
               hosts: Iterable[str] = ("localhost", "127.0.0.1"), days: int = 825,
               force: bool = False, role: str = "node") -> CertPaths:
    """Issue ``<name>.pem`` / ``<name>.key`` in ``directory``, signed by its CA.

    ``role`` (``ROLES``) is written as a SubjectAltName URI; nodes check it
    on every request (``transport.authorize``).

    ``hosts`` become SubjectAltName entries (IP addresses as IP entries, the
    rest as DNS names): clients check the address they dial against them, so
    list every name and address peers use to reach this node.  The common name
    is ``name``; servers log it as the peer's identity.  825 days is the
    longest lifetime mainstream TLS clients accept for a leaf certificate.

    Raises ``ConfigError`` listing every problem: a missing or unreadable CA,
    a bad name or host, existing files without ``force``.
    """
    directory = Path(directory)
    problems = _check_days(days)
    if not _NAME_RE.match(name) or name == CA_NAME:
        problems.append(f"node name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
                        f"start with a letter or digit, and not be {CA_NAME!r}")
    if role not in ROLES:
        problems.append(f"role {role!r}: must be one of {', '.join(ROLES)}")
    dns_names, ips = _split_hosts(hosts, problems)
    paths = CertPaths(directory / f"{name}.pem", directory / f"{name}.key")
    problems += _check_targets(paths, force)
    ca = _load_ca(directory, problems)
    if problems or ca is None:
        error = _refusal(problems)
        if ca is None:
            error.hint = (f"node certificates are signed by {directory / 'ca.pem'}; create it "
                          "first with `replicator certs init`")
        raise error
    ca_cert, ca_key = ca

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    sans += [x509.IPAddress(ip) for ip in ips]
    sans.append(x509.UniformResourceIdentifier(ROLE_URI_PREFIX + role))
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        # Both: every node is a TLS server to its downstream and a client upstream.
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(paths, cert, key)
    return paths


def renew_node(directory: str | os.PathLike[str], name: str, *, days: int = 825) -> CertPaths:
    """Issue ``<name>.pem`` / ``<name>.key`` in ``directory`` anew: a new key, the same host
    names, addresses and role as the certificate there now, valid ``days`` from now.

    A running node loads the new files without a restart; the same names
    matter, because the peers that dial it check them.  ``ConfigError`` if
    there is no such certificate, or it is not a node, operator or monitor
    certificate of this CA.
    """
    directory = Path(directory)
    current = describe(directory / f"{name}.pem")
    if current.is_ca:
        raise ConfigError(f"{directory / (name + '.pem')} is a CA certificate; `certs renew` renews the "
                          "certificates it signed")
    roles = [r for r in current.roles if r in ROLES]
    if len(roles) != 1:
        raise ConfigError(f"{directory / (name + '.pem')} has the roles {', '.join(current.roles) or 'none'}; "
                          "issue its successor with `replicator certs issue NAME --role ROLE --force`")
    hosts = current.dns_names + current.ip_addresses
    return issue_node(directory, name, hosts=hosts or ("localhost", "127.0.0.1"), days=days, force=True,
                      role=roles[0])


def describe(cert_path: str | os.PathLike[str]) -> CertInfo:
    """Read a PEM certificate and summarise it; ``ConfigError`` if missing or not PEM."""
    path = Path(cert_path)
    problems: list[str] = []
    data = read_file(path, "certificate", problems)
    certs = load_certs(data, path, "certificate", problems)
    if not certs:
        raise ConfigError(problems)
    cert = certs[0]
    revocations = Revocations(load_crls(data, path, []), certs, path) if is_ca(cert) else Revocations()
    # After a node's certificate: its intermediate CAs.  After a CA: other CAs (a CA file mid-move).
    chain, others = ([], certs[1:]) if is_ca(cert) else (certs[1:], [])
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        dns_names, ips, uris = (), (), ()
    try:
        eku = tuple(_EKU_NAMES.get(oid, oid.dotted_string) for oid in
                    cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        eku = ()
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return CertInfo(
        path=path,
        subject=cert.subject.rfc4514_string(),
        common_name=str(cns[0].value) if cns else None,
        issuer=cert.issuer.rfc4514_string(),
        serial=cert.serial_number,
        dns_names=dns_names,
        ip_addresses=ips,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        is_ca=is_ca(cert),
        extended_key_usage=eku,
        sha256_fingerprint=cert.fingerprint(hashes.SHA256()).hex(":"),
        roles=() if is_ca(cert) else tuple(sorted(roles_from_uris(uris), key=_role_order)),
        intermediates=tuple(map(_until, chain)),
        other_cas=tuple(map(_until, others)),
        usable_until=min([cert.not_valid_after_utc] + [c.not_valid_after_utc for c in chain]),
        revoked=tuple(f"{r.serial:x} ({r.words()})" for r in revocations.listed()),
    )


def _until(cert: x509.Certificate) -> str:
    return f"{cert.subject.rfc4514_string()} (until {cert.not_valid_after_utc:%Y-%m-%d})"


def _role_order(role: str) -> tuple[int, str]:
    return (ROLES.index(role) if role in ROLES else len(ROLES), role)


# -- helpers ---------------------------------------------------------------

def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
        crl_sign=cert_sign, encipher_only=False, decipher_only=False)


def _check_days(days: int) -> list[str]:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        return [f"validity must be a positive number of days, got {days!r}"]
    return []


#: The problem of a file that is there already, and what a caller of this module does about it.
#: The command line says ``--force`` instead (``cli.py``).
EXISTS = "already exists"
FORCE_HINT = "pass force=True to replace existing files"


def _refusal(problems: list[str]) -> ConfigError:
    error = ConfigError(problems)
    if any(p.endswith(f": {EXISTS}") for p in problems):
        error.hint = FORCE_HINT
    return error


def _check_targets(paths: CertPaths, force: bool) -> list[str]:
    if force:
        return []
    return [f"{p}: {EXISTS}" for p in (paths.cert, paths.key) if p.exists()]


def _split_hosts(hosts: Iterable[str], problems: list[str]
                 ) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    if isinstance(hosts, str):  # a lone "localhost" would otherwise become 9 hosts
        hosts = [hosts]
    dns_names: list[str] = []
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for host in hosts:
        host = host.strip().strip("[]")
        try:
            ips.append(ipaddress.ip_address(host))
            continue
        except ValueError:
            pass
        labels = host.rstrip(".").split(".")
        if host and all(re.fullmatch(r"(\*|[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)", lb)
                        for lb in labels):
            dns_names.append(host.rstrip(".").lower())
        else:
            problems.append(f"host {host!r} is neither an IP address nor a DNS name")
    if not dns_names and not ips and not problems:
        problems.append("at least one host name or IP address is required")
    return dns_names, ips


def _load_cert(path: Path, what: str, problems: list[str]) -> x509.Certificate | None:
    data = read_file(path, what, problems)
    if data is None:
        return None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as e:
        problems.append(f"{what} {path}: not a PEM certificate ({e})")
        return None


def read_file(path: Path, what: str, problems: list[str]) -> bytes | None:
    """The file's bytes, or None with the reason added to ``problems`` (all are reported at once)."""
    if str(path) in ("", "."):  # an option left out: Path("") is the current directory
        problems.append(f"no {what} given")
        return None
    try:
        return path.read_bytes()
    except FileNotFoundError:
        problems.append(f"{what} {path}: no such file")
    except PermissionError:
        problems.append(f"{what} {path}: permission denied")
    except IsADirectoryError:
        problems.append(f"{what} {path}: is a directory")
    except OSError as e:
        problems.append(f"{what} {path}: cannot read ({e.strerror or e})")
    return None


def _load_ca(directory: Path, problems: list[str], name: str = CA_NAME
             ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The CA certificate and key of ``directory`` (``name``: ``ca``, or ``ca-previous``), or None with
    problems added."""
    before = len(problems)
    cert = _load_cert(directory / f"{name}.pem", "CA certificate", problems)
    key_path = directory / f"{name}.key"
    data = read_file(key_path, "CA key", problems)
    key = None
    if data is not None:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            problems.append(f"CA key {key_path}: not an unencrypted PEM private key ({e})")
    if len(problems) > before or cert is None or key is None:
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        problems.append(f"CA key {key_path}: expected an EC key, got {type(key).__name__}")
        return None
    if key.public_key() != cert.public_key():
        problems.append(f"CA key {key_path} does not belong to {directory / (name + '.pem')}")
        return None
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        problems.append(f"CA certificate {directory / (name + '.pem')} is not self-signed")
        return None
    try:
        if not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise x509.ExtensionNotFound("not a CA", x509.BasicConstraints.oid)
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        problems.append(f"CA certificate {directory / (name + '.pem')} is not a CA "
                        "made by `replicator certs init` (missing CA basic constraints or key identifier)")
        return None
    return cert, key


def _write(paths: CertPaths, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    """Write key then certificate; the key is 0600 from creation on."""
    paths.cert.parent.mkdir(parents=True, exist_ok=True)
    _write_file(paths.key, _key_pem(key), 0o600)
    _write_file(paths.cert, _cert_pem(cert), 0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def _write_file(path: Path, data: bytes, mode: int) -> None:
    # Write to a fresh temporary name and rename: a crash never leaves half a
    # key behind, and a replaced key never passes through a readable mode.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)  # a leftover of a crashed run with our pid
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as e:
        raise ConfigError(f"{path}: cannot create ({e.strerror or e})") from e
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # exactly this mode, whatever the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
