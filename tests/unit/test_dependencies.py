"""A ZODB whose restore would make a replica unlike its primary is refused at run time."""

from __future__ import annotations

import pytest

from replicator.errors import ConfigError
from replicator.storage import check_restore_support


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
