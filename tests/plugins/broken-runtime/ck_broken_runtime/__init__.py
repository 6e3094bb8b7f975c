"""A runtime plugin that raises at import, to show the daemon reports it as ``error`` and serves on."""

raise RuntimeError("this plugin is broken on purpose")
