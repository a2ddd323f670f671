"""``gtp5g-op watch``: a thin layer over :mod:`gtp5g_op.trace.watch`."""

from __future__ import annotations

import json
import sys

import click

from gtp5g_op.cli.common import API, GLOBAL, STATE_DIR, Number, api_flags, setup_logs, shared_options, shared_values
from gtp5g_op.config import MIN_INTERVAL
from gtp5g_op.errors import UsageError, cli_errors
from gtp5g_op.trace.tracefs import MAX_BUFFER_KB
from gtp5g_op.trace.watch import BUNDLED_SAMPLE, READ_MODES, WatchOptions, run_watch


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)


def _refuse_ignored(ctx: click.Context, opts: WatchOptions, exe_allow_flag: bool) -> None:
    """Options that would be silently ignored with the others given are refused instead."""
    if opts.trace_pipe or opts.replay is not None:
        source = "--trace-pipe" if opts.trace_pipe else "--replay"
        for name in ("instance", "buffer_kb", "read_mode"):
            if _given(ctx, name):
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} sets up the private tracefs instance, which {source} does not use",
                                 f"drop {flag} or {source}")
    checks = [flag for flag, given in (("--exe-allow", exe_allow_flag), ("--uid-allow", _given(ctx, "uid_allow")),
                                        ("--allow-user-writable-exe", _given(ctx, "allow_user_writable_exe")))
              if given]
    if checks and not opts.validating:
        flag = checks[0]
        if opts.validate is False:
            raise UsageError(f"{flag} applies to validated processes only, and --no-validate turns "
                             "validation off", f"drop --no-validate or {flag}")
        raise UsageError(f"{flag} applies to validated processes only, and a replay that does not push "
                         "is not validated", "add --validate to check the replayed pids against this host")


@click.command()
@click.option(
    "--replay",
    metavar="FILE",
    is_flag=False,
    flag_value=BUNDLED_SAMPLE,
    help="Replay a captured trace (plain or .gz; - for stdin) instead of reading live. "
    "Without FILE: the bundled lab capture.",
)
@click.option("--trace-pipe", metavar="PATH", help="Read this pipe, FIFO or file instead of a private tracefs instance.")
@click.option("--instance", default="gtp5g-op", show_default=True, help="Name of the private tracefs instance.")
@click.option("--buffer-kb", type=click.IntRange(min=4, max=MAX_BUFFER_KB),
              help="Per-CPU buffer size of the private instance (KiB, at most 1048576).")
@click.option("--read-mode", type=click.Choice(READ_MODES), default="auto", show_default=True,
              help="How the private instance is read: its binary ring buffers (raw: least CPU; needs "
              "validation), its text trace_pipe, or auto: raw where it works, else text.")
@click.option("--match", metavar="REGEX", help="Target comms (full match). [default: ^(nr-gnb|nr-ue)$]")
@click.option("--validate/--no-validate", default=None,
              help="Check every subject against this host's processes. [default: on, except for a --replay "
              "without --push]")
@click.option("--exe-allow", metavar="PATH", multiple=True,
              help="Accept only these executables: absolute paths, '*' within one level (repeatable). "
              "[default: any root-owned executable named like a target]")
@click.option("--allow-user-writable-exe", is_flag=True, default=None,
              help="Also accept executables that a non-root user owns or could replace (unsafe).")
@click.option("--uid-allow", metavar="UID", type=click.IntRange(0, 2**32 - 2), multiple=True,
              help="Accept only processes whose real uid is one of these (repeatable). [default: any]")
@click.option("--threads/--no-threads", default=None, help="Cover every thread of a target process. [default: on]")
@click.option("--speed", type=Number(0, 1e6), metavar="X", help="Replay at this many times the recorded pace.")
@click.option("--duration", type=Number(0, 1e9), metavar="SECONDS", help="Stop after this long.")
@click.option("--with-tracer", is_flag=True, help="Build if needed, load the bundled gtp5g tracer, unload on exit.")
@click.option("--kprobe-fallback/--no-kprobe-fallback", default=True,
              help="With --with-tracer: kprobes where fentry/fexit is refused (docs/tracer.md). [default: on]")
@click.option("--tracer-interval", type=Number(0, 3600, min_open=False), metavar="SECONDS",
              help="With --with-tracer: one line per thread and hook this often (0: every event). [default: 1]")
@click.option("--push", is_flag=True, help="Push scheduling strategies for the targets to the Gthulhu API.")
@click.option("--replace", is_flag=True, default=None, help="Replace the server's whole set instead of merging.")
@click.option("--interval", type=Number(MIN_INTERVAL, 86400, min_open=False), metavar="SECONDS",
              help="Re-send the set this often (at least 1). [default: 10]")
