"""Validation of labels (string key/value pairs on namespaces, images, containers...), as containerd's ``labels``.

A label's key must be non-empty, and key plus value together may take at most
:data:`MAX_SIZE` bytes in UTF-8. Values may be empty: where labels are *set* one at a time an empty
value means "remove the label" (that is the caller's semantics, not validation's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from core.errors import InvalidArgument

__all__ = ["MAX_SIZE", "merge_label_paths", "validate_label", "validate_labels"]

MAX_SIZE = 4096
"""Maximum size of a label's key and value together, in UTF-8 bytes."""

_KEY_PREFIX_IN_MESSAGE = 10


def validate_label(key: str, value: str) -> None:
    """Raise :class:`InvalidArgument` unless ``key`` is non-empty and key + value fit in :data:`MAX_SIZE` bytes."""
    if not key:
        raise InvalidArgument("label key must not be empty")
    if len(key.encode()) + len(value.encode()) > MAX_SIZE:
        raise InvalidArgument(
            f"label key and value greater than maximum size ({MAX_SIZE} bytes), key: {key[:_KEY_PREFIX_IN_MESSAGE]}"
        )


def validate_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Validate every pair of ``labels`` (see :func:`validate_label`) and return them as a new dict."""
    for key, value in labels.items():
        validate_label(key, value)
    return dict(labels)


def merge_label_paths(
    current: Mapping[str, str], given: Mapping[str, str], fieldpaths: Sequence[str], subject: str
) -> dict[str, str]:
    """The labels an update with containerd's field paths leaves: ``labels`` takes all of ``given``,
    ``labels.<key>`` takes one (``""`` when ``given`` lacks it: the caller drops empty values); no
    paths means ``labels``. Not validated. InvalidArgument (``cannot update "<path>" field on
    <subject>``) for any other path."""
    labels = dict(current)
    for path in fieldpaths or ("labels",):
        if path.startswith("labels."):
            key = path.removeprefix("labels.")
            labels[key] = given.get(key, "")
        elif path == "labels":
            labels = dict(given)
        else:
            raise InvalidArgument(f'cannot update "{path}" field on {subject}')
    return labels
