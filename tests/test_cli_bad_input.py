"""Every command, walked with a table of bad inputs: one line on stderr (``gtp5g-op: error: …; fix: …``),
the exit code the README gives for it, nothing on stdout, no traceback.

The inputs are real: a directory, a FIFO, /dev/null, a file that is not UTF-8, binary data, a missing
path. Rows for items other engineers own are marked ``xfail(strict=True)`` with the owner; the lead drops
the marker when their work merges (a strict xfail that starts passing fails, so none is forgotten).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FIXTURES

from gtp5g_op.cli import main

# Paths the rows refer to as {name}; made once by the `bad` fixture.
TRACE = str(FIXTURES / "traces" / "scheduler.trace")


def owner(who: str, issue: int):
    return pytest.mark.xfail(strict=True, reason=f"{who}: lands with issue {issue} work")


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF objects: not running as root")
needs_bpftool = pytest.mark.skipif(shutil.which("bpftool") is None, reason="bpftool is not installed")

ROWS = [
    # --- the group itself
    (["nosuch"], 2, "no such command 'nosuch'"),
    (["--nope"], 2, "has no option --nope"),
    (["-v", "--log-format", "xml", "doctor"], 2, "'xml' is not one of"),
    (["build", "nosuch"], 2, "no such command"),
    (["strategies", "nosuch"], 2, "no such command"),
    # --- watch: options
    (["watch", "--nope"], 2, "`gtp5g-op watch` has no option --nope"),
    (["watch", "--replay", TRACE, "-x"], 2, "has no option -x"),
    (["watch", "--speed", "abc"], 2, "'abc' is not a number"),
    (["watch", "--replay", "--speed", "nan"], 2, "'nan' is not a finite number"),
    (["watch", "--replay", "--speed", "inf"], 2, "'inf' is not a finite number"),
    (["watch", "--replay", "--speed", "0"], 2, "'0' is too small"),
    (["watch", "--replay", "--speed", "-3"], 2, "'-3' is too small"),
    (["watch", "--speed", "2"], 2, "--speed paces a replay, and there is none"),
    (["watch", "--replay", "--duration", "nan"], 2, "not a finite number"),
    (["watch", "--replay", "--interval", "0"], 2, "'0' is too small"),
    (["watch", "--replay", "--buffer-kb", "1"], 2, "not in the range"),
    (["watch", "--replay", "--metrics-port", "99999"], 2, "not in the range"),
    (["watch", "--replay", "--log-format", "xml"], 2, "'xml' is not one of"),
    (["watch", "--replay", "--execution-time", "fast"], 2, "is not a duration"),
    (["watch", "--replay", "--api-url", "ftp://x"], 2, "is not an http(s) url"),
    (["watch", "--match", ""], 2, "matches an empty name"),
    (["watch", "--replay", "--match", ".*"], 2, "matches an empty name"),
    (["watch", "--replay", "--match", "(nr-gnb)?"], 2, "matches an empty name"),
    (["watch", "--replay", "--match", "("], 2, "not a valid regular expression"),
    (["watch", "--replay", TRACE, "--trace-pipe", "{fifo}"], 2, "cannot be combined"),
    (["watch", "--replay", TRACE, "--with-tracer"], 2, "cannot be combined"),
    (["watch", "--replay", "--instance", "other"], 2, "--instance sets up the private tracefs instance"),
    (["watch", "--trace-pipe", "{fifo}", "--buffer-kb", "64"], 2, "--buffer-kb sets up the private"),
    (["watch", "--replay", "--exe-allow", "/usr/bin/*"], 2, "a replay that does not push is not validated"),
    (["watch", "--replay", "--no-validate", "--exe-allow", "/x"], 2, "--no-validate turns validation off"),
    (["watch", "--replay", "--uid-allow", "0"], 2, "--uid-allow applies to validated processes only"),
    (["watch", "--replay", "--push", "--no-validate", "--allow-user-writable-exe"], 2,
     "--allow-user-writable-exe applies to validated processes only"),
    (["watch", "--replay", "--push"], 2, "neither a public key nor a user name"),
    # --- watch: files
    (["watch", "--replay", "{missing}"], 2, "replay file {missing} does not exist"),
    (["watch", "--replay", "{dir}"], 2, "replay file {dir} is a directory"),
    (["watch", "--replay", "/dev/null"], 2, "is a character device"),
    (["watch", "--replay", "{binary}"], 2, "is binary data, not a trace"),
    (["watch", "--replay", "{elf}"], 2, "is binary data, not a trace"),
    (["watch", "--trace-pipe", "{dir}"], 2, "trace pipe {dir} is a directory"),
    (["watch", "--trace-pipe", "{missing}"], 2, "trace pipe {missing} does not exist"),
    (["watch", "--trace-pipe", "/dev/null"], 2, "is a character device"),
    (["watch", "--config", "{dir}", "--replay"], 2, "config file {dir} is a directory"),
    (["watch", "--config", "{missing}", "--replay"], 2, "config file {missing} does not exist"),
    (["watch", "--config", "{latin1}", "--replay"], 2, "is not utf-8 text (byte 0xe9"),
    (["watch", "--config", "{binary}", "--replay"], 2, "is binary data, not text"),
    (["watch", "--config", "{fifo}", "--replay"], 2, "is a fifo, not a regular file"),
    (["watch", "--config", "{badtoml}", "--replay"], 2, "is not valid toml"),
    (["--config", "{dir}", "watch", "--replay"], 2, "config file {dir} is a directory"),
    (["watch", "--replay", "--push", "--public-key", "{dir}"], 2, "public key {dir} is a directory"),
    (["watch", "--replay", "--push", "--public-key", "{binary}"], 2, "public key {binary} is binary data"),
    (["watch", "--replay", "--push", "--public-key", "{missing}"], 2, "public key {missing} does not exist"),
    (["watch", "--replay", "--push", "--public-key", "{key}", "--ca-bundle", "{missing}",
      "--api-url", "https://127.0.0.1:9"], 2, "ca bundle {missing} does not exist"),
    (["watch", "--replay", "--config", "{exe_allow_int}"], 2, "exe_allow"),
    (["watch", "--replay", "--json", "--config", "{timeout_nan}"], 2, "timeout"),
    (["watch", "--replay", "--exe-allow", "*/nr-gnb", "--validate"], 2, "is not an absolute path"),
    # --- strategies
    (["strategies", "list", "--nope"], 2, "`gtp5g-op strategies list` has no option --nope"),
    (["strategies", "push"], 2, "missing option '--pid'"),
    (["strategies", "push", "--pid", "abc"], 2, "'abc' is not a valid integer"),
    (["strategies", "push", "--pid", "0"], 2, "not in the range"),
    (["strategies", "delete"], 2, "missing option '--pid'"),
    (["strategies", "list", "--public-key", "{missing}"], 2, "public key {missing} does not exist"),
    (["strategies", "list", "--public-key", "{dir}"], 2, "is a directory"),
    (["strategies", "--public-key", "{latin1}", "list"], 2, "not utf-8"),
    (["strategies", "list", "--config", "{badtoml}"], 2, "is not valid toml"),
    (["strategies", "list", "--public-key", "{key}", "--ca-bundle", "{binary}", "--api-url",
      "https://127.0.0.1:9"], 2, "ca bundle"),
    (["strategies", "push", "--pid", "99999999", "--public-key", "{key}", "--api-url", "http://127.0.0.1:9"], 2,
     "99999999 is above this kernel's pid_max"),
    (["strategies", "push", "--pid", "4242", "--execution-time", "0", "--public-key", "{key}", "--api-url",
      "http://127.0.0.1:9"], 2, "'0' is not a time slice"),
    (["strategies", "list", "--public-key", "{key}", "--api-url", "http://127.0.0.1:99999"], 2, "port out of range"),
    (["strategies", "push", "--comm", "nr-gnb", "--pid", "5", "--api-url", "http://127.0.0.1:99999"], 2, "99999"),
    (["strategies", "list", "--username", "u", "--password-file", "{dir}", "--api-url", "http://127.0.0.1:9"], 2,
     "password file"),
    (["strategies", "list", "--api", "nope"], 2, "nope"),
    # a comm no policy can match is bad input: refused before any connection (it was exit 1 after login)
    (["strategies", "push", "--comm", "", "--username", "u", "--api-url", "http://127.0.0.1:9"], 2,
     "comm '' cannot be matched exactly"),
    (["strategies", "push", "--comm", "x" * 16, "--username", "u", "--api-url", "http://127.0.0.1:9"], 2,
     "1 to 15 bytes"),
    (["strategies", "delete", "--comm", "", "--username", "u", "--api-url", "http://127.0.0.1:9"], 2,
     "comm '' cannot be matched exactly"),
    (["strategies", "list", "--dm-url", "ftp://x", "--public-key", "{key}"], 2, "not an http(s) url"),
    (["watch", "--replay", "--push", "--api-url", "http://user:pw@127.0.0.1:9"], 2, "carries credentials"),
    # --- patch-module
    (["patch-module"], 2, "missing option '--src'"),
    (["patch-module", "--src", "{missing}"], 2, "gtp5g source tree {missing} does not exist"),
    (["patch-module", "--src", "{text}"], 2, "is a regular file, not a directory"),
    (["patch-module", "--src", "{dir}"], 2, "does not look like a gtp5g source tree"),
    (["patch-module", "--src", "{dir}", "--check", "--diff"], 2, "--check and --diff cannot be combined"),
    (["patch-module", "--src", "{dir}", "--diff", "--revert"], 2, "--diff and --revert cannot be combined"),
    (["patch-module", "--src", "{dir}", "--check", "--revert"], 2, "cannot be combined"),
    (["patch-module", "--src", "{dir}", "--diff", "--json"], 2, "has no json form"),
    (["patch-module", "--src", "{dir}", "-U", "1"], 2, "-u/--context sets the context lines of --diff"),
    (["patch-module", "--src", "{dir}", "--revert", "--export", "gtp5g_rx"], 2, "--set and --export do not apply"),
    (["patch-module", "--src", "{dir}", "--diff", "-U", "500"], 2, "not in the range"),
    (["patch-module", "--src", "{dir}", "--set", "{missing}"], 2, "export set {missing} does not exist"),
    (["patch-module", "--src", "{dir}", "--set", "{dir}"], 2, "export set {dir} is a directory"),
    (["patch-module", "--src", "{dir}", "--set", "{latin1}"], 2, "is not utf-8 text"),
    (["patch-module", "--src", "{dir}", "--set", "{binary}"], 2, "is binary data"),
    (["patch-module", "--src", "{dir}", "--set", "{badtoml}"], 2, "is not valid toml"),
    # --- build
    (["build", "module"], 2, "missing option '--src'"),
    (["build", "module", "--src", "{missing}"], 2, "gtp5g source tree {missing} does not exist"),
    (["build", "module", "--src", "{text}"], 2, "is a regular file, not a directory"),
    (["build", "module", "--src", "{dir}", "--kdir", "{missing}"], 2, "kernel build dir {missing} does not exist"),
    (["build", "module", "--src", "{dir}", "--force"], 2, "--force only matters with --reload"),
    (["build", "module", "--src", "{dir}", "-j", "0"], 2, "not in the range"),
    (["build", "tracer", "--kernel-btf", "{dir}"], 2, "is a directory"),
    (["build", "tracer", "--nope"], 2, "`gtp5g-op build tracer` has no option --nope"),
    pytest.param(["build", "tracer", "--kernel-btf", "{text}", "--out", "{out}"], 2, "btf",
                 marks=needs_bpftool),
    # --- verify
    (["verify"], 2, "give either a gtp5g.ko path or --loaded"),
    (["verify", "{dir}"], 2, "module {dir} is a directory"),
    (["verify", "{missing}"], 2, "module {missing} does not exist"),
    (["verify", "{fifo}"], 2, "is a fifo, not a regular file"),
    (["verify", "{text}"], 2, "is not an elf file"),
    (["verify", "{text}", "--loaded"], 2, "give either"),
    (["verify", "--loaded", "--symvers", "{text}"], 2, "not the loaded module"),
    (["verify", "{text}", "--symvers", "{dir}"], 2, "module.symvers {dir} is a directory"),
    (["verify", "{text}", "--base-btf", "{missing}"], 2, "base btf {missing} does not exist"),
    # --- doctor
    (["doctor", "--bad"], 2, "`gtp5g-op doctor` has no option --bad"),
    (["doctor", "--config", "{dir}"], 2, "is a directory"),
    (["doctor", "--api-url", "nope"], 2, "is not an http(s) url"),
    # --- tracer
    (["tracer", "nosuch"], 2, "no such command"),
    (["tracer", "run", "--obj", "{dir}"], 2, "bpf object {dir} is a directory"),
    (["tracer", "run", "--obj", "{missing}"], 2, "bpf object {missing} does not exist"),
    (["tracer", "run", "--duration", "-1"], 2, "'-1' is too small"),
    (["tracer", "run", "--duration", "inf"], 2, "not a finite number"),
    (["tracer", "selftest", "--timeout", "0"], 2, "'0' is too small"),
    (["tracer", "selftest", "--obj", "{fifo}"], 2, "is a fifo"),
    pytest.param(["tracer", "run", "--obj", TRACE, "--duration", "0"], 2, "scheduler.trace",
                 marks=[needs_root]),
    pytest.param(["tracer", "run", "--program", "no_such_prog", "--duration", "0"], 2, "no_such_prog",
                 marks=[needs_root]),
]


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, str]:
    """Real bad inputs: a directory, a FIFO, binary data, an ELF file, Latin-1 text, broken TOML ..."""
    root = tmp_path_factory.mktemp("bad")
    paths = {"dir": root / "a-dir", "missing": root / "no" / "such-file", "fifo": root / "fifo",
             "binary": root / "data.bin", "latin1": root / "latin1.toml", "badtoml": root / "bad.toml",
             "text": root / "notes.txt", "key": root / "key.pem", "out": root / "out",
             "exe_allow_int": root / "exe-allow.toml", "timeout_nan": root / "timeout.toml",
             "elf": Path(sys.executable).resolve()}
    paths["dir"].mkdir()
    os.mkfifo(paths["fifo"])
    paths["binary"].write_bytes(os.urandom(4096))
    paths["latin1"].write_bytes(b'[targets]\nmatch = "caf\xe9"\n')
    paths["badtoml"].write_text("[api\nurl = \n")
    paths["text"].write_text("some notes\n")
    paths["exe_allow_int"].write_text("[targets]\nexe_allow = 5\n")
    paths["timeout_nan"].write_text("[api]\ntimeout = nan\n")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    paths["key"].write_bytes(key.public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo))
    return {name: str(path) for name, path in paths.items()}


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("GTP5G_OP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("GTP5G_OP_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.mark.parametrize(("args", "code", "words"), ROWS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_input_is_one_line_with_the_right_exit_code(args, code, words, bad, clean_env):
    args = [a.format(**bad) for a in args]
    result = CliRunner().invoke(main, args)
    err = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == code, (result.exit_code, result.output)
    assert len(err) == 1 and err[0].startswith("gtp5g-op: error: ") and "; fix: " in err[0], result.output
    assert words.format(**bad).lower() in err[0].lower(), err[0]
    assert result.stdout.strip() == "", result.stdout


def test_the_same_mistake_reads_the_same_in_every_command(bad, clean_env):
    """An unknown option and a directory given as a file: one shape in every command."""
    runner = CliRunner()
    for path in (["watch"], ["strategies", "list"], ["patch-module"], ["verify"], ["doctor"],
                 ["tracer", "run"], ["tracer", "selftest"], ["build", "module"], ["build", "tracer"]):
        err = runner.invoke(main, [*path, "--no-such-flag"]).stderr.strip()
        cmd = " ".join(["gtp5g-op", *path])
        assert err == (f"gtp5g-op: error: `{cmd}` has no option --no-such-flag; "
                       f"fix: `{cmd} --help` lists its options and examples"), err
    for args in (["watch", "--config", bad["dir"], "--replay"], ["doctor", "--config", bad["dir"]],
                 ["strategies", "list", "--config", bad["dir"]]):
        err = runner.invoke(main, args).stderr.strip()
        assert err.startswith(f"gtp5g-op: error: config file {bad['dir']} is a directory, not a regular file; fix: ")


def run_cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GTP5G_OP_")}
    return subprocess.Popen([sys.executable, "-m", "gtp5g_op", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, **kwargs)


def test_as_a_process_the_prog_name_is_gtp5g_op_and_exit_codes_hold(bad):
    missing = Path(bad["dir"]) / "trace_pipe"
    proc = run_cli("watch", "--trace-pipe", str(missing))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and out == b""
    assert err.decode().splitlines() == [
        f"gtp5g-op: error: trace pipe {missing} does not exist; fix: give trace_pipe, a FIFO or a capture "
        "file; or omit --trace-pipe to read a private tracefs instance"]
    proc = run_cli("watch", "--nope")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and err.decode().startswith("gtp5g-op: error: `gtp5g-op watch` has no option")


def test_ctrl_c_exits_130_without_a_traceback(bad):
    """A command without a Ctrl-C handler of its own (an API call to a server that never answers)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        proc = run_cli("strategies", "list", "--api-url", f"http://127.0.0.1:{port}", "--public-key", bad["key"])
        conn = None
        deadline = time.monotonic() + 30
        silent.settimeout(1)
        while conn is None and time.monotonic() < deadline:
            try:
                conn, _ = silent.accept()  # the request is in flight, waiting for an answer
            except TimeoutError:
                assert proc.poll() is None, proc.communicate()
        assert conn is not None, "the command never connected"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        conn.close()
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err, err.decode()
    assert err.strip() == b"" and out == b""


