"""``watch``: read a trace (live pipe, FIFO, file or captured replay), run it through the pipeline, push.

The CLI builds :class:`WatchOptions` and calls :func:`run_watch`; tests call it directly.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import signal
import sys
import threading
import time
import zlib
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from gtp5g_op import userfiles
from gtp5g_op.config import MIN_INTERVAL, finite_number
from gtp5g_op.errors import EXIT_API, EXIT_FAIL, EXIT_OK, EnvironmentProblem, UsageError
from gtp5g_op.trace.parser import DEFAULT_MATCH, Stats, TraceParser
from gtp5g_op.trace.pipeline import REJECTED_SUBJECTS_MAX, Pipeline

log = logging.getLogger(__name__)

BUNDLED_SAMPLE = "lab-capture.trace.gz"
READ_CHUNK = 1 << 20
TICK = 0.2  # seconds between housekeeping rounds while live
READ_BATCH = 0.1  # seconds a live read gathers lines before handing them on (one wake-up per batch)
READ_BATCH_BYTES = 1 << 20  # at most this much per batch
READ_MODES = ("auto", "text", "raw")  # how a private instance is read (docs/live.md)
READER_QUEUE = 16  # batches waiting for the parser: bounds memory (16 MiB) if parsing falls behind
FLUSH_DRAIN = 0.5  # after the tracer's final flush, how long to keep reading its lines
REFRESH = 1.0  # seconds between process refreshes (exits, new threads)
PUSH_STOP_WAIT = 2.0  # at exit, how long to wait for a push still in flight before the final one
# At exit the instance and the tracer go first; then the final push gets at most this long, whatever the
# API does (a second SIGINT/SIGTERM gives up on it at once), so a watch ends well within Kubernetes'
# 30 s grace period.
FINAL_PUSH_WAIT = 3.0
# A trace is called garbage when more than MALFORMED_SHARE of its lines are malformed and at least
# MALFORMED_MIN are (a normal capture has none; a noisy one a few per cent), or when no line is an event.
MALFORMED_SHARE = 0.5
MALFORMED_MIN = 10
LIVE_WARN_AFTER = 200  # lines read before a live watch judges its input
TRACE_FIX = "give a text capture of trace_pipe (plain or gzip), as gtp5g-op watch reads it"
PIPE_FIX = "give trace_pipe, a FIFO or a capture file; or omit --trace-pipe to read a private tracefs instance"


@dataclass
class WatchOptions:
    """Everything ``watch`` can be told; defaults are the CLI's."""

    replay: str | None = None  # a path, "-" for stdin, or BUNDLED_SAMPLE
    trace_pipe: str | None = None
    instance: str = "gtp5g-op"
    state_dir: Path | None = None  # instance locks (gtp5g_op.ops.statedir); None: the default
    buffer_kb: int | None = None
    match: str = DEFAULT_MATCH
    validate: bool | None = None  # None: the rule of :attr:`validating`
    exe_allow: tuple[str, ...] = ()  # absolute executable path patterns (gtp5g_op.trace.validate)
    allow_user_writable_exe: bool = False
    uid_allow: tuple[int, ...] = ()
    threads: bool = True
    speed: float | None = None
    duration: float | None = None
    push: bool = False
    interval: float = 10.0
    pusher_factory: Callable[[], Any] | None = None  # builds a started StrategyPusher
    with_tracer: bool = False
    tracer_interval: float | None = None  # the tracer's aggregation interval (None: its default, 1 s)
    tracer_kprobe_fallback: bool = True  # kprobe twins where fentry/fexit is refused
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"  # an IP address; the DaemonSet passes the pod IP
    accelerate: bool = True
    read_batch: float = READ_BATCH  # seconds a live read gathers lines before handing them on
    read_mode: str = "auto"  # READ_MODES: a private instance's text trace_pipe, its raw ring buffers, or
    # auto: raw where it works (validating, C decoder built, layout known), else text

    @property
    def validating(self) -> bool:
        """One rule: a replay that only reports is not checked against this host unless asked
        (``validate=True``); anything live, and anything that pushes, is checked unless ``validate=False``
        (so a capture from another machine cannot push its pids by accident)."""
        if self.validate is not None:
            return self.validate
        return self.replay is None or self.push


@dataclass
class WatchResult:
    """What a watch run produced: the JSON report and the exit code."""

    report: dict
    exit_code: int = EXIT_OK
    pipeline: Pipeline | None = None


