"""The cluster CA: files, modes, extensions, refusals (certificates in tmp_path)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from replicator import certs
from replicator.errors import ConfigError


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _cert(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_init_ca_writes_a_ca_with_a_private_key(tmp_path):
    paths = certs.init_ca(tmp_path / "pki")
    assert paths.cert == tmp_path / "pki" / "ca.pem"
    assert paths.key == tmp_path / "pki" / "ca.key"
    assert _mode(paths.key) == 0o600
    assert _mode(paths.cert) == 0o644
    cert = _cert(paths.cert)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    cert.verify_directly_issued_by(cert)
    key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    assert key.public_key() == cert.public_key()
    assert not list(paths.cert.parent.glob(".*tmp*")), "temporary files left behind"


def test_key_is_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        paths = certs.init_ca(tmp_path)
        node = certs.issue_node(tmp_path, "n1")
    finally:
        os.umask(old)
    assert _mode(paths.key) == 0o600
    assert _mode(node.key) == 0o600


def test_init_ca_refuses_to_overwrite_and_names_both_files(tmp_path):
    first = certs.init_ca(tmp_path)
    before = first.cert.read_bytes()
    with pytest.raises(ConfigError) as info:
        certs.init_ca(tmp_path)
    assert len(info.value.problems) == 2
    assert "ca.pem: already exists" in str(info.value)
    assert "ca.key: already exists" in str(info.value)
    assert info.value.hint == certs.FORCE_HINT
    assert first.cert.read_bytes() == before


def test_init_ca_force_replaces(tmp_path):
    first = certs.init_ca(tmp_path)
    before = first.cert.read_bytes()
    again = certs.init_ca(tmp_path, force=True, common_name="Other CA")
    assert again.cert.read_bytes() != before
    assert _mode(again.key) == 0o600
    assert certs.describe(again.cert).common_name == "Other CA"


def test_init_ca_rejects_bad_arguments_at_once(tmp_path):
    with pytest.raises(ConfigError) as info:
        certs.init_ca(tmp_path, common_name=" ", days=0)
    assert len(info.value.problems) == 2
    assert not (tmp_path / "ca.pem").exists()


def test_issue_node_for_server_and_client_use(tmp_path):
    ca = certs.init_ca(tmp_path)
    paths = certs.issue_node(tmp_path, "primary-1",
                             hosts=("localhost", "127.0.0.1", "::1", "DB.example.com."))
    assert paths.cert.name == "primary-1.pem" and paths.key.name == "primary-1.key"
    assert _mode(paths.key) == 0o600
    cert, ca_cert = _cert(paths.cert), _cert(ca.cert)
    cert.verify_directly_issued_by(ca_cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "primary-1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "db.example.com"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                       ipaddress.ip_address("::1")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # Strict X.509 verification (Python 3.13's default) needs the key identifiers.
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert key.public_key() == cert.public_key()


def test_issue_node_never_outlives_its_ca(tmp_path):
    ca = certs.init_ca(tmp_path, days=30)
    node = certs.issue_node(tmp_path, "n", days=825)
    assert _cert(node.cert).not_valid_after_utc <= _cert(ca.cert).not_valid_after_utc


def test_issue_node_accepts_a_single_host_string(tmp_path):
    certs.init_ca(tmp_path)
    info = certs.describe(certs.issue_node(tmp_path, "n", hosts="db1").cert)
    assert info.dns_names == ("db1",) and info.ip_addresses == ()


def test_issue_node_without_ca_says_how_to_make_one(tmp_path):
    with pytest.raises(ConfigError) as info:
        certs.issue_node(tmp_path, "n1")
    text = str(info.value)
    assert "ca.pem: no such file" in text and "ca.key: no such file" in text
    assert "certs init" in info.value.hint
    assert not (tmp_path / "n1.key").exists()


def test_issue_node_lists_every_problem(tmp_path):
    certs.init_ca(tmp_path)
    certs.issue_node(tmp_path, "taken")
    with pytest.raises(ConfigError) as info:
        certs.issue_node(tmp_path, "taken", hosts=("ok", "bad host!"), days=-1)
    problems = info.value.problems
    assert any("bad host!" in p for p in problems)
    assert any("positive number of days" in p for p in problems)
    assert sum("already exists" in p for p in problems) == 2


@pytest.mark.parametrize("name", ["", "ca", "../escape", "a/b", "-x", "x" * 65])
def test_issue_node_rejects_unsafe_names(tmp_path, name):
    certs.init_ca(tmp_path)
    with pytest.raises(ConfigError, match="node name"):
        certs.issue_node(tmp_path, name)


def test_issue_node_requires_a_host(tmp_path):
    certs.init_ca(tmp_path)
    with pytest.raises(ConfigError, match="at least one host"):
        certs.issue_node(tmp_path, "n", hosts=())


def test_issue_node_refuses_a_ca_key_from_elsewhere(tmp_path):
    certs.init_ca(tmp_path / "a")
    certs.init_ca(tmp_path / "b")
    (tmp_path / "a" / "ca.key").write_bytes((tmp_path / "b" / "ca.key").read_bytes())
    with pytest.raises(ConfigError, match="does not belong to"):
        certs.issue_node(tmp_path / "a", "n")


def test_issue_node_refuses_a_corrupt_ca(tmp_path):
    certs.init_ca(tmp_path)
    (tmp_path / "ca.pem").write_text("garbage")
    (tmp_path / "ca.key").write_text("garbage")
    with pytest.raises(ConfigError) as info:
        certs.issue_node(tmp_path, "n")
    assert len(info.value.problems) == 2
    assert "not a PEM certificate" in info.value.problems[0]
    assert "not an unencrypted PEM private key" in info.value.problems[1]


def test_issue_node_force_replaces(tmp_path):
    certs.init_ca(tmp_path)
    first = certs.issue_node(tmp_path, "n").cert.read_bytes()
    assert certs.issue_node(tmp_path, "n", force=True).cert.read_bytes() != first


def test_describe_node_and_ca(tmp_path):
    certs.init_ca(tmp_path)
    node = certs.describe(certs.issue_node(tmp_path, "s1", hosts=("db", "10.0.0.1")).cert)
    assert node.subject == "CN=s1" and node.common_name == "s1"
    assert node.issuer == "CN=ZODB replication CA"
    assert node.sans == ("DNS:db", "IP:10.0.0.1")
    assert node.extended_key_usage == ("serverAuth", "clientAuth")
    assert not node.is_ca and not node.expired()
    now = datetime.datetime.now(datetime.UTC)
    assert now + datetime.timedelta(days=824) < node.not_after < now + datetime.timedelta(days=826)
    assert node.not_before < now
    assert len(node.sha256_fingerprint.split(":")) == 32
    ca = certs.describe(tmp_path / "ca.pem")
    assert ca.is_ca and ca.sans == ()


def test_describe_missing_or_not_pem(tmp_path):
    with pytest.raises(ConfigError, match="nope.pem: no such file"):
        certs.describe(tmp_path / "nope.pem")
    (tmp_path / "junk.pem").write_text("-----BEGIN CERTIFICATE-----\nxx\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match="junk.pem: not a PEM certificate"):
        certs.describe(tmp_path / "junk.pem")
    with pytest.raises(ConfigError, match="is a directory"):
        certs.describe(tmp_path)


def test_roles_are_subject_alt_name_uris(tmp_path):
    certs.init_ca(tmp_path)
    for role in certs.ROLES:
        cert = _cert(certs.issue_node(tmp_path, f"c-{role}", role=role).cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"urn:zodb-replicator:role:{role}"]
        assert certs.describe(tmp_path / f"c-{role}.pem").roles == (role,)
    assert certs.describe(tmp_path / "ca.pem").roles == ()
    with pytest.raises(ConfigError, match="role 'admin': must be one of node, operator, monitor"):
        certs.issue_node(tmp_path, "x", role="admin")
    assert not (tmp_path / "x.pem").exists()


def test_a_certificate_without_a_role_is_a_node_and_unknown_roles_grant_nothing_known():
    # Certificates issued before roles existed carry no role URI: they stay nodes.
    assert certs.roles_from_uris([]) == {"node"}
    assert certs.roles_from_uris(["https://example.com/"]) == {"node"}
    assert certs.roles_from_uris(["urn:zodb-replicator:role:monitor"]) == {"monitor"}
    # A role of a later release is kept as it is: it is not taken for a node.
    assert certs.roles_from_uris(["urn:zodb-replicator:role:auditor"]) == {"auditor"}


def test_every_role_has_rights_and_a_command_line_spelling():
    from replicator.cli import certs_issue
    from replicator.transport import ROLE_RIGHTS

    assert tuple(ROLE_RIGHTS) == certs.ROLES
    role_option = next(p for p in certs_issue.params if p.name == "role")
    assert tuple(role_option.type.choices) == certs.ROLES
