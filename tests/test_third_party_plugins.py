"""Third-party plugins: a separately installed distribution appears, is configured and disappears.

The plugin distributions live in ``tests/plugins/`` with their own pyproject.toml. Fixtures
pip-install them into this venv (from a temporary copy, so no build output lands in the repo) and
always uninstall them afterwards. ``containerkit-memory-content`` is a working content store that
also observes events through a pluggy hook; ``containerkit-broken-runtime`` raises at import.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.content import Info
from core.digest import Digest
from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable

PLUGINS = Path(__file__).parent / "plugins"
PIP_ENV = {**os.environ, "PIP_ROOT_USER_ACTION": "ignore", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
EXIT_TIMEOUT = 20.0

MEMORY = "content.memory"
MEMORY_PACKAGE = "containerkit-memory-content 0.1.0"
BROKEN = "runtime.broken"
BROKEN_REASON = "this plugin is broken on purpose"


class Distribution:
    """One plugin distribution from ``tests/plugins/<folder>``, installed into this venv on demand."""

    def __init__(self, folder: str, name: str, plugin_id: str) -> None:
        self.source = PLUGINS / folder
        self.name = name
        self.plugin_id = plugin_id

    def install(self, as_id: str | None = None) -> None:
        """Build and install from a temporary copy of the source folder (pip may build in-tree).

        ``as_id`` renames the entry point in the copy: the same distribution and version, with
        different entry points, as a changed plugin release would be.
        """
        with tempfile.TemporaryDirectory(prefix="ck-plugin-") as tmp:
            copy = Path(tmp) / self.source.name
            shutil.copytree(self.source, copy, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
            if as_id is not None:
                pyproject = copy / "pyproject.toml"
                text = pyproject.read_text()
                assert f"\n{self.plugin_id} = " in text
                pyproject.write_text(text.replace(f"\n{self.plugin_id} = ", f"\n{as_id} = "))
            self._pip("install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet", str(copy))

    def uninstall(self) -> None:
        """Remove the distribution; a no-op (pip only warns) when it is not installed."""
        self._pip("uninstall", "-y", "--quiet", self.name)

    def _pip(self, *args: str) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=PIP_ENV, timeout=300
        )
        assert result.returncode == 0, f"pip {' '.join(args)} failed:\n{result.stdout}{result.stderr}"


def _installed(folder: str, name: str, plugin_id: str) -> Iterator[Distribution]:
    distribution = Distribution(folder, name, plugin_id)
    try:
        distribution.install()
        yield distribution
    finally:
        distribution.uninstall()


@pytest.fixture(scope="module")
def memory_content() -> Iterator[Distribution]:
    """``containerkit-memory-content`` installed for this module's tests, uninstalled after them."""
    yield from _installed("memory-content", "containerkit-memory-content", "memory")


@pytest.fixture(scope="module")
def broken_runtime() -> Iterator[Distribution]:
    """``containerkit-broken-runtime`` installed for this module's tests, uninstalled after them."""
    yield from _installed("broken-runtime", "containerkit-broken-runtime", "broken")


@pytest.fixture
def reinstalled_after(memory_content: Distribution) -> Iterator[Distribution]:
    """For tests that uninstall the memory plugin: puts it back afterwards for the tests that follow."""
    try:
        yield memory_content
    finally:
        memory_content.install()


def plugins(daemon: Any) -> dict[str, dict[str, Any]]:
    """``ckctl plugins ls --json``, by ``type.id``."""
    return {row["name"]: row for row in daemon.ckctl_json("plugins", "ls")}


def ctr_plugins(daemon: Any) -> dict[tuple[str, str], str]:
    """``ctr plugins ls``: the status column by (type, id)."""
    lines = daemon.ctr("plugins", "ls").stdout.splitlines()[1:]
    return {(cols[0], cols[1]): cols[-1] for cols in (line.split() for line in lines) if cols}


def start_expecting_failure(daemon: Any) -> tuple[int, str]:
    """Start a daemon that should refuse to start; its exit code and what it printed this time."""
    seen = len(daemon.log)
    daemon.start(wait=False)
    code = daemon.process.wait(timeout=EXIT_TIMEOUT)
    return code, daemon.log[seen:]


# -- the memory content store, installed -----------------------------------------------------------


