"""``FileWatch``: the kernel's word that a file was written, renamed into place or removed."""

from __future__ import annotations

import os
import sys

import pytest

from replicator.fswatch import FileWatch

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux only")


@pytest.fixture
def watched(tmp_path):
    path = tmp_path / "Data.fs"
    path.write_bytes(b"FS21")
    watch = FileWatch(str(path))
    yield path, watch
    watch.close()


def test_a_write_is_reported_once(watched):
    path, watch = watched
    assert watch.changed() is False
    with open(path, "ab") as f:
        f.write(b"x")
        f.flush()
        f.write(b"y")
        f.flush()
    assert watch.changed() is True
    assert watch.changed() is False  # read and forgotten


def test_other_files_in_the_directory_are_not_reported(watched):
    path, watch = watched
    tmp = path.with_name("Data.fs.tmp")
    tmp.write_bytes(b"scratch")
    with open(tmp, "ab") as f:
        f.write(b"more")
    tmp.rename(path.with_name("Data.fs.index"))
    assert watch.changed() is False


def test_a_file_renamed_into_place_is_watched_in_turn(watched):
    # What a pack does: Data.fs -> Data.fs.old, Data.fs.pack -> Data.fs.
    path, watch = watched
    packed = path.with_name("Data.fs.pack")
    packed.write_bytes(b"FS21packed")
    path.rename(path.with_name("Data.fs.old"))
    packed.rename(path)
    assert watch.changed() is True
    with open(path.with_name("Data.fs.old"), "ab") as f:
        f.write(b"no longer the storage")
    assert watch.changed() is False
    with open(path, "ab") as f:
        f.write(b"a commit after the pack")
    assert watch.changed() is True
    assert watch.lost is False


def test_a_symlinked_path_follows_a_pack_in_the_real_directory(tmp_path):
    real = tmp_path / "data"
    real.mkdir()
    (real / "Data.fs").write_bytes(b"FS21")
    link = tmp_path / "Data.fs"
    link.symlink_to(real / "Data.fs")
    watch = FileWatch(str(link))
    try:
        (real / "Data.fs.pack").write_bytes(b"FS21packed")
        (real / "Data.fs").rename(real / "Data.fs.old")
        (real / "Data.fs.pack").rename(real / "Data.fs")
        assert watch.changed() is True
        with open(link, "ab") as f:
            f.write(b"a commit after the pack")
        assert watch.changed() is True
    finally:
        watch.close()


def test_removal_and_a_truncating_write_are_reported(watched):
    path, watch = watched
    os.truncate(path, 2)
    assert watch.changed() is True
    path.unlink()
    assert watch.changed() is True
    path.write_bytes(b"FS21")  # created anew: watched again
    assert watch.changed() is True
    with open(path, "ab") as f:
        f.write(b"x")
    assert watch.changed() is True


def test_the_directory_going_away_marks_the_watch_lost(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    path = sub / "Data.fs"
    path.write_bytes(b"FS21")
    watch = FileWatch(str(path))
    try:
        path.unlink()
        sub.rmdir()
        assert watch.changed() is True
        assert watch.lost is True
    finally:
        watch.close()


def test_a_missing_file_cannot_be_watched(tmp_path):
    with pytest.raises(OSError, match="No such file"):
        FileWatch(str(tmp_path / "absent.fs"))
