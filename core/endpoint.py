"""How clients reach the daemon: its default socket and the gRPC metadata keys containerd's API uses. Shared
by the daemon (:mod:`core.config`, :mod:`core.server`) and ckctl without importing either's heavier modules."""

from __future__ import annotations

DEFAULT_ADDRESS = "/run/containerkit/containerkit.sock"
"""The unix socket containerkitd serves on unless configured otherwise."""

NAMESPACE_METADATA_KEY = "containerd-namespace"
"""The tenant a call acts in."""

LEASE_METADATA_KEY = "containerd-lease"
"""The lease a call creates things under."""
