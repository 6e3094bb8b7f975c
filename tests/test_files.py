"""core.files.remove_tree: deep trees, symlinks not followed, errors raised or reported."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.files import remove_tree


def test_a_tree_deeper_than_the_recursion_limit_is_removed(tmp_path: Path):
    top = tmp_path / "deep"
    os.makedirs(top)
    fd = os.open(top, os.O_RDONLY)
    try:  # 3000 levels, made relative to a directory fd (the path is far longer than PATH_MAX)
        for _ in range(3000):
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
        with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as f:
            f.write("x")
    finally:
        os.close(fd)
    remove_tree(top)
    assert not top.exists()


def test_symlinks_are_removed_not_followed_and_a_missing_tree_is_fine(tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    top = tmp_path / "top"
    (top / "sub").mkdir(parents=True)
    (top / "sub" / "link").symlink_to(outside)
    (top / "file").write_text("x")
    remove_tree(top)
    assert not top.exists() and (outside / "keep").read_text() == "keep"
    remove_tree(tmp_path / "never-there")


def test_errors_are_raised_or_reported_and_the_rest_removed(tmp_path: Path):
    top = tmp_path / "top"
    (top / "busy").mkdir(parents=True)
    (top / "gone").mkdir()
    (top / "gone" / "f").write_text("x")
    target = str(top / "busy")
    reported: list[str] = []

    real_rmdir = os.rmdir

    def refusing_rmdir(path: str, *args: object, **kwargs: object) -> None:
        if os.path.basename(path) == "busy":
            raise PermissionError(1, "Operation not permitted", path)
        real_rmdir(path, *args, **kwargs)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "rmdir", refusing_rmdir)
        with pytest.raises(PermissionError):
            remove_tree(top)
        remove_tree(top, lambda path, error: reported.append(path))
    assert target in reported and str(top) in reported
    assert not (top / "gone").exists() and (top / "busy").is_dir()
