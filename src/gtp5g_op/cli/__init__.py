"""The ``gtp5g-op`` command: a thin click layer over the library modules.

Sub-commands are imported only when invoked (click's documented lazy-group pattern), so
``gtp5g-op watch --replay`` does not pay for importing the API client, pyroute2 or pyelftools.
"""

from __future__ import annotations

import importlib
import inspect

import click

from gtp5g_op import __version__
from gtp5g_op.cli.common import GLOBAL, shared_options
from gtp5g_op.cli.errorpath import OneErrorPath

_EXAMPLES = "\b\nExamples:"


def examples_last(cmd: click.Command) -> click.Command:
    """Move the "Examples:" block of a command's help (and its sub-commands') after the options.

    Help then ends with worked examples, as bcc's tools do; the docstrings keep them next to the code.
    """
    text = inspect.cleandoc(cmd.help or "")
    head, marker, examples = text.partition(_EXAMPLES)
    if marker and not cmd.epilog:
        cmd.help, cmd.epilog = head.rstrip(), marker + examples
    if isinstance(cmd, click.Group) and not isinstance(cmd, LazyGroup):
        for sub in cmd.commands.values():
            examples_last(sub)
    return cmd


class LazyGroup(click.Group):
    """A click group whose sub-commands live in other modules, loaded on first use."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            module_name, attr = self.lazy[cmd_name].rsplit(":", 1)
            return examples_last(getattr(importlib.import_module(module_name), attr))
        return super().get_command(ctx, cmd_name)


class RootGroup(OneErrorPath, LazyGroup):
    """The ``gtp5g-op`` group: lazily loaded sub-commands, one error path (cli/errorpath.py)."""


@click.group(
    "gtp5g-op",
    cls=RootGroup,
    lazy={
        "watch": "gtp5g_op.cli.watch:watch",
        "strategies": "gtp5g_op.cli.strategies:strategies",
        "patch-module": "gtp5g_op.cli.module:patch_module",
        "verify": "gtp5g_op.cli.module:verify",
        "doctor": "gtp5g_op.cli.doctor:doctor",
        "tracer": "gtp5g_op.cli.tracer:tracer",
        "build": "gtp5g_op.cli:build",
    },
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="gtp5g-op")
@shared_options(*GLOBAL)
def main() -> None:
    """Operate a gtp5g user plane: patch and verify the module, trace its packet path,
    and push Gthulhu scheduling strategies for the processes that carry GTP-U traffic.

    \b
    Examples:
      gtp5g-op watch --replay                 # replay the bundled lab capture
      gtp5g-op watch --push --with-tracer     # trace gtp5g live and push strategies
      gtp5g-op patch-module --src ~/gtp5g     # export the 7 traced functions
      gtp5g-op strategies list                # what the Gthulhu API holds now
      gtp5g-op doctor                         # is this host ready?
    """


examples_last(main)


@click.group(
    cls=LazyGroup,
    lazy={
        "tracer": "gtp5g_op.cli.tracer:build_tracer",
        "module": "gtp5g_op.cli.module:build_module",
    },
)
@shared_options(*GLOBAL)
def build() -> None:
    """Build the BPF tracer or the gtp5g kernel module.

    \b
    Examples:
      gtp5g-op build tracer
      gtp5g-op build module --src ~/gtp5g --install
    """


examples_last(build)
