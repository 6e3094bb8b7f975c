"""Debian's ``ctr`` (containerd 1.6) against containerkitd: it must behave as it does against containerd.

The expected outputs are the shapes containerd 1.6.20 prints for the same commands (learnt once from a real
containerd on a scratch root); containerd itself is not needed to run these tests.
"""

from __future__ import annotations

import re
import shutil
from typing import Any

import pytest

from core import __version__
from core.metadata import MetadataStore

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("ctr") is None, reason="ctr (Debian's containerd package) is not installed"),
]

GRPC_SERVICE = "io.containerd.grpc.v1"
CORE_SERVICES = ("health", "introspection", "namespaces", "version")
IDENTIFIER_PATTERN = "^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$"
WIDGETS_SCHEMA = "CREATE TABLE widgets (namespace TEXT NOT NULL REFERENCES namespaces(name), id TEXT)"


def rows(output: str) -> list[list[str]]:
    """A ``ctr`` table (tabwriter, space padded) as its header and rows split on whitespace."""
    return [line.split() for line in output.splitlines() if line.strip()]


def namespaces(daemon: Any, namespace: str | None = None) -> dict[str, str]:
    """``ctr namespaces ls`` as {name: labels-cell}; checks the header."""
    header, *body = rows(daemon.ctr("namespaces", "ls", namespace=namespace).stdout)
    assert header == ["NAME", "LABELS"]
    return {row[0]: row[1] if len(row) > 1 else "" for row in body}


def add_widget(daemon: Any, namespace: str) -> None:
    """Give ``namespace`` a resource, as later components will: a row in a table referencing namespaces."""
    assert daemon.stop() == 0, daemon.log
    with MetadataStore(daemon.root / "meta.db") as store:
        store.migrate("test-widgets", [WIDGETS_SCHEMA])
        with store.transaction() as conn:
            conn.execute("INSERT INTO widgets (namespace, id) VALUES (?, ?)", (namespace, "w1"))
    daemon.start()


# -- version and plugins ---------------------------------------------------------------------


def test_ctr_version_prints_our_server_version_and_uuid(daemon: Any) -> None:
    result = daemon.ctr("version")
    server = result.stdout.split("Server:\n", 1)[1]
    assert re.fullmatch(
        rf"  Version:  {re.escape(__version__)}\n  Revision: containerkit\n  UUID: [0-9a-f-]{{36}}\n", server
    ), result.stdout
    uuid = server.rsplit("UUID: ", 1)[1].strip()
    assert uuid == daemon.ckctl_json("version")["server"]["uuid"]
    # ctr warns (on stderr) that client and server versions differ, as it would for any other containerd release.
    assert result.stderr.splitlines() == ["WARNING: version mismatch", "WARNING: revision mismatch"]


def test_ctr_plugins_ls_lists_the_core_services_ok(daemon: Any) -> None:
    header, *body = rows(daemon.ctr("plugins", "ls").stdout)
    assert header == ["TYPE", "ID", "PLATFORMS", "STATUS"]
    listed = {(row[0], row[1]): row[2:] for row in body}
    for service in CORE_SERVICES:
        assert listed[(GRPC_SERVICE, service)] == ["-", "ok"]


def test_ctr_plugins_ls_lists_the_snapshotters_and_the_differ(daemon: Any) -> None:
    listed = {(row[0], row[1]): row[2:] for row in rows(daemon.ctr("plugins", "ls").stdout)[1:]}
    for name in (
        ("io.containerd.snapshotter.v1", "overlayfs"),
        ("io.containerd.differ.v1", "walking"),
        (GRPC_SERVICE, "snapshots"),
        (GRPC_SERVICE, "diff"),
        (GRPC_SERVICE, "unpack"),
    ):
        assert listed[name] == ["-", "ok"], name
    assert listed[("io.containerd.snapshotter.v1", "aufs")][1] in ("ok", "skip")


