"""The gRPC metadata keys containerd's API uses, shared by the daemon (:mod:`core.server`) and ckctl without
importing either's gRPC stack."""

from __future__ import annotations

NAMESPACE_METADATA_KEY = "containerd-namespace"
"""The tenant a call acts in."""

LEASE_METADATA_KEY = "containerd-lease"
"""The lease a call creates things under."""
