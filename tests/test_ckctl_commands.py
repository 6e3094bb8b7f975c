"""ckctl's command table: every module's commands are known to main.COMMANDS, and a command line
imports only the module of the command it names."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

from core.cli import main


def test_the_command_table_lists_every_name_each_module_registers():
    for module, names in main.COMMANDS.items():
        parser = argparse.ArgumentParser()
        commands = parser.add_subparsers(dest="command")
        importlib.import_module(f"core.cli.{module}").add_commands(commands)
        assert tuple(commands.choices) == names, module


def test_a_command_line_builds_only_its_command():
    parser = main.build_parser(["-n", "x", "--address", "/s", "images", "ls"])
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(commands.choices) == set(main.COMMANDS["images"])
    everything = main.build_parser(["--help"])
    (commands,) = [a for a in everything._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(commands.choices) == {name for names in main.COMMANDS.values() for name in names}


def test_ckctl_version_does_not_import_the_other_commands():
    code = (
        "import sys; from core.cli import main; main.build_parser(['version'])\n"
        "print(sorted(m for m in sys.modules if m.startswith('core.cli.') and m != 'core.cli.main'))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "core.cli.images" not in loaded and "core.cli.version" in loaded


def test_an_unknown_command_is_refused_with_the_full_list():
    result = subprocess.run(
        [sys.executable, "-m", "core.cli.main", "nosuch"], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0 and "invalid choice: 'nosuch'" in result.stderr and "volumes" in result.stderr
