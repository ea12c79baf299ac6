"""Renewed certificates are used without a restart, and their expiry is watched.

Real Primary and Secondary nodes over mutual TLS on 127.0.0.1, real
certificate files replaced under them (a private copy of the session's CA),
and a real ``replicator primary`` process for SIGHUP.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import shutil
import signal
import ssl
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families

from replicator import credentials
from replicator.certs import describe, drop_old_ca, issue_node, new_ca, renew_node
from replicator.cli import cli
from replicator.errors import ConfigError
from replicator.metrics import render_metrics
from replicator.status import render
from replicator.transport import TLSFiles, client_ssl_context
from tests.helpers import free_port, refused_at_handshake, start_primary, until, wait_until
from tests.integration.test_replication import (
    closed_source,
    make_source,
    running_primary,
    running_secondary,
    tls,
    wait_equal_tid,
)


async def served_certificate(port: int, tls_dir: Path) -> x509.Certificate:
    """The certificate a node presents to a new connection now."""
    t = tls(tls_dir, "secondary")
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ssl_context(t.ca, t.cert, t.key))
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    with contextlib.suppress(ssl.SSLError, ConnectionError):
        await writer.wait_closed()
    return x509.load_der_x509_certificate(der)


def metric_samples(primary) -> dict[tuple[str, str | None], float]:
    """The node's /metrics samples, by name and ``secondary`` label."""
    return {(s.name, s.labels.get("secondary")): s.value for family in text_string_to_metric_families(
        render_metrics(primary.served_status).decode()) for s in family.samples}


def replace_with(tls_dir: Path, target: str, source: str) -> None:
    """Put ``source``'s certificate and key in place of ``target``'s, as an operator copies them."""
    for suffix in (".key", ".pem"):
        shutil.copyfile(tls_dir / f"{source}{suffix}", tls_dir / f"{target}{suffix}")


def test_renewed_certificates_are_presented_without_a_restart(tmp_path, own_tls, monkeypatch):
    monkeypatch.setattr(credentials, "CHECK_INTERVAL", 0.1)
    db, work = make_source(tmp_path, 5)

    async def scenario() -> None:
        async with running_primary(tmp_path, own_tls) as primary, \
                running_secondary(tmp_path, own_tls, primary.port) as (secondary, _):
            await wait_equal_tid(primary, secondary)
            before = describe(own_tls / "primary.pem")
            assert (await served_certificate(primary.port, own_tls)).serial_number == before.serial
            session = set(primary.sessions)

            # The primary's own certificate, renewed in place: its next handshake presents it.
            renew_node(own_tls, "primary", days=400)
            renewed = describe(own_tls / "primary.pem")
            assert renewed.serial != before.serial
            assert (renewed.sans, renewed.roles) == (before.sans, before.roles)
            await until(lambda: primary.credentials.reloads == 1, timeout=10, what="the primary reloads")
            assert (await served_certificate(primary.port, own_tls)).serial_number == renewed.serial
            tls_status = primary.served_status()["tls"]
            assert tls_status["reload_error"] is None and tls_status["reloads"] == 1
            assert tls_status["not_after"] == renewed.not_after.timestamp()

            # The session made with the old certificate goes on streaming.
            work.commit_random(3)
            await wait_equal_tid(primary, secondary)
            assert set(primary.sessions) == session

            # The secondary's client certificate, renewed (under another common name,
            # to tell it apart): its next connection presents it.
            issue_node(own_tls, "standby-renewed")
            replace_with(own_tls, "secondary", "standby-renewed")
            await until(lambda: secondary.credentials.reloads >= 1, timeout=10, what="the secondary reloads")
            for ws, _ in list(primary._sockets.values()):
                await ws.close()
            await until(lambda: [s["peer"].split()[-1] for s in primary.status()["secondaries"]]
                        == ["standby-renewed)"],
                        timeout=20, what="the secondary reconnects with its renewed certificate")
            work.commit_random(2)
            await wait_equal_tid(primary, secondary)

    try:
        asyncio.run(scenario())
    finally:
        work.close()
        db.close()


