"""Issue 11 item 1, replayed: unprivileged users (real uid 65534 processes) naming themselves nr-gnb.

Each test plays the attacker with a real process of another user and checks the validator (and, end to
end, a live ``watch --push`` against the test server) does not favour it; the old code accepted all of
them. The attacker's programs run /usr/bin/python3 (this checkout's interpreter may live where uid 65534
cannot read it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import host_pids, wait_for
from hostile import NOBODY, as_user, open_tmp, popen_as, require_root  # noqa: F401 - open_tmp is a fixture

from gtp5g_op.trace.validate import ProcessValidator, read_stat

SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")
# Names itself nr-gnb (every thread), calls getppid (the selftest probe's tracepoint) and prints its pid.
SPOOFER = r"""
import os, sys, threading, time
def name():
    with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
        f.write("nr-gnb")
def loop():
    name()
    while True:
        os.getppid()
        time.sleep(0.005)
name()
for _ in range(2):
    threading.Thread(target=loop, daemon=True).start()
print(os.getpid(), flush=True)
if len(sys.argv) > 1:  # exec into another program once told to (stdin)
    sys.stdin.readline()
    os.execv(sys.argv[1], [sys.argv[1], "-c", "import time; time.sleep(60)"])
loop()
"""


@pytest.fixture(autouse=True)
def _needs_root_and_python():
    require_root("the attacks run as uid 65534")
    if SYSTEM_PYTHON is None:
        pytest.skip("needs /usr/bin/python3 (apt-get install python3)")


class Spoofer:
    """A running attacker process; ``pid`` once it named itself."""

    def __init__(self, exe: str, uid: int = NOBODY, exec_into: str | None = None):
        cmd = [exe, "-c", SPOOFER] + ([exec_into] if exec_into else [])
        self.proc = (popen_as(cmd, uid, uid, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) if uid
                     else subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        self.pid = int(self.proc.stdout.readline())
        assert wait_for(lambda: (read_stat(self.pid) or read_stat(1)).comm == "nr-gnb", 5) is not None

    def tids(self) -> list[int]:
        return [int(t) for t in os.listdir(f"/proc/{self.pid}/task")]

    def __enter__(self) -> Spoofer:
        return self

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait()


def planted_copy(directory: Path, uid: int = NOBODY) -> str:
    """uid copies /usr/bin/python3 into ``directory`` as nr-gnb, as the issue's attacker did."""
    target = directory / "nr-gnb"

    def copy() -> None:
        shutil.copy(os.path.realpath(SYSTEM_PYTHON), target)
        os.chmod(target, 0o755)

    as_user(copy, uid, uid) if uid else copy()
    return str(target)


def test_a_user_renaming_an_interpreter_is_refused_with_the_default_settings():
    """1a: uid 65534, python3 renamed nr-gnb (comm), with threads: accepted by the old default."""
    with Spoofer(SYSTEM_PYTHON) as s:
        validator = ProcessValidator()
        for tid in s.tids():
            v = validator.check(tid, "nr-gnb")
            assert not v.ok and v.code == "exe" and "not named like a target" in v.reason, v
        # Explicitly allowing that interpreter is the user's call; the uid allow-list still refuses.
        allowed = ProcessValidator(exe_allow=[os.path.realpath(SYSTEM_PYTHON)])
        assert allowed.check(s.pid, "nr-gnb").ok
        v = ProcessValidator(exe_allow=[os.path.realpath(SYSTEM_PYTHON)], uid_allow=[0]).check(s.pid, "nr-gnb")
        assert not v.ok and v.code == "uid" and f"uid {NOBODY}" in v.reason


def test_a_user_planted_binary_named_nr_gnb_is_refused_even_when_the_allow_list_matches(open_tmp):
    """1b: uid 65534 copies python3 as nr-gnb into a world-writable directory; the old '*/nr-gnb' took it."""
    ww = open_tmp / "ww"
    ww.mkdir()
    ww.chmod(0o777)
    exe = planted_copy(ww)
    with Spoofer(exe) as s:
        for validator in (ProcessValidator(), ProcessValidator(exe_allow=[str(open_tmp) + "/*/nr-gnb"])):
            v = validator.check(s.pid, "nr-gnb")
            assert not v.ok and v.code == "untrusted", v
            assert f"owned by uid {NOBODY}, not root" in v.reason and "--allow-user-writable-exe" in v.reason
        # The opt-out is explicit and does what it says.
        assert ProcessValidator(allow_user_writable_exe=True).check(s.pid, "nr-gnb").ok


