"""``gtp5g-op watch --push`` as a whole process: a live target fed through a FIFO, a token that expires
every 2 s, a server restarted mid-watch (set restored within one interval), and a clean exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from conftest import host_pids, open_fifo_writer, wait_for

from gtp5g_op.kernel import workload


@host_pids
def test_watch_survives_token_expiry_and_server_restart(gthulhu_start, tmp_path):
    server = gthulhu_start("--token-lifetime", "2")
    fifo = tmp_path / "trace.fifo"
    os.mkfifo(fifo)
    cmd = [sys.executable, "-m", "gtp5g_op", "watch", "--trace-pipe", str(fifo), "--push", "--interval", "1",
           "--json", "--api-url", server.url, "--public-key", str(server.public_key)]
    watch = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "GTP5G_OP_STATE_DIR": str(tmp_path / "state")})
    try:
        with workload.start("nr-ue", threads=2, rate=1) as wl, open_fifo_writer(fifo, watch) as pipe:
            expected = {wl.pid, *wl.ready.tids}
            pipe.write(f"nr-ue-{wl.pid} [001] ..s21 5.000000: bpf_trace_printk: stop: pid={wl.pid} (nr-ue)\n".encode())
            assert wait_for(lambda: expected <= server.pids(), 5) is not None, server.pids()

            time.sleep(4.5)  # two token lifetimes: pushes go on with renewed tokens
            assert expected <= server.pids()
            assert server.state()["stats"].get("tokens_issued", 0) >= 3, server.state()["stats"]

            server.restart()  # back with only its default selector strategy
            restored = wait_for(lambda: expected <= server.pids(), 5)
            assert restored is not None and restored < 2.5, f"restored after {restored}"
            pipe.write(b"\x00garbage line\n")
        out, err = watch.communicate(timeout=20)  # the writer closed the FIFO: end of input
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.communicate()
    assert watch.returncode == 0, err.decode()[-2000:]
    report = json.loads(out)
    assert report["stats"]["malformed"] == 1 and report["push"]["pushes_ok"] >= 4
    assert b"eyJ" not in out + err and b"Bearer" not in out + err


def test_a_replay_that_does_not_push_imports_no_api_client():
    """``watch --replay`` stays light: requests, urllib3, PyJWT and the Gthulhu clients load only for --push."""
    probe = ("import sys; from click.testing import CliRunner; from gtp5g_op.cli import main; "
             "r = CliRunner().invoke(main, ['watch', '--replay', '--json']); assert r.exit_code == 0, r.output; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('requests', 'urllib3', 'jwt') "
             "or m.startswith('gtp5g_op.gthulhu.') and m != 'gtp5g_op.gthulhu.secret'))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout
