"""Content digests (``algorithm:hex``), as OCI and containerd write them.

A :class:`Digest` is a validated ``str``: it compares, hashes and serialises as the plain string,
so it goes into protobuf fields, JSON and sqlite unchanged. Supported algorithms are ``sha256``
(the default everywhere), ``sha384`` and ``sha512``; the hex part is lowercase.
"""

from __future__ import annotations

from core.errors import InvalidArgument

__all__ = ["ALGORITHMS", "CANONICAL", "Digest", "Digester"]

ALGORITHMS: dict[str, int] = {"sha256": 64, "sha384": 96, "sha512": 128}
"""Supported algorithms and the length of their hex encoding."""

CANONICAL = "sha256"
"""The algorithm used when none is named."""

_HEX = frozenset("0123456789abcdef")


def _check_algorithm(algorithm: str) -> str:
    if algorithm not in ALGORITHMS:
        raise InvalidArgument(f"unsupported digest algorithm {algorithm!r} (supported: {', '.join(ALGORITHMS)})")
    return algorithm


class Digest(str):
    """A validated ``algorithm:hex`` string. ``Digest(s)`` and ``Digest.parse(s)`` validate alike."""

    __slots__ = ()

    def __new__(cls, value: str) -> Digest:
        if type(value) is cls:
            return value
        if not isinstance(value, str):
            raise InvalidArgument(f"digest must be a string like 'sha256:<64 hex>', not {type(value).__name__}")
        algorithm, sep, encoded = value.partition(":")
        if not sep or not algorithm or not encoded:
            raise InvalidArgument(f"invalid digest {value!r}: expected '<algorithm>:<hex>', e.g. 'sha256:<64 hex>'")
        if algorithm not in ALGORITHMS:
            raise InvalidArgument(
                f"invalid digest {value!r}: unsupported algorithm {algorithm!r} (supported: {', '.join(ALGORITHMS)})"
            )
        length = ALGORITHMS[algorithm]
        if len(encoded) != length:
            raise InvalidArgument(
                f"invalid digest {value!r}: {algorithm} needs {length} hex characters, got {len(encoded)}"
            )
        if not _HEX.issuperset(encoded):
            raise InvalidArgument(f"invalid digest {value!r}: the hex part must be lowercase 0-9a-f")
        return super().__new__(cls, value)

    @classmethod
    def parse(cls, value: str) -> Digest:
        """Validate ``value``; raise :class:`~core.errors.InvalidArgument` saying what is wrong."""
        return cls(value)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, algorithm: str = CANONICAL) -> Digest:
        """The digest of ``data``. InvalidArgument for an unsupported ``algorithm``."""
        digester = Digester(algorithm)
        digester.update(data)
        return digester.digest()

    @property
    def algorithm(self) -> str:
        """``sha256``, ``sha384`` or ``sha512``."""
        return self.partition(":")[0]

    @property
    def hex(self) -> str:
        """The lowercase hex encoding after the colon (containerd's ``Encoded()``)."""
        return self.partition(":")[2]

    def digester(self) -> Digester:
        """A fresh :class:`Digester` of this digest's algorithm, to verify data against it."""
        return Digester(self.algorithm)


class Digester:
    """Incremental hashing: ``update()`` with chunks, ``digest()`` at any point (hashing may go on after)."""

    __slots__ = ("_algorithm", "_hash")

    def __init__(self, algorithm: str = CANONICAL) -> None:
        import hashlib  # deferred: loading OpenSSL costs milliseconds at import time

        self._algorithm = _check_algorithm(algorithm)
        self._hash = hashlib.new(algorithm)

    @property
    def algorithm(self) -> str:
        return self._algorithm

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Add ``data`` to what has been hashed."""
        self._hash.update(data)

    def digest(self) -> Digest:
        """The digest of everything passed to :meth:`update` so far."""
        return Digest(f"{self._algorithm}:{self._hash.hexdigest()}")

    def copy(self) -> Digester:
        """An independent digester with the same state."""
        clone = object.__new__(Digester)
        clone._algorithm = self._algorithm
        clone._hash = self._hash.copy()
        return clone