def test_a_closed_stdout_ends_quietly():
    """`gtp5g-op watch --replay | head -0`: the reader went away; no BrokenPipeError noise."""
    proc = run_cli("watch", "--replay", "--json")
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert err == b"", err.decode()


@pytest.mark.parametrize("args", [["watch", "--replay"], ["--help"], ["watch", "--help"], ["doctor"],
                                  ["watch", "--replay", "--no-validate", "--json"]])
def test_a_stdout_closed_before_the_first_write_ends_quietly_with_0(args):
    """The reader of stdout is gone before anything is written (``| head -1`` that already exited): rich's
    own broken-pipe handler (tables) and click's (help of the top group) exited 1, "the answer is no"."""
    rfd, wfd = os.pipe()
    os.close(rfd)
    try:
        proc = subprocess.run([sys.executable, "-m", "gtp5g_op", *args], stdout=wfd, stderr=subprocess.PIPE,
                              timeout=60)
    finally:
        os.close(wfd)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr == b"", proc.stderr.decode()


def test_a_bug_is_one_line_exit_70_and_vv_shows_the_traceback(monkeypatch):
    """An exception nobody turned into an OpError: one line saying it is a bug; the traceback with -vv."""
    from gtp5g_op.ops import doctor

    def broken(*_args, **_kwargs):
        raise ZeroDivisionError("injected")

    monkeypatch.setattr(doctor, "run_checks", broken)
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 70
    assert result.stderr.strip() == ("gtp5g-op: error: unexpected ZeroDivisionError: injected; fix: this is a bug "
                                     "in gtp5g-op: rerun with -vv for the traceback and report it")
    result = CliRunner().invoke(main, ["doctor", "-vv"])
    assert result.exit_code == 70 and "Traceback" in result.stderr and "ZeroDivisionError" in result.stderr


