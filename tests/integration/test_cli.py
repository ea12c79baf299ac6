"""The ``replicator`` command as an operator meets it: exit statuses, messages, config files."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import ZODB
from ZODB.FileStorage import FileStorage

from tests.helpers import REPLICATOR


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([REPLICATOR, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def make_fs(path: Path, values: list[int]) -> None:
    db = ZODB.DB(FileStorage(str(path)))
    for v in values:
        with db.transaction() as conn:
            conn.root()["v"] = v
    db.close()


def test_primary_lists_every_configuration_problem_at_once(tmp_path):
    result = run("primary", "--storage", str(tmp_path / "missing.fs"), "--tls-ca", str(tmp_path / "ca.pem"),
                 "--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem"))
    assert result.returncode == 2
    err = result.stderr
    assert "missing.fs: no such file" in err
    assert "ca.pem: no such file" in err and "c.pem: no such file" in err and "k.pem: no such file" in err


@pytest.mark.parametrize("node", ["standby\n2026-12-02 CRITICAL forged", " ", "x" * 257])
def test_a_node_name_that_would_garble_its_peers_logs_is_refused(tmp_path, node):
    for role, more in (("primary", []), ("secondary", ["--primary", "127.0.0.1:8100"])):
        result = run(role, "--storage", str(tmp_path / "Data.fs"), "--insecure", "--node", node, *more)
        assert result.returncode == 2, result.stderr
        assert "--node" in result.stderr, result.stderr


def test_malformed_addresses_are_listed_with_the_other_problems(tmp_path):
    primary = run("primary", "--storage", str(tmp_path / "missing.fs"), "--listen", "8100", "--insecure")
    assert primary.returncode == 2
    assert "--listen: expected HOST:PORT, got '8100'" in primary.stderr
    assert "missing.fs: no such file" in primary.stderr
    secondary = run("secondary", "--storage", str(tmp_path / "nowhere" / "Data.fs"), "--primary", "host:port",
                    "--listen", ":70000", "--zeo", "localhost", "--max-rate", "5b")
    assert secondary.returncode == 2
    err = secondary.stderr
    for problem in ("--primary: port 'port' is not a number", "--listen: port 70000 out of range",
                    "--zeo: expected HOST:PORT, got 'localhost'", "--max-rate: expected bytes a second",
                    f"directory {tmp_path / 'nowhere'} does not exist", "TLS files are required"):
        assert problem in err, err


@pytest.mark.parametrize("what, problem", [
    ("directory", "is a directory; give the Data.fs file path"),
    ("zeo.conf", "is not a FileStorage file (it begins with b'<zeo', not b'FS30'); give the Data.fs file path"),
])
def test_a_primary_given_the_wrong_path_is_told_so_not_that_the_file_is_damaged(tmp_path, what, problem):
    path = tmp_path / what
    if what == "directory":
        path.mkdir()
    else:
        path.write_text("<zeo>\n  address 8100\n</zeo>\n")
    result = run("primary", "--storage", str(path), "--insecure", "--listen", "127.0.0.1:0")
    assert result.returncode == 2, result.stderr
    assert f"--storage {path} {problem}" in result.stderr
    assert "damaged" not in result.stderr


def test_a_primary_given_a_directory_that_is_no_blob_directory_is_told_so_not_of_damage(tmp_path):
    """The directory above the blob directory, say: its blob files would be missing, which the
    primary would report as damage to its storage once a secondary asked for the first one."""
    make_fs(tmp_path / "Data.fs", [1])
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / ".layout").write_text("bushy")
    result = run("primary", "--storage", str(tmp_path / "Data.fs"), "--blob-dir", str(tmp_path), "--insecure",
                 "--listen", "127.0.0.1:0")
    assert result.returncode == 2, result.stderr
    assert f"--blob-dir {tmp_path} is not a ZODB blob directory" in result.stderr, result.stderr
    assert "`replicator primary --help`" in result.stderr and "COMMAND" not in result.stderr


@pytest.mark.parametrize("option, bad, toml, problem", [
    ("poll-interval", "0", "-1.5", "--poll-interval {}: must be positive"),
    ("batch-delay", "2", "-0.5", "batch-delay {}: must be between 0 and 1 second"),
])
def test_timing_options_are_checked_also_from_a_config_file(tmp_path, option, bad, toml, problem):
    make_fs(tmp_path / "a.fs", [1])
    result = run("primary", "--storage", str(tmp_path / "a.fs"), "--insecure", f"--{option}", bad)
    assert result.returncode == 2 and problem.format(float(bad)) in result.stderr
    (tmp_path / "p.toml").write_text(f"{option} = {toml}\n")
    result = run("primary", "--config", str(tmp_path / "p.toml"), "--storage", str(tmp_path / "a.fs"),
                 "--insecure")
    assert result.returncode == 2 and problem.format(float(toml)) in result.stderr


@pytest.mark.parametrize("args, toml, watching", [
    ((), "", True),
    (("--no-file-events",), "", False),
    ((), "file-events = false\n", False),
    (("--file-events",), "file-events = false\n", True),
])
def test_file_events_are_on_unless_turned_off(tmp_path, tls_dir, args, toml, watching):
    from tests.helpers import Proc, free_port, tls_args, wait_for_port
    from tests.system.sysutil import get_status

    make_fs(tmp_path / "a.fs", [1])
    (tmp_path / "p.toml").write_text(toml)
    port = free_port()
    proc = Proc([REPLICATOR, "primary", "--config", str(tmp_path / "p.toml"), "--storage", str(tmp_path / "a.fs"),
                 "--listen", f"127.0.0.1:{port}", *tls_args(tls_dir, "primary"), *args], tmp_path / "p.log")
    try:
        wait_for_port(port, proc.proc)
        assert get_status(port, tls_dir)["file_events"] is watching
    finally:
        proc.stop()


@pytest.mark.parametrize("args, toml, compressed", [
    ((), "", False),
    (("--compress",), "", True),
    ((), "compress = true\n", True),
    (("--no-compress",), "compress = true\n", False),
])
def test_a_secondary_asks_for_compression_when_told(tmp_path, tls_dir, args, toml, compressed):
    from tests.helpers import Proc, free_port, tls_args, wait_for_port, wait_until
    from tests.system.sysutil import get_status, try_status

    make_fs(tmp_path / "a.fs", [1, 2])
    (tmp_path / "s.toml").write_text(toml)
    port, status_port = free_port(), free_port()
    primary = Proc([REPLICATOR, "primary", "--storage", str(tmp_path / "a.fs"), "--listen", f"127.0.0.1:{port}",
                    *tls_args(tls_dir, "primary")], tmp_path / "p.log")
    secondary = None
    try:
        wait_for_port(port, primary.proc)
        secondary = Proc([REPLICATOR, "secondary", "--config", str(tmp_path / "s.toml"), "--storage",
                          str(tmp_path / "b.fs"), "--primary", f"127.0.0.1:{port}", "--listen",
                          f"127.0.0.1:{status_port}", *tls_args(tls_dir, "secondary"), *args], tmp_path / "s.log")
        wait_until(lambda: not secondary.alive() or (try_status(status_port, tls_dir) or {}).get("connected"),
                   timeout=30, what="the secondary connected")
        assert secondary.alive(), secondary.output()
        # Its status port is served by the primary's machinery, but it logs as what it is.
        assert re.search(r"replicator\.secondary: secondary \S+ serving .*b\.fs", secondary.output())
        assert " serving " not in "".join(line for line in secondary.output().splitlines(True)
                                          if "replicator.primary" in line)
        assert get_status(status_port, tls_dir)["compression"] is compressed
        assert [s["compression"] for s in get_status(port, tls_dir)["secondaries"]] == [compressed]
        writer = FileStorage(str(tmp_path / "a.fs"))  # as its ZEO server would: no [NO WRITER] alarm
        try:
            shown = run("status", f"127.0.0.1:{port}", f"127.0.0.1:{status_port}", *tls_args(tls_dir, "secondary"))
        finally:
            writer.close()
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert ("deflated on the wire" in shown.stdout) is compressed, shown.stdout
        assert ("connected, stream deflated" in shown.stdout) is compressed, shown.stdout
    finally:
        for proc in (secondary, primary):
            if proc is not None:
                proc.stop()


def test_tls_is_required_unless_insecure(tmp_path):
    make_fs(tmp_path / "a.fs", [1])
    result = run("primary", "--storage", str(tmp_path / "a.fs"))
    assert result.returncode == 2
    assert "--insecure" in result.stderr


def test_config_file_supplies_options_and_the_command_line_wins(tmp_path):
    (tmp_path / "p.toml").write_text(f'storage = "{tmp_path}/from-config.fs"\nlisten = "127.0.0.1:1"\n')
    result = run("primary", "--config", str(tmp_path / "p.toml"), "--insecure")
    assert result.returncode == 2 and "from-config.fs: no such file" in result.stderr
    result = run("primary", "--config", str(tmp_path / "p.toml"), "--storage", str(tmp_path / "cli.fs"),
                 "--insecure")
    assert result.returncode == 2 and "cli.fs: no such file" in result.stderr
    (tmp_path / "bad.toml").write_text('stroage = "x"\n')
    result = run("primary", "--config", str(tmp_path / "bad.toml"))
    assert result.returncode == 2 and "unknown keys stroage" in result.stderr


def test_verify_exit_status_and_first_difference(tmp_path):
    make_fs(tmp_path / "a.fs", [1, 2, 3])
    result = run("verify", str(tmp_path / "a.fs"), str(tmp_path / "a.fs"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "equal" in result.stdout
    make_fs(tmp_path / "b.fs", [1, 2])
    result = run("verify", str(tmp_path / "a.fs"), str(tmp_path / "b.fs"))
    assert result.returncode == 5
    # Two histories of their own: they fork at the first transaction, which it names.
    fs = FileStorage(str(tmp_path / "a.fs"), read_only=True)
    first = next(iter(fs.iterator())).tid
    fs.close()
    assert result.stdout.startswith(f"DIFFERENT: after 0000000000000000 (empty) A has {first.hex()} "), result.stdout
    assert "the histories fork" in result.stdout and f"first difference in transaction {first.hex()}" in result.stdout
    result = run("verify", str(tmp_path / "a.fs"), str(tmp_path / "nothing.fs"))
    assert result.returncode == 2


def test_a_file_filestorage_cannot_read_is_named_damaged_not_a_crash(tmp_path):
    """Bytes at the end that ZODB's scan cannot parse (here a bad status byte) make FileStorage
    raise whatever its parser raised; each command names the damage instead (exit 7)."""
    import struct

    make_fs(tmp_path / "a.fs", [1, 2])
    good = (tmp_path / "a.fs").read_bytes()
    damaged = tmp_path / "damaged.fs"
    damaged.write_bytes(good + b"\xff" * 8 + struct.pack(">Q", 256) + b"\xc5" + bytes(306))
    for args in (("verify", str(tmp_path / "a.fs"), str(damaged)),
                 ("secondary", "--storage", str(damaged), "--primary", "127.0.0.1:9", "--insecure")):
        result = run(*args)
        assert result.returncode == 7, result.stderr
        assert f"cannot open {damaged}: the file is damaged: FileStorage failed reading it" in result.stderr
        assert "Traceback" not in result.stderr
    assert damaged.read_bytes()[:len(good)] == good
    # Bytes FileStorage can skip (here NULs) are no transaction: equal, but said.
    tailed = tmp_path / "tailed.fs"
    tailed.write_bytes(good + bytes(100))
    result = run("verify", str(tmp_path / "a.fs"), str(tailed))
    assert result.returncode == 0, result.stderr
    assert "note: B has 100 byte(s) after its last committed transaction" in result.stdout
    (tmp_path / "empty.fs").write_bytes(b"")
    result = run("verify", str(tmp_path / "a.fs"), str(tmp_path / "empty.fs"))
    assert result.returncode == 2 and "empty.fs is empty (0 bytes), not a FileStorage file" in result.stderr


def test_verify_without_blob_dirs_does_not_pass_storages_with_blobs(tmp_path):
    """A replica whose blob was overwritten must not be called equal when its blobs were not read."""
    import shutil

    from ZODB.blob import Blob

    (tmp_path / "a").mkdir()
    db = ZODB.DB(FileStorage(str(tmp_path / "a" / "Data.fs"), blob_dir=str(tmp_path / "a" / "blobs")))
    for i in range(3):
        with db.transaction() as conn:
            blob = conn.root()[f"b{i}"] = Blob()
            with blob.open("w") as fh:
                fh.write(bytes([i]) * 1000)
    db.close()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    [victim] = [p for p in (tmp_path / "b" / "blobs").rglob("*.blob") if p.read_bytes() == b"\x01" * 1000]
    victim.chmod(0o644)
    victim.write_bytes(b"tampered")
    a, b = str(tmp_path / "a" / "Data.fs"), str(tmp_path / "b" / "Data.fs")
    dirs = ["--blob-dir-a", str(tmp_path / "a" / "blobs"), "--blob-dir-b", str(tmp_path / "b" / "blobs")]

    result = run("verify", a, b)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout.startswith("INCOMPLETE"), result.stdout
    assert "3 blob file(s) were not compared: give --blob-dir-a and --blob-dir-b" in result.stdout
    result = run("verify", a, b, *dirs)
    assert result.returncode == 5, result.stdout + result.stderr
    assert "DIFFERENT: blob is 1000 bytes in A, 8 in B" in result.stdout
    result = run("verify", a, a, *dirs[:2], "--blob-dir-b", dirs[1])
    assert result.returncode == 0 and result.stdout.startswith("equal: ") and "3 blob(s)" in result.stdout
    for half in (dirs[:2], dirs[2:]):
        result = run("verify", a, b, *half)
        assert result.returncode == 2 and "--blob-dir-a and --blob-dir-b go together" in result.stderr
        assert not result.stdout


def test_every_option_has_a_help_text_and_every_name_in_a_help_exists():
    import click

    from replicator.cli import cli

    def commands(group, path):
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                yield from commands(command, [*path, name])
            else:
                yield " ".join([*path, name]), command
    for name, command in commands(cli, []):
        options = [p for p in command.params if isinstance(p, click.Option)]
        assert all(p.help for p in options), (name, [p.opts for p in options if not p.help])
        # An upper-case word in a help names an argument (``verify STORAGE_A``), never an option.
        arguments = {p.name.upper() for p in command.params if isinstance(p, click.Argument)}
        texts = [command.help or "", *(p.help or "" for p in options)]
        named = set(re.findall(r"\b[A-Z][A-Z_]{2,}\b", " ".join(texts)))
        words = {"HOST", "PORT", "ZEO", "TOML", "PEM", "CPU", "JSON", "HTTP", "TLS", "GET", "POST", "WAN", "SIGHUP"}
        assert named <= arguments | words, (name, named - arguments - words)


def test_certs_renew_keeps_hosts_and_role(tmp_path):
    directory = tmp_path / "tls"
    assert run("certs", "init", "--dir", str(directory), "--node", "db").returncode == 0
    assert run("certs", "issue", "watcher", "--dir", str(directory), "--role", "monitor",
               "--host", "mon.example.com", "--host", "10.1.2.3", "--days", "20").returncode == 0
    before = run("certs", "show", str(directory / "watcher.pem")).stdout
    old_key = (directory / "watcher.key").read_bytes()
    assert "valid_for: 20 more days" in before, before
    result = run("certs", "renew", "watcher", "--dir", str(directory), "--days", "400")
    assert result.returncode == 0, result.stderr
    assert "role monitor, hosts mon.example.com, 10.1.2.3, valid until" in result.stdout, result.stdout
    after = run("certs", "show", str(directory / "watcher.pem")).stdout

    def field(text: str, name: str) -> str:
        return next(line for line in text.splitlines() if line.startswith(name + ":"))
    for name in ("subject", "dns_names", "ip_addresses", "roles"):
        assert field(before, name) == field(after, name), name
    assert "valid_for: 400 more days" in after, after
    assert field(before, "not_after") != field(after, "not_after")
    assert (directory / "watcher.key").read_bytes() != old_key  # a new key too

    missing = run("certs", "renew", "nobody", "--dir", str(directory))
    assert missing.returncode == 2 and "nobody.pem: no such file" in missing.stderr, missing.stderr
    ca = run("certs", "renew", "ca", "--dir", str(directory))
    assert ca.returncode == 2 and "is a CA certificate" in ca.stderr, ca.stderr


def test_certs_new_ca_then_drop_old_ca(tmp_path):
    """A move to a new CA: both trusted while certificates are renewed, then the old one dropped."""
    from cryptography import x509

    from replicator.certs import issued_by

    directory = tmp_path / "tls"
    assert run("certs", "init", "--dir", str(directory), "--node", "db").returncode == 0
    old_ca = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    result = run("certs", "new-ca", "--dir", str(directory))
    assert result.returncode == 0, result.stderr
    assert f"replicator certs renew db --dir {directory}" in result.stdout, result.stdout
    bundle = x509.load_pem_x509_certificates((directory / "ca.pem").read_bytes())
    assert len(bundle) == 2 and bundle[1] == old_ca and bundle[0].subject != old_ca.subject
    assert oct((directory / "ca.key").stat().st_mode & 0o777) == "0o600"
    assert oct((directory / "ca-previous.key").stat().st_mode & 0o777) == "0o600"
    again = run("certs", "new-ca", "--dir", str(directory))
    assert again.returncode == 2 and "a move to a new CA is under way" in again.stderr, again.stderr
    shown = run("certs", "show", str(directory / "ca.pem")).stdout  # the other CA is no intermediate
    assert "other_cas: CN=ZODB replication CA (until" in shown and "intermediates" not in shown, shown
    assert "valid_for: 3650 more days\n" in shown, shown

    early = run("certs", "drop-old-ca", "--dir", str(directory))
    assert early.returncode == 2 and "db.pem is still signed by the old CA" in early.stderr, early.stderr
    assert len(x509.load_pem_x509_certificates((directory / "ca.pem").read_bytes())) == 2
    assert run("certs", "renew", "db", "--dir", str(directory)).returncode == 0
    db = x509.load_pem_x509_certificate((directory / "db.pem").read_bytes())
    assert issued_by(db, bundle[0]) and not issued_by(db, old_ca)

    done = run("certs", "drop-old-ca", "--dir", str(directory))
    assert done.returncode == 0, done.stderr
    assert x509.load_pem_x509_certificates((directory / "ca.pem").read_bytes()) == [bundle[0]]
    assert not (directory / "ca-previous.key").exists() and not (directory / "ca-previous.pem").exists()
    nothing = run("certs", "drop-old-ca", "--dir", str(directory))
    assert nothing.returncode == 2 and "holds one CA only" in nothing.stderr, nothing.stderr


def test_certs_init_then_show_and_refuse_overwrite(tmp_path):
    result = run("certs", "init", "--dir", str(tmp_path / "tls"), "--host", "db.example.com")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "tls" / "primary.key").stat().st_mode & 0o077 == 0
    shown = run("certs", "show", str(tmp_path / "tls" / "primary.pem"))
    assert shown.returncode == 0 and "db.example.com" in shown.stdout
    again = run("certs", "init", "--dir", str(tmp_path / "tls"))
    assert again.returncode == 2 and "exist" in again.stderr
    # Told in the command line's terms, not the Python API's.
    assert "give --force" in again.stderr and "force=True" not in again.stderr
    issued = run("certs", "issue", "primary", "--dir", str(tmp_path / "tls"))
    assert issued.returncode == 2 and "primary.pem: already exists" in issued.stderr
    assert "give --force" in issued.stderr and "force=True" not in issued.stderr
    assert run("certs", "issue", "primary", "--dir", str(tmp_path / "tls"), "--force").returncode == 0
    # Roles: chosen when issuing, printed by show; a node is the default.
    assert "roles: node\n" in run("certs", "show", str(tmp_path / "tls" / "primary.pem")).stdout
    monitor = run("certs", "issue", "prometheus", "--role", "monitor", "--dir", str(tmp_path / "tls"))
    assert monitor.returncode == 0 and "(role monitor)" in monitor.stdout, monitor.stderr
    assert "roles: monitor\n" in run("certs", "show", str(tmp_path / "tls" / "prometheus.pem")).stdout
    bad = run("certs", "issue", "x", "--role", "admin", "--dir", str(tmp_path / "tls"))
    assert bad.returncode == 2 and "admin" in bad.stderr


def test_status_reports_unreachable_nodes(tmp_path, tls_dir):
    from tests.helpers import free_port, tls_args

    result = run("status", f"127.0.0.1:{free_port()}", *tls_args(tls_dir, "secondary"), "--json")
    assert result.returncode == 6
    assert '"unreachable": true' in result.stdout


@pytest.mark.parametrize("command", [("status",), ("promote",), ("fence",), ("status", "--json")])
def test_one_shot_commands_name_the_address_and_the_reason_only(tls_dir, command):
    """No aiohttp internals (its SSL context object) and no promise of a retry these commands do not make."""
    from tests.helpers import free_port, tls_args

    port = free_port()
    result = run(command[0], f"127.0.0.1:{port}", *command[1:], *tls_args(tls_dir, "secondary"))
    assert result.returncode == 6, result.stdout + result.stderr
    said = result.stdout + result.stderr
    assert f"cannot connect to 127.0.0.1:{port}: Connection refused" in said
    assert "check that the node is running and that this is its --listen address" in said
    assert "SSLContext" not in said and "ssl:" not in said and "retried" not in said


@pytest.mark.parametrize("secure", [True, False])
def test_a_secondary_pointed_at_a_zeo_port_is_told_it_may_be_another_service(tmp_path, tls_dir, secure):
    from tests.helpers import Proc, free_port, start_zeo, tls_args, wait_until

    zeo_port = free_port()
    zeo = start_zeo(tmp_path, tmp_path / "zeo.fs", None, zeo_port)
    secondary = None
    try:
        security = tls_args(tls_dir, "secondary") if secure else ["--insecure"]
        secondary = Proc([REPLICATOR, "secondary", "--storage", str(tmp_path / "b.fs"), "--primary",
                          f"127.0.0.1:{zeo_port}", *security], tmp_path / "s.log")
        wait_until(lambda: "ZEO port" in secondary.output() or not secondary.alive(), timeout=30,
                   what="the secondary said why it cannot connect")
        log = secondary.output()
        assert "the ZEO port instead of the replication port" in log, log
        assert ("wrong version number" if secure else "does not speak HTTP") in log, log
        shown = run("status", f"127.0.0.1:{zeo_port}", *security)
        assert shown.returncode == 6 and "the ZEO port instead of the replication port" in shown.stdout
    finally:
        if secondary is not None:
            secondary.stop()
        zeo.stop()


def test_status_and_control_commands_say_a_host_name_does_not_resolve(tls_dir):
    from tests.helpers import tls_args

    shown = run("status", "noprimary.invalid:8100", *tls_args(tls_dir, "secondary"))
    assert shown.returncode == 6
    assert "UNREACHABLE (" in shown.stdout
    assert "the host name 'noprimary.invalid' could not be resolved" in shown.stdout
    promoted = run("promote", "noprimary.invalid:8100", *tls_args(tls_dir, "secondary"))
    assert promoted.returncode == 6
    assert "the host name 'noprimary.invalid' could not be resolved" in promoted.stderr
    assert "Unknown error" not in promoted.stderr


def test_a_secondary_without_its_primary_warns_and_exits_6_with_give_up_after(tmp_path, tls_dir):
    from tests.helpers import free_port, tls_args

    port = free_port()  # nobody listens there
    result = run("secondary", "--storage", str(tmp_path / "b.fs"), "--primary", f"127.0.0.1:{port}",
                 "--log-level", "warning", "--give-up-after", "2", *tls_args(tls_dir, "secondary"))
    assert result.returncode == 6, result.stderr
    assert (f"WARNING replicator.secondary: cannot connect to the primary: this secondary is not replicating; "
            f"reconnecting to 127.0.0.1:{port} in ") in result.stderr
    assert f"replicator: error: no usable connection to 127.0.0.1:{port} for 2.0s (--give-up-after)" in result.stderr
    assert "Connection refused" in result.stderr
    bad = run("secondary", "--storage", str(tmp_path / "b.fs"), "--primary", f"127.0.0.1:{port}",
              "--give-up-after", "-1", *tls_args(tls_dir, "secondary"))
    assert bad.returncode == 2 and "--give-up-after -1.0: must be 0 (never) or more" in bad.stderr


def test_a_second_secondary_on_the_same_storage_is_a_usage_error(tmp_path, tls_dir):
    from tests.helpers import Proc, free_port, tls_args, wait_until

    port = free_port()  # no primary: the first secondary holds its storage and retries
    argv = ["secondary", "--storage", str(tmp_path / "b.fs"), "--primary", f"127.0.0.1:{port}",
            *tls_args(tls_dir, "secondary")]
    first = Proc([REPLICATOR, *argv], tmp_path / "first.log")
    try:
        wait_until(lambda: "opened" in first.output() or not first.alive(), timeout=30, what="the first opened")
        assert first.alive(), first.output()
        second = run(*argv)
        assert second.returncode == 2, second.stderr
        assert (f"replicator: error: {tmp_path / 'b.fs'} is in use: another process holds its lock "
                f"{tmp_path / 'b.fs'}.lock (held by process {first.pid} (replicator secondary") in second.stderr
        assert "another replicator, a ZEO server" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.stop()


def test_a_secondary_whose_key_does_not_fit_its_certificate_creates_no_storage(tmp_path, tls_dir):
    replica = tmp_path / "replica"
    replica.mkdir()
    result = run("secondary", "--storage", str(replica / "Data.fs"), "--blob-dir", str(replica / "blobs"),
                 "--primary", "127.0.0.1:1", "--tls-ca", str(tls_dir / "ca.pem"),
                 "--tls-cert", str(tls_dir / "secondary.pem"), "--tls-key", str(tls_dir / "primary.key"))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "key" in result.stderr, result.stderr
    assert list(replica.iterdir()) == []  # the next start finds no empty replica to take for its own


def test_rewind_refuses_a_storage_a_running_node_has_open(tmp_path, tls_dir):
    from tests.helpers import Proc, free_port, tls_args, wait_until

    make_fs(tmp_path / "b.fs", [1, 2, 3])
    before = (tmp_path / "b.fs").read_bytes()
    port = free_port()  # no primary: the secondary holds its storage and retries
    node = Proc([REPLICATOR, "secondary", "--storage", str(tmp_path / "b.fs"), "--primary", f"127.0.0.1:{port}",
                 *tls_args(tls_dir, "secondary")], tmp_path / "node.log")
    try:
        wait_until(lambda: "opened" in node.output() or not node.alive(), timeout=30, what="the node opened")
        assert node.alive(), node.output()
        result = run("rewind", "--storage", str(tmp_path / "b.fs"), "--primary", f"127.0.0.1:{port}",
                     *tls_args(tls_dir, "secondary"))
        assert result.returncode == 2, result.stderr
        assert f"{tmp_path / 'b.fs'} is in use: another process holds its lock" in result.stderr
    finally:
        node.stop()
    assert (tmp_path / "b.fs").read_bytes()[:len(before)] == before
    missing = run("rewind", "--storage", str(tmp_path / "none.fs"), "--primary", f"127.0.0.1:{port}",
                  *tls_args(tls_dir, "secondary"))
    assert missing.returncode == 2 and "none.fs: no such file" in missing.stderr
    assert not (tmp_path / "none.fs.lock").exists()


def test_insecure_primary_warns(tmp_path):
    from tests.helpers import Proc, free_port, wait_for_port

    make_fs(tmp_path / "a.fs", [1])
    port = free_port()
    proc = Proc([REPLICATOR, "primary", "--storage", str(tmp_path / "a.fs"), "--listen", f"127.0.0.1:{port}",
                 "--insecure"], tmp_path / "p.log")
    try:
        wait_for_port(port, proc.proc)
    finally:
        proc.stop()
    assert "WARNING" in proc.output() and "plaintext" in proc.output()


def test_a_secondary_given_its_own_listen_port_as_primary_stops(tmp_path, tls_dir):
    """--primary naming the node's own --listen port (localhost for 127.0.0.1, say) made it
    "follow" itself: connected, lag 0, for ever, while the real primary moved on."""
    from tests.helpers import free_port, tls_args

    make_fs(tmp_path / "b.fs", [1])
    port = free_port()
    result = run("secondary", "--storage", str(tmp_path / "b.fs"), "--primary", f"localhost:{port}",
                 "--listen", f"127.0.0.1:{port}", *tls_args(tls_dir, "secondary"), timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"--primary localhost:{port} is this node's own --listen port: it would follow itself" \
        in result.stderr


def test_an_http_address_without_insecure_is_named_plaintext(tls_dir):
    """Nodes speak TLS: an explicit http:// address is the mistake, not a node that "may require TLS"."""
    from tests.helpers import tls_args

    for command in (("status",), ("promote",), ("fence",)):
        result = run(*command, "http://127.0.0.1:9", *tls_args(tls_dir, "secondary"))
        assert result.returncode == 2, result.stderr
        assert "http://127.0.0.1:9 is a plaintext (http://) address, and nodes speak TLS" in result.stderr
        assert "leave out --insecure" not in result.stderr