@click.option("--priority/--no-priority", default=None, help="Strategy priority. [default: priority]")
@click.option("--execution-time", metavar="DURATION", help="Strategy time slice, e.g. 20ms. [default: 20ms]")
@shared_options(*GLOBAL, *API, STATE_DIR)
@click.option("--metrics-port", type=click.IntRange(0, 65535), help="Serve Prometheus /metrics and /healthz here.")
@click.option("--metrics-addr", metavar="IP", default="127.0.0.1", show_default=True,
              help="Address the metrics port binds (the pod IP in Kubernetes; 0.0.0.0 for every interface).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON report at exit instead of tables.")
@click.option("--no-accel", is_flag=True, hidden=True, help="Use the pure-Python parser (for comparisons).")
@click.option("--read-batch", type=Number(0, 1, min_open=False), hidden=True,
              help="Seconds a live read gathers lines (0: the unbatched reader, for comparisons).")
@click.pass_context
@cli_errors
def watch(ctx: click.Context, **kw) -> None:
    """Find the processes that carry GTP-U traffic in a trace and (with --push) favour them.

    Reads a private tracefs instance by default (other readers of the global trace_pipe are not
    disturbed), validates every subject against the live process table, and prints a summary at exit.
    A --replay only reports what the capture holds, unless --validate is given; a replay that pushes
    is validated unless --no-validate is given.

    \b
    Examples:
      gtp5g-op watch --replay                              # the bundled lab capture
      gtp5g-op watch --replay lab.trace.gz --json          # what a capture holds
      gtp5g-op watch --replay lab.trace.gz --validate      # which of its processes run here
      gtp5g-op watch --replay lab.trace --speed 10 --push --public-key gthulhu.pub
      gtp5g-op watch --with-tracer --push --public-key gthulhu.pub
      gtp5g-op watch --with-tracer --push --api-url http://gthulhu-manager:8080 --username ops --password-file pw
      gtp5g-op watch --trace-pipe /sys/kernel/tracing/trace_pipe --duration 30
      gtp5g-op watch --read-mode text --duration 30        # the instance's text pipe, not its ring buffers
      gtp5g-op watch --push --exe-allow /opt/UERANSIM/build/nr-gnb --exe-allow /opt/UERANSIM/build/nr-ue
    """
    setup_logs(ctx)
    from gtp5g_op.config import load_settings

    settings = load_settings(
        shared_values(ctx).get("config"),
        **api_flags(ctx),
        match=kw["match"],
        exe_allow=kw["exe_allow"] or None,
        allow_user_writable_exe=kw["allow_user_writable_exe"],
        uid_allow=kw["uid_allow"] or None,
        threads=kw["threads"],
        priority=kw["priority"],
        execution_time=kw["execution_time"],
        interval=kw["interval"],
        replace=kw["replace"],
        state_dir=shared_values(ctx).get("state_dir"),
    )
    pusher_factory = None
    if kw["push"]:
        from gtp5g_op.gthulhu import factory

        def pusher_factory():
            pusher = factory.make_pusher(settings, kind)  # kind: from the preflight below
            pusher.start()
            return pusher

    opts = WatchOptions(
        replay=kw["replay"],
        trace_pipe=kw["trace_pipe"],
        instance=kw["instance"],
        state_dir=settings.state_dir,
        buffer_kb=kw["buffer_kb"],
        match=settings.match,
        validate=kw["validate"],
        exe_allow=settings.exe_allow,
        allow_user_writable_exe=settings.allow_user_writable_exe,
        uid_allow=settings.uid_allow,
        threads=settings.threads,
        speed=kw["speed"],
        duration=kw["duration"],
        push=kw["push"],
        interval=settings.interval,
        pusher_factory=pusher_factory,
        with_tracer=kw["with_tracer"],
        tracer_interval=kw["tracer_interval"],
        tracer_kprobe_fallback=kw["kprobe_fallback"],
        metrics_port=kw["metrics_port"],
        metrics_addr=kw["metrics_addr"],
        accelerate=not kw["no_accel"],
        read_mode=kw["read_mode"],
    )
    if kw["read_batch"] is not None:
        opts.read_batch = kw["read_batch"]
    if kw["metrics_port"] is not None:
        from gtp5g_op.ops.metrics import check_addr

        check_addr(kw["metrics_addr"])
    _refuse_ignored(ctx, opts, bool(kw["exe_allow"]))
    if kw["push"]:
        kind = factory.preflight(settings)  # the API's kind, and missing credentials now, not after the trace
    view = None
    if not kw["as_json"] and (opts.replay is None or opts.speed) and sys.stdout.isatty():
        from gtp5g_op.cli.liveview import LiveView

        view = LiveView()
    try:
        result = run_watch(opts, view=view)
    finally:
        if view is not None:
            view.close()
    if kw["as_json"]:
        click.echo(json.dumps(result.report, indent=1))
    else:
        from gtp5g_op.cli.liveview import print_summary

        print_summary(result.report)
    ctx.exit(result.exit_code)
