"""The default plugins shipped with containerkit; each loads through its entry point like a third party's."""