def test_a_root_owned_binary_in_a_directory_others_can_write_is_refused(open_tmp):
    """Root's own copy, but in a directory anyone may rename it out of and replace it in."""
    ww = open_tmp / "ww"
    ww.mkdir()
    ww.chmod(0o777)
    exe = planted_copy(ww, uid=0)
    with Spoofer(exe) as s:
        v = ProcessValidator().check(s.pid, "nr-gnb")
        assert not v.ok and v.code == "untrusted" and f"directory {ww} is writable by group or others" in v.reason
    ww.chmod(0o755)  # the same file once the directory is root's alone
    with Spoofer(exe) as s:
        assert ProcessValidator().check(s.pid, "nr-gnb").ok


def test_a_writable_executable_and_an_ancestor_owned_by_a_user_are_refused(open_tmp):
    home = open_tmp / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    sub = home / "bin"
    sub.mkdir(mode=0o755)  # root's, but inside nobody's directory: nobody can rename it away
    exe = planted_copy(sub, uid=0)
    with Spoofer(exe, uid=0) as s:
        v = ProcessValidator().check(s.pid, "nr-gnb")
        assert not v.ok and f"directory {home} is owned by uid {NOBODY}" in v.reason
    safe = open_tmp / "safe"
    safe.mkdir(mode=0o755)
    exe = planted_copy(safe, uid=0)
    os.chmod(exe, 0o757)
    with Spoofer(exe, uid=0) as s:
        v = ProcessValidator().check(s.pid, "nr-gnb")
        assert not v.ok and "is writable by group or others (mode 0757)" in v.reason


def test_execve_into_a_planted_binary_after_validation_is_caught(open_tmp):
    """Same pid, same start time, new program: the identity cache is keyed by the executable's inode too."""
    safe = open_tmp / "safe"
    safe.mkdir(mode=0o755)
    trusted = planted_copy(safe, uid=0)
    ww = open_tmp / "ww"
    ww.mkdir()
    ww.chmod(0o777)
    planted = planted_copy(ww)
    with Spoofer(trusted, uid=0, exec_into=planted) as s:
        validator = ProcessValidator()
        before = validator.check(s.pid, "nr-gnb")
        assert before.ok
        start = read_stat(s.pid).start_ticks
        s.proc.stdin.write("go\n")
        s.proc.stdin.flush()
        assert wait_for(lambda: os.readlink(f"/proc/{s.pid}/exe") == planted, 5) is not None
        assert read_stat(s.pid).start_ticks == start and read_stat(s.pid).comm == "nr-gnb"
        after = validator.check(s.pid, "nr-gnb")
        assert not after.ok and after.code == "untrusted"


# --- end to end: a live watch with --push, the selftest probe standing in for gtp5g's hooks -------------

from test_live_e2e import finish, start_watch  # noqa: E402


@host_pids
def test_live_watch_pushes_no_spoofer_but_the_installed_target(selftest_probe, gthulhu_server, tmp_path, open_tmp):
    from gtp5g_op.kernel import workload

    ww = open_tmp / "ww"
    ww.mkdir()
    ww.chmod(0o777)
    planted = planted_copy(ww)
    watch = start_watch(gthulhu_server, tmp_path, f"gtp5g-op-spoof-{os.getpid()}")
    try:
        with Spoofer(SYSTEM_PYTHON) as renamed, Spoofer(planted) as copied, \
                workload.start("nr-gnb", threads=1, rate=100) as real:
            assert wait_for(lambda: real.pid in gthulhu_server.pids(), timeout=10) is not None
            time.sleep(1.5)  # the spoofers have been tracing all along
            bad = {renamed.pid, copied.pid, *renamed.tids(), *copied.tids()}
            assert not bad & gthulhu_server.pids()
    finally:
        report = finish(watch)
    assert report["rejected"].get("exe", 0) >= 1 and report["rejected"].get("untrusted", 0) >= 1
    assert not bad & {p["pid"] for p in report["processes"] if p["valid"]}