def test_ctr_plugins_ls_shows_a_disabled_plugin_as_skip(make_daemon: Any) -> None:
    daemon = make_daemon('disabled_plugins = ["service.health"]\n')
    listed = {(row[0], row[1]): row[2:] for row in rows(daemon.ctr("plugins", "ls").stdout)[1:]}
    assert listed[(GRPC_SERVICE, "health")] == ["-", "skip"]
    assert listed[(GRPC_SERVICE, "version")] == ["-", "ok"]
    detail = daemon.ctr("plugins", "ls", "-d", "id==health").stdout
    assert "Message:" in detail and "disabled by config (disabled_plugins): skip plugin" in detail


def test_ctr_plugins_ls_detailed(daemon: Any) -> None:
    output = daemon.ctr("plugins", "ls", "-d").stdout
    blocks = re.split(r"\n(?=Type:)", output.strip())
    described = {}
    for block in blocks:
        fields = dict(re.findall(r"^(Type|ID):\s+(\S+)$", block, re.MULTILINE))
        described[(fields["Type"], fields["ID"])] = block
    for service in CORE_SERVICES:
        block = described[(GRPC_SERVICE, service)]
        assert "Error:" not in block
        assert re.search(rf"^\s+containerkit\.package\s+containerkit {re.escape(__version__)}$", block, re.MULTILINE)


def test_ctr_plugins_ls_filters_by_type(daemon: Any) -> None:
    header, *body = rows(daemon.ctr("plugins", "ls", f"type=={GRPC_SERVICE}").stdout)
    assert header == ["TYPE", "ID", "PLATFORMS", "STATUS"]
    assert {row[0] for row in body} == {GRPC_SERVICE}
    assert {row[1] for row in body} >= set(CORE_SERVICES)


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("id==version", [[GRPC_SERVICE, "version", "-", "ok"]]),
        (f"type=={GRPC_SERVICE},id==namespaces", [[GRPC_SERVICE, "namespaces", "-", "ok"]]),
        ("id==health id==version", [[GRPC_SERVICE, "health", "-", "ok"], [GRPC_SERVICE, "version", "-", "ok"]]),
        ("type==io.containerd.no-such-type.v1", []),
    ],
    ids=["by-id", "type-and-id", "either-of-two", "no-match"],
)
def test_ctr_plugins_ls_filters(daemon: Any, selector: str, expected: list[list[str]]) -> None:
    header, *body = rows(daemon.ctr("plugins", "ls", *selector.split()).stdout)
    assert header == ["TYPE", "ID", "PLATFORMS", "STATUS"]
    assert body == expected


def test_ctr_plugins_ls_rejects_a_malformed_filter(daemon: Any) -> None:
    result = daemon.ctr("plugins", "ls", "type==", check=False)
    assert result.returncode != 0
    assert result.stderr.startswith("ctr: ") and "invalid argument" in result.stderr


# -- namespaces ------------------------------------------------------------------------------


def test_ctr_namespaces_ls_on_a_fresh_daemon_is_empty(daemon: Any) -> None:
    # ctr reads the labels of "default" when it connects; as with containerd, that creates nothing.
    assert daemon.ctr("namespaces", "ls").stdout == "NAME LABELS \n"
    assert daemon.ctr("namespaces", "ls", "-q").stdout == ""


def test_ctr_namespaces_create_with_labels_and_ls(daemon: Any) -> None:
    assert daemon.ctr("namespaces", "create", "team-a", "owner=ops", "tier=1").stdout == ""
    daemon.ctr("namespaces", "create", "team-b")
    assert namespaces(daemon) == {"team-a": "owner=ops,tier=1", "team-b": ""}
    assert daemon.ctr("namespaces", "ls", "-q").stdout == "team-a\nteam-b\n"


def test_ctr_namespaces_create_label_forms_as_containerd(daemon: Any) -> None:
    # ctr sends a bare key as "true" and `k=` as an empty value, which containerd does not store.
    daemon.ctr("namespaces", "create", "forms", "flag", "empty=", "kv=a=b")
    assert namespaces(daemon) == {"forms": "flag=true,kv=a=b"}


