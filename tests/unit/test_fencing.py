"""Fence records: durable, readable, and taken as a fence even when damaged."""

from __future__ import annotations

import json

from replicator.fencing import FenceRecord, clear_fence, fence_path, load_fence, save_fence


def test_no_record_no_fence(tmp_path):
    fs = str(tmp_path / "Data.fs")
    assert load_fence(fs) is None
    assert clear_fence(fs) is None


def test_a_record_survives_reloading_and_reads_as_json(tmp_path):
    fs = str(tmp_path / "Data.fs")
    record = FenceRecord("switchover", 1_764_563_340.0, "a", 2)
    save_fence(fs, record)
    assert load_fence(fs) == record
    assert json.loads(open(fence_path(fs)).read()) == {"reason": "switchover", "at": "2025-12-01T04:29:00Z",
                                                       "node": "a", "epoch": 2, "stale": False,
                                                       "superseded": ""}
    assert record.since == "2025-12-01 04:29:00 UTC"
    assert not (tmp_path / "Data.fs.fence.tmp").exists()
    assert clear_fence(fs) == record
    assert load_fence(fs) is None


def test_a_stale_record_stays_stale(tmp_path):
    fs = str(tmp_path / "Data.fs")
    save_fence(fs, FenceRecord("superseded by epoch 1 (seen from c)", 0.0, "a", 0, stale=True))
    assert load_fence(fs).stale  # type: ignore[union-attr]


def test_a_superseded_record_stays_superseded_and_older_records_read_as_not(tmp_path):
    fs = str(tmp_path / "Data.fs")
    save_fence(fs, FenceRecord("fenced by an operator", 0.0, "a", 0, superseded="by epoch 1 (seen from b)"))
    record = load_fence(fs)
    assert record is not None and record.superseded == "by epoch 1 (seen from b)" and not record.stale
    with open(fence_path(fs), "w") as fh:  # written before the field existed
        fh.write('{"reason": "switchover", "at": "2025-12-01T04:29:00Z", "node": "a", "epoch": 0, "stale": false}')
    assert load_fence(fs) == FenceRecord("switchover", 1_764_563_340.0, "a", 0)


def test_a_damaged_record_is_still_a_fence(tmp_path):
    fs = str(tmp_path / "Data.fs")
    with open(fence_path(fs), "w") as fh:
        fh.write('{"reason": "switchover", "at": ')
    record = load_fence(fs)
    assert record is not None and not record.stale
    assert record.reason.startswith(f"the fence record {fence_path(fs)} is unreadable (")
    assert record.reason.endswith("); it is taken as a fence")
