#!/usr/bin/env python3
"""Benchmark: `gtp5g-op watch --replay REF --no-validate --json` against the Go peer parser, same run.

Both run as whole processes on the same reference stream (shared/bench/gen_trace.py 2000000 --seed 1),
alternating, several rounds; the script prints the median wall times, their ratio (ours / peer), peak
RSS, and whether both found the same PIDs. With --big N it also streams an N-line trace through stdin
(no file) to show that peak RSS does not grow with the input.

usage: scripts/bench_replay.py [--rounds 5] [--lines 2000000] [--big 10000000] [--bench-dir ../shared/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_measured(cmd: list[str], stdin=None) -> tuple[float, float, bytes]:
    """Run a command: (wall seconds, its own peak RSS in MiB from wait4, stdout)."""
    with tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=stdin, stdout=out, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read() if proc.stderr else b""
        if proc.returncode != 0:
            sys.exit(f"bench: {' '.join(cmd)} failed ({proc.returncode}): {err.decode()[-500:]}")
        out.seek(0)
        return wall, usage.ru_maxrss / 1024, out.read()


def build_peer(bench: Path, work: Path) -> Path:
    if not shutil.which("go"):
        sys.exit("bench: go not found; fix: apt-get install golang-go")
    src = work / "seed-go-parser"
    shutil.copytree(bench / "seed-go-parser", src)
    exe = work / "seedgo"
    subprocess.run(["go", "build", "-o", str(exe), "."], cwd=src, check=True,
                   env={**os.environ, "GOFLAGS": "-mod=mod", "GOCACHE": str(work / "gocache")})
    return exe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--lines", type=int, default=2_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--big", type=int, default=0, help="also stream this many lines through stdin")
    ap.add_argument("--bench-dir", type=Path, default=ROOT.parent / "shared" / "bench")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    gen = args.bench_dir / "gen_trace.py"
    if not gen.exists():
        sys.exit(f"bench: {gen} not found; fix: pass --bench-dir DIR holding gen_trace.py and seed-go-parser/")
    ours = [sys.executable, "-m", "gtp5g_op", "watch", "--no-validate", "--json", "--replay"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        peer = build_peer(args.bench_dir, work)
        ref = work / "ref.trace"
        with ref.open("wb") as fh:
            subprocess.run([sys.executable, str(gen), str(args.lines), "--seed", str(args.seed)], stdout=fh, check=True)
        size_mb = ref.stat().st_size / 1e6
        t_peer, t_ours, rss_ours, rss_peer = [], [], [], []
        for _ in range(args.rounds):
            w, r, out_peer = run_measured([str(peer), str(ref)])
            t_peer.append(w), rss_peer.append(r)
            w, r, out_ours = run_measured(ours + [str(ref)])
            t_ours.append(w), rss_ours.append(r)
        peer_fields = out_peer.decode().split(maxsplit=2)
        peer_pids = sorted(int(x) for x in peer_fields[2].strip("[]\n").split()) if len(peer_fields) > 2 else []
        report = json.loads(out_ours)
        our_pids = sorted(p["pid"] for p in report["processes"])
        result = {
            "stream": {"lines": args.lines, "seed": args.seed, "megabytes": round(size_mb, 1)},
            "rounds": args.rounds,
            "peer_wall_s": round(statistics.median(t_peer), 3),
            "ours_wall_s": round(statistics.median(t_ours), 3),
            "ratio_ours_over_peer": round(statistics.median(t_ours) / statistics.median(t_peer), 3),
            "peer_pids": len(peer_pids),
            "our_pids": len(our_pids),
            "same_pids": our_pids == peer_pids,
            "ours_peak_rss_mib": round(max(rss_ours), 1),
            "peer_peak_rss_mib": round(max(rss_peer), 1),
            "stats": report["stats"],
        }
        ref.unlink()
        if args.big:
            gen_proc = subprocess.Popen([sys.executable, str(gen), str(args.big), "--seed", str(args.seed)],
                                        stdout=subprocess.PIPE)
            w, r, out = run_measured(ours + ["-"], stdin=gen_proc.stdout)
            gen_proc.stdout.close()  # type: ignore[union-attr]
            gen_proc.wait()
            big = json.loads(out)
            result["big_stream"] = {"lines": big["stats"]["lines"], "wall_s": round(w, 2),
                                    "peak_rss_mib": round(r, 1), "pids": len(big["processes"])}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"reference stream: {args.lines} lines ({size_mb:.0f} MB), {args.rounds} rounds, medians")
    print(f"  Go peer          {result['peer_wall_s']:.3f} s   peak RSS {result['peer_peak_rss_mib']:.1f} MiB   "
          f"{result['peer_pids']} PIDs")
    print(f"  gtp5g-op replay  {result['ours_wall_s']:.3f} s   peak RSS {result['ours_peak_rss_mib']:.1f} MiB   "
          f"{result['our_pids']} PIDs")
    print(f"  ratio ours/peer  {result['ratio_ours_over_peer']:.3f}   same PIDs: {result['same_pids']}")
    if "big_stream" in result:
        b = result["big_stream"]
        print(f"  {b['lines']} lines via stdin: {b['wall_s']:.2f} s, peak RSS {b['peak_rss_mib']:.1f} MiB, {b['pids']} PIDs")


if __name__ == "__main__":
    main()
