"""``gtp5g-op watch --replay``: the CLI over the same pipeline live watching uses."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from conftest import FIXTURES

from gtp5g_op.cli import main

TRACES = sorted((FIXTURES / "traces").glob("*.trace"))


def invoke(*args: str, input: bytes | None = None):
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


@pytest.mark.parametrize("path", TRACES, ids=lambda p: p.name)
def test_json_report_matches_expected(path):
    res = invoke("watch", "--replay", str(path), "--no-validate", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == json.loads(path.with_suffix(".expected.json").read_text())


def test_gzip_and_stdin_give_the_same_report(tmp_path):
    src = FIXTURES / "traces" / "gtp5g-tracer.trace"
    gz = tmp_path / "capture.trace.gz"
    gz.write_bytes(gzip.compress(src.read_bytes()))
    plain = invoke("watch", "--replay", str(src), "--no-validate", "--json").output
    assert invoke("watch", "--replay", str(gz), "--no-validate", "--json").output == plain
    assert invoke("watch", "--replay", "-", "--no-validate", "--json", input=src.read_bytes()).output == plain


def test_bundled_capture_table():
    res = invoke("watch", "--replay", "--no-validate")
    assert res.exit_code == 0
    assert "nr-gnb" in res.output and "nr-ue" in res.output and "lost 17" in res.output


def test_bundled_capture_has_the_lab_threads():
    doc = json.loads(invoke("watch", "--replay", "--no-validate", "--json").output)
    comms = [p["comm"] for p in doc["processes"]]
    assert comms.count("nr-gnb") == 11 and comms.count("nr-ue") == 12
    assert doc["stats"]["malformed"] == 0 and doc["stats"]["lost_events"] == 17


def test_match_selects_targets():
    """The kworker line names nr-ue in its message, so only iperf3 (named by pid=5555) is a subject."""
    doc = json.loads(invoke("watch", "--replay", str(FIXTURES / "traces" / "scheduler.trace"),
                            "--no-validate", "--json", "--match", "iperf3|kworker/.*").output)
    assert {(p["pid"], p["comm"]) for p in doc["processes"]} == {(5555, "iperf3")}


def test_validation_rejects_processes_of_another_machine():
    """With --validate, the pids of a capture are checked against this host: none is alive here, and the
    report says why and what to do; the answer to "which of them run here?" is no (exit 1)."""
    res = invoke("watch", "--replay", str(FIXTURES / "traces" / "gtp5g-tracer.trace"), "--validate", "--json")
    doc = json.loads(res.stdout)
    assert res.exit_code == 1
    assert doc["processes"] == [] and doc["rejected"] == {"dead": 3}
    assert "3 had exited" in doc["problem"]["message"] and "without --validate" in doc["problem"]["fix"]
    table = invoke("watch", "--replay", str(FIXTURES / "traces" / "gtp5g-tracer.trace"), "--validate")
    assert table.exit_code == 1
    assert "every traced target was rejected" in table.stdout and "fix: " in table.stdout


def test_speed_replays_at_the_recorded_pace(tmp_path):
    trace = tmp_path / "paced.trace"
    trace.write_text("".join(
        f"nr-gnb-7 [000] .... {10 + i * 0.5:.6f}: bpf_trace_printk: stop: pid=7 (nr-gnb)\n" for i in range(3)))
    t0 = time.monotonic()
    doc = json.loads(invoke("watch", "--replay", str(trace), "--no-validate", "--json", "--speed", "4").output)
    assert time.monotonic() - t0 >= 0.25  # 1 s of trace at 4x
    assert doc["processes"][0]["events"] == 3


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["--replay", "/nonexistent/x.trace"], 2, "does not exist"),
        (["--replay", "x", "--trace-pipe", "y"], 2, "cannot be combined"),
        (["--replay", "x", "--match", "("], 2, "not a valid regular expression"),
        (["--replay", "x", "--push"], 2, "public key"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args, code, words, monkeypatch):
    monkeypatch.delenv("GTP5G_OP_PUBLIC_KEY", raising=False)
    res = CliRunner().invoke(main, ["watch", *args])
    assert res.exit_code == code
    lines = [line for line in res.output.splitlines() if line]
    assert len(lines) == 1 and words in lines[0] and "fix:" in lines[0]


def test_truncated_gzip_keeps_what_was_read(tmp_path):
    data = gzip.compress((FIXTURES / "traces" / "gtp5g-tracer.trace").read_bytes())
    bad = tmp_path / "cut.trace.gz"
    bad.write_bytes(data[: len(data) - 20])
    res = invoke("watch", "--replay", str(bad), "--no-validate", "--json")
    assert res.exit_code == 0
    assert json.loads(res.stdout)["stats"]["lines"] >= 10
    assert "ended early" in res.stderr


def test_help_lists_every_command_and_version():
    out = invoke("--help").output
    for cmd in ("watch", "strategies", "patch-module", "verify", "doctor", "tracer", "build"):
        assert cmd in out
    assert invoke("--version").output.startswith("gtp5g-op, version ")
    assert "Examples:" in invoke("watch", "--help").output


def test_module_entry_point_runs_as_a_process():
    out = subprocess.run([sys.executable, "-m", "gtp5g_op", "watch", "--replay", "--no-validate", "--json"],
                         capture_output=True, check=True, timeout=60).stdout
    assert len(json.loads(out)["processes"]) == 23


def push_args(server):
    return ["--api-url", server.url, "--public-key", str(server.public_key)]


def test_replay_push_makes_one_final_push(gthulhu_server, tmp_path, monkeypatch):
    monkeypatch.setenv("GTP5G_OP_STATE_DIR", str(tmp_path / "state"))
    res = CliRunner().invoke(main, ["watch", "--replay", "--no-validate", "--json", "--push",
                                    *push_args(gthulhu_server)])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["push"]["final_push_ok"] is True
    assert gthulhu_server.pids() == {p["pid"] for p in doc["processes"]}
    assert any(s.get("selectors") for s in gthulhu_server.state()["strategies"]), "foreign entry lost"
    assert "eyJ" not in res.output


def test_replay_push_exits_nonzero_when_the_api_is_down(gthulhu_server, tmp_path, monkeypatch):
    monkeypatch.setenv("GTP5G_OP_STATE_DIR", str(tmp_path / "state"))
    gthulhu_server.stop()
    res = CliRunner().invoke(main, ["watch", "--replay", str(FIXTURES / "traces" / "scheduler.trace"),
                                    "--no-validate", "--json", "--push", *push_args(gthulhu_server)])
    assert res.exit_code == 4
    doc = json.loads(res.stdout)
    assert doc["push"]["final_push_ok"] is False and len(doc["processes"]) == 5


def test_one_validation_rule(gthulhu_server, tmp_path, monkeypatch):
    """A replay that only reports is not validated (the bundled capture's 23 threads show); one that pushes
    is, so another machine's pids are not pushed by accident: every one rejected, said why, nothing pushed."""
    doc = json.loads(invoke("watch", "--replay", "--json").stdout)
    assert len(doc["processes"]) == 23 and "valid" not in doc["processes"][0] and "problem" not in doc
    monkeypatch.setenv("GTP5G_OP_STATE_DIR", str(tmp_path / "state"))
    res = CliRunner().invoke(main, ["watch", "--replay", "--json", "--push", *push_args(gthulhu_server)])
    doc = json.loads(res.stdout)
    assert res.exit_code == 1, res.output
    assert doc["processes"] == [] and doc["rejected"] == {"dead": 23}
    assert "23 had exited" in doc["problem"]["message"] and "--no-validate" in doc["problem"]["fix"]
    assert gthulhu_server.pids() == set()


def test_mostly_malformed_input_is_warned_with_the_ratio(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("".join(f"line {i} of something else\n" for i in range(40)))
    res = CliRunner().invoke(main, ["watch", "--replay", str(notes), "--json"])
    assert res.exit_code == 0
    warning = "no line of the input is a trace event: 40 of 40 lines (100%) are malformed"
    assert [line for line in res.stderr.splitlines() if line] == [
        f"gtp5g-op: WARNING: {warning}; is this trace_pipe output?"]
    assert json.loads(res.stdout)["warnings"] == [f"{warning}; is this trace_pipe output?"]
    mixed = tmp_path / "mixed.trace"
    good = (FIXTURES / "traces" / "scheduler.trace").read_text()
    mixed.write_text(good + "garbage\n" * 30)
    res = CliRunner().invoke(main, ["watch", "--replay", str(mixed), "--json"])
    assert "the input is mostly not trace_pipe output: 30 of 42 lines (71%) are malformed" in res.stderr
    # a normal capture, and a noisy one (4 of 23 lines malformed), are not warned about
    for trace in ("--replay", f"--replay={FIXTURES / 'traces' / 'noisy-mixed.trace'}"):
        res = CliRunner().invoke(main, ["watch", trace, "--json"])
        assert res.stderr == "" and "warnings" not in json.loads(res.stdout)


def test_garbage_on_a_trace_pipe_is_warned_once(tmp_path):
    garbage = tmp_path / "pipe.txt"
    garbage.write_bytes(b"\x01\x02 not a trace line\n" * 500)
    res = CliRunner().invoke(main, ["watch", "--trace-pipe", str(garbage), "--no-validate", "--json"])
    assert res.exit_code == 0, res.output
    assert res.stderr.count("WARNING") == 1 and "500 of 500 lines (100%)" in res.stderr
