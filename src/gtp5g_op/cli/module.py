"""``patch-module``, ``build module`` and ``verify``: thin commands over patcher, modbuild and verify."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gtp5g_op.errors import EXIT_FAIL, OpError, UsageError, cli_errors
from gtp5g_op.kernel import modbuild, patcher
from gtp5g_op.kernel import verify as verifier

_STATE_STYLE = {"exported": "green", "global only": "yellow", "static": "red", "absent": "dim"}


_ACTION = {"exported": "already exported", "global only": "add EXPORT_SYMBOL",
           "static": "drop static, add EXPORT_SYMBOL", "absent": "skipped"}


def _status_table(statuses: list[patcher.FunctionStatus], title: str, actions: bool = False) -> Table:
    table = Table(title=title)
    for col in ("function", "where", "state", "action" if actions else "note"):
        table.add_column(col)
    for s in statuses:
        where = f"{s.file}:{s.line}" if s.file else "-"
        note = s.conflict or s.note or s.spec.role
        if actions:
            note = _ACTION[s.state.value] + (f" ({s.note})" if s.note else "")
        style = _STATE_STYLE[s.state.value]
        table.add_row(s.name, where, f"[{style}]{s.state.value}[/]", note)
    return table


@click.command("patch-module")
@click.option("--src", "src", required=True, type=click.Path(path_type=Path),
              help="Top directory of a gtp5g source tree (any release v0.8.x to v0.10.x).")
@click.option("--set", "set_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Export set TOML file (default: the bundled patches/gtp5g-exports.toml).")
@click.option("--export", "extra", multiple=True, metavar="NAME",
              help="Also export this function (repeatable); missing is then an error.")
@click.option("--check", "mode", flag_value="check", help="Report each function's state; change nothing.")
@click.option("--diff", "mode", flag_value="diff", help="Print the unified diff; change nothing.")
@click.option("--revert", "mode", flag_value="revert", help="Restore every changed file byte for byte.")
@click.option("-U", "--context", type=click.IntRange(0, 100), default=3, show_default=True,
              help="Lines of context in --diff; 0 leaves out gtp5g's own lines (apply with patch -p1).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@cli_errors
def patch_module(src: Path, set_file: Path | None, extra: tuple[str, ...], mode: str | None,
                 context: int, as_json: bool) -> None:
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
    console = Console()
    if mode == "revert":
        result = patcher.revert(src)
        if as_json:
            click.echo(json.dumps({"restored": result.restored, "unchanged": result.unchanged}))
        elif not result.restored and not result.unchanged:
            click.echo("nothing to revert: gtp5g-op has not patched this tree")
        else:
            for rel in result.restored:
                click.echo(f"restored {rel}")
            for rel in result.unchanged:
                click.echo(f"{rel} was already original")
        return
    export_set = patcher.load_export_set(set_file, extra)
    if mode == "check":
        statuses = patcher.check(src, export_set)
        ok = patcher.check_ok(statuses)
        if as_json:
            click.echo(json.dumps({"ok": ok, "functions": [s.as_dict() for s in statuses]}))
        else:
            console.print(_status_table(statuses, f"gtp5g exports in {src}"))
            click.echo("all exported" if ok else "not all exported: run gtp5g-op patch-module --src DIR")
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
    console.print(_status_table(result.statuses, f"patching {src}", actions=True))
    if result.changed:
        click.echo(f"patched {len(result.changed)} file(s): {', '.join(result.changed)}")
        click.echo(f"next: gtp5g-op build module --src {src}")
    else:
        click.echo("nothing to do: every function this release has is already exported; no file changed")


@click.command("module")
@click.option("--src", "src", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="gtp5g source tree.")
@click.option("--kdir", type=click.Path(path_type=Path),
              help="Kernel build dir (default: /lib/modules/$(uname -r)/build).")
@click.option("--kver", help="Kernel release to build and install for (default: KDIR's, else running).")
@click.option("--copy-vmlinux/--no-copy-vmlinux", default=None,
              help="Copy the running kernel's /sys/kernel/btf/vmlinux into KDIR for module BTF "
                   "(default: ask when interactive). Only for the running kernel's KDIR.")
@click.option("--vmlinux", "vmlinux_src", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="KDIR's kernel's vmlinux, or its /boot/vmlinuz-* image to take it from; put in KDIR "
                   "for module BTF (checked to be that kernel's).")
@click.option("--install", is_flag=True, help="Copy gtp5g.ko into /lib/modules/KVER and run depmod.")
@click.option("--reload", "do_reload", is_flag=True, help="rmmod + modprobe gtp5g after installing.")
@click.option("--force", is_flag=True,
              help="With --reload: delete gtp5g devices (drops their sessions) and unload even if in use.")
@click.option("--allow-no-btf", is_flag=True,
              help="With --install/--reload: accept a module without BTF (the tracer cannot attach to it).")
@click.option("-j", "--jobs", type=click.IntRange(min=1), help="Parallel make jobs (default: CPUs).")
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
      gtp5g-op build module --src ~/gtp5g --kdir /usr/src/linux-headers-6.1.0-28-amd64 \\
          --vmlinux /boot/vmlinuz-6.1.0-28-amd64 --install
    """
    console = Console(stderr=True)
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
        console.print(f"put kernel {target}'s vmlinux in {modbuild.place_vmlinux(kdir, vmlinux_src)}")
    for check in modbuild.preflight(kdir):
        mark = "[green]ok[/]" if check.ok else ("[red]missing[/]" if check.required else "[yellow]warn[/]")
        console.print(f"{mark} {check.name}: {escape(check.detail)}"
                      + ("" if check.ok else f"; fix: {escape(check.fix)}"), highlight=False)
    if modbuild.can_offer_vmlinux(kdir):
        if copy_vmlinux is None and sys.stdin.isatty():
            copy_vmlinux = click.confirm(f"copy {modbuild.SYS_VMLINUX} to {kdir} so gtp5g.ko gets BTF?",
                                         default=True)
        if copy_vmlinux:
            console.print(f"copied BTF to {modbuild.copy_vmlinux(kdir)}")
    elif copy_vmlinux and not (kdir / "vmlinux").exists():
        raise UsageError(f"--copy-vmlinux copies the running kernel's BTF ({modbuild.kernel_release()}), "
                         f"but {kdir} is for {target}: module BTF built on it would be rejected at load",
                         fix=modbuild.vmlinux_fix_text(target))
    with console.status("make ...") as status:
        result = modbuild.build(src, kdir, kver, on_line=lambda ln: status.update(escape(ln.strip()[:90])),
                                jobs=jobs)
    for note in result.notes:
        console.print(f"note: {escape(note)}")
    if not result.ok:
        for line in result.errors:
            console.print(line, markup=False, highlight=False)
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
        console.print(f"[yellow]warn[/] installed for kernel {target}, not the running "
                      f"{modbuild.kernel_release()}: it loads when {target} boots")
    if do_reload:
        for step in modbuild.reload(force=force):
            click.echo(f"ran {step}")
        click.echo("next: gtp5g-op verify --loaded")


