"""``patch-module``, ``build module`` and ``verify``: thin commands over patcher, modbuild and verify."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.table import Table
from rich.text import Text

from gtp5g_op import userfiles
from gtp5g_op.cli.common import GLOBAL, UserPath, command_options
from gtp5g_op.cli.output import Col, fit_table, safe, text
from gtp5g_op.cli.output import console as make_console
from gtp5g_op.errors import EXIT_FAIL, OpError, UsageError, cli_errors
from gtp5g_op.kernel import modbuild, patcher
from gtp5g_op.kernel import verify as verifier
from gtp5g_op.model import Check

_STATE_STYLE = {"exported": "green", "global only": "yellow", "static": "red", "absent": "dim"}


_ACTION = {"exported": "already exported", "global only": "add EXPORT_SYMBOL",
           "static": "drop static, add EXPORT_SYMBOL", "absent": "skipped"}

_TREE = UserPath("gtp5g source tree", {userfiles.DIRECTORY},
                 fix="give the top directory of a gtp5g checkout (git clone https://github.com/free5gc/gtp5g)")


def _status_table(statuses: list[patcher.FunctionStatus], title: str, width: int, actions: bool = False) -> Table:
    """Per function: name and file:line whole at any width; the note folds."""
    cols = [Col("function", key=True), Col("where", key=True), Col("state", key=True, wrap=True),
            Col("action" if actions else "note", min=12)]
    rows = []
    for s in statuses:
        where = f"{s.file}:{s.line}" if s.file else "-"
        note = s.conflict or s.note or s.spec.role
        if actions:
            note = _ACTION[s.state.value] + (f" ({s.note})" if s.note else "")
        rows.append([text(s.name), text(where), Text(s.state.value, style=_STATE_STYLE[s.state.value]), text(note)])
    return fit_table(text(title), cols, rows, width)


def _one_mode(ctx: click.Context, check: bool, diff: bool, revert: bool, set_file: Path | None,
              extra: tuple[str, ...], as_json: bool) -> str | None:
    """The one mode asked for; pairs that cannot both be honoured are refused, never half-run."""
    modes = [flag for flag, on in (("--check", check), ("--diff", diff), ("--revert", revert)) if on]
    if len(modes) > 1:
        raise UsageError(f"{' and '.join(modes)} cannot be combined: each is a mode of its own",
                         "run gtp5g-op patch-module once per mode")
    mode = modes[0][2:] if modes else None
    given = ctx.get_parameter_source("context") not in (None, click.core.ParameterSource.DEFAULT)
    if given and mode != "diff":
        raise UsageError("-U/--context sets the context lines of --diff", "add --diff, or drop -U")
    if mode == "diff" and as_json:
        raise UsageError("--diff prints a unified diff, which has no JSON form", "drop --json (or --diff)")
    if mode == "revert" and (set_file or extra):
        raise UsageError("--revert restores every file patch-module changed; --set and --export do not apply",
                         "drop --set/--export")
    return mode


@click.command("patch-module")
@click.option("--src", "src", required=True, type=_TREE, metavar="DIR",
              help="Top directory of a gtp5g source tree (any release v0.8.x to v0.10.x).")
@click.option("--set", "set_file", type=click.Path(path_type=Path), metavar="TOML",
              help="Export set TOML file (default: the bundled patches/gtp5g-exports.toml).")
@click.option("--export", "extra", multiple=True, metavar="NAME",
              help="Also export this function (repeatable); missing is then an error.")
@click.option("--check", is_flag=True, help="Report each function's state; change nothing.")
@click.option("--diff", is_flag=True, help="Print the unified diff; change nothing.")
@click.option("--revert", is_flag=True, help="Restore every changed file byte for byte.")
@click.option("-U", "--context", type=click.IntRange(0, 100), default=3, show_default=True,
              help="Lines of context in --diff; 0 leaves out gtp5g's own lines (apply with patch -p1).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@command_options(*GLOBAL)
@click.pass_context
@cli_errors
def patch_module(ctx: click.Context, src: Path, set_file: Path | None, extra: tuple[str, ...], check: bool,
                 diff: bool, revert: bool, context: int, as_json: bool) -> None:
    """Export the functions the tracer attaches to, in a gtp5g source tree.

    Finds each function by its definition (not by line number), drops `static` where the export set
    says so, adds EXPORT_SYMBOL after the function and `#include <linux/module.h>` where missing.
    All files change or none; a second run changes nothing. --check exits 0 only when every
    function the release has is exported.

    \b
    Examples:
      gtp5g-op patch-module --src ~/gtp5g               # apply the bundled export set
      gtp5g-op patch-module --src ~/gtp5g --check       # exported / global only / static / absent
      gtp5g-op patch-module --src ~/gtp5g --diff > exports.patch
      gtp5g-op patch-module --src ~/gtp5g --diff -U0 > exports.patch   # only the changed lines
      gtp5g-op patch-module --src ~/gtp5g --export gtp5g_rx
      gtp5g-op patch-module --src ~/gtp5g --revert      # back to the release, byte for byte
    """
    mode = _one_mode(ctx, check, diff, revert, set_file, extra, as_json)
    console = make_console()
    if mode == "revert":
        result = patcher.revert(src)
        if as_json:
            click.echo(json.dumps({"restored": result.restored, "unchanged": result.unchanged}))
        elif not result.restored and not result.unchanged:
            click.echo("nothing to revert: gtp5g-op has not patched this tree")
        else:
            for rel in result.restored:
                click.echo(f"restored {safe(rel)}")
            for rel in result.unchanged:
                click.echo(f"{safe(rel)} was already original")
        return
    export_set = patcher.load_export_set(set_file, extra)
    if mode == "check":
        statuses = patcher.check(src, export_set)
        ok = patcher.check_ok(statuses)
        if as_json:
            click.echo(json.dumps({"ok": ok, "functions": [s.as_dict() for s in statuses]}))
        else:
            console.print(_status_table(statuses, f"gtp5g exports in {src}", console.width))
            click.echo("all exported" if ok else f"not all exported: run gtp5g-op patch-module --src {safe(src)}")
        if not ok:
            sys.exit(EXIT_FAIL)
        return
    if mode == "diff":
        plan = patcher.plan_patch(src, export_set)
        click.echo(plan.diff(context), nl=False)
        return
    result = patcher.patch(src, export_set)
    if as_json:
        click.echo(json.dumps({"changed": result.changed,
                               "functions": [s.as_dict() for s in result.statuses]}))
        return
    console.print(_status_table(result.statuses, f"patching {src}", console.width, actions=True))
    if result.changed:
        click.echo(f"patched {len(result.changed)} file(s): {safe(', '.join(result.changed))}")
        click.echo(f"next: gtp5g-op build module --src {safe(src)}")
    else:
        click.echo("nothing to do: every function this release has is already exported; no file changed")


@click.command("module")
@click.option("--src", "src", required=True, type=_TREE, metavar="DIR", help="gtp5g source tree.")
@click.option("--kdir", type=UserPath("kernel build dir", {userfiles.DIRECTORY}), metavar="DIR",
              help="Kernel build dir (default: /lib/modules/$(uname -r)/build).")
@click.option("--kver", help="Kernel release to build and install for (default: KDIR's, else running).")
@click.option("--copy-vmlinux/--no-copy-vmlinux", default=None,
              help="Copy the running kernel's /sys/kernel/btf/vmlinux into KDIR for module BTF "
                   "(default: ask when interactive). Only for the running kernel's KDIR.")
@click.option("--vmlinux", "vmlinux_src", type=UserPath("vmlinux or kernel image"), metavar="FILE",
              help="KDIR's kernel's vmlinux, or its /boot/vmlinuz-* image to take it from; put in KDIR "
                   "for module BTF (checked to be that kernel's).")
@click.option("--install", is_flag=True, help="Copy gtp5g.ko into /lib/modules/KVER and run depmod.")
@click.option("--reload", "do_reload", is_flag=True, help="rmmod + modprobe gtp5g after installing.")
@click.option("--force", is_flag=True,
              help="With --reload: delete gtp5g devices (drops their sessions) and unload even if in use.")
@click.option("--allow-no-btf", is_flag=True,
              help="With --install/--reload: accept a module without BTF (the tracer cannot attach to it).")
@click.option("-j", "--jobs", type=click.IntRange(min=1), help="Parallel make jobs (default: CPUs).")
@command_options(*GLOBAL)
@cli_errors
def build_module(src: Path, kdir: Path | None, kver: str | None, copy_vmlinux: bool | None,
                 vmlinux_src: Path | None, install: bool, do_reload: bool, force: bool, allow_no_btf: bool,
                 jobs: int | None) -> None:
    """Build gtp5g with its own Makefile against KDIR; optionally install and reload it.

    Checks the compiler, kbuild, pahole and vmlinux first: module BTF (what the tracer attaches by)
    needs KDIR's own kernel's vmlinux in KDIR; --copy-vmlinux takes the running kernel's, --vmlinux
    another kernel's (e.g. from its /boot/vmlinuz-* image). --install/--reload refuse a module
    without BTF unless --allow-no-btf; --reload refuses while gtp5g devices exist (a running UPF's
    upfgtp, in any network namespace) unless --force, and refuses for a kernel that is not running.
    The full log stays in SRC/.gtp5g-op/build.log; a failure shows the last compiler errors.

    \b
    Examples:
      gtp5g-op build module --src ~/gtp5g
      gtp5g-op build module --src ~/gtp5g --copy-vmlinux --install --reload
      gtp5g-op build module --src ~/gtp5g --kdir KDIR --vmlinux /boot/vmlinuz-6.1.0-28-amd64 --install
    """
    console = make_console(stderr=True)
    if force and not do_reload:
        raise UsageError("--force only matters with --reload (it deletes gtp5g devices first)",
                         "add --reload, or drop --force")
    kdir = kdir or modbuild.default_kdir(kver)
    target = kver or modbuild.kdir_release(kdir) or modbuild.kernel_release()
    running = target == modbuild.kernel_release()
    if do_reload and not running:
        raise UsageError(f"--reload loads the module into the running kernel ({modbuild.kernel_release()}), "
                         f"but this build is for {target}", fix="drop --reload (use --install), or build "
                         "for the running kernel")
    if copy_vmlinux and vmlinux_src:
        raise UsageError("--copy-vmlinux and --vmlinux both name a vmlinux", fix="pass one of them")
    if do_reload:
        modbuild.check_reload(force)  # refuse before building or installing anything
    if vmlinux_src:
        console.print(text(f"put kernel {target}'s vmlinux in {modbuild.place_vmlinux(kdir, vmlinux_src)}"))
    console.print(preflight_table(modbuild.preflight(kdir), f"build preflight for {kdir}", console.width))
    if modbuild.can_offer_vmlinux(kdir):
        if copy_vmlinux is None and sys.stdin.isatty():
            copy_vmlinux = click.confirm(f"copy {modbuild.SYS_VMLINUX} to {kdir} so gtp5g.ko gets BTF?",
                                         default=True)
        if copy_vmlinux:
            console.print(text(f"copied BTF to {modbuild.copy_vmlinux(kdir)}"))
    elif copy_vmlinux and not (kdir / "vmlinux").exists():
        raise UsageError(f"--copy-vmlinux copies the running kernel's BTF ({modbuild.kernel_release()}), "
                         f"but {kdir} is for {target}: module BTF built on it would be rejected at load",
                         fix=modbuild.vmlinux_fix_text(target))
    with console.status("make ...") as status:
        result = modbuild.build(src, kdir, kver, on_line=lambda ln: status.update(text(ln.strip()[:90])),
                                jobs=jobs)
    for note in result.notes:
        console.print(text(f"note: {note}"))
    if not result.ok:
        for line in result.errors:
            console.print(text(line))
        raise OpError(f"build failed after {result.seconds:.1f}s; full log: {result.log}",
                      fix="fix the errors above (a gtp5g release too old or new for this kernel?)")
    btf = "no BTF (see vmlinux above)" if result.btf_skipped else "BTF generated"
    click.echo(f"built {result.ko} in {result.seconds:.1f}s, {btf}; log: {result.log}")
    if not (install or do_reload):
        return
    if result.btf_skipped and not allow_no_btf:
        raise OpError(f"{result.ko} has no BTF, so the tracer cannot attach to it; nothing was installed",
                      fix=modbuild.vmlinux_fix(kdir) + "; or pass --allow-no-btf")
    installed = modbuild.install(result.ko, target)
    click.echo(f"installed {installed.path}; ran {' '.join(installed.depmod)}")
    if not running:
        console.print(text(f"warn: installed for kernel {target}, not the running {modbuild.kernel_release()}: "
                           f"it loads when {target} boots", "yellow"))
    if do_reload:
        for step in modbuild.reload(force=force):
            click.echo(f"ran {step}")
        click.echo("next: gtp5g-op verify --loaded")


@click.command("verify")
@click.argument("ko", required=False, type=click.Path(path_type=Path))
@click.option("--loaded", is_flag=True, help="Check the loaded module (kallsyms, /sys/kernel/btf/gtp5g).")
@click.option("--function", "functions", multiple=True, metavar="NAME",
              help="Function to check (repeatable; default: the bundled export set).")
@click.option("--symvers", type=UserPath("Module.symvers"), metavar="FILE",
              help="Module.symvers to read exports from (default: next to KO).")
@click.option("--base-btf", type=UserPath("base BTF"), metavar="FILE",
              help="Base BTF of the kernel the module is for: its vmlinux, or /sys/kernel/btf/vmlinux "
                   "on that host (default: this kernel's).")
@click.option("--allow-no-btf", is_flag=True,
              help="Pass a module without usable BTF (exports only; the tracer cannot attach to it).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@command_options(*GLOBAL)
@cli_errors
def verify(ko: Path | None, loaded: bool, functions: tuple[str, ...], symvers: Path | None,
           base_btf: Path | None, allow_no_btf: bool, as_json: bool) -> None:
    """Check that gtp5g exports the traced functions: global symbol, exported, and in BTF.

    A module without BTF, or with BTF built against another kernel's vmlinux (that kernel rejects
    it and loads the module without BTF), fails: fentry attaches by BTF id, so the tracer could
    not attach to it. --allow-no-btf checks the exports alone. Exit code 0 only when every
    check passes.

    \b
    Examples:
      gtp5g-op verify ~/gtp5g/gtp5g.ko
      gtp5g-op verify --loaded
      gtp5g-op verify gtp5g.ko --function gtp5g_encap_recv --json
      gtp5g-op verify gtp5g.ko --base-btf /usr/src/linux-headers-6.1.0-28-amd64/vmlinux
      gtp5g-op verify gtp5g.ko --allow-no-btf     # exports only
    """
    if bool(ko) == loaded:
        raise UsageError("give either a gtp5g.ko path or --loaded", fix="e.g. gtp5g-op verify ~/gtp5g/gtp5g.ko")
    if loaded and (symvers or base_btf):
        raise UsageError("--symvers and --base-btf describe a gtp5g.ko file, not the loaded module",
                         "drop them with --loaded, or give the .ko instead of --loaded")
    names = list(functions) or None
    report = (verifier.verify_loaded(names, allow_no_btf=allow_no_btf) if loaded
              else verifier.verify_ko(ko, names, symvers=symvers, base_btf=base_btf, allow_no_btf=allow_no_btf))
    if as_json:
        click.echo(json.dumps(report.as_dict()))
    else:
        _print_report(report)
    if not report.ok:
        sys.exit(EXIT_FAIL)


def _yes(value: bool) -> Text:
    return Text("yes", style="green") if value else Text("no", style="red")


def _print_report(report: verifier.VerifyReport) -> None:
    console = make_console()
    cols = [Col("function", key=True), Col("global", key=True), Col("exported", key=True),
            Col("BTF", key=True, wrap=True), Col("result", key=True, wrap=True)]
    rows: list[list[str | Text]] = []
    for f in report.functions:
        if f.skipped:
            rows.append([text(f.name), "-", "-", "-", Text("absent (not in this release)", style="dim")])
            continue
        btf = Text("no BTF") if f.btf is None else text(f.btf, "green" if f.btf_ok else "red")
        rows.append([text(f.name), _yes(f.global_symbol), _yes(f.exported), btf,
                     Text("pass", style="green") if f.ok else Text("FAIL", style="red")])
    console.print(fit_table(text(f"gtp5g exports: {report.source}"), cols, rows, console.width))
    for note in report.notes:
        click.echo(f"note: {safe(note)}")
    if report.btf_problem:
        click.echo(("note: " if report.allow_no_btf else "FAIL: ") + safe(report.btf_problem))
    if report.ok:
        click.echo("all pass" + (" (exports only: --allow-no-btf)" if report.btf_problem else ""))
    elif all(f.ok for f in report.functions):
        click.echo(f"not all pass: no usable module BTF; fix: {verifier.BTF_FIX}")
    else:
        click.echo("not all pass: gtp5g-op patch-module --src DIR, then rebuild")


def preflight_table(checks: list[Check], title: str, width: int) -> Table:
    """The build preflight: what is checked and its status whole; detail and fix wrap between words."""
    cols = [Col("check", key=True), Col("status", key=True), Col("detail", key=True, wrap=True)]
    rows = []
    for c in checks:
        status = Text("ok", style="green") if c.ok else (
            Text("missing", style="red") if c.required else Text("warn", style="yellow"))
        detail = text(c.detail)
        if not c.ok and c.fix:
            detail.append("\nfix: ").append_text(text(c.fix))
        rows.append([text(c.name), status, detail])
    return fit_table(text(title), cols, rows, width)