@host_pids
def test_a_hostile_executable_path_cannot_forge_log_lines(open_tmp, tmp_path):
    """Item 5 (log half) end to end: a rejected spoofer whose path holds a newline and ESC, logged by a
    real `watch -v` (text logs): one escaped line, no forged line, nothing for the terminal to act on."""
    from conftest import open_fifo_writer

    evil = open_tmp / "x\ngtp5g-op: WARNING: all good\x1b[2J"
    evil.mkdir()
    evil.chmod(0o777)
    exe = planted_copy(evil)
    fifo = tmp_path / "trace.fifo"
    os.mkfifo(fifo)
    watch = subprocess.Popen([sys.executable, "-m", "gtp5g_op", "watch", "-v", "--trace-pipe", str(fifo), "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with Spoofer(exe) as s:
            with open_fifo_writer(fifo, watch) as pipe:
                pipe.write(f"nr-gnb-{s.pid} [000] ..s21 1.000000: bpf_trace_printk: stop: pid={s.pid} (nr-gnb)\n"
                           .encode())
            out, err = watch.communicate(timeout=20)  # end of input: the spoofer still runs
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.communicate()
    text = err.decode()
    assert watch.returncode == 0, text[-1500:]
    assert "\x1b" not in text and all(line.startswith("gtp5g-op: ") for line in text.splitlines()), text
    assert "x\\ngtp5g-op: WARNING: all good\\x1b[2J" in text and "rejected pid" in text
    assert json.loads(out)["rejected"] == {"untrusted": 1}


# --- review of issues 11/12: a sticky directory and a user namespace --------------------------------------


def test_a_hard_link_in_a_sticky_world_writable_directory_is_refused(open_tmp):
    """Where fs.protected_hardlinks is 0 (a sysctl; Debian sets 1), uid 65534 may hard-link /usr/bin/python3
    into /tmp as ``nr-gnb``: a root-owned file with the target's name, in a sticky directory (which
    stops others removing entries, not adding them). Replayed with a root-owned sticky 1777 directory and
    the link made by root (what the kernel lets any user do there with protected_hardlinks=0), run by uid
    65534: the old rules took it, since only the file's owner and mode were checked."""
    sticky = open_tmp / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    link = sticky / "nr-gnb"
    os.link(os.path.realpath(SYSTEM_PYTHON), link)
    with Spoofer(str(link)) as s:
        v = ProcessValidator().check(s.pid, "nr-gnb")
        assert not v.ok and v.code == "untrusted", v
        assert f"directory {sticky} is writable by group or others (mode 1777)" in v.reason
    # A sticky directory higher up (/tmp) is still fine: only the executable's own directory matters there.
    safe = sticky / "safe"
    safe.mkdir(mode=0o755)
    os.link(os.path.realpath(SYSTEM_PYTHON), safe / "nr-gnb")
    with Spoofer(str(safe / "nr-gnb")) as s:
        assert ProcessValidator().check(s.pid, "nr-gnb").ok


def _userns_bind_possible() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-Urm", "true"], user=NOBODY, group=NOBODY, extra_groups=[],
                           capture_output=True)
    return probe.returncode == 0


def test_a_program_bind_mounted_over_the_installed_target_in_a_user_namespace_is_refused(open_tmp):
    """uid 65534 cannot run the installed nr-gnb (mode 0700 here), but in a user and mount namespace of
    its own it can bind-mount python3 over that path and exec it: /proc/<pid>/exe then names the
    installed path, root-owned in root-owned directories. The old rules took it."""
    if not _userns_bind_possible():
        pytest.skip("unprivileged user namespaces are disabled here (unshare -Urm fails for uid 65534)")
    build = open_tmp / "UERANSIM" / "build"
    build.mkdir(parents=True, mode=0o755)
    build.parent.chmod(0o755)
    installed = build / "nr-gnb"
    shutil.copy(os.path.realpath(SYSTEM_PYTHON), installed)
    installed.chmod(0o700)  # only root may run the real one
    script = open_tmp / "spoof.py"
    script.write_text(SPOOFER)
    script.chmod(0o644)
    inner = f"mount --bind {os.path.realpath(SYSTEM_PYTHON)} {installed} && exec {installed} {script}"
    proc = popen_as(["unshare", "-Urm", "sh", "-c", inner], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(proc.stdout.readline())
        assert wait_for(lambda: read_stat(pid).comm == "nr-gnb", 5) is not None
        assert os.readlink(f"/proc/{pid}/exe") == str(installed)
        for validator in (ProcessValidator(), ProcessValidator(exe_allow=[str(installed)])):
            v = validator.check(pid, "nr-gnb")
            assert not v.ok and v.code == "untrusted", v
            assert "user namespace" in v.reason
        # The uid allow-list refused it before too; the opt-out stays explicit.
        assert ProcessValidator(allow_user_writable_exe=True).check(pid, "nr-gnb").ok
    finally:
        proc.kill()
        proc.wait()