def test_runzeo_with_a_bad_replicated_section_exits_2_listing_every_problem(tmp_path, tls_dir):
    """Under runzeo a configuration error used to end in a traceback and exit status 1 (a bug, by
    the README's table), naming command-line options the file does not have."""
    from tests.helpers import RUNZEO, free_port

    conf = tmp_path / "zeo.conf"
    conf.write_text(f"%import replicator\n<zeo>\n  address 127.0.0.1:{free_port()}\n</zeo>\n"
                    f"<replicated-primary>\n  listen 127.0.0.1:81x\n  tls-ca {tls_dir / 'ca.pem'}\n"
                    f"  tls-cert {tls_dir / 'primary.pem'}\n  tls-key {tmp_path / 'missing.key'}\n"
                    f"  <filestorage>\n    path {tmp_path / 'Data.fs'}\n  </filestorage>\n</replicated-primary>\n")
    result = subprocess.run([RUNZEO, "-C", str(conf)], capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    assert "<replicated-primary>: invalid configuration: listen: port '81x' is not a number; " \
           f"tls-key {tmp_path / 'missing.key'}: no such file" in output, output


@pytest.mark.parametrize("section", ["replicated-primary", "replicated-secondary"])
def test_runzeo_with_a_certificate_of_another_ca_exits_2_saying_it_once(tmp_path, tls_dir, foreign_tls_dir, section):
    """Found when the section starts, not while the file is read: the secondary's section ended
    in ZEO's traceback and exit status 1, the primary's said it twice, once with the command
    line's hint."""
    from tests.helpers import RUNZEO, free_port

    upstream = f"  primary 127.0.0.1:{free_port()}\n" if section == "replicated-secondary" else ""
    conf = tmp_path / "zeo.conf"
    conf.write_text(f"%import replicator\n<zeo>\n  address 127.0.0.1:{free_port()}\n</zeo>\n"
                    f"<{section}>\n{upstream}  listen 127.0.0.1:{free_port()}\n  tls-ca {tls_dir / 'ca.pem'}\n"
                    f"  tls-cert {foreign_tls_dir / 'secondary.pem'}\n  tls-key {foreign_tls_dir / 'secondary.key'}\n"
                    f"  <filestorage>\n    path {tmp_path / 'Data.fs'}\n  </filestorage>\n</{section}>\n")
    result = subprocess.run([RUNZEO, "-C", str(conf)], capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    said = [line for line in output.splitlines() if "is not signed by the CA" in line]
    assert len(said) == 1 and f"<{section}>: invalid configuration: certificate " in said[0], output
    assert f"fix the <{section}> section" in said[0] and "COMMAND --help" not in said[0], said


def _blob_dir_with_files(path: Path) -> list[Path]:
    (path / "0x00").mkdir(parents=True)
    files = [path / "NOTES.txt", path / "0x00" / "0x01.blob"]
    for f in files:
        f.write_text("keep")
    (path / ".layout").write_text("bushy")
    return files


def test_a_new_secondary_refuses_a_blob_dir_with_files_zodb_would_delete(tmp_path, tls_dir):
    """FileStorage, creating its file, empties the blob directory: given the primary's own
    (one host, a copied command line), a new secondary deleted its blobs."""
    from tests.helpers import tls_args

    replica = tmp_path / "replica"
    replica.mkdir()
    files = _blob_dir_with_files(tmp_path / "theirs")
    result = run("secondary", "--storage", str(replica / "Data.fs"), "--blob-dir", str(tmp_path / "theirs"),
                 "--primary", "127.0.0.1:1", *tls_args(tls_dir, "secondary"))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert (f"the storage {replica / 'Data.fs'} does not exist yet, but its blob directory {tmp_path / 'theirs'} "
            "holds files (") in result.stderr, result.stderr
    assert "creating the storage would delete them" in result.stderr and "new or empty blob directory" in \
        result.stderr
    assert all(f.read_text() == "keep" for f in files)
    assert list(replica.iterdir()) == []


def test_a_replicated_section_refuses_a_blob_dir_with_files_zodb_would_delete(tmp_path, tls_dir):
    import ZODB.config

    from replicator.errors import ConfigError
    from tests.helpers import free_port

    files = _blob_dir_with_files(tmp_path / "blobs")
    for section, key in (("replicated-primary", f"listen 127.0.0.1:{free_port()}"),
                         ("replicated-secondary", "primary 127.0.0.1:1")):
        conf = (f"%import replicator\n<{section}>\n  {key}\n  tls-ca {tls_dir / 'ca.pem'}\n"
                f"  tls-cert {tls_dir / 'primary.pem'}\n  tls-key {tls_dir / 'primary.key'}\n"
                f"  <filestorage>\n    path {tmp_path / 'Data.fs'}\n    blob-dir {tmp_path / 'blobs'}\n"
                f"  </filestorage>\n</{section}>\n")
        with pytest.raises(ConfigError, match="creating the storage would delete them"):
            ZODB.config.storageFromString(conf)
        assert all(f.read_text() == "keep" for f in files), section
        assert not (tmp_path / "Data.fs").exists()
    # An empty one (ZODB's marker and tmp directory only) is taken, and the file created
    # (by the secondary's section, which starts following only once a server takes it).
    for f in files:
        f.unlink()
    (tmp_path / "blobs" / "tmp").mkdir()
    storage = ZODB.config.storageFromString(conf)
    try:
        assert (tmp_path / "Data.fs").exists()
    finally:
        storage.close()


def test_a_replicated_section_cuts_back_a_file_whose_fsync_failed(tmp_path, tls_dir, caplog):
    """Inside a ZEO server the storage is opened by the section, not by the replicator's command:
    the marker a failed fsync left is acted on there too, before FileStorage reads the file."""
    import errno
    import logging

    import transaction
    import ZODB
    import ZODB.config
    from ZODB.FileStorage import FileStorage

    from replicator.storage import UNSYNCED_SUFFIX, record_fsync_failure

    path = tmp_path / "Data.fs"
    db = ZODB.DB(FileStorage(str(path)))
    with db.transaction() as conn:
        conn.root()["a"] = 1
    durable, kept = path.stat().st_size, db.lastTransaction()
    with db.transaction() as conn:
        conn.root()["b"] = 2
    transaction.abort()
    db.close()
    assert record_fsync_failure(str(path), durable, kept, OSError(errno.EIO, "Input/output error")) is None
    conf = (f"%import replicator\n<replicated-secondary>\n  primary 127.0.0.1:1\n  tls-ca {tls_dir / 'ca.pem'}\n"
            f"  tls-cert {tls_dir / 'secondary.pem'}\n  tls-key {tls_dir / 'secondary.key'}\n"
            f"  <filestorage>\n    path {path}\n  </filestorage>\n</replicated-secondary>\n")
    with caplog.at_level(logging.WARNING):
        storage = ZODB.config.storageFromString(conf)
    try:
        assert storage.lastTransaction() == kept
    finally:
        storage.close()
    assert not (tmp_path / f"Data.fs{UNSYNCED_SUFFIX}").exists()
    assert f"cut back to byte {durable}" in caplog.text and "Ignoring index" not in caplog.text


def test_a_command_given_only_the_ca_names_the_options_left_out(tmp_path, tls_dir):
    result = run("status", "127.0.0.1:1", "--tls-ca", str(tls_dir / "ca.pem"))
    assert result.returncode == 2, result.stderr
    assert "no certificate given; no key given" in result.stderr, result.stderr
    assert "is a directory" not in result.stderr and "`replicator status --help`" in result.stderr
