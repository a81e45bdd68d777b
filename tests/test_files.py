"""files.atomic_write: the one "write to a partial file, then rename" every produced file goes through."""
from __future__ import annotations

import pytest

from infinitetalk.files import atomic_write, partial_path


def test_a_finished_write_replaces_the_file_and_leaves_no_partial(tmp_path):
    out = tmp_path / "clip.mp4"
    out.write_bytes(b"old")
    with atomic_write(out) as part:
        assert part == partial_path(out) == tmp_path / ".clip.partial.mp4"
        part.write_bytes(b"new")
        assert out.read_bytes() == b"old"            # readers see the old file until the rename
    assert out.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_a_failed_write_removes_the_partial_file_and_keeps_the_old_one(tmp_path):
    out = tmp_path / "state.json"
    out.write_text("committed")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(out, tmp_path / "state.json.tmp") as part:
            part.write_text("half")
            raise KeyboardInterrupt
    assert out.read_text() == "committed" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_long_lived_writers_commit_or_discard_themselves(tmp_path):
    kept, dropped = atomic_write(tmp_path / "a.bin"), atomic_write(tmp_path / "b.bin")
    kept.partial.write_bytes(b"a")
    dropped.partial.write_bytes(b"b")
    assert kept.commit() == tmp_path / "a.bin"
    dropped.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
    with pytest.raises(FileNotFoundError):   # nothing was written: nothing to rename, the old name untouched
        atomic_write(tmp_path / "c.bin").commit()
    assert not (tmp_path / "c.bin").exists()
