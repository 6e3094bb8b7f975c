"""ckctl, the admin CLI: version, plugins and namespaces, its output forms, environment and exit codes.

ckctl exits 0 on success and non-zero with exactly one line on stderr otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import CKCTL

from core import __version__
from core.metadata import MetadataStore

pytestmark = pytest.mark.integration

IDENTIFIER_PATTERN = "^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$"
PLUGIN_KEYS = {"type", "id", "package", "status", "reason"}
CORE_SERVICES = ("health", "introspection", "namespaces", "version")
LAYER_PLUGINS = (  # the snapshotters, the differ and the services over them: ok on any Linux with overlayfs
    ("snapshotter", "overlayfs"),
    ("differ", "walking"),
    ("service", "snapshots"),
    ("service", "diff"),
    ("service", "unpack"),
)
WIDGETS_SCHEMA = "CREATE TABLE widgets (namespace TEXT NOT NULL REFERENCES namespaces(name), id TEXT)"


def ckctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ckctl with exactly ``args`` (no implied -a/-n) and ``env`` on top of a CONTAINERKIT_*-free environment."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERKIT_")}
    environment.update(env or {})
    return subprocess.run([*CKCTL, *args], capture_output=True, text=True, timeout=60, env=environment)


def table(output: str) -> list[dict[str, str]]:
    """A ckctl table as one dict per row, keyed by the (upper-case) headers; cells may contain spaces."""
    header, *lines = output.rstrip("\n").splitlines()
    starts = [match.start() for match in re.finditer(r"\S+", header)]
    names = header.split()
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    return [{name: line[start:end].strip() for name, (start, end) in zip(names, bounds, strict=True)} for line in lines]


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The failure's single stderr line (asserting that is what it is)."""
    assert result.returncode != 0, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ckctl: ")
    return lines[0]


# -- version ---------------------------------------------------------------------------------


def test_version(daemon: Any) -> None:
    result = daemon.ckctl("version")
    assert result.returncode == 0 and result.stderr == ""
    match = re.fullmatch(
        rf"Client:\n  Version:  {re.escape(__version__)}\n\nServer:\n  Version:  {re.escape(__version__)}\n"
        r"  Revision: containerkit\n  UUID:     ([0-9a-f-]{36})\n",
        result.stdout,
    )
    assert match, result.stdout


def test_version_json(daemon: Any) -> None:
    info = daemon.ckctl_json("version")
    assert info["client"] == {"version": __version__}
    assert info["server"]["version"] == __version__
    assert info["server"]["revision"] == "containerkit"
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}", info["server"]["uuid"])
    assert info["server"]["uuid"] in daemon.ckctl("version").stdout


# -- plugins ---------------------------------------------------------------------------------


def test_plugins_ls_table(daemon: Any) -> None:
    result = daemon.ckctl("plugins", "ls")
    assert result.stdout.splitlines()[0].split() == ["TYPE", "ID", "PACKAGE", "STATUS", "REASON"]
    listed = {(row["TYPE"], row["ID"]): row for row in table(result.stdout)}
    for service in CORE_SERVICES:
        row = listed[("service", service)]
        assert row["PACKAGE"] == f"containerkit {__version__}"
        assert (row["STATUS"], row["REASON"]) == ("ok", "")


def test_plugins_ls_json(daemon: Any) -> None:
    plugins = daemon.ckctl_json("plugins", "ls")
    assert isinstance(plugins, list)
    for plugin in plugins:
        assert plugin.keys() >= PLUGIN_KEYS
        assert plugin["status"] in ("ok", "skip", "error")
    by_name = {(p["type"], p["id"]): p for p in plugins}
    for service in CORE_SERVICES:
        assert {k: by_name[("service", service)][k] for k in PLUGIN_KEYS} == {
            "type": "service",
            "id": service,
            "package": f"containerkit {__version__}",
            "status": "ok",
            "reason": "",
        }


