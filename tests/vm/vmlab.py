#!/usr/bin/env python3
"""The VM lab: boot Debian's kernel under qemu with virtme-ng and run a command inside, on the host's root fs.

This machine's own kernel cannot load gtp5g (no modules, no fentry); a Debian 6.1 guest can
(``../shared/reference/vm-lab.md``). The guest sees the host's files read-only over 9p (writes go to
tmpfs overlays) plus one read-write results dir, so a guest command hands its results back as files.

Library (used by tests/vm/test_vm.py)::

    from vmlab import Lab
    lab = Lab.find()                       # raises Unavailable(reason) when something is missing
    kdir = lab.prepare_kdir(cache_dir)     # headers copy + the kernel's own vmlinux (module BTF)
    run = lab.boot("gtp5g-op doctor --json > $RESULTS/doctor.json", results_dir)

Script (for colleagues' measurements; prints the guest's output and the wall time)::

    python tests/vm/vmlab.py check
    python tests/vm/vmlab.py run [--results DIR] [--timeout S] -- 'gtp5g-op tracer selftest --json'
    python tests/vm/vmlab.py kdir            # print the prepared KDIR (cached)

In the guest the project's venv ``bin`` is first on PATH, the working directory is the checkout, and
``$RESULTS`` / ``$KDIR`` / ``$KVER`` name the results dir, the prepared headers and the guest's release.
Environment: GTP5G_OP_VM_KERNEL (a /boot/vmlinuz-* to boot), GTP5G_OP_VM_KVM=1 (try KVM; TCG otherwise:
nested KVM fails on this machine), GTP5G_OP_VM_MEMORY (default 2G).
"""

from __future__ import annotations

import argparse
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
XZ_MAGIC = b"\xfd7zXZ\x00"
ELF_MAGIC = b"\x7fELF"


class Unavailable(Exception):
    """Something the VM lab needs is missing here; the message says what and how to get it."""


@dataclass
class BootResult:
    returncode: int
    output: str  # the guest console and the command's output (stdout and stderr together)
    seconds: float
    timed_out: bool = False


def _headers_for(release: str) -> Path | None:
    for cand in (Path("/usr/src") / f"linux-headers-{release}", Path("/lib/modules") / release / "build"):
        if (cand / "Makefile").is_file():
            return cand.resolve()
    return None


def find_kernel() -> tuple[Path, str]:
    """A bootable kernel image and its release: GTP5G_OP_VM_KERNEL, else the newest /boot/vmlinuz-* with headers."""
    wanted = os.environ.get("GTP5G_OP_VM_KERNEL")
    images = [Path(wanted)] if wanted else sorted(Path("/boot").glob("vmlinuz-*"), reverse=True)
    for image in images:
        release = image.name.removeprefix("vmlinuz-")
        if image.is_file() and _headers_for(release) is not None:
            return image, release
    if wanted:
        raise Unavailable(f"{wanted} is not a kernel image with matching linux-headers installed")
    raise Unavailable("no /boot/vmlinuz-* with matching linux-headers: apt-get install "
                      "linux-image-<the release of /usr/src/linux-headers-*-amd64> (scripts/test does)")


