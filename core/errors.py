"""The one error vocabulary of containerkit, from the stores up to the gRPC status.

Every layer raises these (or lets ``OSError`` escape for genuine I/O faults); the gRPC layer maps
them to the status codes containerd uses, so clients such as ``ctr`` print the right message.
Messages name what failed and, where it helps, what to do about it.
"""

from __future__ import annotations


class ContainerkitError(Exception):
    """Base of all expected failures. ``grpc_code`` is the name of a ``grpc.StatusCode`` member."""

    grpc_code = "UNKNOWN"


class NotFound(ContainerkitError):
    """The named object does not exist (in this namespace)."""

    grpc_code = "NOT_FOUND"


class AlreadyExists(ContainerkitError):
    """An object with that name or key exists already."""

    grpc_code = "ALREADY_EXISTS"


class InvalidArgument(ContainerkitError):
    """The request itself is malformed: a bad name, label, digest, filter or field path."""

    grpc_code = "INVALID_ARGUMENT"


class FailedPrecondition(ContainerkitError):
    """The request is well formed but the system is not in a state that allows it."""

    grpc_code = "FAILED_PRECONDITION"


class Unavailable(ContainerkitError):
    """The resource is busy or temporarily out of reach; retrying later may succeed."""

    grpc_code = "UNAVAILABLE"


class Unauthenticated(ContainerkitError):
    """A remote service (a registry) refused the credentials given, or wants credentials none were given for.

    The message names the host, never the credentials."""

    grpc_code = "UNAUTHENTICATED"


class OutOfRange(ContainerkitError):
    """An offset lies outside the object (a read past a blob's end, a write away from an ingest's offset)."""

    grpc_code = "OUT_OF_RANGE"


class NotImplementedByPlugin(ContainerkitError):
    """The plugin serving the request does not support this operation."""

    grpc_code = "UNIMPLEMENTED"


ERRORS_BY_CODE: dict[str, type[ContainerkitError]] = {
    cls.grpc_code: cls
    for cls in (
        NotFound,
        AlreadyExists,
        InvalidArgument,
        FailedPrecondition,
        Unavailable,
        Unauthenticated,
        OutOfRange,
        NotImplementedByPlugin,
    )
}