# --- sources ---------------------------------------------------------------------------------
def open_replay(path: str) -> IO[bytes]:
    """Open a captured trace: a path (plain or gzip, by content; a FIFO too), ``-`` for stdin, or the bundled one."""
    if path == "-":
        return sys.stdin.buffer
    if path == BUNDLED_SAMPLE:
        return (resources.files("gtp5g_op") / "data" / BUNDLED_SAMPLE).open("rb")
    return userfiles.open_binary(path, "replay file", kinds=userfiles.STREAMS, fix=TRACE_FIX)


def refuse_binary(first: bytes, what: str) -> None:
    """Refuse a replay whose first bytes (decompressed) are binary data rather than trace text."""
    why = userfiles.binary_evidence(first, strict=False)
    if why:
        raise UsageError(f"{what} is binary data, not a trace ({why})", TRACE_FIX)


def garbage_warning(stats: Stats) -> str | None:
    """A warning naming the share of malformed lines when the input does not look like a trace; else None."""
    if not stats.malformed:
        return None
    share = stats.malformed / max(stats.lines, 1)
    ratio = f"{stats.malformed} of {stats.lines} lines ({share:.0%}) are malformed"
    if not stats.events:
        return f"no line of the input is a trace event: {ratio}; is this trace_pipe output?"
    if stats.malformed >= MALFORMED_MIN and share > MALFORMED_SHARE:
        return f"the input is mostly not trace_pipe output: {ratio}"
    return None


_REJECTED_WHY = {
    "dead": "{n} had exited or never ran on this host",
    "comm": "{n} carry another name now",
    "reused": "{n} pids belong to other processes now",
    "exe": "{n} run an executable that is not allowed",
    "kthread": "{n} are kernel threads",
    "idle": "{n} were pid 0",
}


def explain_rejections(rejected: dict[str, int], replay: bool, push: bool) -> dict[str, str]:
    """Why every traced target was rejected (``rejected``: distinct subjects per reason code), and what to
    do: ``{"message": ..., "fix": ...}``."""
    parts = [_REJECTED_WHY.get(code, "{n} failed the check " + code).format(
                 n=f"{n} or more" if n >= REJECTED_SUBJECTS_MAX else n)
             for code, n in sorted(rejected.items(), key=lambda kv: -kv[1])]
    message = f"every traced target was rejected by the checks against this host's processes: {', '.join(parts)}"
    top = max(rejected, key=lambda code: rejected[code])
    if replay and top in ("dead", "reused", "comm"):
        fix = ("a capture from another machine (or of processes gone by now) cannot be checked here: replay it "
               "without --validate to see its processes" + (", and push its pids with --no-validate only on the "
                                                            "machine where they run" if push else ""))
    elif top == "exe":
        fix = ("compare `readlink /proc/PID/exe` of the targets with --exe-allow (targets.exe_allow), or without "
               "it with the default rule: a root-owned executable named like the target, in root-owned "
               "directories (docs/live.md)")
    elif top in ("dead", "reused"):
        fix = "the targets exited before they could be checked: are the gNB and UE running?"
    elif top == "comm":
        fix = "the targets renamed themselves after the trace named them: check --match against `ps -L -o tid,comm`"
    else:
        fix = "check --match: it selects kernel threads or pid 0"
    return {"message": message, "fix": fix}


def read_chunks(fh: IO[bytes], size: int = READ_CHUNK) -> Iterator[bytes]:
    """Yield a file's bytes in chunks, decompressing gzip (by its magic bytes) on the way.

    zlib's streaming decompressor is used rather than ``gzip.GzipFile`` so that a truncated
    capture still yields everything before the cut (GzipFile raises and loses the last block).
    """
    first = fh.read(size)
    if first[:2] != b"\x1f\x8b":
        chunk = first
        while chunk:
            yield chunk
            chunk = fh.read(size)
        return
    inflater, pending, data = zlib.decompressobj(wbits=31), False, first
    try:
        while data:
            out, pending = inflater.decompress(data), True
            while inflater.eof:  # a member ended; another may follow (concatenated gzip)
                rest, pending = inflater.unused_data, False
                inflater = zlib.decompressobj(wbits=31)
                if rest:
                    out += inflater.decompress(rest)
                    pending = True
            if out:
                yield out
            data = fh.read(size)
    except zlib.error as exc:
        log.warning("replay input is not valid gzip past this point: %s", exc)
        return
    if pending:
        if tail := inflater.flush():
            yield tail
        log.warning("replay input ended early: the gzip stream is truncated")


