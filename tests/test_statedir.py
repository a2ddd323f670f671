"""The hardened state directory, attacked the way issue 11 (item 9) did: planted dirs, symlinks, big files."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from hostile import NOBODY, as_user, open_tmp, require_root  # noqa: F401 - open_tmp is a fixture

from gtp5g_op.errors import EXIT_ENV
from gtp5g_op.gthulhu.ownership import OwnershipStore
from gtp5g_op.ops.statedir import MAX_READ, StateDir, StateDirError, check_name, default_state_dir


@pytest.fixture
def base(tmp_path) -> Path:
    """A root-owned 0755 directory to create state directories in (tmp_path's parents are safe)."""
    d = tmp_path / "base"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    return d


def test_created_0700_files_0600_and_written_atomically(base):
    sd = StateDir(base / "a" / "b" / "state")
    sd.write("owned-x.json", b"{}\n")
    for p in (base / "a", base / "a" / "b", base / "a" / "b" / "state"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700
    f = base / "a" / "b" / "state" / "owned-x.json"
    assert f.read_bytes() == b"{}\n" and stat.S_IMODE(f.stat().st_mode) == 0o600
    sd.write("owned-x.json", b"new")
    assert sd.read("owned-x.json") == b"new" and sd.read("missing") is None
    assert sorted(os.listdir(sd.path)) == ["owned-x.json"]  # no temp file left behind


def test_defaults_per_user():
    assert default_state_dir(env={}, euid=0) == Path("/run/gtp5g-op")
    assert default_state_dir(env={"XDG_RUNTIME_DIR": "/run/user/1000"}, euid=1000) == Path("/run/user/1000/gtp5g-op")
    assert default_state_dir(env={}, euid=1000) == Path.home() / ".local/state/gtp5g-op"


@pytest.mark.parametrize("bad", ["", ".hidden", "a/b", "..", "x\n", "x" * 201, "sp ace"])
def test_file_names_are_plain(bad):
    with pytest.raises(Exception) as exc:
        check_name(bad)
    assert exc.value.exit_code == 2


def test_a_directory_another_user_created_is_refused_and_its_symlinks_never_followed(open_tmp):
    """Issue 11 item 9: nobody creates the state_dir and plants symlinks at every name root might write."""
    require_root()
    victim = open_tmp / "victim"
    victim.write_text("precious\n")
    state = open_tmp / "state"
    state.mkdir(mode=0o777)
    state.chmod(0o777)
    os.chown(state, NOBODY, NOBODY)

    def plant() -> None:
        store = OwnershipStore("http://127.0.0.1:8080", state)
        for name in (store.filename, f"{store.filename[:-5]}.tmp{os.getpid()}", f"{store.filename[:-5]}.lock"):
            os.symlink(victim, state / name)

    as_user(plant)
    store = OwnershipStore("http://127.0.0.1:8080", state)
    with pytest.raises(StateDirError) as exc:
        store.change(set_watch={1})
    assert f"owned by uid {NOBODY}" in exc.value.message and exc.value.exit_code == EXIT_ENV
    assert "state-dir" in exc.value.fix
    assert victim.read_text() == "precious\n"

    os.chown(state, 0, 0)  # root's now, but still world-writable
    with pytest.raises(StateDirError, match="writable by group or others"):
        store.change(set_watch={1})
    assert victim.read_text() == "precious\n"


def test_symlinked_state_dir_and_planted_file_symlink(base, tmp_path):
    real = base / "real"
    real.mkdir(mode=0o700)
    link = base / "link"
    link.symlink_to(real)
    with pytest.raises(StateDirError, match="symlink or not a directory"):
        StateDir(link).write("f", b"x")

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, real / "f")  # planted inside a directory that is ours
    sd = StateDir(real)
    with pytest.raises(StateDirError, match="cannot open f"):
        sd.read("f")  # O_NOFOLLOW: not followed
    sd.write("f", b"new")  # rename replaces the link itself
    assert victim.read_text() == "precious\n" and not (real / "f").is_symlink()


def test_an_ancestor_another_user_owns_is_refused(base):
    require_root()
    mid = base / "mid"
    mid.mkdir(mode=0o755)
    os.chown(mid, NOBODY, NOBODY)  # nobody could rename mid/state away and put their own there
    with pytest.raises(StateDirError, match=f"above it is owned by uid {NOBODY}"):
        StateDir(mid / "state").ensure()


def test_a_world_writable_sticky_ancestor_is_fine(tmp_path):
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    StateDir(sticky / "state").write("f", b"x")


def test_reads_are_bounded_and_never_block_on_a_fifo(base):
    sd = StateDir(base / "s")
    sd.ensure()
    (sd.path / "big").write_bytes(b"x" * (MAX_READ + 1))
    with pytest.raises(StateDirError, match="larger than"):
        sd.read("big")
    os.mkfifo(sd.path / "fifo")
    with pytest.raises(StateDirError, match="not a regular file"):
        sd.read("fifo")  # O_NONBLOCK: no writer needed to get here
    assert sd.read("big", limit=MAX_READ + 1) is not None


def test_an_oversized_ownership_file_is_ignored_with_a_warning(base, caplog):
    store = OwnershipStore("http://x:1", base / "s")
    store.change(set_watch={7})
    store.path.write_bytes(b" " * (MAX_READ + 10))
    assert store.load() == {}
    assert "larger than" in caplog.text


def test_locks_live_in_their_own_namespace(base):
    """Issue 11 item 11: an instance named like the store's lock file deadlocked the pusher."""
    from gtp5g_op.trace.tracefs import _lock

    sd = StateDir(base / "s")
    store = OwnershipStore("http://127.0.0.1:8080", sd)
    held = _lock(sd, store.filename[: -len(".json")])  # the old store lock was owned-<api>.lock
    other = _lock(sd, "owned-127.0.0.1_8080.lock")
    assert held.acquire() and other.acquire()
    try:
        done = threading.Event()
        t = threading.Thread(target=lambda: (store.change(set_watch={1}), done.set()), daemon=True)
        t.start()
        assert done.wait(5), "the ownership store waited on an instance's lock"
        assert store.load() == {1: "watch"}
        assert sorted(os.listdir(sd.path / "lock")) == ["instance-owned-127.0.0.1_8080",
                                                        "instance-owned-127.0.0.1_8080.lock"]
    finally:
        held.release()
        other.release()
    assert os.listdir(sd.path / "lock") == []


def test_lock_is_exclusive_across_processes_and_freed_by_death(base):
    sd = StateDir(base / "s")
    lock = sd.lock("instance", "x")
    assert lock.acquire()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        got = sd.lock("instance", "x").acquire()
        os.write(w, b"1" if got else b"0")
        os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"0"
    os.close(r)
    os.waitpid(pid, 0)
    assert lock.owner() == os.getpid()
    lock.release()
    assert sd.lock("instance", "x").acquire()  # free again (this one is dropped at process exit)


def test_a_lock_file_planted_as_a_symlink_is_refused(base, tmp_path):
    sd = StateDir(base / "s")
    sd.ensure()
    (sd.path / "lock").mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, sd.path / "lock" / "instance-x")
    with pytest.raises(StateDirError, match="cannot lock"):
        sd.lock("instance", "x").acquire()
    assert victim.read_text() == "precious\n"