def test_a_cluster_moves_to_a_new_ca_without_a_restart(tmp_path, own_tls, monkeypatch, caplog):
    """new-ca, renew, drop-old-ca under running nodes: replication goes on throughout, and at the
    end the old CA's certificates are refused, open connections included.

    Each node looks at its files when the test says (as on SIGHUP), so that which side closes
    what is known: the secondary first, then the primary."""
    monkeypatch.setattr(credentials, "CHECK_INTERVAL", 3600)
    db, work = make_source(tmp_path, 5)
    old_ca = x509.load_pem_x509_certificate((own_tls / "ca.pem").read_bytes())

    async def scenario() -> None:
        async with running_primary(tmp_path, own_tls) as primary, \
                running_secondary(tmp_path, own_tls, primary.port) as (secondary, _):
            await wait_equal_tid(primary, secondary)
            first_session = set(primary.sessions)

            # 1. A CA file that holds both: loaded, and nothing is closed.
            new_ca(own_tls)
            assert secondary.credentials.check(asked=True) and primary.credentials.check(asked=True)
            # 2. Both nodes' certificates renewed under the new CA.
            renew_node(own_tls, "primary")
            renew_node(own_tls, "secondary")
            assert secondary.credentials.check(asked=True) and primary.credentials.check(asked=True)
            work.commit_random(3)
            await wait_equal_tid(primary, secondary)
            assert set(primary.sessions) == first_session  # the session of the old certificates goes on
            assert not issued_by_ca(await served_certificate(primary.port, own_tls), old_ca)

            # A client of the old CA (tertiary was not renewed) keeps a connection open.
            old = tls(own_tls, "tertiary")
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", primary.port, ssl=client_ssl_context(old.ca, old.cert, old.key))
            writer.write(b"GET /status HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")

            # 3. The old CA dropped (tertiary forced through): connections of its certificates closed.
            with pytest.raises(ConfigError, match="tertiary.pem is still signed by the old CA"):
                drop_old_ca(own_tls)
            assert len(x509.load_pem_x509_certificates((own_tls / "ca.pem").read_bytes())) == 2
            drop_old_ca(own_tls, force=True)
            # The secondary's session was made with the primary's old certificate: it closes it.
            assert secondary.credentials.check(asked=True)
            # The primary closes the connections of old certificates: tertiary's (and the
            # secondary's old session, if it is not gone yet).
            assert primary.credentials.check(asked=True)
            async with asyncio.timeout(10):
                while await reader.read(1 << 16):
                    pass  # the rest of the answer, then the close
            writer.close()
            # The secondary connects again, with its new certificate.
            await until(lambda: primary.sessions and set(primary.sessions) != first_session,
                        timeout=20, what="the secondary connects again with its new certificate")
            work.commit_random(2)
            await wait_equal_tid(primary, secondary)

            # New connections of the old CA's certificates are refused at the handshake.
            await refused_at_handshake(primary, own_tls, "tertiary")

    try:
        with caplog.at_level(logging.INFO, logger="replicator"):
            asyncio.run(scenario())
    finally:
        work.close()
        db.close()
    closed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("closing the connection")]
    assert any("of client" in m and "CN=tertiary was signed by the CA CN=ZODB replication CA" in m
               for m in closed), closed
    assert any("to the primary" in m and "CN=primary" in m for m in closed), closed
    # The renewal under the new CA says so: nothing else shows which CA a node's certificate is from.
    renewed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded the renewed TLS files")]
    assert renewed and all(", issued by CN=" in m and "(a new CA)" in m for m in renewed), renewed


