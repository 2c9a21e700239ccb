"""data.atomic_file: the target holds the old content or the new, never part of the new, and nothing is left
beside it when writing fails."""

import pytest

from data.atomic_file import replace_atomically, write_atomically


def test_a_failed_write_keeps_the_old_content_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "manifest.json"
    write_atomically(target, "old")

    def half_then_fail(aside):
        aside.write_text("ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_atomically(target, half_then_fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    write_atomically(target, b"new \xe2\x9c\x93")
    assert target.read_text() == "new ✓" and [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