def paced(chunks: Iterator[bytes], speed: float, stop: threading.Event) -> Iterator[bytes]:
    """Re-emit lines at ``speed`` times the pace of their trace timestamps."""
    from gtp5g_op.trace.parser import parse_line

    t0 = ts0 = None
    tail = b""
    for chunk in chunks:
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        for line in lines:
            ev = parse_line(line)
            if ev is not None:
                if t0 is None:
                    t0, ts0 = time.monotonic(), ev.timestamp
                delay = t0 + (ev.timestamp - ts0) / speed - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    return
            yield line + b"\n"
    if tail:
        yield tail


class LiveReader:
    """Reads a live pipe in a thread of its own so parsing or pushing never stalls the kernel buffer.

    ``chunks`` should batch (``tail(..., batch_seconds=READ_BATCH)``): a handful of wake-ups a second
    instead of one per page read. The reader has its own stop event, so the final lines (e.g. the
    tracer's flush at detach) can still be read after the watch was told to stop.
    """

    def __init__(self, chunks: Iterator[bytes], stop: threading.Event):
        self.queue: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=READER_QUEUE)
        self._chunks = chunks
        self._stop = stop
        self.thread = threading.Thread(target=self._run, name="trace-reader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        # The thread that iterates the generator closes it (another thread cannot while it runs): the
        # pipe's descriptor is closed when this thread ends, not when the garbage collector gets to it.
        try:
            with contextlib.closing(self._chunks):
                for chunk in self._chunks:
                    if not self._put(chunk):
                        return
            self._put(None)
        except BaseException as exc:  # handed to the main thread, which raises it
            self._put(exc)

    def _put(self, item: bytes | BaseException | None) -> bool:
        """Queue ``item`` unless stopped meanwhile (a full queue must not keep the pipe open)."""
        while not self._stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def close(self, timeout: float = 2.0) -> None:
        """Stop reading and wait for the thread to close the pipe (tail polls at most 0.2 s at a time)."""
        self._stop.set()
        self.thread.join(timeout)
        if self.thread.is_alive():
            log.warning("the trace reader did not stop within %.1f s", timeout)

    def get(self, timeout: float) -> bytes | None:
        """The next chunk; b"" when nothing came within ``timeout``; None at the end of input."""
        try:
            item = self.queue.get(timeout=timeout)
        except queue.Empty:
            return b""
        if isinstance(item, BaseException):
            raise item
        return item


# --- the run ---------------------------------------------------------------------------------
@dataclass
class _Stop:
    """``stop``: the first SIGTERM/SIGINT (or the end of input); ``abort``: a second one, give up waiting."""

    stop: threading.Event
    abort: threading.Event


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[_Stop]:
    """SIGTERM and SIGINT end the watch cleanly (instance removed, final report printed); a second one
    abandons the final push."""
    state = _Stop(stop, threading.Event())
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum: int, _frame: Any) -> None:
        if stop.is_set():
            log.warning("signal %d again: not waiting for the API any longer", signum)
            state.abort.set()
        else:
            log.info("signal %d: stopping", signum)
        stop.set()

    for s in previous:
        signal.signal(s, handler)
    try:
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _final_push(pusher: Any, abort: threading.Event, wait: float = FINAL_PUSH_WAIT) -> bool:
    """Stop the pusher and push the last set, giving it at most ``wait`` seconds (less after ``abort``).

    It runs in a daemon thread so that nothing the API does (a server that accepts and never answers, a
    slow drip, Retry-After) can hold the exit; True if it finished and succeeded.
    """
    result: list[bool] = []
    worker = threading.Thread(target=lambda: result.append(pusher.stop(final_push=True, timeout=PUSH_STOP_WAIT)),
                              name="final-push", daemon=True)
    worker.start()
    deadline = time.monotonic() + wait
    while worker.is_alive() and not abort.is_set() and (left := deadline - time.monotonic()) > 0:
        worker.join(min(left, 0.1))
    if worker.is_alive():
        log.warning("the final push to %s did not finish within %.0f s; exiting without it",
                    getattr(getattr(pusher, "client", None), "api_url", "the Gthulhu API"), wait)
        return False
    return bool(result and result[0])


