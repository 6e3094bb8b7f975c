"""containerkitd's life cycle: directories, the root lock, the socket, signals, logs, health, and refusing bad input.

Every test runs a real daemon (see conftest.py) on a private root, state and socket.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import socket
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core.daemon import SOCKET_PATH_MAX

pytestmark = pytest.mark.integration

FAILURE_TIMEOUT = 15.0  # a daemon that cannot start must say so and exit well within this
LOGFMT_LINE = re.compile(
    r'^time=\S+ level=(debug|info|warning|error) msg=("(?:[^"\\]|\\.)*"|\S+)( \S+=("(?:[^"\\]|\\.)*"|\S*))*$'
)


def start_expecting_failure(daemon: Any) -> tuple[int, str, float]:
    """Start ``daemon``, which must exit on its own; return its exit code, its output and how long it ran."""
    started = time.monotonic()
    daemon.start(wait=False)
    code = daemon.process.wait(FAILURE_TIMEOUT)
    return code, daemon.log, time.monotonic() - started


def assert_refused(daemon: Any, *needles: str, foreign_socket: bool = False) -> str:
    """The daemon exits non-zero, promptly, with one clear line (no traceback) containing every needle.

    It leaves no socket behind, unless the path was someone else's (``foreign_socket``) to begin with.
    """
    code, log, elapsed = start_expecting_failure(daemon)
    assert code != 0, log
    assert elapsed < FAILURE_TIMEOUT
    assert "Traceback" not in log, log
    (line,) = [line for line in log.splitlines() if line.startswith("containerkitd: ")]
    for needle in needles:
        assert needle in line, line
    if not foreign_socket:
        assert not os.path.exists(daemon.address), "a daemon that failed to start left its socket behind"
    return line


def version_call(address: str, timeout: float = 5.0) -> Any:
    from google.protobuf import empty_pb2

    from core.api.containerd.services.version.v1 import version_pb2_grpc

    with grpc.insecure_channel(f"unix:{address}") as channel:
        return version_pb2_grpc.VersionStub(channel).Version(empty_pb2.Empty(), timeout=timeout)


@contextmanager
def read_only_tmpfs(mountpoint: Path, prepare: str | None = None) -> Iterator[Path]:
    """A small tmpfs at ``mountpoint``, read-only (after creating directory ``prepare`` in it, if given)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mountpoint.mkdir(parents=True)
    options = "size=1m" if prepare else "ro,size=1m"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mountpoint)], check=True)
    try:
        if prepare:
            (mountpoint / prepare).mkdir()
            subprocess.run(["mount", "-o", "remount,ro", str(mountpoint)], check=True)
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)]).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mountpoint)], check=True)


# -- directories, lock and socket ------------------------------------------------------------


def test_root_and_state_are_created_0711_whatever_the_umask(make_daemon: Any) -> None:
    daemon = make_daemon(start=False)
    daemon.root = daemon.dir / "deep" / "root"
    previous = os.umask(0o077)  # the daemon inherits it
    try:
        daemon.start()
    finally:
        os.umask(previous)
    for directory in (daemon.root, daemon.state):
        assert directory.is_dir()
        assert stat.S_IMODE(directory.stat().st_mode) == 0o711, directory


def test_socket_is_0660_and_owned_by_root(daemon: Any) -> None:
    info = os.stat(daemon.address)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert (info.st_uid, info.st_gid) == (0, 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another group needs root")
def test_socket_group_comes_from_grpc_gid(make_daemon: Any) -> None:
    """The socket has its group from the moment it accepts connections (it is bound under a staging name,
    given its group, then renamed into place; no staging name is left)."""
    daemon = make_daemon("[grpc]\ngid = 100\n")
    info = os.stat(daemon.address)
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 100, 0o660)
    assert not [path for path in Path(daemon.address).parent.iterdir() if path.name.startswith(".containerkitd-")]
    daemon.stop()
    assert not os.path.exists(daemon.address)


