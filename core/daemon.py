"""containerkitd: the daemon's life cycle.

Start: create root (0711) and state dirs, lock the root against a second daemon, open the metadata
store, load plugins, serve gRPC on the unix socket (0660). Stop on SIGTERM/SIGINT: refuse new calls,
let in-flight ones finish, close plugins in reverse order, remove the socket, exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import fcntl
import gc
import logging
import os
import signal
import socket
import sqlite3
import stat
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

from core import __version__, logs
from core.config import LOG_LEVELS, Config, ConfigError, load_config
from core.errors import ContainerkitError
from core.plugin import Status

log = logging.getLogger("containerkit.daemon")

SOCKET_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL
SHUTDOWN_GRACE_SECONDS = 10.0


class StartupError(Exception):
    """The daemon cannot start; the message says what and why."""


class Daemon:
    """One running containerkitd. :meth:`start` returns once it serves; :meth:`stop` undoes it all."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.root = Path(config.root).absolute()
        self.state = Path(config.state).absolute()
        self.address = Path(config.grpc.address).absolute()
        self._lock_fd: int | None = None
        self._server: Any = None
        self._loader: Any = None
        self._metadata: Any = None
        self._events: Any = None

    def start(self) -> None:
        """Bring the daemon up. Raises StartupError, leaving nothing behind, when it cannot."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self._check_address()
        _make_dir(self.root, "root")
        _make_dir(self.state, "state")
        self._lock_root()
        self._refuse_live_socket()

        from core.events import Exchange
        from core.hookspecs import new_plugin_manager
        from core.loader import PluginLoader, RequiredPluginError
        from core.metadata import MetadataStore

        try:
            self._metadata = MetadataStore(self.root / "meta.db")
        except (ContainerkitError, OSError, sqlite3.Error) as err:
            raise StartupError(f"cannot open the metadata store {self.root / 'meta.db'}: {err}") from None
        hooks = new_plugin_manager()
        self._events = Exchange(hooks)
        self._loader = PluginLoader(self.config, metadata=self._metadata, hooks=hooks, events=self._events)
        try:
            records = self._loader.load()
        except (ConfigError, RequiredPluginError) as err:
            raise StartupError(str(err)) from None
        for record in records.values():
            if record.status is not Status.OK:
                log.warning("plugin %s is %s: %s", record.name, record.status, record.reason)
        self._serve(records)

    def _check_address(self) -> None:
        for path in dict.fromkeys([self.address, self._bind_address()]):  # a staging name is bound too
            if len(os.fsencode(path)) > SOCKET_PATH_MAX:
                raise StartupError(
                    f"socket path {path} is {len(os.fsencode(path))} bytes; unix sockets allow at most "
                    f"{SOCKET_PATH_MAX}: choose a shorter --address"
                )

    def _lock_root(self) -> None:
        lock_path = self.root / "containerkitd.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StartupError(
                f"root {self.root} is in use by another containerkitd (pid {holder}); stop it or use another --root"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _refuse_live_socket(self) -> None:
        """gRPC replaces an existing socket file silently; refuse if a live server still answers on it."""
        if not self.address.exists():
            return
        if not stat.S_ISSOCK(self.address.stat().st_mode):
            raise StartupError(f"{self.address} exists and is not a socket; remove it or use another --address")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.address))
        except OSError:
            self.address.unlink(missing_ok=True)  # stale: nobody listens
            return
        finally:
            probe.close()
        raise StartupError(f"socket {self.address} is served by another process; stop it or use another --address")

    def _serve(self, records: dict[str, Any]) -> None:
        from core.server import new_server

        server = new_server(self.config.grpc)
        for record in records.values():
            if record.type == "service" and record.status is Status.OK:
                try:
                    record.instance.register(server)
                except Exception as err:
                    record.status, record.reason = Status.ERROR, f"registering the service failed: {err}"
                    log.error("service %s failed to register", record.name, exc_info=True)
        self._listen(server)
        # What start-up made (modules, plugins, generated message classes: ~50,000 objects) lives as long as the
        # daemon: out of the collector's sight, a collection during a burst of calls scans ~10,000 objects
        # instead of ~60,000 (gen1 and gen2 pauses of 10-200 ms per 50 containers started, measured).
        gc.freeze()
        server.start()
        self._server = server
        log.info("containerkitd %s serving on %s", __version__, self.address, extra={"root": str(self.root)})

    def _listen(self, server: Any) -> None:
        """Bind ``server`` to the socket, 0660 and root:``[grpc] gid`` from the first moment anyone can
        connect: with another group it is bound under a staging name, given its group, then renamed into place."""
        _make_dir(self.address.parent, "socket directory")
        staging = self._bind_address()
        previous_umask = os.umask(0o117)  # the socket is born 0660, never briefly wider
        try:
            server.add_insecure_port(f"unix:{staging}")
        except RuntimeError as err:
            raise StartupError(f"cannot listen on {self.address}: {err}") from None
        finally:
            os.umask(previous_umask)
        if staging != self.address:
            os.chown(staging, 0, self.config.grpc.gid)
            staging.rename(self.address)

    def _bind_address(self) -> Path:
        """Where the socket is bound: its address, or with a group other than root's a staging name beside it."""
        if self.config.grpc.gid == 0:
            return self.address
        return self.address.with_name(f".containerkitd-{os.getpid()}")

    def stop(self) -> None:
        """Stop serving (in-flight calls get a grace period), close plugins and the store, unlock."""
        if self._server is not None:
            stopped = self._server.stop(SHUTDOWN_GRACE_SECONDS)  # from here on new calls are refused
            self._notify_services_stopping()
            stopped.wait()
            self._server = None
            self.address.unlink(missing_ok=True)
        if self._loader is not None:
            self._loader.close()
            self._loader = None
        if self._events is not None:
            self._events.close()
            self._events = None
        if self._metadata is not None:
            self._metadata.close()
            self._metadata = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _notify_services_stopping(self) -> None:
        """Tell service plugins the daemon is stopping, so they can end long-lived streams (see GrpcService)."""
        records = self._loader.records.values() if self._loader is not None else ()
        for record in records:
            stopping = getattr(record.instance, "stopping", None)
            if record.type != "service" or record.status is not Status.OK or stopping is None:
                continue
            try:
                stopping()
            except Exception:
                log.exception("service %s failed to prepare for shutdown", record.name)