def build_pipeline(opts: WatchOptions, pusher: Any = None, metrics: Any = None) -> Pipeline:
    """The pipeline for these options."""
    validator, resolve_comm = None, None
    if opts.validating:
        from gtp5g_op.trace.validate import ProcessValidator, current_comm

        # The checks compare with /proc anyway, so a `<...>` subject can be named from there.
        validator = ProcessValidator(exe_allow=opts.exe_allow, threads=opts.threads, exe_names=opts.match,
                                     allow_user_writable_exe=opts.allow_user_writable_exe,
                                     uid_allow=opts.uid_allow)
        resolve_comm = current_comm
    parser = TraceParser(opts.match, accelerate=opts.accelerate, resolve_comm=resolve_comm)
    return Pipeline(parser, validator=validator, pusher=pusher, metrics=metrics, threads=opts.threads)


def run_watch(opts: WatchOptions, view: Callable[[Pipeline, Any], None] | None = None) -> WatchResult:
    """Run a watch to the end of its input, ``--duration``, or a signal; return the report."""
    check_options(opts)
    if opts.trace_pipe:
        userfiles.check(opts.trace_pipe, "trace pipe", kinds=userfiles.STREAMS, fix=PIPE_FIX)
    if opts.replay is None and opts.validating:
        from gtp5g_op.trace.validate import require_host_pid_namespace

        require_host_pid_namespace()
    stop = threading.Event()
    with contextlib.ExitStack() as stack:
        metrics = None
        if opts.metrics_port is not None:
            from gtp5g_op.ops.metrics import Metrics, push_max_age

            metrics = Metrics(push_max_age=push_max_age(opts.interval) if opts.push else None)
            metrics.serve(opts.metrics_port, host=opts.metrics_addr)
            stack.callback(metrics.stop)
        pusher = opts.pusher_factory() if opts.push and opts.pusher_factory else None
        if pusher is not None and metrics is not None and hasattr(pusher, "metrics"):
            pusher.metrics = metrics
        pipeline = build_pipeline(opts, pusher, metrics)
        signals = stack.enter_context(_stop_on_signals(stop))
        pushed_ok = True
        try:
            if opts.replay is not None:
                _run_replay(opts, pipeline, stop, metrics, view)
            else:
                _run_live(opts, pipeline, stop, metrics, view)  # removes its instance before returning
        finally:
            if pusher is not None:
                pipeline.publish()
                pushed_ok = _final_push(pusher, signals.abort)
        report = pipeline.report()
        if pusher is not None:
            report["push"] = _push_status(pusher, pushed_ok)
        warning = garbage_warning(pipeline.parser.stats)
        if warning:
            report["warnings"] = [warning]
            if not pipeline.garbage_warned:
                log.warning("%s", warning)
        all_rejected = bool(pipeline.rejected) and not any(r.valid for r in pipeline.records.values())
        if all_rejected:
            distinct = {code: len(keys) for code, keys in pipeline.rejected_subjects.items()}
            report["problem"] = explain_rejections(distinct, opts.replay is not None, opts.push)
        code = EXIT_OK
        if pusher is not None and opts.replay is not None and not pushed_ok:
            code = EXIT_API
        elif all_rejected and opts.replay is not None:
            code = EXIT_FAIL  # the answer to "which processes of this capture run here?" is "none"
        return WatchResult(report, code, pipeline)


def check_options(opts: WatchOptions) -> None:
    """Refuse options that cannot be right together, before anything starts."""
    if opts.replay is not None and (opts.trace_pipe or opts.with_tracer):
        raise UsageError("--replay cannot be combined with --trace-pipe or --with-tracer", "pick one source")
    if opts.read_mode not in READ_MODES:
        raise UsageError(f"--read-mode must be one of {', '.join(READ_MODES)}, not {opts.read_mode!r}",
                         "pass --read-mode auto")
    if opts.read_mode == "raw":
        if opts.replay is not None or opts.trace_pipe:
            raise UsageError("--read-mode raw reads a private tracefs instance's ring buffers, and "
                             f"{'--replay' if opts.replay is not None else '--trace-pipe'} reads text",
                             "drop --read-mode raw")
        if not opts.validating:
            raise UsageError("--read-mode raw needs validation: a ring-buffer record has no comm, which is "
                             "named from /proc while validating", "drop --no-validate, or use --read-mode text")
    if opts.speed is not None and opts.replay is None:
        raise UsageError("--speed paces a replay, and there is none", "add --replay FILE, or drop --speed")
    for what, value, minimum, maximum in (("--speed", opts.speed, 0.0, 1e6), ("--duration", opts.duration, 0.0, 1e9),
                                          ("--interval", opts.interval, MIN_INTERVAL, 86400.0)):
        if value is not None:
            finite_number(value, what, minimum, maximum, min_open=minimum == 0.0)


