"""Runs INSIDE the VM lab's guest (tests/vm/vmlab.py): the whole gtp5g-op kernel-side list on a real gtp5g.

    python tests/vm/guest.py --results DIR --kdir KDIR SOURCE...

For each gtp5g SOURCE (a release tarball, or a tree used in place: vmlab.prebuild patched and built it
on the host against KDIR, the guest kernel's headers with its vmlinux, so the module has BTF):
patch-module (nothing left to do) and --check, install and reload (what build module --install --reload
does after make), the refusal of `build module --reload` under a gtp5g device, verify the file and the
loaded module, doctor, build tracer with gtp5g loaded, tracer run, tracer selftest --gtp5g, the
refusal to reload under a gtp5g device, SIGTERM cleanup of the selftest, ``watch --with-tracer --push``
against the test server with a real nr-gnb sender (validation on) and SIGTERM cleanup, and a validated
``watch --json`` whose sender exits before the end. Every step lands in DIR/results.json as it finishes
(version, step, ok, seconds, detail, data), so the host asserts on data even after a timeout.

Commands run in this interpreter through the click entry point where they need no process of their own
(a Python start costs seconds under TCG over 9p); watch, the test server, the gNB and the SIGTERM cases
run as processes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

import psutil

from gtp5g_op.kernel import gtp5gnl
from gtp5g_op.kernel.gtp5glab import NETNS_RUN_DIR, Gtp5gLab, LabConfig

TRACEFS = Path("/sys/kernel/tracing")


class Results:
    def __init__(self, path: Path):
        self.path = path
        self.steps: list[dict] = []
        self.meta: dict = {"release": os.uname().release, "started": time.time()}
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": self.meta, "steps": self.steps}, indent=1))
        tmp.replace(self.path)

    def record(self, version: str, step: str, ok: bool, seconds: float, detail: str, data=None) -> None:
        self.steps.append({"version": version, "step": step, "ok": ok, "seconds": round(seconds, 2),
                           "detail": detail[-4000:], "data": data})
        print(f"[guest] {version} {step}: {'ok' if ok else 'FAIL'} {seconds:.1f}s {detail[:300]}", flush=True)
        self.flush()


def cli(*args: str) -> tuple[int, str, str]:
    """Run ``gtp5g-op ARGS`` in this interpreter: (exit code, stdout, stderr)."""
    from gtp5g_op.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main.main(list(args), prog_name="gtp5g-op", standalone_mode=True)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def sh(cmd: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)


STEPS = ("patch-module", "install --reload", "verify gtp5g.ko", "verify --loaded", "doctor",
         "reload refused while a gtp5g device exists", "build tracer (gtp5g loaded)", "tracer run",
         "tracer selftest --gtp5g", "selftest SIGTERM cleanup", "watch --with-tracer --push, SIGTERM",
         "watch --json keeps an exited sender")


def unpack(source: Path, work: Path) -> Path:
    """The tree to work on: a directory in place, a tarball extracted under ``work``."""
    if source.is_dir():
        return source
    with tarfile.open(source) as tar:
        tops = {m.name.split("/")[0] for m in tar.getmembers()}
        tar.extractall(work, filter="data")
    return work / tops.pop()


def leftovers(instance_prefix: str = "gtp5g-op") -> list[str]:
    """gtp5g-op's traces on the system: namespaces, gtp5g devices, tracefs instances, tracing BPF links,
    gNB senders still running (one orphaned by the selftest's SIGTERM kept sending into its deleted
    namespace, and the guest kernel's routing memory went bad: docs/tracer.md)."""
    left = [f"netns {p.name}" for p in NETNS_RUN_DIR.glob("gtp5g-op-*")] if NETNS_RUN_DIR.is_dir() else []
    left += [f"gNB sender pid {p.pid}" for p in psutil.process_iter(["cmdline"])
             if "gtp5g_op.kernel.gnb" in (p.info["cmdline"] or [])]
    left += [f"gtp5g device {name}" for _, name in _gtp5g_links()]
    inst = TRACEFS / "instances"
    left += [f"tracefs instance {p.name}" for p in inst.glob(f"{instance_prefix}*")] if inst.is_dir() else []
    links = sh(["bpftool", "-j", "link", "show"])
    try:
        tracing = [ln for ln in json.loads(links.stdout or "[]")
                   if ln.get("type") in ("tracing", "kprobe_multi", "perf_event", "kprobe")]
    except ValueError:
        tracing = []
    left += [f"BPF link {ln.get('id')} ({ln.get('type')})" for ln in tracing]
    return left


def _gtp5g_links() -> list[tuple[int, str]]:
    from gtp5g_op.kernel.modbuild import links_of_kind

    return links_of_kind("gtp5g")


def wait_for(pred, timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return False


class Guest:
    def __init__(self, results: Results, kdir: Path, work: Path):
        self.r = results
        self.kdir = kdir
        self.work = work

    def step(self, version: str, name: str, fn) -> object:
        started = time.monotonic()
        try:
            ok, detail, data = fn()
        except Exception as exc:  # a step's crash is its failure, with the traceback as detail
            ok, detail, data = False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2500:]}", None
        self.r.record(version, name, bool(ok), time.monotonic() - started, detail, data)
        return data if ok else None

    def run_version(self, source: Path) -> None:
        tree = unpack(source, self.work)
        v = tree.name
        os.environ["XDG_CACHE_HOME"] = f"/tmp/cache-{v}"  # each release's tracer is built for its own BTF
        ko = tree / "gtp5g.ko"

        def patch():
            code, out, err = cli("patch-module", "--src", str(tree), "--json")
            doc = json.loads(out) if code == 0 else None
            check, cout, cerr = cli("patch-module", "--src", str(tree), "--check", "--json")
            states = {f["name"]: f["state"] for f in json.loads(cout)["functions"]} if cout.strip() else {}
            return (code == 0 and check == 0,
                    f"exit {code}; changed {doc and doc['changed']}; --check exit {check}: {states} {err}{cerr}",
                    {"patch": doc, "states": states})

        def install_reload():
            # What `build module --install --reload` does after make (make ran on the host: vmlab.prebuild).
            from gtp5g_op.kernel import modbuild

            installed = modbuild.install(ko, os.uname().release)
            steps = modbuild.reload()
            version = gtp5gnl.module_version()
            btf = Path("/sys/kernel/btf/gtp5g").is_file()
            rejected = [ln for ln in sh(["dmesg"]).stdout.splitlines() if "failed to validate module" in ln]
            ok = version == v.split("-v")[-1] and btf and not rejected
            return ok, (f"installed {installed.path}; ran {', '.join(installed.depmod)}; {'; '.join(steps)}; "
                        f"loaded version {version}; module BTF {'present' if btf else 'MISSING'}; "
                        f"{rejected or 'no BTF rejection in dmesg'}"), {"steps": steps, "version": version}

        def verify_file():
            code, out, err = cli("verify", str(ko), "--base-btf", str(self.kdir / "vmlinux"), "--json")
            doc = json.loads(out) if out.strip().startswith("{") else None
            return code == 0 and bool(doc and doc["btf_present"]), f"exit {code} {err.strip()}", doc

        def verify_loaded():
            code, out, err = cli("verify", "--loaded", "--json")
            doc = json.loads(out) if out.strip().startswith("{") else None
            return (code == 0 and bool(doc and doc["btf_present"]),
                    f"exit {code}; version {gtp5gnl.module_version()}; {err.strip()}", doc)

        def doctor():
            code, out, err = cli("doctor", "--json")
            doc = json.loads(out)
            kernel = {c["name"]: c for c in doc["checks"]
                      if c["name"] in ("tracefs", "bpf", "kernel BTF", "fentry", "gtp5g module", "gtp5g exports")}
            bad = [f"{n}: {c['detail']}" for n, c in kernel.items() if not c["ok"]]
            return not bad and len(kernel) >= 5, "; ".join(bad) or "kernel-side checks ok", doc

        def build_tracer():
            code, out, err = cli("build", "tracer", "--json")
            return code == 0, f"exit {code} {out.strip()} {err.strip()}", json.loads(out) if code == 0 else None

        def tracer_run():
            code, out, err = cli("tracer", "run", "--duration", "0", "--json")
            doc = json.loads(out) if out.strip().startswith("{") else None
            progs = doc["programs"] if doc else []
            failed = [f"{p['name']}: {p['error']}" for p in progs if not p["attached"]]
            return (code == 0 and bool(doc and doc["attached"]),
                    f"exit {code}; {doc and doc['attached']} of {len(progs)} attached; " + "; ".join(failed), doc)

        def selftest():
            code, out, err = cli("tracer", "selftest", "--gtp5g", "--enable-qos", "--json", "--timeout", "20")
            doc = json.loads(out) if out.strip().startswith("{") else None
            steps = "; ".join(f"{s['name']}: {'ok' if s['ok'] else s['ok']} {s['detail']}"
                              for s in (doc or {}).get("steps", []))
            if code == 0 and doc and doc["ok"]:
                return True, f"exit 0; {steps}", doc
            # gtp5g before v0.9 registers no netlink policy: Linux 6.1 refuses every rule. The selftest must
            # say exactly that, exit 1, and still prove every hook that runs without a session.
            failed = [s for s in (doc or {}).get("steps", []) if not s["ok"]]
            known = (code == 1 and [s["name"] for s in failed] == ["device and session"]
                     and "without a netlink policy" in failed[0]["detail"])
            return known, f"exit {code}{' (known: gtp5g < 0.9 on Linux 6.1+)' if known else ''}; {err} {steps}", doc

        self.step(v, "patch-module", patch)
        if self.step(v, "install --reload", install_reload) is None:
            return
        self.step(v, "verify gtp5g.ko", verify_file)
        self.step(v, "verify --loaded", verify_loaded)
        self.step(v, "doctor", doctor)
        self.step(v, "reload refused while a gtp5g device exists", lambda: self.reload_refused(tree))
        if self.step(v, "build tracer (gtp5g loaded)", build_tracer) is None:
            return
        self.step(v, "tracer run", tracer_run)
        self.step(v, "tracer selftest --gtp5g", selftest)
        self.step(v, "selftest SIGTERM cleanup", self.selftest_sigterm)
        self.step(v, "watch --with-tracer --push, SIGTERM", self.watch_push)
        self.step(v, "watch --json keeps an exited sender", self.watch_exited)

    # -- steps with processes of their own -----------------------------------------------------

    def reload_refused(self, tree: Path):
        """The real CLI, a real gtp5g device in a private namespace: refused before make runs."""
        log = tree / ".gtp5g-op" / "build.log"
        before = log.stat().st_mtime_ns if log.exists() else None
        with Gtp5gLab(LabConfig(tag="rl"), session=False) as lab:
            code, out, err = cli("build", "module", "--src", str(tree), "--kdir", str(self.kdir), "--reload")
            still = bool(_gtp5g_links_in_ns())
        untouched = (log.stat().st_mtime_ns if log.exists() else None) == before
        ok = code == 1 and f"{lab.config.device} (netns {lab.config.netns})" in err and "--force" in err
        return ok and still and untouched, (f"exit {code}: {err.strip()}; device still there: {still}; "
                                            f"make not run: {untouched}"), {"exit": code, "stderr": err}

    def selftest_sigterm(self):
        cmd = ["gtp5g-op", "tracer", "selftest", "--gtp5g", "--packets", "100000", "--json"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        running = wait_for(lambda: any(NETNS_RUN_DIR.glob("gtp5g-op-st-*")) and bool(_gtp5g_links_in_ns()), 120)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            return False, "selftest did not exit within 60 s of SIGTERM", None
        wait_for(lambda: not leftovers(), 10)
        left = leftovers()
        said = proc.returncode == 130 and "interrupted; everything the selftest had created was removed" in err
        return (running and not left and said,
                f"session was {'up' if running else 'NOT up'} at SIGTERM; exit {proc.returncode}; "
                f"left: {left or 'nothing'}; {err.strip()[-500:]}", {"exit": proc.returncode, "left": left})

    def watch_push(self):
        server, url, pub = start_testserver(self.work)
        try:
            with Gtp5gLab(LabConfig(tag="w"), require_session=False) as lab:
                gnb = lab.start_gnb(count=0, rate=50, timeout=90, binary=True)
                inst = f"gtp5g-op-vmw-{os.getpid()}"
                cmd = ["gtp5g-op", "watch", "--with-tracer", "--push", "--json", "--interval", "1",
                       "--api-url", url, "--public-key", str(pub), "--instance", inst]
                with _reaped(cmd) as watch:
                    pushed = wait_for(lambda: gnb.pid in server_pids(url, pub), 120, 1.0)
                    watch.send_signal(signal.SIGTERM)
                    out, err = watch.communicate(timeout=60)
                report = json.loads(out) if out.strip().startswith("{") else None
                gnb.stop()
            wait_for(lambda: not leftovers(), 10)
            left = leftovers()
            seen = [p for p in (report or {}).get("processes", []) if p.get("pid") == gnb.pid]
            ok = pushed and watch.returncode == 0 and bool(seen) and not left
            return ok, (f"pushed gNB pid {gnb.pid}: {pushed}; watch exit {watch.returncode}; in report: "
                        f"{bool(seen)}; left: {left or 'nothing'}; {err.strip()[-800:]}"), \
                {"report": report, "left": left, "gnb_pid": gnb.pid}
        finally:
            server.terminate()
            server.wait(10)

    def watch_exited(self):
        instance = f"gtp5g-op-vmx-{os.getpid()}"
        cmd = ["gtp5g-op", "watch", "--with-tracer", "--json", "--duration", "40", "--instance", instance]
        with Gtp5gLab(LabConfig(tag="x"), require_session=False) as lab, _reaped(cmd) as watch:
            # the sender lives 2 s: it must start once the watch reads (the tracer attaches program by
            # program, seconds apart under TCG; lines read after the sender exited name a dead process)
            wait_for(lambda: _reading(watch.pid, instance), 90)
            gnb = lab.start_gnb(count=100, rate=50, timeout=90, binary=True)
            gnb.wait(timeout=60)
            out, err = watch.communicate(timeout=120)
        report = json.loads(out) if out.strip().startswith("{") else None
        procs = (report or {}).get("processes", [])
        mine = [p for p in procs if p.get("pid") == gnb.pid]
        exited = bool(mine) and any(p.get("exited") or p.get("state") == "exited" for p in mine)
        return (watch.returncode == 0 and exited,
                f"watch exit {watch.returncode}; gNB pid {gnb.pid} (exited) in report: {mine or 'no'}; "
                f"stats {report and report.get('stats')}; rejected {report and report.get('rejected')}; "
                f"{err.strip()[-500:]}", report)


@contextlib.contextmanager
def _reaped(cmd: list[str]):
    """A process for the block; killed if still running when the block ends (a failed step leaves none)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _reading(pid: int, instance: str) -> bool:
    """Process ``pid`` has a pipe of tracefs instance ``instance`` open (text or raw: it reads)."""
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if f"/instances/{instance}/" in target and "trace_pipe" in target:
            return True
    return False


def _gtp5g_links_in_ns() -> bool:
    """A gtp5g device exists in one of gtp5g-op's namespaces."""
    for ns in NETNS_RUN_DIR.glob("gtp5g-op-*"):
        out = sh(["ip", "-n", ns.name, "-d", "link", "show"]).stdout
        if "gtp5g" in out:
            return True
    return False


def start_testserver(work: Path) -> tuple[subprocess.Popen, str, Path]:
    pub = work / "gthulhu.pub"
    cmd = [sys.executable, "-m", "gtp5g_op.gthulhu.testserver", "--port", "0", "--empty",
           "--private-key", str(work / "gthulhu.key"), "--public-key-out", str(pub)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        m = re.search(r"listening on (\S+)", line)
        if m:
            url = m.group(1)
            return proc, url if url.startswith("http") else f"http://{url}", pub
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("the test server did not start")


def server_pids(url: str, pub: Path) -> set[int]:
    """PIDs in the strategies the test server holds (through gtp5g-op's own client)."""
    code, out, _ = cli("strategies", "list", "--json", "--api-url", url, "--public-key", str(pub))
    if code != 0:
        return set()
    pids: set[int] = set()

    def walk(obj) -> None:
        if isinstance(obj, dict):
            for k, val in obj.items():
                if k in ("pid", "PID") and isinstance(val, int):
                    pids.add(val)
                else:
                    walk(val)
        elif isinstance(obj, list):
            for item in obj:
                walk(item)

    walk(json.loads(out))
    return pids


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--kdir", type=Path, required=True)
    ap.add_argument("sources", type=Path, nargs="+")
    args = ap.parse_args()
    results = Results(args.results / "results.json")
    work = Path("/tmp/gtp5g-op-vm")
    work.mkdir(parents=True, exist_ok=True)
    guest = Guest(results, args.kdir, work)
    for source in args.sources:
        started = time.monotonic()
        try:
            guest.run_version(source)
        except Exception:
            results.record(source.name, "guest driver", False, time.monotonic() - started,
                           traceback.format_exc()[-3000:])
    results.meta["seconds"] = round(time.time() - results.meta["started"], 1)
    results.meta["done"] = True
    results.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