@click.command("verify")
@click.argument("ko", required=False, type=click.Path(path_type=Path))
@click.option("--loaded", is_flag=True, help="Check the loaded module (kallsyms, /sys/kernel/btf/gtp5g).")
@click.option("--function", "functions", multiple=True, metavar="NAME",
              help="Function to check (repeatable; default: the bundled export set).")
@click.option("--symvers", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Module.symvers to read exports from (default: next to KO).")
@click.option("--base-btf", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Base BTF of the kernel the module is for: its vmlinux, or /sys/kernel/btf/vmlinux "
                   "on that host (default: this kernel's).")
@click.option("--allow-no-btf", is_flag=True,
              help="Pass a module without usable BTF (exports only; the tracer cannot attach to it).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
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
    if loaded and (base_btf or symvers):
        raise UsageError("--base-btf and --symvers apply to a gtp5g.ko file, not --loaded",
                         fix="drop them, or verify the file")
    names = list(functions) or None
    report = (verifier.verify_loaded(names, allow_no_btf=allow_no_btf) if loaded
              else verifier.verify_ko(ko, names, symvers=symvers, base_btf=base_btf, allow_no_btf=allow_no_btf))
    if as_json:
        click.echo(json.dumps(report.as_dict()))
    else:
        _print_report(report)
    if not report.ok:
        sys.exit(EXIT_FAIL)


def _yes(value: bool) -> str:
    return "[green]yes[/]" if value else "[red]no[/]"


def _print_report(report: verifier.VerifyReport) -> None:
    console = Console()
    table = Table(title=f"gtp5g exports: {report.source}")
    for col in ("function", "global", "exported", "BTF", "result"):
        table.add_column(col)
    for f in report.functions:
        btf = "no BTF" if f.btf is None else (f"[green]{f.btf}[/]" if f.btf_ok else f"[red]{f.btf}[/]")
        if f.skipped:
            table.add_row(f.name, "-", "-", "-", "[dim]absent (not in this release)[/]")
            continue
        table.add_row(f.name, _yes(f.global_symbol), _yes(f.exported), btf,
                      "[green]pass[/]" if f.ok else "[red]FAIL[/]")
    console.print(table)
    for note in report.notes:
        click.echo(f"note: {note}")
    if report.btf_problem:
        click.echo(("note: " if report.allow_no_btf else "FAIL: ") + report.btf_problem)
    if report.ok:
        click.echo("all pass" + (" (exports only: --allow-no-btf)" if report.btf_problem else ""))
    elif all(f.ok for f in report.functions):
        click.echo(f"not all pass: no usable module BTF; fix: {verifier.BTF_FIX}")
    else:
        click.echo("not all pass: gtp5g-op patch-module --src DIR, then rebuild")
