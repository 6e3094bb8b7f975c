"""The local content store: blobs as files under a root directory, ingests resumable across restarts.

Layout under ``root`` (each directory created on demand)::

    blobs/<algorithm>/<hex>      committed blobs, read-only (0444), published by fsync + link/rename
    labels/<algorithm>/<hex>     a blob's labels as a JSON object; absent when it has none
    ingest/<sha256(ref) hex>/    one folder per ingest, whatever the ref contains:
        ref                      the ref itself (UTF-8); written last, so a folder without a valid one is debris
        data                     the bytes written so far; its size is the ingest's offset
        startedat, updatedat     ISO 8601 timestamps
        total, expected          what the writer was told to expect (absent: unknown)
        lock                     flock()ed by the process holding a writer on the ref
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from core.content import ContentStore, Info, ReaderAt, Status, Writer
from core.crashpoints import crashpoint
from core.digest import ALGORITHMS, CANONICAL, Digest, Digester
from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from core.filters import Filter
from core.filters import parse as parse_filters
from core.labels import validate_labels
from core.types import Descriptor

__all__ = ["DEFAULT_INGEST_EXPIRY", "MAX_REF_BYTES", "LocalContentStore"]

DEFAULT_INGEST_EXPIRY = 7 * 24 * 3600.0
"""Seconds after its last write when an unlocked ingest counts as stale (containerd's default, 7 days)."""

MAX_REF_BYTES = 4096
"""The longest ref accepted, in UTF-8 bytes. Refs are hashed into folder names, so this bounds only
the ``ref`` file and messages; 4 KiB fits any "<namespace>/<ref>" a client sends."""

_BUFFER = 1 << 20  # small writes gather into a buffer this large before hitting the file
_DIRECT = 64 << 10  # writes at least this large go straight to the file
_READ_CHUNK = 1 << 20
_TMP_PREFIX = ".tmp-"
_HEX = frozenset("0123456789abcdef")


def _now() -> datetime:
    return datetime.now(UTC)


def _from_timestamp(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _show(ref: str) -> str:
    """``ref`` for a message: quoted, and cut short when it is long."""
    return repr(ref) if len(ref) <= 200 else repr(ref[:200]) + f"... ({len(ref)} characters)"


def _checked_digest(value: object) -> Digest:
    """``value`` validated afresh (even a ``Digest``), so that only ``<algorithm>:<hex>`` becomes a path."""
    if isinstance(value, Descriptor):
        value = value.digest
    if not isinstance(value, str):
        raise InvalidArgument(f"digest must be a string like 'sha256:<64 hex>', not {type(value).__name__}")
    return Digest(str(value))  # str() of a str subclass is a plain str: Digest() cannot skip validation


def _ingest_key(ref: object) -> str:
    """The folder name of ingest ``ref`` (sha256 of its UTF-8 bytes). InvalidArgument for a bad ref."""
    if not isinstance(ref, str):
        raise InvalidArgument(f"ingest ref must be a string, not {type(ref).__name__}")
    if not ref:
        raise InvalidArgument("an ingest needs a non-empty ref")
    try:
        encoded = ref.encode()
    except UnicodeEncodeError:
        raise InvalidArgument(f"ingest ref {_show(ref)} is not valid UTF-8") from None
    if len(encoded) > MAX_REF_BYTES:
        raise InvalidArgument(f"ingest ref {_show(ref)} is {len(encoded)} bytes long; at most {MAX_REF_BYTES}")
    return Digest.from_bytes(encoded).hex


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_small(path: Path, text: str) -> None:
    with open(path, "wb") as f:  # binary: a ref is stored byte for byte, "\r" and all
        f.write(text.encode())


def _read_small(path: Path) -> str | None:
    """The text of a small ingest file; None when it is absent, too long for a ref or not UTF-8."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_REF_BYTES + 1)
        return data.decode() if len(data) <= MAX_REF_BYTES else None
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return None


def _hash_file(fd: int, size: int, algorithm: str) -> Digester:
    """A digester fed with the first ``size`` bytes of the file open as ``fd``."""
    digester = Digester(algorithm)
    buffer = bytearray(_READ_CHUNK)
    view = memoryview(buffer)
    offset = 0
    try:
        while offset < size:
            n = os.preadv(fd, [view[: min(_READ_CHUNK, size - offset)]], offset)
            if n == 0:
                raise FailedPrecondition(f"ingest data shrank to {offset} bytes while being read ({size} expected)")
            digester.update(view[:n])
            offset += n
    finally:
        view.release()
    return digester


def _is_stale_tmp(name: str) -> bool:
    """Whether ``name`` is a temp file (``.tmp-<pid>-...``) whose writing process is gone."""
    try:
        pid = int(name[len(_TMP_PREFIX) :].split("-", 1)[0])
    except ValueError:
        return True
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class _Reader(ReaderAt):
    """Reads one blob through an open file descriptor, so a concurrent delete does not disturb it."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd: int | None = fd
        self._size = size
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise InvalidArgument(f"cannot read {size} bytes at offset {offset}: both must be >= 0")
        fd = self._fd
        if fd is None:
            raise FailedPrecondition("reader is closed")
        size = min(size, self._size - offset)
        if size <= 0:
            return b""
        data = os.pread(fd, size, offset)
        if len(data) == size or not data:
            return data
        parts = [data]  # a short read before the end: keep reading
        got = len(data)
        while got < size and (more := os.pread(fd, size - got, offset + got)):
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class _Writer(Writer):
    """Appends to one locked ingest of a :class:`LocalContentStore`, hashing as the bytes reach the file.

    Small writes gather in a buffer of up to 1 MiB; large ones go straight to the file. Only bytes
    that reached the file are hashed and counted as flushed, so after an I/O error (a full disk) the
    digest still matches the file and the writer can go on (or be truncated, closed, aborted).
    """

    def __init__(
        self,
        store: LocalContentStore,
        ref: str,
        directory: Path,
        lock_fd: int,
        data_fd: int,
        offset: int,
        digester: Digester,
        status: Status,
    ) -> None:
        self._store = store
        self._ref = ref
        self._dir = directory
        self._lock_fd: int | None = lock_fd
        self._fd: int | None = data_fd
        self._flushed = offset
        self._digester = digester
        self._buffer = bytearray()
        self._status = status
        self._removed = False  # set once a commit removed the ingest
        self._updated_at = status.updated_at
        self._mutex = threading.RLock()

    @property
    def ref(self) -> str:
        return self._ref

    @property
    def offset(self) -> int:
        return self._flushed + len(self._buffer)

    def _check_open(self) -> int:
        if self._fd is None:
            raise FailedPrecondition(f"writer for {_show(self._ref)} is closed")
        return self._fd

    def _write_through(self, fd: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` at the end of the file, hashing each piece once it is written."""
        with memoryview(data) as whole, whole.cast("B") as view:
            done, size = 0, len(view)
            while done < size:
                try:
                    n = os.write(fd, view[done:])
                except OSError as err:
                    if err.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise OSError(
                            err.errno,
                            f"{os.strerror(err.errno).lower()} writing ingest ref {_show(self._ref)} "
                            f"({self._flushed} bytes written)",
                            str(self._dir / "data"),
                        ) from err
                    raise
                self._digester.update(view[done : done + n])
                done += n
                self._flushed += n

    def _flush(self) -> None:
        if self._buffer:
            fd = self._check_open()
            pending, self._buffer = self._buffer, bytearray()  # dropped on failure: the file is the truth
            self._write_through(fd, pending)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        with self._mutex:
            fd = self._check_open()
            self._updated_at = _now()
            if size >= _DIRECT:
                self._flush()
                self._write_through(fd, data)
            else:
                self._buffer += data
                if len(self._buffer) >= _BUFFER:
                    self._flush()
        return size

    def digest(self) -> Digest:
        with self._mutex:
            self._check_open()
            self._flush()
            return self._digester.digest()

    def commit(self, size: int = 0, expected: Digest | None = None, labels: Mapping[str, str] | None = None) -> Digest:
        with self._mutex:
            fd = self._check_open()
            try:
                self._flush()  # first: whatever fails below, buffered bytes are kept for a retry
                if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                    raise InvalidArgument(f"invalid commit size {size!r} for {_show(self._ref)}: must be >= 0")
                wanted = None if expected is None else _checked_digest(expected)
                checked = validate_labels(labels or {})
                os.fsync(fd)
                if size and size != self._flushed:
                    raise FailedPrecondition(
                        f"{_show(self._ref)}: unexpected commit size {self._flushed}, expected {size}"
                    )
                actual = self._digester.digest()
                if wanted is not None and wanted.algorithm != actual.algorithm:
                    actual = _hash_file(fd, self._flushed, wanted.algorithm).digest()
                if wanted is not None and actual != wanted:
                    raise FailedPrecondition(
                        f"{_show(self._ref)}: unexpected commit digest {actual}, expected {wanted}"
                    )
                try:
                    self._store._publish(self._dir, fd, actual, checked)
                except AlreadyExists:
                    self._removed = True
                    raise
                self._removed = True
                return actual
            finally:
                self._release()

    def truncate(self, size: int) -> None:
        with self._mutex:
            fd = self._check_open()
            if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= self.offset:
                raise InvalidArgument(f"cannot truncate {_show(self._ref)} to {size!r} bytes: it holds {self.offset}")
            self._flush()
            os.ftruncate(fd, size)
            os.lseek(fd, size, os.SEEK_SET)
            self._digester = _hash_file(fd, size, self._digester.algorithm)
            self._flushed = size
            self._updated_at = _now()

    def status(self) -> Status:
        with self._mutex:
            self._check_open()
            return self._live_status()

    def _live_status(self) -> Status:
        s = self._status
        return Status(self._ref, self.offset, s.total, s.expected, s.started_at, self._updated_at)

    def close(self) -> None:
        with self._mutex:
            if self._fd is None:
                return
            try:
                self._flush()
            finally:
                self._release()

    def _release(self) -> None:
        """Close the files, record when the ingest was last written, drop the ref's locks."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        if not self._removed:
            with contextlib.suppress(OSError):  # best effort (a full disk): the data's mtime tells the same
                _write_small(self._dir / "updatedat", self._updated_at.isoformat())
        lock_fd, self._lock_fd = self._lock_fd, None
        if lock_fd is not None:
            os.close(lock_fd)  # releases the flock
        self._store._forget_writer(self._ref, self)


class LocalContentStore(ContentStore):
    """A :class:`core.content.ContentStore` on the local filesystem; see the module doc for the layout.

    Usable as a library: ``LocalContentStore(root)`` creates ``root`` if needed, removes debris of
    interrupted commits and ingests untouched for ``ingest_expiry`` seconds. Several threads and
    several processes may share a root: a ref is locked in-process (a dict) and across processes
    (``flock`` on the ingest's ``lock`` file), and blobs appear atomically, complete and fsynced.

    Labels: the metadata layer keeps each namespace's labels itself, so the backend's labels matter
    only to library users; they are kept anyway, honestly and persistently, in a small JSON sidecar
    per blob (``labels/<algorithm>/<hex>``, written atomically), and removed with the blob.

    Blobs are local files, so it :attr:`~core.content.ContentStore.reads_locally`.

    Refs are opaque non-empty strings of at most :data:`MAX_REF_BYTES` UTF-8 bytes (NUL, ``/`` and
    ``..`` included); they only ever name a folder through their sha256, never as a path.
    """

    reads_locally = True

    def __init__(self, root: Path | str, ingest_expiry: float = DEFAULT_INGEST_EXPIRY) -> None:
        if isinstance(ingest_expiry, bool) or not isinstance(ingest_expiry, int | float) or ingest_expiry <= 0:
            raise ValueError(f"ingest_expiry must be a positive number of seconds, got {ingest_expiry!r}")
        self.root = Path(root)
        self.ingest_expiry = float(ingest_expiry)
        self._blobs = self.root / "blobs"
        self._blobs_dir = str(self._blobs)
        self._labels = self.root / "labels"
        self._ingests = self.root / "ingest"
        self._lock = threading.Lock()
        self._writers: dict[str, _Writer | None] = {}  # None: being opened or removed
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for directory in (self._blobs, self._labels, self._ingests):
            directory.mkdir(mode=0o700, exist_ok=True)
        self._remove_debris()
        self.cleanup_stale_ingests()

    # -- paths ---------------------------------------------------------------------------------

    def _blob_path(self, digest: Digest) -> Path:
        return self._blobs / digest.algorithm / digest.hex

    def _blob_file(self, digest: Digest) -> str:
        """:meth:`_blob_path` as a string, built without pathlib (a few times cheaper) for the read paths."""
        algorithm, _, encoded = digest.partition(":")
        return f"{self._blobs_dir}/{algorithm}/{encoded}"

    def _labels_path(self, digest: Digest) -> Path:
        return self._labels / digest.algorithm / digest.hex

    # -- blobs ---------------------------------------------------------------------------------

    def _read_labels(self, digest: Digest) -> tuple[dict[str, str], float | None]:
        """The blob's labels and when they last changed (None: never set)."""
        path = self._labels_path(digest)
        try:
            with open(path, encoding="utf-8") as f:
                labels = json.load(f)
                mtime = os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return {}, None
        except (ValueError, UnicodeDecodeError) as err:
            raise FailedPrecondition(f"labels of content {digest} are unreadable ({path}): {err}") from None
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise FailedPrecondition(f"labels of content {digest} are not a JSON object of strings ({path})")
        return labels, mtime

    def _write_labels(self, digest: Digest, labels: Mapping[str, str], keep_empty: bool) -> None:
        """Store ``labels`` for ``digest`` atomically; without labels (and not ``keep_empty``) remove the file."""
        path = self._labels_path(digest)
        if not labels and not keep_empty:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = path.parent / f"{_TMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{digest.hex}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(dict(labels), f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    def _info(self, digest: Digest) -> Info:
        try:
            st = os.stat(self._blob_file(digest))
        except FileNotFoundError:
            raise NotFound(f"content digest {digest}: not found") from None
        labels, labelled_at = self._read_labels(digest)
        updated = max(st.st_mtime, labelled_at or 0.0)
        return Info(digest, st.st_size, _from_timestamp(st.st_mtime), _from_timestamp(updated), labels)

    def info(self, digest: Digest) -> Info:
        return self._info(_checked_digest(digest))

    def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        digest = _checked_digest(info.digest)
        with self._lock:
            current = self._info(digest)
            labels = dict(current.labels)
            for path in fieldpaths or ("labels",):
                if path == "labels":
                    labels = dict(info.labels)
                elif path.startswith("labels.") and (key := path.removeprefix("labels.")):
                    value = info.labels.get(key, "")
                    labels[key] = value
                    if not value:
                        del labels[key]
                else:
                    raise InvalidArgument(f"cannot update field {path!r} of content {digest}: only labels")
            self._write_labels(digest, validate_labels(labels), keep_empty=True)
            return self._info(digest)

    def walk(self, filters: Sequence[str] = ()) -> Iterator[Info]:
        matches = parse_filters(filters)  # parsed now: a malformed filter fails the call
        return self._walk(matches)

    def _walk(self, matches: Filter) -> Iterator[Info]:
        for algorithm, length in ALGORITHMS.items():
            try:
                names = sorted(os.listdir(self._blobs / algorithm))
            except FileNotFoundError:
                continue
            for name in names:
                if len(name) != length or not _HEX.issuperset(name):
                    continue
                try:
                    info = self._info(Digest(f"{algorithm}:{name}"))
                except NotFound:
                    continue  # deleted meanwhile
                if matches({"digest": info.digest, "size": info.size, "labels": info.labels}):
                    yield info

    def delete(self, digest: Digest) -> None:
        digest = _checked_digest(digest)
        with self._lock:
            try:
                os.unlink(self._blob_path(digest))
            except FileNotFoundError:
                raise NotFound(f"content digest {digest}: not found") from None
            self._labels_path(digest).unlink(missing_ok=True)

    def reader_at(self, target: Descriptor | Digest) -> ReaderAt:
        digest = _checked_digest(target)
        try:
            fd = os.open(self._blob_file(digest), os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise NotFound(f"content digest {digest}: not found") from None
        try:
            size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        return _Reader(fd, size)

    # -- ingests -------------------------------------------------------------------------------

    def writer(self, ref: str, expected_size: int = 0, expected_digest: Digest | None = None) -> Writer:
        key = _ingest_key(ref)
        if isinstance(expected_size, bool) or not isinstance(expected_size, int) or expected_size < 0:
            raise InvalidArgument(f"invalid expected size {expected_size!r} for {_show(ref)}: must be >= 0")
        expected = None if expected_digest is None else _checked_digest(expected_digest)
        if expected is not None and self._blob_path(expected).exists():
            raise AlreadyExists(f"content {expected}: already exists")
        self._reserve(ref)
        try:
            lock_fd = self._lock_ingest(key, ref, create=True)
            try:
                writer = self._open_ingest(self._ingests / key, ref, lock_fd, expected_size, expected)
            except BaseException:
                os.close(lock_fd)
                raise
        except BaseException:
            self._forget_writer(ref, None)
            raise
        with self._lock:
            self._writers[ref] = writer
        return writer

    def _reserve(self, ref: str) -> None:
        with self._lock:
            if ref in self._writers:
                raise Unavailable(f"ref {_show(ref)} is locked (a writer holds it; retry later)")
            self._writers[ref] = None

    def _forget_writer(self, ref: str, writer: _Writer | None) -> None:
        with self._lock:
            if self._writers.get(ref) is writer:
                del self._writers[ref]

    def _lock_ingest(self, key: str, ref: str, create: bool) -> int:
        """flock the ingest folder ``key`` (created when ``create``); its lock fd. Unavailable when held
        elsewhere, NotFound when the folder is absent and not ``create``."""
        directory = self._ingests / key
        lock_path = directory / "lock"
        for _ in range(100):  # retried only while another process removes the folder under us
            if create:
                directory.mkdir(mode=0o700, exist_ok=True)
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            except FileNotFoundError:
                if not create:
                    raise NotFound(f"ingest ref {_show(ref)}: not found") from None
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise Unavailable(f"ref {_show(ref)} is locked (another process writes it; retry later)") from None
            try:
                same = os.stat(lock_path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # the folder was removed and maybe recreated meanwhile: lock the current one
        raise Unavailable(f"ref {_show(ref)}: its ingest folder keeps changing; retry later")

    def _open_ingest(
        self, directory: Path, ref: str, lock_fd: int, expected_size: int, expected: Digest | None
    ) -> _Writer:
        data_path = directory / "data"
        resuming = _read_small(directory / "ref") == ref
        if resuming:
            total = self._read_total(directory)
            if expected_size and total and expected_size != total:
                raise FailedPrecondition(
                    f"ingest {_show(ref)} was started with total size {total}, not {expected_size}"
                )
            if expected_size and not total:
                _write_small(directory / "total", str(expected_size))
            total = total or expected_size
            if expected is not None:
                _write_small(directory / "expected", expected)
            else:
                expected = self._read_expected(directory)
            try:
                published = os.stat(data_path, follow_symlinks=False).st_nlink > 1
            except FileNotFoundError:
                published = False
            if published:  # an interrupted commit already made this data a blob: start afresh
                data_path.unlink()
            fd = os.open(data_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                os.fchmod(fd, 0o644)  # 0444 after a commit interrupted before publishing
                offset = os.fstat(fd).st_size
                os.lseek(fd, offset, os.SEEK_SET)
                digester = _hash_file(fd, offset, expected.algorithm if expected else CANONICAL)
                started = self._read_time(directory / "startedat") or _from_timestamp(os.fstat(fd).st_ctime)
                updated = self._updated_at(directory)
            except BaseException:
                os.close(fd)
                raise
        else:  # new, or debris of a folder whose creation was interrupted: (re)build it, ref last
            (directory / "ref").unlink(missing_ok=True)
            for name in ("total", "expected"):
                (directory / name).unlink(missing_ok=True)
            data_path.unlink(missing_ok=True)
            fd = os.open(data_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            try:
                started = updated = _now()
                offset, total = 0, expected_size
                digester = Digester(expected.algorithm if expected else CANONICAL)
                _write_small(directory / "startedat", started.isoformat())
                _write_small(directory / "updatedat", updated.isoformat())
                if total:
                    _write_small(directory / "total", str(total))
                if expected is not None:
                    _write_small(directory / "expected", expected)
                _write_small(directory / "ref", ref)
            except BaseException:
                os.close(fd)
                raise
        status = Status(ref, offset, total, expected, started, updated)
        return _Writer(self, ref, directory, lock_fd, fd, offset, digester, status)

    def _publish(self, directory: Path, fd: int, digest: Digest, labels: Mapping[str, str]) -> None:
        """Make the fsynced ingest data in ``directory`` (open as ``fd``) the blob ``digest``; remove the ingest.

        AlreadyExists (ingest removed) when the blob is there already.
        """
        target = self._blob_path(digest)
        with self._lock:
            if target.exists():
                self._remove_ingest_dir(directory)
                raise AlreadyExists(f"content {digest}: already exists")
            if not target.parent.is_dir():
                target.parent.mkdir(mode=0o700, exist_ok=True)
                _fsync_dir(self._blobs)
            self._write_labels(digest, labels, keep_empty=False)
            os.utime(fd)  # a blob's mtime is its creation time
            os.fchmod(fd, 0o444)
            crashpoint("content.commit.before-rename")
            try:
                try:
                    os.link(directory / "data", target)  # atomic, and never replaces a blob
                except FileExistsError:
                    self._remove_ingest_dir(directory)
                    raise AlreadyExists(f"content {digest}: already exists") from None
                except OSError as err:
                    if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                        raise
                    os.rename(directory / "data", target)  # no hard links on this filesystem
            except BaseException:
                if (directory / "data").exists():
                    os.fchmod(fd, 0o644)
                raise
            _fsync_dir(target.parent)
            self._remove_ingest_dir(directory)

    @staticmethod
    def _remove_ingest_dir(directory: Path) -> None:
        """Remove an ingest folder whose lock the caller holds; the lock file goes last."""
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return
        for name in names:
            if name != "lock":
                (directory / name).unlink(missing_ok=True)
        (directory / "lock").unlink(missing_ok=True)
        try:
            directory.rmdir()
        except OSError as err:
            if err.errno not in (errno.ENOENT, errno.ENOTEMPTY):
                raise  # ENOTEMPTY: another process took the folder over meanwhile; it is theirs

    @staticmethod
    def _read_total(directory: Path) -> int:
        text = _read_small(directory / "total")
        try:
            return max(int(text), 0) if text else 0
        except ValueError:
            return 0

    @staticmethod
    def _read_expected(directory: Path) -> Digest | None:
        text = _read_small(directory / "expected")
        try:
            return Digest(text) if text else None
        except InvalidArgument:
            return None

    @staticmethod
    def _read_time(path: Path) -> datetime | None:
        text = _read_small(path)
        try:
            value = datetime.fromisoformat(text) if text else None
        except ValueError:
            return None
        return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)

    def _updated_at(self, directory: Path) -> datetime:
        """When the ingest was last written: its ``updatedat`` record or its data's mtime, the later."""
        candidates = [t for t in (self._read_time(directory / "updatedat"),) if t is not None]
        with contextlib.suppress(FileNotFoundError):
            candidates.append(_from_timestamp(os.stat(directory / "data").st_mtime))
        return max(candidates, default=self._read_time(directory / "startedat") or datetime.fromtimestamp(0, UTC))

    def _stored_ref(self, key: str) -> str | None:
        """The ref of ingest folder ``key``, or None when the folder is not a complete ingest."""
        ref = _read_small(self._ingests / key / "ref")
        if not ref:
            return None
        try:
            return ref if _ingest_key(ref) == key else None
        except InvalidArgument:
            return None

    def _stored_status(self, key: str, ref: str) -> Status:
        directory = self._ingests / key
        started = self._read_time(directory / "startedat")
        updated = self._updated_at(directory)
        try:
            offset = os.stat(directory / "data").st_size
        except FileNotFoundError:
            offset = 0
        total, expected = self._read_total(directory), self._read_expected(directory)
        return Status(ref, offset, total, expected, started or updated, updated)

    def _status(self, key: str, ref: str) -> Status | None:
        """The status of ingest ``ref`` (folder ``key``): live from its writer when this process holds it."""
        with self._lock:
            writer = self._writers.get(ref)
        if writer is not None:
            with writer._mutex:
                if writer._fd is not None:
                    return writer._live_status()
        if self._stored_ref(key) != ref:
            return None
        try:
            return self._stored_status(key, ref)
        except FileNotFoundError:
            return None  # removed meanwhile

    def status(self, ref: str) -> Status:
        status = self._status(_ingest_key(ref), ref)
        if status is None:
            raise NotFound(f"ingest ref {_show(ref)}: not found")
        return status

    def list_statuses(self, filters: Sequence[str] = ()) -> list[Status]:
        matches = parse_filters(filters)
        statuses = []
        for key in sorted(os.listdir(self._ingests)):
            ref = self._stored_ref(key)
            if ref is None or not matches({"ref": ref}):
                continue
            status = self._status(key, ref)
            if status is not None:
                statuses.append(status)
        return statuses

    def abort(self, ref: str) -> None:
        key = _ingest_key(ref)
        if not (self._ingests / key).is_dir() or self._stored_ref(key) != ref:
            raise NotFound(f"ingest ref {_show(ref)}: not found")
        if not self._remove_ingest(key, ref):
            raise NotFound(f"ingest ref {_show(ref)}: not found")

    def _remove_ingest(self, key: str, ref: str | None) -> bool:
        """Remove ingest folder ``key`` unless a writer holds it (Unavailable). False when already gone."""
        if ref is not None:
            self._reserve(ref)
        try:
            lock_fd = self._lock_ingest(key, ref or key, create=False)
            try:
                if ref is not None and self._stored_ref(key) != ref:
                    return False
                self._remove_ingest_dir(self._ingests / key)
                return True
            finally:
                os.close(lock_fd)
        finally:
            if ref is not None:
                self._forget_writer(ref, None)

    # -- maintenance ---------------------------------------------------------------------------

    def cleanup_stale_ingests(self, now: datetime | float | None = None) -> list[str]:
        """Remove ingests that no writer holds and nobody wrote for ``ingest_expiry`` seconds before
        ``now`` (default: the current time); also debris folders without a valid ``ref``. Returns the
        refs removed."""
        if now is None:
            now = _now()
        elif not isinstance(now, datetime):
            now = _from_timestamp(now)
        removed = []
        for key in sorted(os.listdir(self._ingests)):
            directory = self._ingests / key
            ref = self._stored_ref(key)
            try:
                if ref is None:
                    if directory.is_dir():
                        self._remove_ingest(key, None)  # debris: an interrupted creation
                    continue
                with self._lock:
                    if ref in self._writers:
                        continue
                if (now - self._updated_at(directory)).total_seconds() < self.ingest_expiry:
                    continue
                if self._remove_ingest(key, ref):
                    removed.append(ref)
            except (Unavailable, NotFound):
                continue  # in use, or removed meanwhile
        return removed

    def _remove_debris(self) -> None:
        """Clean up after interrupted commits: temp files, orphan labels, ingests already published."""
        for parent in (self._blobs, self._labels):
            for algorithm in ALGORITHMS:
                directory = parent / algorithm
                try:
                    names = os.listdir(directory)
                except FileNotFoundError:
                    continue
                for name in names:
                    if name.startswith(_TMP_PREFIX):
                        stale = _is_stale_tmp(name)
                    else:  # labels of a blob that is not there (its commit failed after writing them)
                        stale = parent is self._labels and not (self._blobs / algorithm / name).exists()
                    if stale:
                        (directory / name).unlink(missing_ok=True)
        for key in os.listdir(self._ingests):
            try:
                published = os.stat(self._ingests / key / "data", follow_symlinks=False).st_nlink > 1
            except (FileNotFoundError, NotADirectoryError):
                continue
            if published:  # the commit linked the data into blobs/ and stopped before removing the ingest
                with contextlib.suppress(Unavailable):
                    self._remove_ingest(key, None)

    def close(self) -> None:
        """Close the writers still open (their ingests persist, resumable)."""
        with self._lock:
            writers = [w for w in self._writers.values() if w is not None]
        for writer in writers:
            writer.close()