def test_read_only_file_system_is_one_line(tmp_path):
    """An EROFS (or any OSError) while creating the directory is a StateDirError with the fix."""
    require_root()
    import subprocess
    import sys

    code = (
        "from gtp5g_op.ops.statedir import StateDir\n"
        "from gtp5g_op.errors import OpError\n"
        f"try:\n    StateDir({str(tmp_path / 'ro' / 'gtp5g-op')!r}).ensure()\n"
        "except OpError as e:\n    print(e.one_line(), e.exit_code)\n"
    )
    (tmp_path / "ro").mkdir()
    out = subprocess.run(
        ["unshare", "-m", "sh", "-c",
         f"mount -t tmpfs -o ro tmpfs {tmp_path / 'ro'} && exec {sys.executable} -c \"$0\"", code],
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "Read-only file system" in out.stdout and out.stdout.strip().endswith(" 3")
    assert "fix: point --state-dir" in out.stdout


def test_a_live_watch_on_a_read_only_run_is_one_line_and_state_dir_fixes_it(tmp_path):
    """Issue 11 item 4: /run read-only (readOnlyRootFilesystem, nothing mounted there) killed a live watch
    with an OSError traceback. Replayed in a private mount namespace with an empty read-only /run."""
    require_root()
    import subprocess
    import sys

    name = f"gtp5g-op-ro-{os.getpid()}"
    state = tmp_path / "state"
    script = (f"mount -t tmpfs -o ro tmpfs /run || exit 99\n"
              f"{sys.executable} -m gtp5g_op watch --duration 0.5 --no-validate --instance {name}; echo rc=$?\n"
              f"{sys.executable} -m gtp5g_op watch --duration 0.5 --no-validate --instance {name} "
              f"--state-dir {state} --json > /dev/null; echo rc=$?\n")
    out = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["rc=3", "rc=0"], (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("gtp5g-op: error: state directory /run/gtp5g-op: cannot open or create")
    assert "Read-only file system" in lines[0] and "fix: point --state-dir" in lines[0]
    assert not Path(f"/sys/kernel/tracing/instances/{name}").exists()
    assert os.listdir(state / "lock") == []  # the second run took and released its lock there


def test_strategies_push_with_an_unusable_state_dir_fails_before_touching_the_api(gthulhu_server, tmp_path):
    """The ownership record could not be written afterwards: refuse first, so nothing is pushed unowned."""
    from click.testing import CliRunner

    from gtp5g_op.cli import main

    bad = tmp_path / "ww"
    bad.mkdir()
    bad.chmod(0o777)
    before = gthulhu_server.state()["strategies"]
    out = CliRunner().invoke(main, ["strategies", "push", "--pid", str(os.getpid()), "--api-url", gthulhu_server.url,
                                    "--public-key", str(gthulhu_server.public_key), "--state-dir", str(bad)])
    assert out.exit_code == 3 and "writable by group or others" in out.output, out.output
    assert gthulhu_server.state()["strategies"] == before
    listed = CliRunner().invoke(main, ["strategies", "list", "--json", "--api-url", gthulhu_server.url,
                                       "--public-key", str(gthulhu_server.public_key), "--state-dir", str(bad)])
    assert listed.exit_code == 0, listed.output  # listing needs no state


def test_strategies_push_on_a_full_disk_fails_before_touching_the_api(gthulhu_server, tmp_path):
    """A state directory that looks fine but cannot take a write (ENOSPC): the old code pushed the PID,
    then failed to record it (exit 3), leaving a strategy on the server that prune would never remove."""
    import subprocess

    from click.testing import CliRunner

    from gtp5g_op.cli import main

    require_root("mounts a tiny tmpfs")
    mnt = tmp_path / "full"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k,mode=0755", "tmpfs", str(mnt)], check=True)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        state = mnt / "state"
        StateDir(state).ensure()
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:  # fill the file system to the last byte
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        before = gthulhu_server.state()["strategies"]
        args = ["--api-url", gthulhu_server.url, "--public-key", str(gthulhu_server.public_key),
                "--state-dir", str(state)]
        out = CliRunner().invoke(main, ["strategies", "push", "--pid", str(sleeper.pid), *args])
        assert out.exit_code == 3 and "No space left on device" in out.output, out.output
        assert gthulhu_server.state()["strategies"] == before
        assert sleeper.pid not in gthulhu_server.pids()
        out = CliRunner().invoke(main, ["strategies", "delete", "--pid", "4242", *args])
        assert out.exit_code == 3 and gthulhu_server.state()["strategies"] == before, out.output
    finally:
        sleeper.kill()
        sleeper.wait()
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_symlink_another_user_planted_above_the_state_dir_is_never_followed(open_tmp):
    """uid 65534 plants /tmp/<x> -> a root directory of its choice; root then runs with --state-dir
    /tmp/<x>/state. The old code resolved the path once (realpath) and created its directory, lock
    directory and ownership file inside the attacker's pick."""
    require_root()
    target = open_tmp / "chosen-by-the-attacker"
    target.mkdir(mode=0o755)
    planted = Path(f"/tmp/gtp5g-op-planted-{os.getpid()}")
    as_user(lambda: os.symlink(target, planted))
    try:
        assert planted.lstat().st_uid == NOBODY
        with pytest.raises(StateDirError) as exc:
            StateDir(planted / "state").ensure()
        assert exc.value.exit_code == EXIT_ENV
        assert f"{planted} is a symlink owned by uid {NOBODY}" in exc.value.one_line()
        assert not (target / "state").exists()
    finally:
        planted.unlink()


def test_symlinks_root_owns_above_the_state_dir_are_followed(base):
    """/var/run -> /run: a symlink only root could have made is resolved as before."""
    real = base / "real"
    real.mkdir(mode=0o755)
    (base / "alias").symlink_to("real")  # relative, resolved against its own directory
    (base / "abs").symlink_to(base / "alias")  # a chain
    sd = StateDir(base / "abs" / "sub" / ".." / "state")
    sd.write("f", b"x")
    assert (real / "state" / "f").read_bytes() == b"x"