def test_second_daemon_on_same_root_exits_at_once(make_daemon: Any) -> None:
    first = make_daemon()
    second = make_daemon(start=False)
    second.root = first.root
    assert_refused(second, str(first.root), f"pid {first.process.pid}")
    # The first one is unharmed: still serving, its lock still held.
    assert first.ckctl("version").returncode == 0
    assert (first.root / "containerkitd.lock").read_text().strip() == str(first.process.pid)


def test_root_is_unlocked_after_a_clean_stop(make_daemon: Any) -> None:
    first = make_daemon()
    assert first.stop() == 0
    second = make_daemon(start=False)
    second.root = first.root
    second.start()
    assert second.ckctl("version").returncode == 0


def test_socket_served_by_another_live_process_is_refused(make_daemon: Any) -> None:
    daemon = make_daemon(start=False)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(daemon.address)
        other.listen(1)
        assert_refused(daemon, daemon.address, "served by another process", foreign_socket=True)
        # The other process's socket is left alone and still answers.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(daemon.address)


def test_stale_socket_file_is_replaced(make_daemon: Any) -> None:
    daemon = make_daemon(start=False)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:
        gone.bind(daemon.address)  # a socket file nobody listens on, as a crashed daemon leaves it
    assert stat.S_ISSOCK(os.stat(daemon.address).st_mode)
    daemon.start()
    assert version_call(daemon.address).revision == "containerkit"


def test_file_at_the_socket_path_that_is_not_a_socket_is_refused_and_kept(make_daemon: Any) -> None:
    daemon = make_daemon(start=False)
    Path(daemon.address).write_text("precious\n")
    assert_refused(daemon, daemon.address, "not a socket", foreign_socket=True)
    assert Path(daemon.address).read_text() == "precious\n"


def socket_path_of_length(directory: Path, length: int) -> str:
    prefix = f"{directory}/"
    path = prefix + "s" * (length - len(prefix) - len(".sock")) + ".sock"
    assert len(os.fsencode(path)) == length
    return path


def test_socket_path_of_107_bytes_is_served(make_daemon: Any) -> None:
    daemon = make_daemon(start=False)
    daemon.address = socket_path_of_length(daemon.dir, SOCKET_PATH_MAX)
    daemon.start()
    assert daemon.ckctl("version").returncode == 0


def test_socket_path_too_long_is_refused(make_daemon: Any) -> None:
    daemon = make_daemon(start=False)
    daemon.address = socket_path_of_length(daemon.dir, SOCKET_PATH_MAX + 1)
    assert_refused(daemon, daemon.address, "108 bytes", "at most 107")


# -- signals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly_exit_0_and_socket_removed(daemon: Any, sig: signal.Signals) -> None:
    assert daemon.ckctl("version").returncode == 0
    assert daemon.stop(sig) == 0, daemon.log
    assert not os.path.exists(daemon.address)
    assert f"received {sig.name}" in daemon.log
    assert "containerkitd stopped" in daemon.log