def _make_dir(path: Path, what: str) -> None:
    try:
        if not path.is_dir():
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o711)  # exactly, whatever the umask (mkdir's mode is masked by it)
        # A real write, not os.access(): it reports EROFS as such, and root's EACCES exemption correctly.
        probe = path / f".containerkitd-write-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise StartupError(f"cannot use {path} as the {what}: {err.strerror}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="containerkitd", description="containerkit daemon (containerd's v1 API)")
    parser.add_argument("--config", "-c", type=Path, help="TOML config file (default: built-in defaults)")
    parser.add_argument("--root", type=Path, help="persistent state directory (overrides the config's root)")
    parser.add_argument("--state", type=Path, help="runtime state directory (overrides the config's state)")
    parser.add_argument("--address", "-a", help="unix socket to serve on (overrides [grpc] address)")
    parser.add_argument("--log-level", "-l", choices=LOG_LEVELS, help="log level")
    parser.add_argument("--version", "-v", action="version", version=f"containerkitd {__version__}")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    """The config file's values with the command line's overrides applied."""
    config = load_config(args.config)
    if args.root:
        config.root = args.root
    if args.state:
        config.state = args.state
    if args.address:
        config.grpc.address = args.address
    if args.log_level:
        config.debug.level = args.log_level
    return config


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = build_config(args)
    except ConfigError as err:
        print(f"containerkitd: {err}", file=sys.stderr)
        return 2
    logs.setup(config.debug.level)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # as containerd: SIGUSR1 dumps every stack to stderr
    daemon = Daemon(config)
    try:
        daemon.start()
    except StartupError as err:
        print(f"containerkitd: {err}", file=sys.stderr)
        return 1
    while not stopping.wait(3600):
        pass
    daemon.stop()
    log.info("containerkitd stopped")
    _exit_at_once(0)


def _exit_at_once(code: int) -> NoReturn:
    """Exit once :meth:`Daemon.stop` has released everything: without waiting for threads it does not own (a
    handler of a call cancelled at the end of the grace period that has not noticed yet) and without tearing
    down the heap (about half a second of garbage collection), so a stop is bounded and quick."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