def _push_status(pusher: Any, ok: bool) -> dict:
    doc = asdict(pusher.status)
    doc["final_push_ok"] = ok
    return doc


def _load_tracer(stack: contextlib.ExitStack, interval: float | None = None, kprobe_fallback: bool = True) -> Any:
    """Load and attach the bundled gtp5g tracer until the watch ends; the loaded BpfObject."""
    from gtp5g_op.kernel.bpf_loader import open_tracer

    bpf = open_tracer(interval=interval, kprobe_fallback=kprobe_fallback)
    stack.callback(bpf.close)
    if not bpf.attached:
        reasons = list(dict.fromkeys(r.error for r in bpf.report if r.error))
        why = reasons[0] if reasons else "the object has no programs"
        if len(reasons) > 1:
            why += f" (and {len(reasons) - 1} other reasons)"
        raise EnvironmentProblem(
            f"no gtp5g tracer program attached: {why}",
            "`gtp5g-op tracer run` shows the reason for every function; `gtp5g-op doctor` checks the host",
        )
    for r in bpf.report:
        if not r.attached:
            log.warning("tracer: %s not attached: %s", r.function or r.name, r.error)
        elif r.fallback:
            log.info("tracer: %s attached by %s (%s refused: %s)", r.function, r.mechanism, r.kind, r.fallback)
    return bpf


class _Refresher:
    """Every REFRESH seconds: forget exited processes, pick up threads, publish, redraw the view."""

    def __init__(self, pipeline: Pipeline, view: Callable | None, instance: Any = None):
        self.pipeline, self.view, self.instance = pipeline, view, instance
        self.last = 0.0

    def __call__(self, now: float) -> None:
        if now - self.last >= REFRESH:
            self.last = now
            self.pipeline.refresh()
            self._judge_input()
            if self.view:
                self.view(self.pipeline, self.instance)

    def _judge_input(self) -> None:
        """Warn once, while still reading, when the input turns out not to be a trace."""
        stats = self.pipeline.parser.stats
        if not self.pipeline.garbage_warned and stats.lines >= LIVE_WARN_AFTER:
            warning = garbage_warning(stats)
            if warning:
                log.warning("%s", warning)
                self.pipeline.garbage_warned = True


def _run_replay(
    opts: WatchOptions, pipeline: Pipeline, stop: threading.Event, metrics: Any, view: Callable | None
) -> None:
    deadline = time.monotonic() + opts.duration if opts.duration else None
    refresh = _Refresher(pipeline, view)
    with open_replay(opts.replay) as fh, contextlib.ExitStack() as gens:  # type: ignore[arg-type]
        chunks: Iterator[bytes] = gens.enter_context(contextlib.closing(read_chunks(fh)))
        chunks = gens.enter_context(contextlib.closing(_sniffed(chunks, _replay_name(opts.replay))))  # type: ignore[arg-type]
        if opts.speed:
            chunks = gens.enter_context(contextlib.closing(paced(chunks, opts.speed, stop)))
        for chunk in chunks:
            pipeline.feed(chunk)
            if metrics is not None:
                metrics.mark_read()
            now = time.monotonic()
            if opts.speed:  # a paced replay behaves like a live watch
                refresh(now)
            if stop.is_set() or (deadline and now >= deadline):
                break
    pipeline.finish()
    pipeline.refresh()


def _replay_name(replay: str) -> str:
    return {"-": "standard input", BUNDLED_SAMPLE: "the bundled capture"}.get(replay, f"replay file {replay}")


def _sniffed(chunks: Iterator[bytes], what: str) -> Iterator[bytes]:
    """``chunks``, after refusing binary data in the first of them."""
    first = True
    for chunk in chunks:
        if first and chunk:
            refuse_binary(chunk, what)
            first = False
        yield chunk