def test_sigterm_under_concurrent_load_every_call_succeeds_or_is_refused(daemon: Any) -> None:
    """20 clients call Version in a loop while SIGTERM arrives: the daemon exits 0, no call hangs, and every
    call either succeeds or is refused as the server goes away.

    Refused means UNAVAILABLE (connection closed, socket gone) or CANCELLED: grpc's C core drops calls that
    reached the server but had not started when it shuts down (RST_STREAM; they never ran), and grpcio gives
    no way to answer those with UNAVAILABLE instead. Calls that had started all finish (the grace period).
    """
    from google.protobuf import empty_pb2

    from core.api.containerd.services.version.v1 import version_pb2_grpc

    outcomes: collections.Counter[str] = collections.Counter()
    details: set[str] = set()
    timings: list[str] = []  # for a failure: when each refused call started (to SIGTERM) and how long it took
    lock = threading.Lock()
    daemon_gone = threading.Event()
    all_connected = threading.Barrier(21)
    signalled = [0.0]

    def hammer() -> None:
        with grpc.insecure_channel(f"unix:{daemon.address}") as channel:
            stub = version_pb2_grpc.VersionStub(channel)
            stub.Version(empty_pb2.Empty(), timeout=10)
            all_connected.wait(30)
            calls_after_exit = 0
            while calls_after_exit < 3:
                started = time.monotonic()
                try:
                    stub.Version(empty_pb2.Empty(), timeout=10)
                    outcome = "ok"
                except grpc.RpcError as err:
                    outcome = err.code().name
                    with lock:
                        details.add(f"{outcome}: {err.details()}")
                        took = time.monotonic() - started
                        timings.append(f"{outcome} at {started - signalled[0]:+.2f}s took {took:.2f}s")
                with lock:
                    outcomes[outcome] += 1
                if daemon_gone.is_set():
                    calls_after_exit += 1

    threads = [threading.Thread(target=hammer, daemon=True) for _ in range(20)]
    for thread in threads:
        thread.start()
    all_connected.wait(30)
    time.sleep(0.3)
    signalled[0] = time.monotonic()
    assert daemon.stop(signal.SIGTERM) == 0, daemon.log
    stopped_after = time.monotonic() - signalled[0]
    daemon_gone.set()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "a call hung across the shutdown"
    assert outcomes["ok"] > 0 and outcomes["UNAVAILABLE"] > 0, outcomes
    slowest = sorted(timings, key=lambda line: -float(line.rsplit(" ", 1)[1][:-1]))[:10]
    assert set(outcomes) <= {"ok", "UNAVAILABLE", "CANCELLED"}, (  # no DEADLINE_EXCEEDED, no UNKNOWN
        f"{sorted(details)}\nthe daemon exited {stopped_after:.2f}s after SIGTERM; slowest refusals: {slowest}\n"
        f"{daemon.log}"
    )
    assert not os.path.exists(daemon.address)


def test_in_flight_health_watch_sees_not_serving_and_ends_on_sigterm(daemon: Any) -> None:
    """A call that never ends by itself (a Watch) learns of the stop and ends; it does not hold the daemon up."""
    with grpc.insecure_channel(f"unix:{daemon.address}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        statuses = [response.status for response in watch]  # ends with OK, not an error
        assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING]
        assert daemon.stop() == 0, daemon.log
        assert time.monotonic() - started < 5.0


# -- serving ---------------------------------------------------------------------------------


