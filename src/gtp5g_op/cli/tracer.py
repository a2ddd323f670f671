"""``gtp5g-op tracer run|selftest`` and ``gtp5g-op build tracer``: thin commands over
:mod:`gtp5g_op.kernel.bpf_loader`, :mod:`gtp5g_op.kernel.selftest` and :mod:`gtp5g_op.kernel.tracer_build`."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

import click
from rich.console import Group
from rich.text import Text

from gtp5g_op.cli.common import GLOBAL, Number, UserPath, command_options, shared_options
from gtp5g_op.cli.output import Col, fit_table, safe, text
from gtp5g_op.cli.output import console as make_console
from gtp5g_op.errors import EXIT_FAIL, OpError, UsageError, cli_errors
from gtp5g_op.kernel.bpf_loader import DEFAULT_INTERVAL, MAX_INTERVAL, BpfObject, ProgramResult, open_tracer
from gtp5g_op.kernel.selftest import run_gtp5g_selftest, run_selftest
from gtp5g_op.kernel.tracer_build import build_tracer as build_objects
from gtp5g_op.kernel.tracer_build import default_out_dir, ensure_built

_DIR = click.Path(file_okay=False, path_type=Path)
_OBJ = click.Path(dir_okay=False, exists=True, path_type=Path)
_BPF_OBJ = UserPath("BPF object", fix="give a .bpf.o that gtp5g-op build tracer wrote")


def report_table(results: Iterable[ProgramResult], width: int = 80) -> Group:
    """The per-program verdicts, readable at ``width`` columns.

    One row per hook: how it attached (``via``: fentry, fexit, kprobe, kretprobe, tp) or ``-``; a
    reason is printed once below the table and referred to by number, however many rows share it.
    """
    results = list(results)
    rows: list[list[Text]] = []
    reasons: dict[str, int] = {}
    for r in results:
        why = r.error if not r.attached else (f"fentry/fexit refused, kprobes used: {r.fallback}" if r.fallback else "")
        ref = f"[{reasons.setdefault(why, len(reasons) + 1)}]" if why else ""
        via = Text(r.mechanism, style="green") if r.attached else Text("-", style="red")
        rows.append([text(f"{r.kind}/{r.function}" if r.kind != "tp" else r.function), via, Text(ref)])
    cols = [Col("hook", key=True), Col("via", key=True), Col("note", key=True)]
    title = Text(f"BPF programs: {sum(r.attached for r in results)} of {len(results)} attached")
    return Group(fit_table(title, cols, rows, width), *(text(f"[{n}] {why}") for why, n in reasons.items()))


def _wait_for_signal(duration: float | None, bpf: BpfObject | None = None, every: float = DEFAULT_INTERVAL) -> None:
    """Block until SIGINT/SIGTERM, or ``duration`` seconds; meanwhile flush ``bpf``'s idle counts ``every`` s."""
    done = threading.Event()
    old = {sig: signal.signal(sig, lambda *_: done.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    deadline = None if duration is None else time.monotonic() + duration
    try:
        while not done.is_set():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            if done.wait(every if left is None else min(every, left)):
                break
            if bpf is not None and bpf.aggregates:
                bpf.flush()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@click.group("tracer")
@shared_options(*GLOBAL)
def tracer() -> None:
    """Run the bundled BPF tracer on gtp5g, or prove the BPF path with a selftest.

    \b
    Examples:
      gtp5g-op tracer selftest            # BPF load, bpf_printk, instance pipe, parser
      gtp5g-op tracer run                 # attach to gtp5g until Ctrl-C
      gtp5g-op tracer run --duration 60 --json
      gtp5g-op tracer run --selftest-probe  # keep the selftest probe attached (no gtp5g needed)
    """


@tracer.command("run")
@click.option("--obj", type=_BPF_OBJ, help="A built gtp5g.bpf.o (default: build into --build-dir if needed).")
@click.option("--build-dir", type=_DIR, help=f"Where objects are built [default: {default_out_dir()}].")
@click.option("--program", "programs", multiple=True,
              help="Only this program (repeatable), e.g. gtp5g_encap_recv_entry.")
@click.option("--interval", type=Number(0, MAX_INTERVAL, min_open=False), metavar="SECONDS",
              help=f"At most one line per thread and hook this often, with the count since the last "
                   f"(N=); 0 prints every event. [default: {DEFAULT_INTERVAL:g}]")
@click.option("--kprobe-fallback/--no-kprobe-fallback", default=True,
              help="Where the kernel refuses fentry/fexit for a function (ip4_find_route before Linux 6.6), "
                   "trace it by kprobe/kretprobe instead (docs/tracer.md). [default: on]")
@click.option("--selftest-probe", is_flag=True,
              help="Attach the selftest probe (getppid tracepoints, any host) instead of the gtp5g tracer.")
@click.option("--duration", type=Number(0, 1e9, min_open=False),
              help="Detach after this many seconds (default: until Ctrl-C).")
@click.option("--json", "as_json", is_flag=True, help="Print the per-program report as JSON.")
@command_options(*GLOBAL)
@cli_errors
def run(obj: Path | None, build_dir: Path | None, programs: tuple[str, ...], interval: float | None,
        kprobe_fallback: bool, selftest_probe: bool, duration: float | None, as_json: bool) -> None:
    """Load the tracer, attach every program, hold until SIGINT/SIGTERM (or --duration), detach.

    Each gtp5g function is traced by fentry/fexit, or by a kprobe/kretprobe where the kernel's
    trampoline refuses it (not with --no-kprobe-fallback); the report names the mechanism per hook and, for every
    failure, the reason in plain words. Exits 1 when nothing attached. Read the lines with `gtp5g-op watch`,
    or use `watch --with-tracer` to do both in one process. On detach the counts still pending
    in the kernel are printed, so no event is lost.

    \b
    Examples:
      gtp5g-op tracer run
      gtp5g-op tracer run --program gtp5g_encap_recv_entry --duration 30
      gtp5g-op tracer run --json --duration 0    # just report what attaches
      gtp5g-op tracer run --interval 0           # one line per event (no aggregation)
      gtp5g-op tracer run --no-kprobe-fallback   # fentry/fexit only (no ip4_find_route before 6.6)
      gtp5g-op tracer run --selftest-probe       # for watch on a host without gtp5g (docs/live.md)
    """
    if selftest_probe:
        if obj is not None:
            raise UsageError("--selftest-probe and --obj both name the object to load", "give one of them")
        obj = ensure_built(build_dir)["selftest"]
    bpf = open_tracer(obj, build_dir, programs or None, interval=interval, kprobe_fallback=kprobe_fallback)
    try:
        report = bpf.report
        if as_json:
            click.echo(json.dumps({"attached": len(bpf.attached), "aggregates": bpf.aggregates,
                                   "interval": (DEFAULT_INTERVAL if interval is None else interval)
                                   if bpf.aggregates else None,
                                   "programs": [r.to_dict() for r in report]}))
        else:
            console = make_console()
            console.print(report_table(report, console.width))
        if not bpf.attached:
            raise OpError("no tracer program attached", fix="see why in the report above")
        if not as_json:
            click.echo(f"{len(bpf.attached)} of {len(report)} programs attached; "
                       + ("Ctrl-C to detach" if duration is None else f"detaching in {duration:g}s"), err=True)
        _wait_for_signal(duration, bpf, every=interval or DEFAULT_INTERVAL)
    finally:
        bpf.close()


@tracer.command("selftest")
@click.option("--gtp5g", "gtp5g", is_flag=True,
              help="Test the real tracer on the loaded gtp5g: throwaway device, session and GTP-U traffic.")
@click.option("--obj", type=_BPF_OBJ, help="A built selftest.bpf.o (gtp5g.bpf.o with --gtp5g) [default: build].")
@click.option("--build-dir", type=_DIR, help=f"Where objects are built [default: {default_out_dir()}].")
@click.option("--timeout", type=Number(0.1, 3600, min_open=False), default=5.0, show_default=True,
              help="Seconds to wait for the probe's lines (with --gtp5g: for the last hook's line).")
@click.option("--packets", type=click.IntRange(1, 100000), default=20, show_default=True,
              help="With --gtp5g: rounds of uplink G-PDU + echo request + downlink IP to send.")
@click.option("--enable-qos", is_flag=True,
              help="With --gtp5g: turn gtp5g's global QoS switch on for the test (restored after), "
                   "so policePacket runs.")
@click.option("--instance", default=None, help="tracefs instance name [default: gtp5g-op-selftest; "
                                                "with --gtp5g gtp5g-op-st5g-<pid>].")
@click.option("--json", "as_json", is_flag=True, help="Print the verdicts as JSON.")
@command_options(*GLOBAL)
@cli_errors
def selftest(gtp5g: bool, obj: Path | None, build_dir: Path | None, timeout: float, packets: int,
             enable_qos: bool, instance: str | None, as_json: bool) -> None:
    """Prove BPF loading, bpf_printk, the tracefs instance pipe and the parser end to end.

    Loads a tracepoint probe that prints the tracer's line format on getppid(2), calls getppid
    from a thread named gtp5g-op-st, and checks its line comes back parsed as that thread.
    Needs root and tracefs, not gtp5g.

    With --gtp5g, on a host where gtp5g is loaded: loads the real tracer, creates a throwaway gtp5g
    device and PDU session (PDR/FAR/QER) in a private network namespace, sends uplink GTP-U and
    downlink IP from a process named nr-gnb, and checks that every attached hook fired and that its
    lines name that process. The UPF's own devices and sessions are not touched; the namespace,
    device, tracefs instance and BPF links are removed at the end, also on Ctrl-C or SIGTERM.
    Exits 0 when every step passes, 1 otherwise.

    \b
    Examples:
      gtp5g-op tracer selftest
      gtp5g-op tracer selftest --json --timeout 10
      gtp5g-op tracer selftest --gtp5g                     # on a UPF host with gtp5g loaded
      gtp5g-op tracer selftest --gtp5g --enable-qos --json # policePacket too
    """
    if not gtp5g and (enable_qos or packets != 20):
        raise UsageError("--packets and --enable-qos only apply with --gtp5g",
                         fix="add --gtp5g, or drop them")
    try:
        with _sigterm_as_interrupt():
            if gtp5g:
                result = run_gtp5g_selftest(obj, build_dir, timeout=timeout, packets=packets,
                                            enable_qos=enable_qos, instance=instance)
            else:
                result = run_selftest(obj, build_dir, timeout=timeout, instance=instance or "gtp5g-op-selftest")
    except KeyboardInterrupt:
        raise OpError("interrupted; everything the selftest had created was removed", exit_code=130) from None
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        marks = {True: Text("pass", style="green"), False: Text("FAIL", style="red"),
                 None: Text("skipped", style="dim")}
        console = make_console()
        cols = [Col("step", key=True), Col("result", key=True), Col("detail", key=True, wrap=True)]
        rows = [[text(s.name), marks[s.ok], text(s.detail)] for s in result.steps]
        console.print(fit_table(Text("tracer selftest" + (" on gtp5g" if gtp5g else "")), cols, rows,
                                console.width))
        if gtp5g and result.hooks:
            cols = [Col("hook", key=True), Col("lines", key=True), Col("from gNB", key=True),
                    Col("note", min=12, wrap=True)]
            rows = [[text(h.hook), str(h.lines), str(h.from_gnb), text(h.note)] for h in result.hooks]
            console.print(fit_table(Text("hooks"), cols, rows, console.width))
        for line in result.lines:
            click.echo(safe(line))
    if not result.ok:
        raise SystemExit(EXIT_FAIL)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the block, so the selftest's cleanup runs as on Ctrl-C."""
    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@click.command("tracer")
@click.option("--out", "out_dir", type=_DIR, help=f"Output directory [default: {default_out_dir()}].")
@click.option("--kernel-btf", type=_OBJ, default="/sys/kernel/btf/vmlinux", show_default=True,
              help="The kernel's BTF, for vmlinux.h.")
@click.option("--module-btf", type=_OBJ, help="gtp5g's BTF [default: /sys/kernel/btf/gtp5g when loaded].")
@click.option("--json", "as_json", is_flag=True, help="Print the built objects as JSON.")
@command_options(*GLOBAL)
@cli_errors
def build_tracer(out_dir: Path | None, kernel_btf: Path, module_btf: Path | None, as_json: bool) -> None:
    """Build the BPF tracer: vmlinux.h with bpftool, then clang for gtp5g.bpf.o and selftest.bpf.o.

    Needs clang, bpftool and libbpf-dev, and a kernel with BTF (CONFIG_DEBUG_INFO_BTF).

    \b
    Examples:
      gtp5g-op build tracer
      gtp5g-op build tracer --out ./build --json
    """
    built = build_objects(out_dir, kernel_btf, module_btf)
    if as_json:
        click.echo(json.dumps({name: str(path) for name, path in built.items()}))
    else:
        for name, path in built.items():
            click.echo(f"{name}: {path}")
