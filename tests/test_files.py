"""Atomic writes: what a later run trusts appears whole or not at all."""
from __future__ import annotations

import pytest

from pararl.files import atomic_folder, atomic_write


def test_a_file_is_replaced_whole_and_no_temporary_file_stays(tmp_path):
    path = atomic_write(tmp_path / "sub" / "stats.json", "old")
    atomic_write(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in path.parent.iterdir()) == ["stats.json"]


def test_a_folder_that_fails_halfway_leaves_the_earlier_one_untouched(tmp_path):
    final = tmp_path / "policy"
    with atomic_folder(final) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_folder(final) as tmp:
            (tmp / "weights").write_text("v2, half")
            raise RuntimeError("disk full")
    assert (final / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"], "no temporary folder is left"
    with atomic_folder(final) as tmp:
        (tmp / "weights").write_text("v2")
    assert (final / "weights").read_text() == "v2" and sorted(p.name for p in tmp_path.iterdir()) == ["policy"]
