"""The dependencies' lower bounds: declared, pinned for their test run, and refused below at run time."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from replicator.errors import ConfigError
from replicator.storage import RESTORE_SINCE, check_restore_support

ROOT = Path(__file__).resolve().parents[2]


def _release(version: str) -> tuple[int, ...]:
    parts = [int(p) for p in version.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def test_every_lower_bound_is_pinned_for_the_floors_run():
    declared = {}
    for spec in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        name, floor = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", spec).groups()  # type: ignore[union-attr]
        declared[name.lower()] = _release(floor)
    pinned = {}
    for line in (ROOT / ".ci" / "floors.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pinned[name.strip().lower()] = _release(version.strip())
    assert pinned == declared
    assert declared["zodb"] == RESTORE_SINCE


@pytest.mark.parametrize("version", ["5.8.1", "5.6.0", "6.0.0", "6.0", "4"])
def test_a_zodb_whose_restore_differs_from_the_primary_is_refused(version):
    with pytest.raises(ConfigError) as info:
        check_restore_support(version)
    assert f"ZODB {version} cannot apply the stream faithfully" in str(info.value)
    assert "ZODB#395" in str(info.value)
    assert "install ZODB 6.0.1 or later" in info.value.hint


@pytest.mark.parametrize("version", ["6.0.1", "6.4", "6.10.2", "7.0.0a1", None])
def test_a_zodb_with_a_faithful_restore_is_taken(version):
    check_restore_support(version)  # None: the one installed here