def test_grpc_health_answers_serving(daemon: Any) -> None:
    with grpc.insecure_channel(f"unix:{daemon.address}") as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_logs_are_logfmt_lines_on_stderr(make_daemon: Any) -> None:
    daemon = make_daemon(start=False)
    stdout_path, stderr_path = daemon.dir / "stdout", daemon.dir / "stderr"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        daemon.process = subprocess.Popen(daemon.command, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    daemon.wait_ready()
    daemon.ckctl("namespaces", "create", "logged")
    assert daemon.stop() == 0
    assert stdout_path.read_text() == ""
    lines = stderr_path.read_text().splitlines()
    assert lines
    for line in lines:
        assert LOGFMT_LINE.match(line), line
    assert any("level=info" in line and f"serving on {daemon.address}" in line for line in lines)
    assert any("level=debug" in line for line in lines)  # --log-level debug is honoured


def test_server_uuid_persists_across_restarts(daemon: Any) -> None:
    def server_uuid() -> str:
        match = re.search(r"^Server:\n(?:  .*\n)*?  UUID: (\S+)$", daemon.ctr("version").stdout, re.MULTILINE)
        assert match, daemon.ctr("version").stdout
        return match.group(1)

    before = server_uuid()
    assert uuid.UUID(before).version == 4
    daemon.restart()
    assert server_uuid() == before


# -- bad input -------------------------------------------------------------------------------


def test_malformed_config_is_refused_naming_the_line(make_daemon: Any) -> None:
    daemon = make_daemon('root = "/tmp/x"\nstate = = 1\n[grpc]\n', start=False)
    assert_refused(daemon, str(daemon.config_path), "TOML", "line 2")


def test_missing_config_file_is_refused(make_daemon: Any) -> None:
    daemon = make_daemon(start=False)
    daemon.config_path.unlink()
    assert_refused(daemon, str(daemon.config_path), "No such file")


def test_unknown_plugin_in_config_is_refused_naming_it(make_daemon: Any) -> None:
    daemon = make_daemon("[plugins.service.nosuch]\n", start=False)
    assert_refused(daemon, "plugins.service.nosuch", "no such plugin")


def test_unknown_plugin_type_in_config_is_refused_naming_it(make_daemon: Any) -> None:
    daemon = make_daemon("[plugins.gizmo.x]\n", start=False)
    assert_refused(daemon, "plugins.gizmo", "unknown plugin type")


def test_unknown_top_level_key_is_refused(make_daemon: Any) -> None:
    daemon = make_daemon('rooot = "/tmp/x"\n', start=False)
    assert_refused(daemon, "unknown key", "'rooot'")


@pytest.mark.parametrize(
    ("config", "needles"),
    [
        ("root = 5\n", ("root", "expected a path string", "integer")),
        ('disabled_plugins = "service.health"\n', ("disabled_plugins", "expected a list")),
        ("[grpc]\naddress = true\n", ("grpc.address", "expected a string", "boolean")),
        ('[grpc]\ngid = "wheel"\n', ("grpc.gid", "expected an integer")),
    ],
    ids=["root", "disabled_plugins", "grpc.address", "grpc.gid"],
)
def test_wrong_value_type_is_refused_naming_the_key(make_daemon: Any, config: str, needles: tuple[str, ...]) -> None:
    assert_refused(make_daemon(config, start=False), *needles)


@pytest.mark.parametrize("root_exists", [False, True], ids=["new-root", "existing-root"])
def test_root_on_read_only_filesystem_is_refused(make_daemon: Any, root_exists: bool) -> None:
    daemon = make_daemon(start=False)
    with read_only_tmpfs(daemon.dir / "ro", prepare="sub" if root_exists else None) as mountpoint:
        daemon.root = mountpoint / "sub"
        try:
            assert_refused(daemon, str(daemon.root), "Read-only file system")
        finally:
            daemon.stop(signal.SIGKILL)  # whatever happened, nothing may hold the mount when it is unmounted


def test_required_plugin_not_ok_exits_non_zero(make_daemon: Any) -> None:
    config = 'required_plugins = ["service.version"]\ndisabled_plugins = ["service.version"]\n'
    assert_refused(make_daemon(config, start=False), "required plugin service.version is skip", "disabled")


def test_required_plugin_not_installed_exits_non_zero(make_daemon: Any) -> None:
    assert_refused(make_daemon('required_plugins = ["service.nosuch"]\n', start=False), "'service.nosuch'")


def test_required_plugins_that_are_ok_let_the_daemon_start(make_daemon: Any) -> None:
    daemon = make_daemon('required_plugins = ["service.version", "introspection"]\n')
    assert daemon.ckctl("version").returncode == 0


def test_corrupt_metadata_store_is_refused_without_traceback(make_daemon: Any) -> None:
    daemon = make_daemon(start=False)
    daemon.root.mkdir(parents=True)
    (daemon.root / "meta.db").write_bytes(b"this is not a database\n" * 100)
    assert_refused(daemon, "metadata store", str(daemon.root / "meta.db"))


def test_bad_command_line_is_refused(make_daemon: Any) -> None:
    daemon = make_daemon(args=("--log-level", "loud"), start=False)
    code, log, _ = start_expecting_failure(daemon)
    assert code != 0
    assert "--log-level" in log and "loud" in log
