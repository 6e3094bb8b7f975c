"""Event messages on the wire: an event travels as a ``google.protobuf.Any`` whose type URL is the message's
full proto name; :func:`message_of` decodes it. Shared by the events service and ckctl (no gRPC imports)."""

from __future__ import annotations

import functools
from typing import Any


def message_of(event: Any) -> Any:
    """The message an Any holds when its type (the part of the type URL after the last ``/``) is one
    the daemon knows (every event message is) and its bytes parse; otherwise the Any itself."""
    from google.protobuf import descriptor_pool, message, message_factory

    _import_event_messages()
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(event.type_url.rpartition("/")[2])
    except KeyError:
        return event
    decoded = message_factory.GetMessageClass(descriptor)()
    try:
        decoded.ParseFromString(event.value)
    except message.DecodeError:
        return event
    return decoded


@functools.cache
def _import_event_messages() -> None:
    """Load every event message module into the descriptor pool: containerd's
    (``core/api/containerd/events/*_pb2``) and those our own services declare beside their calls
    (``core/api/containerkit/services/<name>/v1/*_pb2``)."""
    import importlib
    import pkgutil

    from core.api.containerd import events
    from core.api.containerkit import services

    packages = [events.__name__]
    packages += [f"{services.__name__}.{service.name}.v1" for service in pkgutil.iter_modules(services.__path__)]
    for package in packages:
        for module in pkgutil.iter_modules(importlib.import_module(package).__path__):
            if module.name.endswith("_pb2"):
                importlib.import_module(f"{package}.{module.name}")