def test_plugins_ls_shows_the_snapshotters_and_the_differ(daemon: Any) -> None:
    by_name = {(p["type"], p["id"]): p for p in daemon.ckctl_json("plugins", "ls")}
    for name in LAYER_PLUGINS:
        assert (by_name[name]["status"], by_name[name]["reason"]) == ("ok", ""), by_name[name]
    aufs = by_name[("snapshotter", "aufs")]
    if "aufs" in Path("/proc/filesystems").read_text().split():
        assert aufs["status"] == "ok", aufs
    else:
        assert aufs["status"] == "skip" and aufs["reason"].startswith("aufs is not in /proc/filesystems"), aufs


def test_plugins_ls_quiet(daemon: Any) -> None:
    names = daemon.ckctl("plugins", "ls", "-q").stdout.splitlines()
    assert {f"service.{service}" for service in CORE_SERVICES} <= set(names)
    assert names == [f"{p['type']}.{p['id']}" for p in daemon.ckctl_json("plugins", "ls")]


def test_plugins_ls_shows_skip_with_its_reason(make_daemon: Any) -> None:
    daemon = make_daemon('disabled_plugins = ["service.health"]\n')
    (health,) = [p for p in daemon.ckctl_json("plugins", "ls") if p["id"] == "health"]
    assert (health["status"], health["reason"]) == ("skip", "disabled by config (disabled_plugins)")
    (row,) = [row for row in table(daemon.ckctl("plugins", "ls").stdout) if row["ID"] == "health"]
    assert (row["STATUS"], row["REASON"]) == ("skip", "disabled by config (disabled_plugins)")


def test_plugins_ls_filters(daemon: Any) -> None:
    assert daemon.ckctl("plugins", "ls", "-q", "id==version").stdout == "service.version\n"
    assert daemon.ckctl("plugins", "ls", "-q", "type==io.containerd.grpc.v1,id==health").stdout == "service.health\n"
    assert daemon.ckctl("plugins", "ls", "-q", "id==nosuch").stdout == ""


def test_plugins_ls_bad_filter_is_one_line_error(daemon: Any) -> None:
    line = one_line_error(daemon.ckctl("plugins", "ls", "type==", check=False))
    assert "invalid argument" in line


def test_output_into_a_closed_pipe_is_no_traceback(daemon: Any) -> None:
    # `true` exits at once, so ckctl writes into a pipe nobody reads (as with `| head` on a long listing).
    pipeline = f"{' '.join(CKCTL)} -a {daemon.address} plugins ls --json | true"
    result = subprocess.run(["bash", "-c", pipeline], capture_output=True, text=True, timeout=60)
    assert result.stderr == ""


# -- namespaces ------------------------------------------------------------------------------


def test_namespaces_create_ls_rm(daemon: Any) -> None:
    created = daemon.ckctl("namespaces", "create", "team-a", "owner=ops", "tier=1")
    assert (created.returncode, created.stdout, created.stderr) == (0, "", "")
    daemon.ckctl("namespaces", "create", "team-b")
    assert table(daemon.ckctl("namespaces", "ls").stdout) == [
        {"NAME": "team-a", "LABELS": "owner=ops,tier=1"},
        {"NAME": "team-b", "LABELS": ""},
    ]
    removed = daemon.ckctl("namespaces", "rm", "team-a", "team-b")
    assert (removed.returncode, removed.stdout) == (0, "team-a\nteam-b\n")
    assert daemon.ckctl("namespaces", "ls", "-q").stdout == ""


def test_namespaces_ls_json_and_quiet(daemon: Any) -> None:
    daemon.ckctl("namespaces", "create", "b-ns", "k=v")
    daemon.ckctl("namespaces", "create", "a-ns")
    assert daemon.ckctl_json("namespaces", "ls") == [
        {"name": "a-ns", "labels": {}},
        {"name": "b-ns", "labels": {"k": "v"}},
    ]
    assert daemon.ckctl("namespaces", "ls", "-q").stdout == "a-ns\nb-ns\n"


def test_namespaces_ls_filter(daemon: Any) -> None:
    daemon.ckctl("namespaces", "create", "infra-1", "team=infra")
    daemon.ckctl("namespaces", "create", "web-1", "team=web")
    assert daemon.ckctl("namespaces", "ls", "-q", "labels.team==infra").stdout == "infra-1\n"
    assert daemon.ckctl("namespaces", "ls", "-q", "name==web-1", "labels.team==infra").stdout == "infra-1\nweb-1\n"


