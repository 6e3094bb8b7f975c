"""The core's own gRPC services, each a ``service`` plugin loaded through the same entry points as
any third party's (see ``[project.entry-points."containerkit.service"]`` in pyproject.toml)."""