def test_installed_plugin_appears_in_plugins_ls_with_its_package(memory_content: Distribution, make_daemon: Any):
    daemon = make_daemon()
    row = plugins(daemon)[MEMORY]
    assert (row["type"], row["id"], row["status"], row["reason"]) == ("content", "memory", "ok", "")
    assert row["package"] == MEMORY_PACKAGE
    assert row["exports"] == {"max_bytes": str(64 << 20)}
    assert ctr_plugins(daemon)[("io.containerd.content.v1", "memory")] == "ok"


def test_config_table_configures_and_required_plugins_accepts_the_plugin(
    memory_content: Distribution, make_daemon: Any
):
    daemon = make_daemon('required_plugins = ["content.memory"]\n\n[plugins.content.memory]\nmax_bytes = 1024\n')
    row = plugins(daemon)[MEMORY]
    assert row["status"] == "ok"
    assert row["exports"] == {"max_bytes": "1024"}


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ("bogus = 1", ["plugins.content.memory.bogus", "unknown key"]),
        ('max_bytes = "big"', ["plugins.content.memory.max_bytes", "expected an integer"]),
    ],
    ids=["unknown-key", "wrong-type"],
)
def test_invalid_plugin_config_stops_the_daemon_naming_the_key(
    memory_content: Distribution, make_daemon: Any, table: str, expected: list[str]
):
    daemon = make_daemon(f"[plugins.content.memory]\n{table}\n", start=False)
    code, output = start_expecting_failure(daemon)
    assert code != 0, output
    for words in expected:
        assert words in output


def test_disabled_plugin_is_listed_as_skip(memory_content: Distribution, make_daemon: Any):
    daemon = make_daemon('disabled_plugins = ["content.memory"]\n')
    row = plugins(daemon)[MEMORY]
    assert row["status"] == "skip"
    assert "disabled" in row["reason"]
    assert ctr_plugins(daemon)[("io.containerd.content.v1", "memory")] == "skip"


def test_event_hook_of_a_third_party_plugin_observes_events(
    memory_content: Distribution, make_daemon: Any, tmp_path: Path
):
    event_log = tmp_path / "events.log"
    daemon = make_daemon(f'[plugins.content.memory]\nevent_log = "{event_log}"\n')
    daemon.ctr("namespaces", "create", "team-a")
    daemon.ckctl("namespaces", "create", "team-b")
    daemon.ckctl("namespaces", "rm", "team-b")
    lines = event_log.read_text().splitlines()
    topics = [line.split(" ", 1)[1] for line in lines]
    assert topics == ["/namespaces/create", "/namespaces/create", "/namespaces/delete"], lines


def test_uninstalled_plugin_disappears_and_its_config_table_is_refused(
    reinstalled_after: Distribution, make_daemon: Any
):
    daemon = make_daemon()
    assert MEMORY in plugins(daemon)
    reinstalled_after.uninstall()
    daemon.restart()
    assert MEMORY not in plugins(daemon)
    assert daemon.stop() == 0

    daemon.config_path.write_text("[plugins.content.memory]\nmax_bytes = 1024\n")
    code, output = start_expecting_failure(daemon)
    assert code != 0, output
    assert "[plugins.content.memory]: no such plugin is installed" in output


def test_installs_changes_and_removals_are_seen_at_the_next_start(reinstalled_after: Distribution, make_daemon: Any):
    """No stale entry-point cache: stevedore's keys on the entry_points.txt paths and their mtimes
    packed as 32-bit floats (128 s resolution), so a release of the same distribution with another
    entry point, installed within seconds, would still list the old one through it."""
    reinstalled_after.uninstall()
    daemon = make_daemon()
    steps: list[tuple[str | None, set[str]]] = [
        ("memory", {MEMORY}),  # installed while the daemon runs, seen after a restart
        ("scratch", {"content.scratch"}),  # same distribution and version, entry point renamed
        (None, set()),  # uninstalled
        ("memory", {MEMORY}),  # reinstalled
    ]
    assert not {MEMORY, "content.scratch"} & plugins(daemon).keys()
    for plugin_id, expected in steps:
        if plugin_id is None:
            reinstalled_after.uninstall()
        else:
            reinstalled_after.install(as_id=plugin_id)
        daemon.restart()
        listed = {name for name, row in plugins(daemon).items() if row["package"] == MEMORY_PACKAGE}
        assert listed == expected, f"after installing {plugin_id}"


# -- the memory content store as a library (the installed module, no daemon) ------------------------


@pytest.fixture
def store(memory_content: Distribution) -> Any:
    importlib.invalidate_caches()
    module = importlib.import_module("ck_memory_content")
    return module.MemoryContentStore(module.MemoryConfig(max_bytes=64))


