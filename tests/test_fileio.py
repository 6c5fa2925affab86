"""Atomic writes: whole files or nothing, normal permissions, checkpoint folders swapped in whole."""

from __future__ import annotations

import os

import pytest

from muscle_fast.fileio import atomic_write, replace_dir, write_json


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    write_json(target, {"v": 1})

    def boom(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write('{"v": 2, "half')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(target, boom)
    assert target.read_text() == '{\n  "v": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "b.json", [1])
        replace_dir(tmp_path / "ck", lambda d: (d / "w.txt").write_text("x"))
    finally:
        os.umask(old)
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "ck").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "ck" / "w.txt").stat().st_mode & 0o777 == 0o644


def test_replace_dir_swaps_whole_folder(tmp_path):
    replace_dir(tmp_path / "ck", lambda d: (d / "old.txt").write_text("1"))

    def fail(d):
        (d / "new.txt").write_text("2")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        replace_dir(tmp_path / "ck", fail)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["old.txt"]
    replace_dir(tmp_path / "ck", lambda d: (d / "new.txt").write_text("2"))
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_replace_dir_ignores_leftovers_of_a_killed_run(tmp_path):
    """A killed run may leave ``.ck.old-<pid>``; pids repeat in containers, and the swap failed
    with 'Directory not empty' when it reused that name."""
    import os

    replace_dir(tmp_path / "ck", lambda d: (d / "a.txt").write_text("1"))
    stale = tmp_path / f".ck.old-{os.getpid()}"
    stale.mkdir()
    (stale / "junk").write_text("x")
    replace_dir(tmp_path / "ck", lambda d: (d / "b.txt").write_text("2"))
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["b.txt"]
    assert (stale / "junk").read_text() == "x"  # not ours to delete
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ck.old-" + str(os.getpid()), "ck"]


def test_writes_are_flushed_before_and_after_the_rename(tmp_path, monkeypatch):
    """A rename is durable only with the data fsynced before it and the folder after it; order of
    the fsync and rename calls checked with the system calls recorded."""
    import muscle_fast.fileio as fileio

    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = fileio._fsync, os.replace
    monkeypatch.setattr(
        fileio,
        "_fsync",
        lambda p, directory=False: calls.append(("fsync", str(p))) or real_fsync(p, directory),
    )
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append(("replace", str(b))) or real_replace(a, b))
    write_json(tmp_path / "a.json", [1])
    assert [c[0] for c in calls] == ["fsync", "replace", "fsync"]
    assert calls[1:] == [("replace", str(tmp_path / "a.json")), ("fsync", str(tmp_path))]
    calls.clear()
    replace_dir(tmp_path / "ck", lambda d: (d / "w.txt").write_text("x"))
    kinds = [c[0] for c in calls]
    assert kinds == ["fsync", "fsync", "replace", "fsync"]  # the file, the folder, swap, the parent
    assert calls[-1] == ("fsync", str(tmp_path))
