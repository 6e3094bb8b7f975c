"""containerkit's microkernel: plugin types and interfaces, metadata store, wire API and daemon."""

__version__ = "0.1.0"
