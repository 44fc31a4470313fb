"""Every command has help text with an example, and the root answers --help / --version."""

from __future__ import annotations

from typing import Any

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from service.cli import app

runner = CliRunner()


def _commands(group: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for name, cmd in group.commands.items():
        path = (*prefix, name)
        if hasattr(cmd, "commands"):
            out.extend(_commands(cmd, path))
        else:
            out.append(path)
    return out


ROOT: Any = get_command(app)
COMMANDS = _commands(ROOT)


def test_root_help_and_version() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "ontology" in result.output
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith("kgdx ")


@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(p) for p in COMMANDS])
def test_every_command_has_help_with_example(path: tuple[str, ...]) -> None:
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    cmd = ROOT
    for part in path:
        cmd = cmd.commands[part]
    assert cmd.help and cmd.help.strip(), f"{' '.join(path)} has no help"
    assert "Example: kgdx " in cmd.help, f"{' '.join(path)} help lacks an example"


def test_usage_error_exits_2() -> None:
    result = runner.invoke(app, ["ontology", "paths"])
    assert result.exit_code == 2


def test_typer_is_the_root() -> None:
    assert isinstance(app, typer.Typer)