def test_ctr_namespaces_label_sets_and_clears(daemon: Any) -> None:
    daemon.ctr("namespaces", "create", "lab", "a=1", "b=2")
    assert daemon.ctr("namespaces", "label", "lab", "a=", "c=3").returncode == 0
    assert namespaces(daemon) == {"lab": "b=2,c=3"}
    daemon.ctr("namespaces", "label", "lab", "b=22")
    assert namespaces(daemon) == {"lab": "b=22,c=3"}


def test_ctr_namespaces_label_creates_a_missing_namespace_as_containerd(daemon: Any) -> None:
    daemon.ctr("namespaces", "label", "fresh", "x=y")
    assert namespaces(daemon) == {"fresh": "x=y"}


def test_ctr_namespaces_rm_prints_the_name(daemon: Any) -> None:
    daemon.ctr("namespaces", "create", "gone")
    daemon.ctr("namespaces", "create", "kept")
    result = daemon.ctr("namespaces", "rm", "gone")
    assert (result.stdout, result.stderr) == ("gone\n", "")
    assert namespaces(daemon) == {"kept": ""}


def test_ctr_namespaces_rm_of_a_missing_one_prints_the_name_and_exits_0(daemon: Any) -> None:
    daemon.ctr("namespaces", "create", "real")
    result = daemon.ctr("namespaces", "rm", "nosuch", "real")
    assert (result.returncode, result.stdout) == (0, "nosuch\nreal\n")
    assert namespaces(daemon) == {}


def test_ctr_namespaces_create_existing_says_already_exists(daemon: Any) -> None:
    daemon.ctr("namespaces", "create", "twice", "a=1")
    result = daemon.ctr("namespaces", "create", "twice", "b=2", check=False)
    assert result.returncode == 1
    assert result.stderr == 'ctr: namespace "twice": already exists\n'
    assert namespaces(daemon) == {"twice": "a=1"}


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("bad name", f"must match {IDENTIFIER_PATTERN}"),
        ("-leading", f"must match {IDENTIFIER_PATTERN}"),
        ("trailing.", f"must match {IDENTIFIER_PATTERN}"),
        ("double..dot", f"must match {IDENTIFIER_PATTERN}"),
        ("x" * 77, "greater than maximum length (76 characters)"),
    ],
    ids=["space", "leading-dash", "trailing-dot", "double-dot", "too-long"],
)
def test_ctr_namespaces_create_invalid_name_is_invalid_argument(daemon: Any, name: str, problem: str) -> None:
    result = daemon.ctr("namespaces", "create", "--", name, check=False)
    assert result.returncode == 1
    assert result.stderr == f'ctr: identifier "{name}" {problem}: invalid argument\n'
    assert namespaces(daemon) == {}


def test_ctr_namespaces_longest_valid_name_is_accepted(daemon: Any) -> None:
    name = "a" * 76
    daemon.ctr("namespaces", "create", name)
    assert namespaces(daemon) == {name: ""}


def test_ctr_namespaces_rm_of_a_non_empty_namespace_fails_as_containerd(daemon: Any) -> None:
    daemon.ctr("namespaces", "create", "busy")
    add_widget(daemon, "busy")
    result = daemon.ctr("namespaces", "rm", "busy", check=False)
    assert result.returncode == 1
    assert result.stdout == ""
    # containerd's wording: a log line, then "ctr: unable to delete NAME: <error>: failed precondition".
    assert result.stderr.splitlines()[-1] == (
        'ctr: unable to delete busy: namespace "busy" must be empty, but it still has widgets: failed precondition'
    )
    assert namespaces(daemon) == {"busy": ""}


def test_ctr_namespace_flag_does_not_scope_namespaces_themselves(daemon: Any) -> None:
    # Namespaces are not namespaced: -n changes nothing about creating or listing them.
    daemon.ctr("namespaces", "create", "from-other", namespace="other")
    daemon.ctr("namespaces", "create", "from-default")
    expected = {"from-default": "", "from-other": ""}
    assert namespaces(daemon, namespace="other") == expected
    assert namespaces(daemon) == expected  # and -n other did not create "other"


def test_ctr_namespaces_persist_across_restarts(daemon: Any) -> None:
    daemon.ctr("namespaces", "create", "durable", "k=v")
    daemon.restart()
    assert namespaces(daemon) == {"durable": "k=v"}