def test_memory_store_writes_resumes_and_reads_blobs(store: Any):
    data = b"hello, content"
    digest = Digest.from_bytes(data)
    with store.writer("ref-1", len(data), digest) as writer:
        writer.write(data[:5])
    assert store.status("ref-1").offset == 5
    with store.writer("ref-1") as writer:
        assert writer.offset == 5
        writer.write(data[5:])
        assert writer.digest() == digest
        assert writer.commit(len(data), digest, {"k": "v"}) == digest
    assert store.list_statuses() == []
    info = store.info(digest)
    assert (info.size, info.labels) == (len(data), {"k": "v"})
    with store.reader_at(digest) as reader:
        store.delete(digest)  # open readers may finish
        assert reader.read(7, 100) == b"content"
    with pytest.raises(NotFound):
        store.info(digest)


def test_memory_store_locks_refs_and_checks_commits(store: Any):
    writer = store.writer("ref")
    with pytest.raises(Unavailable):
        store.writer("ref")
    with pytest.raises(Unavailable):
        store.abort("ref")
    writer.write(b"abc")
    with pytest.raises(FailedPrecondition):
        writer.commit(size=4)
    with pytest.raises(FailedPrecondition):  # commit always releases the writer
        writer.write(b"d")
    assert store.status("ref").offset == 3  # the failed commit kept the ingest
    with store.writer("ref") as again, pytest.raises(FailedPrecondition):
        again.commit(expected=Digest.from_bytes(b"xyz"))
    digest = store.write_blob("other", b"abc")
    with pytest.raises(AlreadyExists):
        store.writer("third", expected_digest=digest)
    with pytest.raises(AlreadyExists), store.writer("ref") as same:
        same.commit()
    with pytest.raises(NotFound):  # an AlreadyExists commit removes the ingest
        store.status("ref")
    with pytest.raises(NotFound):
        store.abort("ref")


def test_memory_store_refuses_writes_beyond_max_bytes(store: Any):
    with store.writer("big") as writer:
        writer.write(b"x" * 60)
        with pytest.raises(FailedPrecondition, match="memory content store is full"):
            writer.write(b"x" * 5)
        writer.truncate(0)
        writer.write(b"y" * 64)
    store.abort("big")
    store.write_blob("fits", b"z" * 64)


def test_memory_store_updates_labels_and_filters(store: Any):
    one = store.write_blob("1", b"one", labels={"a": "1", "b": "2"})
    two = store.write_blob("2", b"two", labels={"a": "2"})
    updated = store.update(Info(one, labels={"b": "", "c": "3"}), ["labels.b", "labels.c"])
    assert updated.labels == {"a": "1", "c": "3"}
    assert store.update(Info(two, labels={"z": "9"})).labels == {"z": "9"}
    with pytest.raises(InvalidArgument):
        store.update(updated, ["size"])
    assert {i.digest for i in store.walk(['labels.a=="1"', "labels.z"])} == {one, two}
    assert [i.digest for i in store.walk([f"digest=={two}"])] == [two]
    with pytest.raises(InvalidArgument):
        store.walk(["labels.a=="])
    with store.writer("ingest-x"), store.writer("ingest-y"):
        assert [s.ref for s in store.list_statuses(["ref~=x$"])] == ["ingest-x"]


def test_memory_store_is_safe_to_share_between_threads(store: Any):
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            store.write_blob(f"ref-{n}", bytes([n]) * 4)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(list(store.walk())) == 16


# -- a plugin that fails at import ----------------------------------------------------------------


def test_broken_plugin_is_listed_as_error_and_the_daemon_serves_on(broken_runtime: Distribution, make_daemon: Any):
    daemon = make_daemon()
    row = plugins(daemon)[BROKEN]
    assert (row["type"], row["id"], row["status"]) == ("runtime", "broken", "error")
    assert BROKEN_REASON in row["reason"]
    assert row["package"] == "containerkit-broken-runtime 0.1.0"
    assert ctr_plugins(daemon)[("io.containerd.runtime.v2", "broken")] == "error"
    assert daemon.ckctl("version").returncode == 0
    assert plugins(daemon)["service.version"]["status"] == "ok"


def test_required_broken_plugin_stops_the_daemon_quickly(broken_runtime: Distribution, make_daemon: Any):
    daemon = make_daemon('required_plugins = ["runtime.broken"]\n', start=False)
    started = time.monotonic()
    code, output = start_expecting_failure(daemon)
    assert code != 0, output
    assert time.monotonic() - started < 10
    assert "runtime.broken" in output
    assert BROKEN_REASON in output