@dataclass
class Lab:
    kernel: Path
    release: str
    headers: Path
    vng: Path
    kvm: bool = False

    @classmethod
    def find(cls) -> Lab:
        """Everything needed to boot, or :class:`Unavailable` naming what is missing."""
        if os.geteuid() != 0:
            raise Unavailable("the VM lab needs root (module builds, 9p root fs, tracefs in the guest)")
        if shutil.which("qemu-system-x86_64") is None:
            raise Unavailable("qemu-system-x86_64 is missing: apt-get install qemu-system-x86")
        if not any(Path(p).is_file() for p in ("/bin/busybox", "/usr/bin/busybox")) or not _static_busybox():
            raise Unavailable("a static busybox is missing (virtme-ng's 9p init needs it): "
                              "apt-get install busybox-static")
        vng = VENV_BIN / "vng"
        if not vng.is_file():
            raise Unavailable(f"virtme-ng is not installed in {VENV_BIN.parent}: pip install virtme-ng "
                              "(scripts/test installs it)")
        kernel, release = find_kernel()
        headers = _headers_for(release)
        assert headers is not None
        return cls(kernel, release, headers, vng, kvm=os.environ.get("GTP5G_OP_VM_KVM") == "1")

    # -- module BTF: the guest kernel's own vmlinux in a copy of its headers ----------------------

    def vmlinux(self, cache: Path) -> Path:
        """The guest kernel's vmlinux ELF (it carries .BTF), taken out of the bzImage once and cached."""
        out = cache / f"vmlinux-{self.release}"
        stamp = f"{self.kernel.stat().st_size}:{self.kernel.stat().st_mtime_ns}"
        if out.is_file() and (cache / f"{out.name}.stamp").read_text() == stamp:
            return out
        cache.mkdir(parents=True, exist_ok=True)
        data = self.kernel.read_bytes()
        pos = data.find(XZ_MAGIC)
        while pos >= 0:
            try:
                elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[pos:])
            except lzma.LZMAError:
                elf = b""
            if elf.startswith(ELF_MAGIC):
                tmp = out.with_suffix(".tmp")
                tmp.write_bytes(elf)
                tmp.replace(out)
                (cache / f"{out.name}.stamp").write_text(stamp)
                return out
            pos = data.find(XZ_MAGIC, pos + 1)
        raise Unavailable(f"{self.kernel} holds no xz-compressed vmlinux (not a Debian bzImage?)")

    def prepare_kdir(self, cache: Path) -> Path:
        """A copy of the headers with the kernel's vmlinux in it, so kbuild generates module BTF.

        The headers' ``scripts``/``tools`` links are relative: the copy points them at their real targets.
        """
        kdir = cache / f"headers-{self.release}"
        vmlinux = self.vmlinux(cache)
        if (kdir / "vmlinux").is_file() and (kdir / "Makefile").is_file():
            return kdir
        tmp = Path(tempfile.mkdtemp(prefix="headers.", dir=cache))
        shutil.copytree(self.headers, tmp, symlinks=True, dirs_exist_ok=True)
        for link in tmp.iterdir():
            if link.is_symlink():
                target = (self.headers / os.readlink(link)).resolve()
                link.unlink()
                link.symlink_to(target)
        shutil.copyfile(vmlinux, tmp / "vmlinux")
        shutil.rmtree(kdir, ignore_errors=True)
        tmp.rename(kdir)
        return kdir

    def modules_dir(self, dest: Path, keep: tuple[str, ...] = ("udp_tunnel",)) -> Path:
        """A small /lib/modules/RELEASE for the guest: the kernel's built-in lists plus ``keep`` (and
        what they depend on), indexed by depmod.

        Mounted read-write over the guest's /lib/modules/RELEASE, it makes ``depmod -a`` (which
        ``install`` runs) read a handful of modules instead of all ~4000 over 9p: minutes under TCG.
        Everything gtp5g needs to load is in it (its only dependency is udp_tunnel).
        """
        src = Path("/lib/modules") / self.release
        out = dest / "lib" / "modules" / self.release
        shutil.rmtree(dest, ignore_errors=True)
        out.mkdir(parents=True)
        deps = {}
        for line in (src / "modules.dep").read_text().splitlines():
            mod, _, rest = line.partition(":")
            deps[Path(mod).name.split(".ko")[0]] = (mod, rest.split())
        wanted, todo = set(), list(keep)
        while todo:
            name = todo.pop()
            if name in deps and deps[name][0] not in wanted:
                wanted.add(deps[name][0])
                todo += [Path(d).name.split(".ko")[0] for d in deps[name][1]]
        for rel in sorted(wanted):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, out / rel)
        for name in ("modules.builtin", "modules.builtin.modinfo"):
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
        (out / "modules.order").write_text("".join(f"{rel}\n" for rel in sorted(wanted)))
        subprocess.run(["depmod", "-b", str(dest), self.release], check=True, capture_output=True)
        return out

    # -- boot ---------------------------------------------------------------------------------

    def command(self, guest_cmd: str, results: Path, env: dict[str, str] | None = None,
                memory: str | None = None, cpus: int = 2, modules: Path | None = None) -> list[str]:
        """The vng command line that runs ``guest_cmd`` (a shell command) in the guest."""
        exports = {"PATH": f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "RESULTS": str(results),
                   "KVER": self.release, "PYTHONUNBUFFERED": "1", "HOME": "/root",
                   "XDG_CACHE_HOME": "/tmp/cache", **(env or {})}
        script = " ".join(f"export {k}={shlex.quote(v)};" for k, v in exports.items())
        script += f" cd {shlex.quote(str(ROOT))} && {guest_cmd}"
        cmd = [str(self.vng), "-r", str(self.kernel), "--force-9p", "--memory",
               memory or os.environ.get("GTP5G_OP_VM_MEMORY", "2G"), "--cpus", str(cpus),
               "--rwdir", str(results), "-e", script]
        if modules is not None:
            cmd[-2:-2] = ["--rwdir", f"/lib/modules/{self.release}={modules}"]
        if not self.kvm:
            cmd.insert(3, "--disable-kvm")
        return cmd

    def boot(self, guest_cmd: str, results: Path, timeout: float = 900, env: dict[str, str] | None = None,
             log: Path | None = None, echo: bool = False, modules: Path | None = None) -> BootResult:
        """Boot, run ``guest_cmd``, power off; the guest's output also goes to ``log`` as it comes.

        ``modules``: a directory from :meth:`modules_dir` to mount over the guest's /lib/modules/RELEASE.
        """
        results.mkdir(parents=True, exist_ok=True)
        cmd = self.command(guest_cmd, results, env, modules=modules)
        host_env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}")
        started = time.monotonic()
        out_lines: list[str] = []
        logf = open(log, "w") if log else None
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", env=host_env, start_new_session=True)
        timed_out = False
        try:
            def kill() -> None:
                nonlocal timed_out
                timed_out = True
                _kill_group(proc)

            timer = threading.Timer(timeout, kill)
            timer.start()
            assert proc.stdout is not None
            for line in proc.stdout:
                out_lines.append(line)
                if logf:
                    logf.write(line)
                    logf.flush()
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
            code = proc.wait()
            timer.cancel()
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            if logf:
                logf.close()
        return BootResult(code, "".join(out_lines), time.monotonic() - started, timed_out)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    proc.wait()


