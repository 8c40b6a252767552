"""Every command is in the admin's guide, and every command's --help works and has text."""
from __future__ import annotations

from pathlib import Path

import click
from click.testing import CliRunner

from mailflow.cli import cli

GUIDE = (Path(__file__).resolve().parent.parent / "docs" / "admin.md").read_text()


def commands(cmd: click.Command = cli, path: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from commands(sub, (*path, name))
    else:
        yield path, cmd


def test_every_command_is_in_the_admins_guide() -> None:
    missing = [" ".join(p) for p, _ in commands() if f"mailflow {' '.join(p)}" not in GUIDE]
    assert missing == [], f"document these in docs/admin.md: {missing}"


def test_every_command_has_help() -> None:
    runner = CliRunner()
    for path, cmd in commands():
        assert cmd.help, f"{' '.join(path)} has no help text"
        r = runner.invoke(cli, [*path, "--help"])
        assert r.exit_code == 0 and "Usage:" in r.output, path