def _run_live(
    opts: WatchOptions,
    pipeline: Pipeline,
    stop: threading.Event,
    metrics: Any,
    view: Callable | None,
) -> None:
    """Read the live source until the end, ``--duration`` or a signal; the instance, the tracer and the
    reader are gone when this returns (before the final push, which may wait on the API)."""
    from gtp5g_op.trace import tracefs

    with contextlib.ExitStack() as stack:
        instance = None
        if opts.trace_pipe:
            path = Path(opts.trace_pipe)
        else:
            instance = stack.enter_context(tracefs.TraceInstance(opts.instance, buffer_kb=opts.buffer_kb,
                                                                 state_dir=opts.state_dir))
            path = instance.pipe
            pipeline.boot_clock = True  # the instance's clock is "boot": exact pid-reuse checks
        bpf = None
        if opts.with_tracer:
            bpf = _load_tracer(stack, opts.tracer_interval, opts.tracer_kprobe_fallback)
            pipeline.tracer = [r.to_dict() for r in bpf.report]
        read_stop = threading.Event()  # its own: the tracer's final flush is read after `stop`
        raw = _raw_reader(opts, instance, read_stop) if instance is not None else None
        chunks = raw if raw is not None else tracefs.tail(path, read_stop, batch_seconds=opts.read_batch,
                                                          batch_bytes=READ_BATCH_BYTES)
        pipeline.reader = {"mode": "raw" if raw is not None else "text"}
        reader = LiveReader(chunks, read_stop)  # type: ignore[arg-type]
        stack.callback(reader.close)  # first on the way out: removing the instance needs the pipe closed
        deadline = time.monotonic() + opts.duration if opts.duration else None
        refresh = _Refresher(pipeline, view, instance)
        flush_every = opts.tracer_interval or 1.0
        last_flush = time.monotonic()
        while not stop.is_set():
            chunk = reader.get(TICK)
            if chunk is None:
                break
            if chunk:
                pipeline.feed(chunk)
            if metrics is not None:
                metrics.mark_read()
            now = time.monotonic()
            if bpf is not None and bpf.aggregates and now - last_flush >= flush_every:
                bpf.flush()  # counts of threads idle for an interval: printed now, not at exit
                last_flush = now
            refresh(now)
            if deadline and now >= deadline:
                break
        stop.set()
        if bpf is not None:  # detach, then the kernel prints every pending count: read those lines too
            bpf.detach()
            end = time.monotonic() + FLUSH_DRAIN
            while (left := end - time.monotonic()) > 0 and (chunk := reader.get(min(left, TICK))) is not None:
                pipeline.feed(chunk)
        if instance is not None:
            pipeline.overruns = instance.overruns()
    if raw is not None:
        pipeline.reader |= raw.stats.as_json()
    pipeline.finish()
    pipeline.refresh()


def _raw_reader(opts: WatchOptions, instance: Any, stop: threading.Event) -> Any:
    """A RawReader of ``instance``'s ring buffers when the read mode asks for one and it works; else None
    (the text pipe), with one log line saying why when raw reading was possible in principle."""
    from gtp5g_op.trace import rawbuf

    if opts.read_mode == "text" or not opts.validating:
        return None  # without validation nothing could name a raw record's task (docs/live.md)
    decode, compiled = rawbuf.best_decoder(opts.accelerate)
    if opts.read_mode == "auto" and opts.accelerate and not compiled:
        log.info("reading the text trace_pipe: the C ring-buffer decoder is not built")
        return None
    try:
        fmt = rawbuf.read_format(instance.path)
    except rawbuf.RawUnavailable as exc:
        if opts.read_mode == "raw":
            raise EnvironmentProblem(f"cannot read the ring buffers of {instance.path}: {exc}",
                                     "use --read-mode text") from None
        log.info("reading the text trace_pipe: %s", exc)
        return None
    instance.wake_on_any_data()
    try:
        reader = rawbuf.RawReader(instance.path, stop, fmt, decode=decode, batch_seconds=opts.read_batch,
                                  batch_bytes=READ_BATCH_BYTES)
    except EnvironmentProblem as exc:
        if opts.read_mode == "raw":
            raise
        log.info("reading the text trace_pipe: %s", exc.message)
        return None
    log.debug("reading the ring buffers of %s (%s decoder)", instance.path, "C" if compiled else "Python")
    return reader
