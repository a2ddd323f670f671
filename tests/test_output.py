"""Output for people: every table keeps its key facts at 80 columns, honours COLUMNS when piped, and shows
untrusted text literally (rich markup in a comm or an executable path is printed, never interpreted).

The markup attack is replayed with a real process: a copy of sleep(1) installed as ``…/evil[/x]/nr-gnb``
(so its comm is nr-gnb and its executable path holds ``[/x]``, which rich would read as a closing tag and
raise MarkupError on), traced in a paced replay with the live view on, validated against the real
process table, rejected by ``--exe-allow`` so the path is shown, and summarised at exit.
"""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FIXTURES
from rich.console import Console

from gtp5g_op.cli import main
from gtp5g_op.cli.doctor import doctor_table
from gtp5g_op.cli.liveview import LiveView, print_summary, summary_table
from gtp5g_op.cli.module import _print_report, preflight_table
from gtp5g_op.cli.output import Col, fit_table, safe
from gtp5g_op.kernel.verify import FunctionCheck, VerifyReport
from gtp5g_op.model import Check
from gtp5g_op.trace.watch import WatchOptions, run_watch

HOOKS = ("enqueue", "fentry/gtp5g_encap_recv", "fexit/pdr_find_by_gtp1u", "stop")


def render(renderable, width: int = 80) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def assert_fits(out: str, width: int = 80) -> None:
    """Every line of every table fits (a sentence after a table may be longer: it holds a path)."""
    assert max(len(line.rstrip()) for line in out.splitlines() if line[:1] in "┏┃┡│└") <= width, out


def cells(out: str) -> set[str]:
    """Every table cell's text, one per line of the rendered table."""
    return {c.strip() for line in out.splitlines() for c in re.split(r"[│┃]", line) if c.strip()}


def test_fit_table_keeps_keys_whole_and_drops_secondary_columns_in_order():
    cols = [Col("id", key=True), Col("url", key=True, wrap=True), Col("count", "right", drop=1),
            Col("when", drop=2), Col("note", min=6, drop=3)]
    url = "http://gthulhu-api.svc:8080/api/v1/strategies"
    rows = [["pid-1150348", url, "123456", "34203.408986", "a long note that may fold anywhere"]]
    out = render(fit_table("t", cols, rows, 80))
    assert_fits(out)
    assert url in out and "pid-1150348" in out and "123456" in out
    assert "34203.408986" not in out and "not shown at 80 columns: note, when" in out
    wide = render(fit_table("t", cols, rows, 200), 200)
    assert "34203.408986" in wide and "not shown" not in wide
    # narrower than the keys themselves: they fold, nothing is cut off
    narrow = render(fit_table("t", cols, rows, 40), 40)
    assert url in "".join(c for line in narrow.splitlines() for c in re.split(r"[│┃]", line)[2:3]).replace(" ", "")


def bundled_json() -> dict:
    return json.loads(CliRunner().invoke(main, ["watch", "--replay", "--json"]).stdout)


def test_watch_summary_at_80_columns_shows_every_pid_comm_and_hook(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    res = CliRunner().invoke(main, ["watch", "--replay"])
    assert res.exit_code == 0, res.output
    assert_fits(res.stdout)
    for p in bundled_json()["processes"]:
        assert re.search(rf"│ +{p['pid']} │ +{p['tgid'] or '-'} │ {p['comm']} ", res.stdout), p["pid"]
    shown = cells(res.stdout)
    assert all(any(h in c for c in shown) for h in HOOKS), shown
    assert "…" not in res.stdout
    assert len([line for line in res.stdout.splitlines() if re.match(r"│ +\d+ │", line)]) == 23


def test_piped_output_honours_columns_and_defaults_to_80():
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    cmd = [sys.executable, "-m", "gtp5g_op", "watch", "--replay"]
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60).stdout
    wide = subprocess.run(cmd, capture_output=True, text=True, env={**env, "COLUMNS": "132"}, timeout=60).stdout
    assert max(map(len, plain.splitlines())) == 80
    assert max(map(len, wide.splitlines())) == 132
    assert "first seen" in wide and "last seen" in wide and "not shown" not in wide


