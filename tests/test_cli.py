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


def test_shared_options_are_accepted_on_the_group_and_the_command_and_the_nearest_wins(tmp_path):
    """API, config and verbosity options work before or after the sub-command (as kubectl and gh)."""
    runner = CliRunner()
    missing = tmp_path / "no-such.pem"
    for args in (
        ["strategies", "list", "--api-url", "http://127.0.0.1:9", "--public-key", str(missing), "-v"],
        ["-v", "strategies", "--public-key", str(missing), "list"],
        ["strategies", "--public-key", str(tmp_path / "other.pem"), "list", "--public-key", str(missing)],
    ):
        result = runner.invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert f"public key {missing} does not exist" in result.output, (args, result.output)
    result = runner.invoke(main, ["watch", "--replay", "--no-validate", "--json", "-v", "--log-format", "json"])
    assert result.exit_code == 0, result.output


def test_every_command_takes_the_global_options_after_its_name():
    """-v/-vv, --log-format and --config work on every command, so a fix that says "run with -vv" works
    wherever it is printed."""
    runner = CliRunner()
    for path in all_commands(main, click.Context(main)):
        for opts in (["-vv"], ["--log-format", "json"], ["--config", "x.toml"]):
            result = runner.invoke(main, [*path, *opts, "--help"])
            assert result.exit_code == 0, (path, opts, result.output)
