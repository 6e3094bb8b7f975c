"""ckctl snapshots against a real containerkitd: every verb, listings in each format, errors as one line."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from test_ckctl import one_line_error, table

from core.mount import temp_mount
from core.types import Mount

pytestmark = pytest.mark.integration


def test_prepare_write_commit_view_and_read(daemon: Any) -> None:
    prepared = daemon.ckctl("snapshots", "prepare", "--mounts", "work").stdout
    (mount,) = json.loads(prepared)
    assert (mount["type"], mount["options"]) == ("bind", ["rw", "rbind"])
    with temp_mount([Mount(mount["type"], mount["source"], tuple(mount["options"]))]) as root:
        (root / "file").write_text("from ckctl\n")
    assert daemon.ckctl("snapshots", "commit", "base", "work").stdout == ""
    printed = daemon.ckctl("snapshots", "view", "--target", "/mnt/look", "look", "base").stdout
    assert re.fullmatch(r"mount -t bind \S+/fs /mnt/look -o ro,rbind\n", printed)
    (view,) = daemon.ckctl_json("snapshots", "mounts", "/ignored", "look")
    with temp_mount([Mount(view["type"], view["source"], tuple(view["options"]))]) as root:
        assert (root / "file").read_text() == "from ckctl\n"
    assert daemon.ckctl("snapshots", "mounts", "/mnt/x", "look").stdout == printed.replace("/mnt/look", "/mnt/x")


def test_ls_info_usage_tree_in_each_format(daemon: Any) -> None:
    daemon.ckctl("snapshots", "prepare", "a")
    daemon.ckctl("snapshots", "commit", "base", "a", "--label", "tier=os")
    daemon.ckctl("snapshots", "prepare", "child", "base")
    daemon.ckctl("snapshots", "view", "look", "base")

    assert table(daemon.ckctl("snapshots", "ls").stdout) == [
        {"KEY": "base", "PARENT": "", "KIND": "committed"},
        {"KEY": "child", "PARENT": "base", "KIND": "active"},
        {"KEY": "look", "PARENT": "base", "KIND": "view"},
    ]
    assert daemon.ckctl("snapshots", "ls", "-q", "kind==committed").stdout == "base\n"
    records = daemon.ckctl_json("snapshots", "ls", "labels.tier==os")
    assert [(r["name"], r["kind"], r["labels"]["tier"]) for r in records] == [("base", "committed", "os")]
    assert "containerd.io/gc.root" in records[0]["labels"]  # as ctr, so GC keeps what ckctl made

    info = json.loads(daemon.ckctl("snapshots", "info", "child").stdout)
    assert (info["name"], info["parent"], info["kind"]) == ("child", "base", "active")
    assert info["created_at"].endswith("Z")

    usage = daemon.ckctl_json("snapshots", "usage")
    assert [u["name"] for u in usage] == ["base", "child", "look"]
    assert usage[0]["size"] > 0 and usage[0]["inodes"] >= 1
    assert [row["KEY"] for row in table(daemon.ckctl("snapshots", "usage", "base").stdout)] == ["base"]

    assert daemon.ckctl("snapshots", "tree").stdout == " base\n  \\_ child\n  \\_ look\n"


def test_label_rm_and_errors(daemon: Any) -> None:
    daemon.ckctl("snapshots", "prepare", "a")
    daemon.ckctl("snapshots", "commit", "base", "a")
    daemon.ckctl("snapshots", "prepare", "child", "base", "--label", "tier=os")
    # child keeps its gc.root label: without it a collection could take child before "rm base" below
    labelled = daemon.ckctl("snapshots", "label", "child", "team=infra", "tier=").stdout
    assert re.fullmatch(r"containerd\.io/gc\.root=\S+Z,team=infra\n", labelled)

    assert one_line_error(daemon.ckctl("snapshots", "rm", "base", check=False)) == (
        "ckctl: base: cannot remove snapshot with child: failed precondition (failed precondition)"
    )
    assert daemon.ckctl("snapshots", "rm", "child", "base").stdout == "child\nbase\n"
    assert daemon.ckctl_json("snapshots", "ls") == []
    error = one_line_error(daemon.ckctl("snapshots", "info", "base", check=False))
    assert error == "ckctl: snapshot base does not exist: not found (not found)"
    error = one_line_error(daemon.ckctl("snapshots", "--snapshotter", "zfs", "ls", check=False))
    assert error == "ckctl: snapshotter not loaded: zfs: invalid argument (invalid argument)"


def test_snapshots_are_per_namespace(daemon: Any) -> None:
    daemon.ckctl("snapshots", "prepare", "k", namespace="one")
    assert daemon.ckctl("snapshots", "ls", "-q", namespace="one").stdout == "k\n"
    assert daemon.ckctl("snapshots", "ls", "-q").stdout == ""
