"""Revoking certificates: the revocation lists in ca.pem, and what a node's checks make of them.

Real certificate files in tmp_path; the TLS handshakes with them are in
tests/integration/test_revocation.py.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from replicator import certs
from replicator.cli import REASON_WORDS
from replicator.errors import ConfigError
from replicator.revocation import REASONS, Revocations, crl_pems, load_crls
from replicator.transport import TLSFiles, check_pems, read_pems


@pytest.fixture
def pki(tmp_path) -> Path:
    directory = tmp_path / "tls"
    certs.init_ca(directory)
    for name in ("primary", "secondary", "lost"):
        certs.issue_node(directory, name)
    return directory


def _crls(directory: Path) -> list[x509.CertificateRevocationList]:
    return [x509.load_pem_x509_crl(block) for block in crl_pems((directory / "ca.pem").read_bytes())]


def _serial(directory: Path, name: str) -> int:
    return x509.load_pem_x509_certificate((directory / f"{name}.pem").read_bytes()).serial_number


def _problems(directory: Path, name: str) -> list[str]:
    paths = (directory / "ca.pem", directory / f"{name}.pem", directory / f"{name}.key")
    problems: list[str] = []
    return problems + check_pems(*paths, read_pems(*paths, problems))


def test_revoke_writes_a_signed_list_into_ca_pem(pki):
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    done = certs.revoke(pki, "lost", reason="key-compromise")
    assert done.already is None and done.listed == 1 and done.serial == _serial(pki, "lost")
    # The CA certificate comes first still, then the list: tools that read the first block see the CA.
    assert x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes()) == ca
    [crl] = _crls(pki)
    assert crl.is_signature_valid(ca.public_key())
    assert crl.issuer == ca.subject
    assert crl.next_update_utc == ca.not_valid_after_utc  # never stale before its CA is
    entry = crl.get_revoked_certificate_by_serial_number(_serial(pki, "lost"))
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1
    when = f"{entry.revocation_date_utc:%Y-%m-%d %H:%M}"
    assert certs.describe(pki / "ca.pem").revoked == (
        f"{_serial(pki, 'lost'):x} (revoked by the CA CN=ZODB replication CA on {when} UTC, reason key-compromise)",)


def test_a_second_revocation_keeps_the_first_and_the_same_one_changes_nothing(pki):
    certs.revoke(pki, "lost")
    before = (pki / "ca.pem").read_bytes()
    again = certs.revoke(pki, pki / "lost.pem")  # by its file this time
    assert again.already is not None and again.already.serial == _serial(pki, "lost")
    assert (pki / "ca.pem").read_bytes() == before
    done = certs.revoke(pki, serial=_serial(pki, "secondary"))
    assert done.cert is None and done.listed == 2
    [crl] = _crls(pki)
    assert {e.serial_number for e in crl} == {_serial(pki, "lost"), _serial(pki, "secondary")}
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2


def test_revoke_refuses_what_it_cannot_revoke(pki, tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        certs.revoke(pki, "lost", serial=5)
    with pytest.raises(ConfigError, match="not both"):
        certs.revoke(pki)
    with pytest.raises(ConfigError, match="unknown revocation reason 'lost-it'"):
        certs.revoke(pki, "lost", reason="lost-it")
    with pytest.raises(ConfigError, match="nobody.pem: no such file"):
        certs.revoke(pki, "nobody")
    with pytest.raises(ConfigError, match="is a CA certificate: to stop trusting a CA"):
        certs.revoke(pki, pki / "ca.pem")
    other = tmp_path / "other"
    certs.init_ca(other)
    certs.issue_node(other, "stranger")
    with pytest.raises(ConfigError, match="was not signed by a CA of .*only the CA that signed"):
        certs.revoke(pki, other / "stranger.pem")
    assert not _crls(pki)


def test_the_lists_follow_a_move_to_a_new_ca(pki):
    certs.revoke(pki, "lost")
    old = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    rotation = certs.new_ca(pki)
    # The old CA's list stays, and the new CA has one (empty) too: TLS wants a list of every CA.
    by_issuer = {crl.issuer: crl for crl in _crls(pki)}
    assert set(by_issuer) == {old.subject, rotation.new.subject}
    assert len(by_issuer[rotation.new.subject]) == 0
    assert by_issuer[rotation.new.subject].is_signature_valid(rotation.new.public_key())
    assert len(x509.load_pem_x509_certificates((pki / "ca.pem").read_bytes())) == 2
    # A certificate of the old CA is revoked with the old CA's key, kept during the move.
    done = certs.revoke(pki, "secondary")
    assert done.ca == old and done.listed == 2
    certs.renew_node(pki, "primary")
    certs.revoke(pki, "primary", reason="superseded")  # now the new CA's
    certs.drop_old_ca(pki, force=True)
    [crl] = _crls(pki)
    assert crl.issuer == rotation.new.subject and len(crl) == 1
    assert x509.load_pem_x509_certificates((pki / "ca.pem").read_bytes()) == [rotation.new]


def test_a_node_refuses_to_use_its_own_revoked_certificate(pki):
    assert _problems(pki, "lost") == []
    certs.revoke(pki, "lost")
    [problem] = _problems(pki, "lost")
    assert f"lost.pem: CN=lost (serial {_serial(pki, 'lost'):x}) was revoked by the CA" in problem
    assert "`replicator certs renew NAME`" in problem
    assert _problems(pki, "primary") == []
    with pytest.raises(ConfigError, match="was revoked by the CA"):
        TLSFiles(pki / "ca.pem", pki / "lost.pem", pki / "lost.key").server_context()
    # Renewed: a new serial, not on the list.
    certs.renew_node(pki, "lost")
    assert _problems(pki, "lost") == []


def test_an_unusable_list_is_refused_by_name(pki, tmp_path):
    certs.revoke(pki, "lost")
    good = (pki / "ca.pem").read_bytes()
    [block] = crl_pems(good)
    # A list signed by another CA of the same name (or tampered with).
    imposter = tmp_path / "imposter"
    certs.init_ca(imposter)
    certs.issue_node(imposter, "x")
    certs.revoke(imposter, "x")
    [forged] = crl_pems((imposter / "ca.pem").read_bytes())
    (pki / "ca.pem").write_bytes(good.replace(block, forged))
    assert any("revocation list of CN=ZODB replication CA does not verify with that CA's key" in p
               for p in _problems(pki, "primary"))
    # A list past its next update: TLS would refuse every certificate of its CA.
    ca = x509.load_pem_x509_certificate(good)
    key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    now = datetime.datetime.now(datetime.UTC)
    stale = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
             .last_update(now - datetime.timedelta(days=40)).next_update(now - datetime.timedelta(days=10))
             .sign(key, hashes.SHA256()))  # type: ignore[arg-type]
    (pki / "ca.pem").write_bytes(good.replace(block, stale.public_bytes(serialization.Encoding.PEM)))
    assert any("was due to be replaced on" in p for p in _problems(pki, "primary"))
    # A block cut short.
    (pki / "ca.pem").write_bytes(good.replace(block, block[: len(block) // 2]))
    assert any("has no END line" in p for p in _problems(pki, "primary"))
    (pki / "ca.pem").write_bytes(good)
    assert _problems(pki, "primary") == []


def test_revocations_by_issuer_and_serial(pki):
    certs.revoke(pki, "lost", reason="cessation-of-operation")
    data = (pki / "ca.pem").read_bytes()
    problems: list[str] = []
    index = Revocations(load_crls(data, pki / "ca.pem", problems), x509.load_pem_x509_certificates(data),
                        pki / "ca.pem", problems)
    assert problems == [] and len(index) == 1 and index
    lost = x509.load_pem_x509_certificate((pki / "lost.pem").read_bytes())
    primary = x509.load_pem_x509_certificate((pki / "primary.pem").read_bytes())
    assert index.of(primary) is None
    revoked = index.of(lost)
    assert revoked is not None and revoked.reason == "cessation-of-operation"
    assert not Revocations() and len(Revocations()) == 0


def test_the_command_line_offers_every_reason():
    assert set(REASON_WORDS) == set(REASONS)


def test_certs_revoke_on_the_command_line(pki):
    from click.testing import CliRunner

    from replicator.cli import cli

    runner = CliRunner()
    serial = _serial(pki, "lost")
    done = runner.invoke(cli, ["certs", "revoke", "lost", "--dir", str(pki), "--reason", "superseded"])
    assert done.exit_code == 0, done.output
    assert done.output.startswith(f"revoked CN=lost (serial {serial:x}): the revocation list of CN=ZODB "
                                  f"replication CA in {pki / 'ca.pem'} now lists 1 certificate(s). Copy")
    again = runner.invoke(cli, ["certs", "revoke", "--serial", f"{serial:x}", "--dir", str(pki)])
    assert again.exit_code == 0, again.output
    assert "was already revoked by the CA CN=ZODB replication CA on" in again.output
    assert "reason superseded" in again.output and "is unchanged" in again.output
    shown = runner.invoke(cli, ["certs", "show", str(pki / "ca.pem")])
    assert f"revoked: {serial:x} (revoked by the CA" in shown.output
    bad = runner.invoke(cli, ["certs", "revoke", "--serial", "zz", "--dir", str(pki)])
    assert bad.exit_code == 2 and "--serial 'zz' is not a hexadecimal serial number" in bad.output
    missing = runner.invoke(cli, ["certs", "revoke", "--dir", str(pki)])
    assert missing.exit_code == 2 and "name the certificate to revoke, or give its serial number" in missing.output
