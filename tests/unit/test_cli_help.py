"""Every `ftune` command's --help renders: a user told to "Try 'ftune ... --help'" gets help,
not a traceback (rich reads `[...]` in a help text as markup)."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from service.cli import app


def _paths(command: object, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    if isinstance(command, typer.core.TyperGroup):  # typer's own click, not `click`'s
        for name, sub in command.commands.items():
            found += _paths(sub, (*path, name))
    return found


COMMANDS = _paths(typer.main.get_command(app))


def test_the_walk_finds_the_commands() -> None:
    assert ("datasets", "import") in COMMANDS and len(COMMANDS) > 20


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "ftune")
def test_help_renders(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "Usage:" in result.output
