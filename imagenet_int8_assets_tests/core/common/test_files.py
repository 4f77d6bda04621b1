"""The one atomic-folder helper (storage.staging_dir / move_into_place / atomic_dir) and its writers."""

from __future__ import annotations

import json
import os

import pytest

from imagenet_int8_assets.core.dataset import mds_index
from imagenet_int8_assets.core.common.files import atomic_dir, move_into_place, staging_dir


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_staging_dir_without_a_name_cleans_every_leftover_and_deletes_what_was_not_moved(tmp_path):
    (tmp_path / ".tmp-deadbeef").mkdir()
    (tmp_path / ".trash-v-1-cafebabe").mkdir()
    (tmp_path / "v-keep").mkdir()
    with staging_dir(tmp_path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-") and tmp.is_dir()
        (tmp / "x").write_text("x")
    assert names(tmp_path) == ["v-keep"]  # leftovers gone, the unused staging folder too


def test_clean_leftovers_false_leaves_other_writers_folders_alone(tmp_path):
    other = tmp_path / ".tmp-sample-0123abcd"  # another process's write in progress
    other.mkdir()
    with atomic_dir(tmp_path / "sample", clean_leftovers=False) as tmp:
        (tmp / "a").write_text("1")
    assert names(tmp_path) == [".tmp-sample-0123abcd", "sample"]
    assert (tmp_path / "sample" / "a").read_text() == "1"


def test_move_into_place_replaces_a_folder_as_a_whole(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "old-only").write_text("old")
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "new").write_text("new")
    assert move_into_place(staged, final) == final
    assert names(final) == ["new"] and names(tmp_path) == ["final"]


def test_move_into_place_puts_the_old_folder_back_when_the_swap_fails(tmp_path, monkeypatch):
    final = tmp_path / "final"
    final.mkdir()
    (final / "a").write_text("old")
    staged = tmp_path / "staged"
    staged.mkdir()
    real_rename = os.rename

    def failing_rename(src, dst):
        if str(src) == str(staged):
            raise OSError("disk went away")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="disk went away"):
        move_into_place(staged, final)
    assert (final / "a").read_text() == "old"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".trash-")]


def test_a_failed_write_through_atomic_dir_keeps_the_previous_folder_and_leaves_nothing(tmp_path):
    final = tmp_path / "report"
    with atomic_dir(final) as tmp:
        (tmp / "report.html").write_text("v1")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final) as tmp:
            (tmp / "report.html").write_text("half")
            raise KeyboardInterrupt
    assert (final / "report.html").read_text() == "v1" and names(tmp_path) == ["report"]


def _staged_version(home, content: str):
    staged = home / ".tmp-staged"
    staged.mkdir(parents=True)
    (staged / mds_index.INDEX).write_text(json.dumps({"version": 2, "shards": [], "c": content}))
    (staged / mds_index.BUILD_INFO).write_text("{}")
    return staged


def test_commit_class_version_keeps_an_equal_version_unless_told_to_replace_it(tmp_path):
    root = tmp_path / "mds"
    home = mds_index.class_home(root, "cls")
    first = mds_index.commit_class_version(root, "cls", _staged_version(home, "a"))
    (first / "marker").write_text("first copy")
    again = mds_index.commit_class_version(root, "cls", _staged_version(home, "a"))
    assert again == first and (first / "marker").is_file()  # same content: the staged copy is dropped
    replaced = mds_index.commit_class_version(root, "cls", _staged_version(home, "a"), replace=True)
    assert replaced == first and not (first / "marker").exists()  # e.g. a damaged version replaced
    assert names(home) == sorted([first.name, mds_index.CURRENT])
    assert mds_index.current_version_dir(root, "cls") == first