def test_namespaces_label_sets_and_clears(daemon: Any) -> None:
    daemon.ckctl("namespaces", "create", "lab", "a=1", "b=2")
    result = daemon.ckctl("namespaces", "label", "lab", "a=", "c=3")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert daemon.ckctl_json("namespaces", "ls") == [{"name": "lab", "labels": {"b": "2", "c": "3"}}]


def test_namespaces_label_forms_follow_ctr(daemon: Any) -> None:
    # As ctr's: a bare KEY means "true"; KEY= sets nothing on create and clears on label.
    daemon.ckctl("namespaces", "create", "forms", "flag", "empty=", "kv=a=b")
    assert daemon.ckctl_json("namespaces", "ls") == [{"name": "forms", "labels": {"flag": "true", "kv": "a=b"}}]
    daemon.ckctl("namespaces", "label", "forms", "flag=", "other")
    assert daemon.ckctl_json("namespaces", "ls") == [{"name": "forms", "labels": {"kv": "a=b", "other": "true"}}]


def test_namespaces_label_without_key_is_one_line_error(daemon: Any) -> None:
    daemon.ckctl("namespaces", "create", "lab")
    line = one_line_error(daemon.ckctl("namespaces", "label", "lab", "=v", check=False))
    assert "'=v' has no key" in line


def test_namespaces_create_existing_is_one_line_error(daemon: Any) -> None:
    daemon.ckctl("namespaces", "create", "twice")
    result = daemon.ckctl("namespaces", "create", "twice", check=False)
    assert result.returncode == 1
    assert one_line_error(result) == 'ckctl: namespace "twice": already exists (already exists)'


@pytest.mark.parametrize("verb", ["create", "label"])
def test_namespaces_invalid_name_is_one_line_error_exit_1(daemon: Any, verb: str) -> None:
    labels = ["k=v"] if verb == "label" else []
    for name in ("bad name", "-dash", "UPPER!", "a..b", "x" * 77):
        result = daemon.ckctl("namespaces", verb, "--", name, *labels, check=False)
        assert result.returncode == 1
        line = one_line_error(result)
        assert line.startswith(f'ckctl: identifier "{name}" ')
        assert line.endswith("(invalid argument)")
        assert IDENTIFIER_PATTERN in line or "greater than maximum length (76 characters)" in line
    assert daemon.ckctl("namespaces", "ls", "-q").stdout == ""


def test_namespaces_rm_of_a_missing_one_is_one_line_error(daemon: Any) -> None:
    daemon.ckctl("namespaces", "create", "real")
    result = daemon.ckctl("namespaces", "rm", "nosuch", "real", check=False)
    assert result.returncode == 1
    assert result.stdout == "real\n"  # what could be removed was
    (line,) = result.stderr.splitlines()
    assert line == 'ckctl: nosuch: namespace "nosuch": not found (not found)'


def test_namespaces_rm_of_a_non_empty_namespace_is_failed_precondition(daemon: Any) -> None:
    daemon.ckctl("namespaces", "create", "busy")
    assert daemon.stop() == 0, daemon.log
    with MetadataStore(daemon.root / "meta.db") as store:
        store.migrate("test-widgets", [WIDGETS_SCHEMA])
        with store.transaction() as conn:
            conn.execute("INSERT INTO widgets (namespace, id) VALUES ('busy', 'w1')")
    daemon.start()
    result = daemon.ckctl("namespaces", "rm", "busy", check=False)
    assert result.returncode == 1
    assert one_line_error(result) == (
        'ckctl: busy: namespace "busy" must be empty, but it still has widgets (failed precondition)'
    )
    assert daemon.ckctl("namespaces", "ls", "-q").stdout == "busy\n"


# -- environment -----------------------------------------------------------------------------


def test_containerkit_address_env_is_honoured(daemon: Any) -> None:
    result = ckctl("namespaces", "create", "via-env", env={"CONTAINERKIT_ADDRESS": daemon.address})
    assert result.returncode == 0, result.stderr
    assert daemon.ckctl("namespaces", "ls", "-q").stdout == "via-env\n"