def _ca(name: str, key, issuer: x509.Certificate | None = None, issuer_key=None, path_length: int | None = 0,
        days: int = 3650) -> x509.Certificate:
    """A CA certificate for ``key``: self-signed, or signed by ``issuer`` (an intermediate)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = (x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski) if issuer is None else
           x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()))  # type: ignore[arg-type]
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject)
            .issuer_name(subject if issuer is None else issuer.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=max(1, 1 - days)))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False).add_extension(aki, critical=False)
            .sign(key if issuer_key is None else issuer_key, hashes.SHA256()))


def _reissued(cert: x509.Certificate, issuer: x509.Certificate, issuer_key) -> x509.Certificate:
    """``cert`` (its name, key, roles and host names) signed by ``issuer`` instead."""
    builder = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(issuer.subject)
               .public_key(cert.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(cert.not_valid_before_utc).not_valid_after(cert.not_valid_after_utc))
    for ext in cert.extensions:
        if isinstance(ext.value, x509.AuthorityKeyIdentifier):
            builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                issuer.public_key()), critical=False)  # type: ignore[arg-type]
        else:
            builder = builder.add_extension(ext.value, critical=ext.critical)
    return builder.sign(issuer_key, hashes.SHA256())


async def _status_on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """GET /status on an open connection: its status line, the answer read whole (the connection stays)."""
    writer.write(b"GET /status HTTP/1.1\r\nHost: localhost\r\n\r\n")
    line = await reader.readline()
    length = 0
    while (header := await reader.readline()) not in (b"\r\n", b""):
        if header.lower().startswith(b"content-length:"):
            length = int(header.split(b":")[1])
    await reader.readexactly(length)
    return line


def test_a_dropped_root_closes_connections_signed_through_an_intermediate(tmp_path, own_tls, monkeypatch, caplog):
    """A peer whose certificate an intermediate CA signed (its file holds the leaf and the
    intermediate) loses its open connection when the root above that intermediate leaves the CA
    file, and keeps it when another CA leaves or its root is re-issued with the same key."""
    monkeypatch.setattr(credentials, "CHECK_INTERVAL", 3600)
    closed_source(tmp_path, 1)
    cluster_ca = (own_tls / "ca.pem").read_bytes()
    root_key, inter_key, other_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _ca("Site root CA", root_key, path_length=1)
    reissued_root = _ca("Site root CA", root_key, path_length=1, days=3660)
    inter = _ca("Site issuing CA", inter_key, root, root_key)
    other = _ca("Another CA", other_key)
    leaf = _reissued(x509.load_pem_x509_certificate((own_tls / "tertiary.pem").read_bytes()), inter, inter_key)
    chain_file = tmp_path / "tertiary-chain.pem"
    chain_file.write_bytes(pem(leaf) + pem(inter))

    def trust(*cas: x509.Certificate) -> None:
        (own_tls / "ca.pem").write_bytes(cluster_ca + b"".join(map(pem, cas)))

    async def scenario() -> None:
        trust(root, other)
        async with running_primary(tmp_path, own_tls) as primary:
            context = ssl.create_default_context(cafile=str(own_tls / "ca.pem"))
            context.load_cert_chain(chain_file, own_tls / "tertiary.key")
            reader, writer = await asyncio.open_connection("127.0.0.1", primary.port, ssl=context)
            assert (await _status_on(reader, writer)).startswith(b"HTTP/1.1 200")
            # Another CA taken out, then the root re-issued with its own key: the connection stays.
            trust(root)
            assert primary.credentials.check(asked=True)
            assert (await _status_on(reader, writer)).startswith(b"HTTP/1.1 200")
            trust(reissued_root)
            assert primary.credentials.check(asked=True)
            assert (await _status_on(reader, writer)).startswith(b"HTTP/1.1 200")
            # The root taken out: the connection made through its intermediate is closed.
            trust()
            assert primary.credentials.check(asked=True)
            async with asyncio.timeout(10):
                assert await reader.read() == b""
            writer.close()

    with caplog.at_level(logging.INFO, logger="replicator"):
        asyncio.run(scenario())
    closed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("closing the connection")]
    assert len(closed) == 1, closed
    assert "CN=tertiary was signed through the CA CN=Site root CA" in closed[0], closed


def test_an_intermediate_ca_close_to_expiry_is_flagged(tmp_path, own_tls, caplog):
    """A node's certificate file that holds an intermediate CA works until the first of the two
    expires: that date is the one shown, and the warning names the intermediate."""
    closed_source(tmp_path, 3)
    root_key, inter_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    root = _ca("Site root CA", root_key, path_length=1)
    inter = _ca("Site issuing CA", inter_key, root, root_key, days=10)
    for node in ("primary", "secondary"):
        leaf = _reissued(x509.load_pem_x509_certificate((own_tls / f"{node}.pem").read_bytes()), inter, inter_key)
        (own_tls / f"{node}.pem").write_bytes(pem(leaf) + pem(inter))
        assert leaf.not_valid_after_utc > inter.not_valid_after_utc
    (own_tls / "ca.pem").write_bytes((own_tls / "ca.pem").read_bytes() + pem(root))
    expiry = inter.not_valid_after_utc.timestamp()
    info = describe(own_tls / "primary.pem")
    assert info.usable_until == inter.not_valid_after_utc and info.not_after > info.usable_until
    assert info.intermediates == (f"CN=Site issuing CA (until {inter.not_valid_after_utc:%Y-%m-%d})",)
    shown = CliRunner().invoke(cli, ["certs", "show", str(own_tls / "primary.pem")])
    assert shown.exit_code == 0 and "intermediates: CN=Site issuing CA" in shown.output, shown.output
    assert "valid_for: 10 more days (an intermediate CA expires first)" in shown.output, shown.output

    async def scenario() -> None:
        async with running_primary(tmp_path, own_tls) as primary, \
                running_secondary(tmp_path, own_tls, primary.port) as (secondary, _):
            await wait_equal_tid(primary, secondary)
            status = primary.served_status()
            assert status["tls"]["not_after"] == expiry
            assert secondary.credentials.not_after == expiry
            # A secondary without --listen: its primary shows the date of its chain.
            [peer] = status["secondaries"]
            assert peer["certificate_not_after"] == expiry
            text = render([{**status, "url": "p"}], time.time())
            assert "this node's certificate expires in 10 days" in text, text
            assert "the certificate of secondary dst expires in 10 days" in text, text
            # It serves that chain: a client of the root alone accepts it.
            context = ssl.create_default_context(cadata=pem(root).decode())
            context.check_hostname = False
            t = tls(own_tls, "secondary")
            context.load_cert_chain(t.cert, t.key)
            reader, writer = await asyncio.open_connection("127.0.0.1", primary.port, ssl=context)
            assert (await _status_on(reader, writer)).startswith(b"HTTP/1.1 200")
            writer.close()

    with caplog.at_level(logging.WARNING, logger="replicator"):
        asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if "expires on" in r.getMessage()]
    own = [m for m in warnings if m.startswith("this node's certificate")]
    assert len(own) == 2 and all("(the intermediate CA CN=Site issuing CA in it)" in m and "in 10 days" in m
                                 for m in own), warnings  # the primary's and the secondary's
    [peer] = [m for m in warnings if m.startswith("secondary dst presents")]
    assert "through the intermediate CA CN=Site issuing CA, which expires on" in peer, peer
    assert len(warnings) == 3, warnings


def test_an_expired_intermediate_ca_is_named_at_start(tmp_path, own_tls):
    closed_source(tmp_path, 1)
    root_key, inter_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    root = _ca("Site root CA", root_key, path_length=1)
    inter = _ca("Site issuing CA", inter_key, root, root_key, days=-1)
    leaf = _reissued(x509.load_pem_x509_certificate((own_tls / "primary.pem").read_bytes()), inter, inter_key)
    (own_tls / "primary.pem").write_bytes(pem(leaf) + pem(inter))
    (own_tls / "ca.pem").write_bytes((own_tls / "ca.pem").read_bytes() + pem(root))
    with pytest.raises(ConfigError, match=r"primary.pem: the intermediate CA CN=Site issuing CA in it expired on"):
        TLSFiles(own_tls / "ca.pem", own_tls / "primary.pem", own_tls / "primary.key").validate()


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def issued_by_ca(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    from replicator.certs import issued_by

    return issued_by(cert, ca)


def test_unusable_replacements_change_nothing_and_are_reported(tmp_path, own_tls, caplog):
    closed_source(tmp_path, 3)

    async def scenario() -> None:
        async with running_primary(tmp_path, own_tls) as primary:
            keeper = primary.credentials
            serial = describe(own_tls / "primary.pem").serial
            good = {s: (own_tls / f"primary{s}").read_bytes() for s in (".pem", ".key")}

            # Half copied: the key of another certificate.
            shutil.copyfile(own_tls / "tertiary.key", own_tls / "primary.key")
            with caplog.at_level(logging.WARNING, logger="replicator"):
                assert not keeper.check()  # maybe copied half-way: looked at again before it is said
                assert keeper.reload_error is None and not caplog.records
                assert not keeper.check()
                assert not keeper.check()  # the same files: reported once
            warnings = [r.getMessage() for r in caplog.records if "cannot be used" in r.getMessage()]
            assert len(warnings) == 1 and "does not match certificate" in warnings[0], warnings
            assert "does not match" in keeper.reload_error
            assert (await served_certificate(primary.port, own_tls)).serial_number == serial

            status = primary.served_status()
            assert b"replicator_tls_reload_failed 1.0" in render_metrics(primary.served_status)
            text = render([{**status, "url": "p"}], time.time())
            assert "[CERTIFICATE]" in text and "changed but were not loaded" in text, text
            # Expiring too: two lines, one flag.
            soon = {**status, "url": "p", "tls": {**status["tls"], "not_after": time.time() + 5 * 86400}}
            text = render([soon], time.time())
            assert text.count("[CERTIFICATE]") == 1 and text.count("  CERTIFICATE   ") == 2, text

            # A renewal that forgot a name peers dial this node by.
            issue_node(own_tls, "primary", hosts=("localhost",), force=True)
            assert not keeper.check(asked=True)
            assert "no longer lists IP:127.0.0.1" in keeper.reload_error and "certs renew" in keeper.reload_error
            assert (await served_certificate(primary.port, own_tls)).serial_number == serial

            # A certificate of another role: not for a node.
            replace_with(own_tls, "primary", "monitor")
            assert not keeper.check(asked=True)  # SIGHUP: said at once
            assert "role monitor" in keeper.reload_error
            assert (await served_certificate(primary.port, own_tls)).serial_number == serial

            # Put back as they were: nothing to load, and nothing wrong any more.
            for suffix, data in good.items():
                (own_tls / f"primary{suffix}").write_bytes(data)
            assert not keeper.check()
            assert keeper.reload_error is None and keeper.reloads == 0
            assert b"replicator_tls_reload_failed 0.0" in render_metrics(primary.served_status)

    asyncio.run(scenario())


def test_a_certificate_close_to_expiry_is_flagged(tmp_path, own_tls, caplog):
    issue_node(own_tls, "primary", days=10, force=True)
    not_after = describe(own_tls / "primary.pem").not_after.timestamp()
    closed_source(tmp_path, 3)

    async def scenario() -> None:
        async with running_primary(tmp_path, own_tls) as primary:
            status = primary.served_status()
            assert status["tls"]["not_after"] == not_after
            text = render([{**status, "url": "p"}], time.time())
            assert "[CERTIFICATE]" in text and "this node's certificate expires in 10 days" in text, text
            assert metric_samples(primary)[("replicator_tls_certificate_expiry_timestamp_seconds", None)] == not_after
            primary.credentials.check()  # a later look does not repeat the day's warning

    with caplog.at_level(logging.WARNING, logger="replicator"):
        asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if "expires on" in r.getMessage()]
    assert len(warnings) == 1 and "in 10 days" in warnings[0] and "certs renew" in warnings[0], warnings


def test_sighup_reloads_a_running_primary_process(tmp_path, own_tls):
    closed_source(tmp_path, 3)
    port = free_port()
    proc = start_primary(tmp_path, tmp_path / "src.fs", tmp_path / "src-blobs", port, own_tls)
    try:
        before = describe(own_tls / "primary.pem").serial
        proc.proc.send_signal(signal.SIGHUP)  # nothing changed: said so, and the process goes on
        wait_until(lambda: "TLS files unchanged" in proc.output(), timeout=10, what="the unchanged line")
        assert proc.alive()
        assert asyncio.run(served_certificate(port, own_tls)).serial_number == before

        issue_node(own_tls, "primary", force=True)
        renewed = describe(own_tls / "primary.pem").serial
        proc.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "loaded the renewed TLS files" in proc.output(), timeout=10, what="the reload")
        assert asyncio.run(served_certificate(port, own_tls)).serial_number == renewed
        assert proc.alive()
    finally:
        assert proc.stop() == 0, proc.output()


def test_the_primary_shows_when_a_secondarys_certificate_expires(tmp_path, own_tls, caplog):
    """A secondary without --listen has no status of its own to scrape: its primary's shows it."""
    issue_node(own_tls, "secondary", days=10, force=True)
    not_after = describe(own_tls / "secondary.pem").not_after.timestamp()
    closed_source(tmp_path, 3)

    async def scenario() -> None:
        async with running_primary(tmp_path, own_tls) as primary, \
                running_secondary(tmp_path, own_tls, primary.port) as (secondary, _):
            await wait_equal_tid(primary, secondary)
            [peer] = primary.served_status()["secondaries"]
            assert peer["certificate_not_after"] == not_after
            assert metric_samples(primary)[("replicator_secondary_certificate_expiry_timestamp_seconds", "dst")] \
                == not_after
            text = render([{**primary.served_status(), "url": "p"}], time.time())
            assert "[CERTIFICATE]" in text and "the certificate of secondary dst expires in 10 days" in text, text
            # Connected again: no second warning that day.
            for ws, _ in list(primary._sockets.values()):
                await ws.close()
            await until(lambda: caplog.text.count("secondary dst (") >= 2, timeout=20, what="the reconnection")

    with caplog.at_level(logging.INFO, logger="replicator.primary"):
        asyncio.run(scenario())
    warned = [r.getMessage() for r in caplog.records if "presents a certificate that expires" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("secondary dst ") and "in 10 days" in warned[0], warned


def test_pem_paths_hold_exactly_the_bytes_given(monkeypatch):
    """Memory files where Linux has them, private temporary files otherwise; gone afterwards."""
    from replicator import transport

    data = [b"-----BEGIN X-----\n" + bytes(range(256)) * 40, b"", b"key"]
    for memory in (True, False):
        if not memory:
            monkeypatch.delattr(transport.os, "memfd_create", raising=False)
        with transport.pem_paths(*data) as paths:
            assert [Path(p).read_bytes() for p in paths] == data
            if not memory:
                assert all(oct(Path(p).stat().st_mode & 0o777) == "0o600" for p in paths)
        assert not any(Path(p).exists() for p in paths) or memory