def _static_busybox() -> bool:
    for path in ("/bin/busybox", "/usr/bin/busybox"):
        try:
            head = Path(path).read_bytes()[:4096]
        except OSError:
            continue
        if head.startswith(ELF_MAGIC) and b"/lib64/ld-linux" not in head and b"ld-linux" not in head:
            return True
    return False


def unpack(source: Path, work: Path) -> Path:
    """A writable copy of a gtp5g source (tarball extracted, tree copied) in ``work``."""
    import tarfile

    work.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        dest = work / source.name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(source, dest, symlinks=True)
        return dest
    with tarfile.open(source) as tar:
        tops = {m.name.split("/")[0] for m in tar.getmembers()}
        if len(tops) != 1:
            raise Unavailable(f"{source} is not a gtp5g release tarball (one top directory)")
        dest = work / next(iter(tops))
        shutil.rmtree(dest, ignore_errors=True)
        tar.extractall(work, filter="data")
    return dest


def prebuild(sources: list[Path], work: Path, kdir: Path, jobs: int = 2) -> dict[Path, dict]:
    """Unpack, patch and build each source on the host with gtp5g-op itself (patch-module, build module).

    Same compiler, same headers, same vmlinux as in the guest, so the same gtp5g.ko; here it takes
    seconds, in the guest minutes: even a relink there spent 273 s in kbuild's dependency checks (it
    stats thousands of headers over 9p under TCG, measured). The guest installs and reloads it with the
    calls ``build module --install --reload`` makes after make.
    Returns tree -> {"seconds", "patch", "build"} (the commands' exit codes and output).
    """
    out: dict[Path, dict] = {}
    for source in sources:
        started = time.monotonic()
        tree = unpack(source, work)
        gtp5g_op = str(VENV_BIN / "gtp5g-op")
        patch = subprocess.run([gtp5g_op, "patch-module", "--src", str(tree), "--json"], capture_output=True,
                               text=True, check=False)
        build = subprocess.run([gtp5g_op, "build", "module", "--src", str(tree), "--kdir", str(kdir),
                                "-j", str(jobs)], capture_output=True, text=True, check=False,
                               stdin=subprocess.DEVNULL)
        out[tree] = {"source": str(source), "seconds": round(time.monotonic() - started, 1),
                     "patch": [patch.returncode, patch.stdout + patch.stderr],
                     "build": [build.returncode, build.stdout + build.stderr]}
    return out


def compile_python(paths: list[Path]) -> None:
    """Byte-compile on the host: the guest's root fs is read-only, so it could not cache .pyc itself."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "2", *map(str, paths)],
                   capture_output=True, check=False)


def upstream_sources(value: str | None = None) -> list[Path]:
    """The gtp5g sources named by GTP5G_UPSTREAM (tarballs or trees, colon- or space-separated)."""
    value = os.environ.get("GTP5G_UPSTREAM", "") if value is None else value
    return [Path(p).expanduser().resolve() for p in re.split(r"[:\s]+", value) if p]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("check", help="say whether the lab can boot here, and why not")
    sub.add_parser("kdir", help="prepare (or reuse) the headers copy with vmlinux and print its path")
    run = sub.add_parser("run", help="boot and run a shell command in the guest")
    run.add_argument("--results", type=Path, help="read-write results dir (default: a new temp dir)")
    run.add_argument("--timeout", type=float, default=900)
    run.add_argument("--small-modules", action="store_true",
                     help="mount a /lib/modules with only udp_tunnel (fast depmod; see Lab.modules_dir)")
    run.add_argument("cmd", nargs="+", help="the command (after --)")
    args = parser.parse_args(argv)
    cache = ROOT / ".cache" / "vmlab"
    try:
        lab = Lab.find()
    except Unavailable as exc:
        print(f"vmlab: unavailable: {exc}", file=sys.stderr)
        return 3
    if args.what == "check":
        print(f"vmlab: ok: {lab.kernel} ({lab.release}), headers {lab.headers}, "
              f"{'KVM' if lab.kvm else 'TCG'}, vng {lab.vng}")
        return 0
    kdir = lab.prepare_kdir(cache)
    if args.what == "kdir":
        print(kdir)
        return 0
    results = (args.results or Path(tempfile.mkdtemp(prefix="vmlab."))).resolve()
    modules = lab.modules_dir(results / "modules") if args.small_modules else None
    result = lab.boot(" ".join(args.cmd), results, timeout=args.timeout,
                      env={"KDIR": str(kdir)}, echo=True, modules=modules)
    print(f"vmlab: exit {result.returncode} in {result.seconds:.1f}s"
          f"{' (timed out)' if result.timed_out else ''}; results in {results}", file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
