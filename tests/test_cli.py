"""The command tree as a whole: every command's --help ends with worked examples (as bcc's tools do)."""

from __future__ import annotations

import click
from click.testing import CliRunner

from gtp5g_op.cli import main


def all_commands(group: click.Group, ctx: click.Context, path: tuple[str, ...] = ()):
    """Every command path under ``group``, its lazily loaded sub-commands included."""
    yield path
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if isinstance(cmd, click.Group):
            yield from all_commands(cmd, ctx, path + (name,))
        else:
            yield path + (name,)


def test_every_help_ends_with_examples_of_itself():
    paths = list(all_commands(main, click.Context(main)))
    assert len(paths) >= 15, paths
    runner = CliRunner()
    for path in paths:
        result = runner.invoke(main, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        head, _, examples = result.output.partition("\n  Examples:\n")
        assert examples and "Options:" in head, (path, result.output)
        lines = [x.strip() for x in examples.splitlines() if x.strip()]
        assert lines and all(x.split()[0] == "gtp5g-op" and set(path) <= set(x.split()) for x in lines), (
            path, lines)