def test_address_flag_beats_the_env(daemon: Any) -> None:
    result = ckctl("-a", daemon.address, "version", env={"CONTAINERKIT_ADDRESS": "/nonexistent/ck.sock"})
    assert result.returncode == 0, result.stderr


class RecordingNamespaces:
    """A stand-in daemon on a private socket that records the ``containerd-namespace`` of each call."""

    def __init__(self, address: str) -> None:
        from core.api.containerd.services.namespaces.v1 import namespace_pb2, namespace_pb2_grpc

        self.seen: list[str | None] = []
        recorder = self

        class Servicer(namespace_pb2_grpc.NamespacesServicer):
            def List(self, request: Any, context: grpc.ServicerContext) -> Any:
                metadata = dict(context.invocation_metadata())
                recorder.seen.append(metadata.get("containerd-namespace"))
                return namespace_pb2.ListNamespacesResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        namespace_pb2_grpc.add_NamespacesServicer_to_server(Servicer(), self.server)
        self.server.add_insecure_port(f"unix:{address}")
        self.server.start()


@pytest.fixture
def recording_daemon() -> Iterator[tuple[str, RecordingNamespaces]]:
    directory = Path(tempfile.mkdtemp(prefix="ck-", dir="/tmp"))
    address = str(directory / "rec.sock")
    recorder = RecordingNamespaces(address)
    try:
        yield address, recorder
    finally:
        recorder.server.stop(None).wait()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize(
    ("flags", "env", "expected"),
    [
        ((), {}, "default"),
        ((), {"CONTAINERKIT_NAMESPACE": ""}, "default"),
        ((), {"CONTAINERKIT_NAMESPACE": "team-a"}, "team-a"),
        (("-n", "team-b"), {"CONTAINERKIT_NAMESPACE": "team-a"}, "team-b"),
        (("--namespace", "team-c"), {}, "team-c"),
    ],
    ids=["unset", "empty", "env", "flag-beats-env", "long-flag"],
)
def test_namespace_of_each_call_from_flag_env_or_default(
    recording_daemon: tuple[str, RecordingNamespaces], flags: tuple[str, ...], env: dict[str, str], expected: str
) -> None:
    address, recorder = recording_daemon
    result = ckctl(*flags, "namespaces", "ls", env={"CONTAINERKIT_ADDRESS": address, **env})
    assert result.returncode == 0, result.stderr
    assert recorder.seen == [expected]


# -- reaching the daemon ---------------------------------------------------------------------


def test_no_socket_is_one_line_error_naming_it(tmp_path: Path) -> None:
    address = str(tmp_path / "nobody.sock")
    line = one_line_error(ckctl("-a", address, "version"))
    assert line == f"ckctl: cannot reach containerkitd at {address}: No such file or directory"


def test_socket_nobody_listens_on_is_one_line_error_naming_it(tmp_path: Path) -> None:
    address = str(tmp_path / "stale.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(address)
    line = one_line_error(ckctl("-a", address, "namespaces", "ls"))
    assert line == f"ckctl: cannot reach containerkitd at {address}: Connection refused"


def test_stopped_daemon_is_one_line_error(daemon: Any) -> None:
    assert daemon.stop() == 0, daemon.log
    for command in (("version",), ("plugins", "ls"), ("namespaces", "ls", "--json"), ("namespaces", "create", "x")):
        line = one_line_error(daemon.ckctl(*command, check=False))
        assert line.startswith(f"ckctl: cannot reach containerkitd at {daemon.address}: ")


def test_default_address_is_the_documented_socket() -> None:
    result = ckctl("--help")
    assert result.returncode == 0
    assert "/run/containerkit/containerkit.sock" in " ".join(result.stdout.split())


def test_usage_error_exits_non_zero() -> None:
    result = ckctl("namespaces", "frobnicate")
    assert result.returncode != 0
    assert "invalid choice" in result.stderr


def test_output_is_json_parsable_for_every_listing(daemon: Any) -> None:
    daemon.ckctl("namespaces", "create", "j")
    for listing in (("plugins", "ls"), ("namespaces", "ls")):
        assert isinstance(json.loads(daemon.ckctl(*listing, "--json").stdout), list)
