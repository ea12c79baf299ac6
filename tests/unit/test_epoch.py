"""Epoch records: durable, atomic, checked when read."""

from __future__ import annotations

import json

import pytest

from replicator.epoch import adopt_epoch, begin_epoch, epoch_path, load_epoch
from replicator.errors import ConfigError


def test_missing_file_is_epoch_zero(tmp_path):
    assert load_epoch(str(tmp_path / "Data.fs")).epoch == 0


def test_promotions_increase_and_survive_reloading(tmp_path):
    fs = str(tmp_path / "Data.fs")
    first = begin_epoch(fs, b"\0" * 7 + b"\5", "b")
    second = begin_epoch(fs, b"\0" * 7 + b"\x09", "c")
    assert (first.epoch, second.epoch) == (1, 2)
    again = load_epoch(fs)
    assert again == second
    assert [r.node for r in again.history] == ["b", "c"]
    assert not (tmp_path / "Data.fs.epoch.tmp").exists()


def test_adopting_only_moves_forward(tmp_path):
    fs = str(tmp_path / "Data.fs")
    assert adopt_epoch(fs, 3, "p").epoch == 3
    assert adopt_epoch(fs, 2, "old").epoch == 3
    assert load_epoch(fs).epoch == 3


def test_an_adopted_epoch_records_no_start_it_does_not_know(tmp_path):
    fs = str(tmp_path / "Data.fs")
    adopt_epoch(fs, 1, "p")
    (record,) = load_epoch(fs).history
    assert (record.epoch, record.node, record.start_tid) == (1, "p", None)
    assert '"start_tid": null' in open(epoch_path(fs)).read()


@pytest.mark.parametrize("content", ["{", '{"history": [{"epoch": "x"}]}',
                                     '{"history": [{"epoch": 2, "start_tid": "00", "node": "a", "at": 1}]}'])
def test_damaged_records_are_config_errors(tmp_path, content):
    fs = str(tmp_path / "Data.fs")
    with open(epoch_path(fs), "w") as fh:
        fh.write(content)
    with pytest.raises(ConfigError, match="epoch"):
        load_epoch(fs)


def test_following_in_epoch_0_is_recorded_once_and_a_promotion_is_kept(tmp_path):
    fs = str(tmp_path / "Data.fs")
    assert [r.node for r in adopt_epoch(fs, 0, "p").history] == ["p"]
    assert [r.node for r in adopt_epoch(fs, 0, "q").history] == ["p"]  # already a follower
    begin_epoch(fs, b"\0" * 8, "me")
    assert adopt_epoch(fs, 1, "other").history[-1].node == "me"  # its own epoch: still its own
    assert [(r.epoch, r.node) for r in adopt_epoch(fs, 2, "other").history] == [(0, "p"), (1, "me"),
                                                                                (2, "other")]


def test_the_database_is_recorded_kept_through_epochs_and_optional_in_older_records(tmp_path):
    from replicator.epoch import record_database

    fs = str(tmp_path / "Data.fs")
    adopt_epoch(fs, 0, "p")  # a record from before the database was named
    raw = json.loads(open(epoch_path(fs)).read())
    del raw["database"]
    open(epoch_path(fs), "w").write(json.dumps(raw))
    assert load_epoch(fs).database is None
    record_database(fs, b"\0" * 7 + b"\7")
    begin_epoch(fs, b"\0" * 8, "me")
    adopt_epoch(fs, 5, "q")
    state = load_epoch(fs)
    assert (state.epoch, state.database) == (5, b"\0" * 7 + b"\7")
    raw = json.loads(open(epoch_path(fs)).read())
    open(epoch_path(fs), "w").write(json.dumps({**raw, "database": "zz"}))
    with pytest.raises(ConfigError, match="malformed"):
        load_epoch(fs)
