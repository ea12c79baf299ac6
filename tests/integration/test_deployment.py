"""The deployment files stay true to the program: compose config is valid and its commands exist."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import pytest
import yaml

from replicator.cli import cli

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_docker_compose_config_is_valid():
    result = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def _parse(args: list[str]) -> click.Context:
    """Resolve ``replicator ARGS`` to its command and parse the options, without running it."""
    command: click.Command = cli
    while isinstance(command, click.Group):
        name, args = args[0], args[1:]
        assert name in command.commands, f"replicator has no command {name!r}"
        command = command.commands[name]
    return command.make_context(command.name or "?", list(args))


def test_every_replicator_command_in_compose_parses(tmp_path, monkeypatch):
    # The compose commands name config files inside the image; read them from the repo instead.
    for role in ("primary", "secondary"):
        src = ROOT / role / f"{role}.toml"
        (tmp_path / f"{role}.toml").write_text(src.read_text())
    seen = 0
    for name, service in compose()["services"].items():
        command = service.get("command") or []
        if isinstance(command, str):
            command = command.split()
        if command and command[0] == "replicator":
            args = [a.replace(f"/etc/replicator/{name}/", f"{tmp_path}/") for a in command[1:]]
            ctx = _parse(args)
            assert ctx.command.name in ("primary", "secondary")
            assert ctx.params["storage"] == "/data/Data.fs"
            seen += 1
    assert seen == 2


def test_role_config_files_only_use_known_options():
    for role in ("primary", "secondary"):
        keys = tomllib.loads((ROOT / role / f"{role}.toml").read_text()).keys()
        command = cli.commands[role]
        names = {opt[2:] for p in command.params for opt in p.opts if opt.startswith("--")}
        unknown = [k for k in keys if k not in names]
        assert not unknown, f"{role}.toml has unknown keys {unknown}"


def test_certs_script_uses_existing_commands():
    script = (ROOT / "primary" / "make-certs.sh").read_text().replace("\\\n", " ")
    line = next(line for line in script.splitlines() if "replicator certs" in line)
    args = line.split("replicator", 1)[1].replace('"$ca"', "/tmp/x").split()
    ctx = _parse(args)
    assert ctx.command.name == "init"
    assert set(ctx.params["nodes"]) == {"primary", "secondary"}


def test_the_certs_job_keeps_the_ca_key_off_the_shared_volume(tmp_path):
    ca, shared = tmp_path / "ca", tmp_path / "tls"
    shared.mkdir()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for _ in range(2):  # the second run finds the certificates there and changes nothing
        result = subprocess.run(["sh", str(ROOT / "primary" / "make-certs.sh"), str(ca), str(shared)],
                                capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in shared.iterdir()) == ["ca.pem", "primary.key", "primary.pem",
                                                          "secondary.key", "secondary.pem"]
    assert (ca / "ca.key").exists()
    assert oct((shared / "primary.key").stat().st_mode & 0o777) == "0o600"
    services = compose()["services"]
    mounts = {name: service.get("volumes", []) for name, service in services.items()}
    assert [name for name, volumes in mounts.items() if any(v.startswith("ca:") for v in volumes)] == ["certs"]
    # The primary writes beside Data.fs (what packs dropped, a fence): not a read-only volume.
    assert "primary-data:/data" in mounts["primary"], mounts["primary"]


def _unit(role: str) -> dict[str, str]:
    """The [Service] settings of ``<role>/replicator-<role>.service``."""
    settings: dict[str, str] = {}
    section = None
    for line in (ROOT / role / f"replicator-{role}.service").read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key] = value
    return settings


def test_systemd_units_run_the_real_commands_and_stay_stopped_when_restarting_cannot_help(tmp_path):
    from replicator.cli import EXIT_CODES
    from replicator.errors import ConfigError, CorruptedSourceError, RejectedError, StorageInUseError

    codes = {cls: code for cls, code in EXIT_CODES}
    for role, operator_needed in (("primary", {ConfigError, CorruptedSourceError, RejectedError}),
                                  ("secondary", {ConfigError, StorageInUseError, RejectedError})):
        unit = _unit(role)
        command = unit["ExecStart"].split()
        assert command[0].endswith("/replicator") and command[1] == role
        config = tmp_path / f"{role}.toml"
        config.write_text((ROOT / role / f"{role}.toml").read_text())
        ctx = _parse([a.replace(f"/etc/replicator/{role}.toml", str(config)) for a in command[1:]])
        assert ctx.params["storage"] == "/data/Data.fs"
        # SIGHUP: the CLI's services load renewed TLS files at once.
        assert unit["ExecReload"] == "/bin/kill -HUP $MAINPID"
        assert {int(c) for c in unit["RestartPreventExitStatus"].split()} == {codes[c] for c in operator_needed}
        assert unit["Restart"] == "on-failure"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_units_are_valid(tmp_path):
    replicator = shutil.which("replicator") or str(Path(sys.executable).parent / "replicator")
    for role in ("primary", "secondary"):
        unit = tmp_path / f"replicator-{role}.service"
        unit.write_text((ROOT / role / unit.name).read_text().replace("/opt/zodb-replicator/bin/replicator",
                                                                      replicator))
        result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
        assert result.returncode == 0 and not result.stderr.strip(), result.stderr