def test_the_workload_helper_uses_the_same_error_path():
    proc = subprocess.run([sys.executable, "-m", "gtp5g_op.kernel.workload", "--rate", "fast"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "gtp5g-op: error: invalid value for '--rate': 'fast' is not a number; fix: give a number for --rate; "
        "`python -m gtp5g_op.kernel.workload --help` lists its options and examples"]


@pytest.mark.parametrize("args", [["verify", "{closed}/gtp5g.ko"],
                                  ["tracer", "run", "--build-dir", "{closed}/build", "--duration", "0"]])
def test_a_path_in_a_directory_the_user_cannot_search_is_bad_input_not_a_bug(tmp_path, args):
    """As uid 65534, a path under a 0700 directory of root's: stat() fails with EACCES, which
    ``Path.is_dir()``/``is_file()`` raise rather than answer; both ended as exit 70 "a bug in gtp5g-op"."""
    from hostile import as_user, require_root

    require_root("needs root to drop to uid 65534")
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    tmp_path.chmod(0o755)
    argv = [a.format(closed=closed) for a in args]
    # This interpreter's standard library may be out of uid 65534's reach: load what the command needs now.
    import encodings.utf_8_sig  # noqa: F401

    import gtp5g_op.kernel.bpf_loader  # noqa: F401
    import gtp5g_op.kernel.tracer_build  # noqa: F401
    import gtp5g_op.kernel.verify  # noqa: F401

    CliRunner().invoke(main, [*args[:2], "--help"])

    def run() -> tuple[int, str]:
        result = CliRunner().invoke(main, argv, env={"HOME": "/nonexistent", "XDG_CACHE_HOME": ""})
        return result.exit_code, result.output

    code, output = as_user(run)
    assert code == 2, output
    assert len(output.strip().splitlines()) == 1 and "unexpected" not in output, output
    assert str(closed) in output and "uid 65534" in output or "Permission denied" in output, output