def test_live_view_at_80_columns_keeps_pid_comm_hooks_and_pushed():
    report = {"processes": [
        {"pid": 1150348, "tgid": 1150348, "comm": "nr-gnb", "events": 578, "first_seen": 1.0, "last_seen": 2.0,
         "hooks": list(HOOKS), "valid": True, "reason": "ok", "code": "ok", "from_threads": False},
        {"pid": 1150349, "tgid": 1150348, "comm": "nr-gnb", "events": 0, "first_seen": None, "last_seen": None,
         "hooks": [], "valid": True, "reason": "ok", "code": "ok", "from_threads": True}],
        "stats": {"lines": 1, "events": 1, "matched": 1, "malformed": 0, "lost_events": 0}}
    out = render(summary_table(report, 80, "live", {"ev/s": lambda p: "12", "pushed": lambda p: "yes"}))
    assert_fits(out)
    for fact in ("1150348", "1150349", "nr-gnb", *HOOKS, "pushed", "yes", "ev/s", "valid", "thread of"):
        assert fact in out, (fact, out)


def test_patch_module_check_at_80_columns_keeps_function_and_file_line(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    tree = FIXTURES / "gtp5g-mini" / "v0.10"
    res = CliRunner().invoke(main, ["patch-module", "--src", str(tree), "--check"])
    doc = json.loads(CliRunner().invoke(main, ["patch-module", "--src", str(tree), "--check", "--json"]).stdout)
    assert_fits(res.stdout)
    for f in doc["functions"]:
        assert re.search(rf"│ {f['name']} +│ {re.escape(f['file'])}:{f['line']} +│", res.stdout), f["name"]


def test_verify_doctor_and_preflight_tables_at_80_columns(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    names = ["gtp5g_encap_recv", "gtp5g_handle_skb_ipv4", "pdr_find_by_gtp1u", "policePacket"]
    report = VerifyReport("/lib/modules/6.1.0-56-amd64/updates/gtp5g/gtp5g.ko", True,
                          [FunctionCheck(n, True, n != "policePacket", "global") for n in names])
    _print_report(report)
    out = capsys.readouterr().out
    assert_fits(out)
    assert all(re.search(rf"│ {n} +│", out) for n in names)
    assert "/lib/modules/6.1.0-56-amd64/updates/gtp5g/gtp5g.ko" in out.replace("\n", "")

    url = "http://127.0.0.1:8080/health"
    checks = [Check("Gthulhu API", "fail", f"{url}: ConnectionError", "start the Gthulhu API, or pass --api-url"),
              Check("fentry", "fail", "refused: " + "word " * 30, "CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS=y"),
              Check("n3 interface", "warn", "no interface named n3", "name it n3", required=False)]
    out = render(doctor_table(checks, 80))
    assert_fits(out)
    assert url in out and "CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS=y" in out and "warn (optional)" in out

    kdir = "/usr/src/linux-headers-6.1.0-56-amd64"
    pre = [Check("kbuild", "ok", kdir), Check("vmlinux", "fail", "missing: module BTF will be skipped",
                                               f"cp /sys/kernel/btf/vmlinux {kdir}/", required=False)]
    out = render(preflight_table(pre, f"build preflight for {kdir}", 80))
    assert_fits(out)
    assert "/sys/kernel/btf/vmlinux" in out and f"{kdir}/" in out and "│ kbuild " in out


def test_untrusted_text_is_shown_literally():
    assert safe("a\x1b[31mb\x07c\udcff") == "a\\x1b[31mb\\x07c\\xff"
    report = {"processes": [
        {"pid": 7, "tgid": 7, "comm": "[/x]\x1b]0;pwned\x07", "events": 1, "first_seen": 1.0, "last_seen": 1.0,
         "hooks": ["[bold]fentry/x[/]"], "valid": False, "code": "exe", "from_threads": False,
         "reason": "executable /tmp/evil[/x]/nr-gnb matches no --exe-allow path"}],
        "stats": {"lines": 1, "events": 1, "matched": 1, "malformed": 0, "lost_events": 0},
        "problem": {"message": "every [/x] rejected", "fix": "[red]nothing[/red]"}}
    console = Console(file=io.StringIO(), width=120, force_terminal=True)
    print_summary(report, console)
    out = console.file.getvalue()
    assert "[/x]\\x1b]0;pwned\\x07" in out and "\x1b]0;" not in out
    assert "[bold]fentry/x[/]" in out and "/tmp/evil[/x]/nr-gnb" in out and "[red]nothing[/red]" in out


@pytest.fixture
def evil_gnb():
    """A real process named nr-gnb whose executable path holds ``[/x]``: sleep(1) copied as …/evil[/x]/nr-gnb."""
    root = Path(tempfile.mkdtemp(prefix="m", dir="/tmp"))
    exe = root / "evil[" / "x]" / "nr-gnb"
    exe.parent.mkdir(parents=True)
    shutil.copy2(shutil.which("sleep"), exe)
    proc = subprocess.Popen([str(exe), "60"])
    try:
        deadline = time.monotonic() + 5
        while Path(f"/proc/{proc.pid}/comm").read_text().strip() != "nr-gnb":
            assert time.monotonic() < deadline, "the copied sleep never showed up as nr-gnb"
            time.sleep(0.01)
        trace = root / "evil.trace"
        trace.write_text("".join(
            f"          nr-gnb-{proc.pid}    [000] ..s21   {100 + i * 0.1:.6f}: bpf_trace_printk: "
            f"fentry/gtp5g_encap_recv: PID={proc.pid}, TGID={proc.pid}, CPU=0, LEN=108, DEV=n3\n" for i in range(15)))
        yield proc.pid, exe, trace
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(root)


@pytest.mark.skipif(not os.path.exists("/proc/self/exe"), reason="needs /proc")
def test_markup_in_an_executable_path_in_a_paced_watch_with_the_view(evil_gnb):
    pid, exe, trace = evil_gnb
    console = Console(file=io.StringIO(), width=80, force_terminal=True)
    view = LiveView(console)
    try:
        result = run_watch(WatchOptions(replay=str(trace), speed=1.0, validate=True, exe_allow=("/nowhere/*",)),
                           view=view)
    finally:
        view.close()
    live = " ".join(console.file.getvalue().split())
    assert f"executable {exe} matches no --exe-allow path" in live, live[-3000:]
    assert str(pid) in live and "rejected (exe)" in live
    summary = Console(file=io.StringIO(), width=200, force_terminal=True)
    print_summary(result.report, summary)
    out = summary.file.getvalue()
    assert f"executable {exe} matches no --exe-allow path" in out and "every traced target was rejected" in out
    assert result.exit_code == 1


def test_markup_in_an_executable_path_through_the_cli_on_a_terminal(evil_gnb):
    """The same attack through the command as a person runs it: stdout a real terminal (pty), so the live
    view draws; exit 1 (every target rejected), no traceback, the path printed as it is."""
    pid, exe, trace = evil_gnb
    master, slave = pty.openpty()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("GTP5G_OP_")}, "COLUMNS": "100",
           "TERM": "xterm"}
    proc = subprocess.Popen([sys.executable, "-m", "gtp5g_op", "watch", "--replay", str(trace), "--speed", "1",
                             "--validate", "--exe-allow", "/nowhere/*"],
                            stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    proc.wait(timeout=30)
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode("utf-8", "replace")).replace("\r", "")
    assert "Traceback" not in out and "MarkupError" not in out, out[-3000:]
    assert proc.returncode == 1, out[-3000:]
    assert f"executable {exe} matches no --exe-allow path" in " ".join(out.split()), out[-3000:]
    assert "gtp5g-op watch: targets" in out  # the live view was drawn
