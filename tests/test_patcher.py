"""patch-module on the gtp5g-shaped fixture trees: states, diff, idempotence, revert, safety, atomicity."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from hostile import open_tmp  # noqa: F401 - a fixture

from gtp5g_op.cli import main
from gtp5g_op.errors import EnvironmentProblem, OpError, UsageError
from gtp5g_op.kernel import patcher
from gtp5g_op.kernel.patcher import CSource, State

MINI = Path(__file__).resolve().parent.parent / "fixtures" / "gtp5g-mini"
SEVEN = ["gtp5g_encap_recv", "gtp5g_handle_skb_ipv4", "ip4_find_route", "gtp5g_xmit_skb_ipv4",
         "gtp5g_push_header", "pdr_find_by_gtp1u", "policePacket"]


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(params=["v0.8", "v0.10"])
def tree(request, tmp_path) -> Path:
    dst = tmp_path / request.param
    shutil.copytree(MINI / request.param, dst)
    return dst


@pytest.fixture
def v10(tmp_path) -> Path:
    dst = tmp_path / "v0.10"
    shutil.copytree(MINI / "v0.10", dst)
    return dst


@pytest.fixture
def exports() -> patcher.ExportSet:
    return patcher.load_export_set()


def states(root: Path, export_set: patcher.ExportSet) -> dict[str, State]:
    return {s.name: s.state for s in patcher.check(root, export_set)}


def test_bundled_set_is_the_seven_functions(exports):
    assert [f.name for f in exports.functions] == SEVEN
    assert [f.name for f in exports.functions if f.unstatic] == ["gtp5g_encap_recv"]


def test_check_states_before_patching(tree, exports):
    got = states(tree, exports)
    assert got["gtp5g_encap_recv"] is State.STATIC
    assert got["pdr_find_by_gtp1u"] is State.GLOBAL  # multi-line signature
    assert got["policePacket"] is (State.ABSENT if tree.name == "v0.8" else State.GLOBAL)
    assert not patcher.check_ok(patcher.check(tree, exports))


def test_absent_file_is_reported_not_fatal(tmp_path, exports):
    root = tmp_path / "v0.8"
    shutil.copytree(MINI / "v0.8", root)
    police = next(s for s in patcher.check(root, exports) if s.name == "policePacket")
    assert police.state is State.ABSENT and "not in this release" in police.note
    patcher.patch(root, exports)
    assert patcher.check_ok(patcher.check(root, exports))


def test_patch_exports_all_then_second_run_is_a_noop(tree, exports):
    result = patcher.patch(tree, exports)
    assert "src/gtpu/encap.c" in result.changed
    assert set(states(tree, exports).values()) <= {State.EXPORTED, State.ABSENT}
    encap = (tree / "src/gtpu/encap.c").read_text()
    assert "static int gtp5g_encap_recv" not in encap.split("/**")[0] + encap.split("* */")[-1]
    assert encap.count("EXPORT_SYMBOL(gtp5g_encap_recv);") == 1
    assert "#include <linux/module.h>" in encap
    after = snapshot(tree)
    again = patcher.patch(tree, exports)
    assert again.changed == []
    assert snapshot(tree) == after


def test_revert_restores_byte_for_byte(tree, exports):
    before = snapshot(tree)
    patcher.patch(tree, exports)
    result = patcher.revert(tree)
    assert result.restored
    assert snapshot(tree) == before  # the state dir is gone too
    assert patcher.revert(tree).restored == []


def test_diff_is_git_applicable_and_matches_patch(v10, exports, tmp_path):
    before = snapshot(v10)
    text = patcher.plan_patch(v10, exports).diff()
    assert snapshot(v10) == before  # --diff writes nothing
    assert "-static int gtp5g_encap_recv(struct sock *, struct sk_buff *);\n" in text
    assert "+int gtp5g_encap_recv(struct sock *, struct sk_buff *);\n" in text
    assert "-static int gtp5g_encap_recv(struct sock *sk, struct sk_buff *skb)\n" in text
    assert "+EXPORT_SYMBOL(pdr_find_by_gtp1u);\n" in text
    assert text.startswith("--- a/src/gtpu/encap.c\n+++ b/src/gtpu/encap.c\n")
    other = tmp_path / "other"
    shutil.copytree(MINI / "v0.10", other)
    subprocess.run(["git", "apply", "-"], input=text.encode(), cwd=other, check=True)
    patcher.patch(v10, exports)
    assert {k: v for k, v in snapshot(other).items()} == {
        k: v for k, v in snapshot(v10).items() if not k.startswith(".gtp5g-op/")}


@pytest.mark.parametrize("tool", [["git", "apply", "--unidiff-zero", "-"], ["patch", "-p1", "-s"]])
def test_zero_context_diff_applies_with_patch_and_git(tree, exports, tmp_path, tool):
    if not shutil.which(tool[0]):
        pytest.skip(f"{tool[0]} is not installed")
    text = patcher.plan_patch(tree, exports).diff(context=0)
    other = tmp_path / "other"
    shutil.copytree(tree, other)
    subprocess.run(tool, input=text.encode(), cwd=other, check=True)
    patcher.patch(tree, exports)
    assert snapshot(other) == {k: v for k, v in snapshot(tree).items() if not k.startswith(".gtp5g-op/")}


SHIPPED = Path(__file__).resolve().parent.parent / "patches" / "gtp5g-v0.10.2-exports.patch"


def test_shipped_patch_carries_only_the_export_set_changes(exports):
    """The bundled v0.10.2 patch: zero context, and every line it holds follows from the export set.

    Removed lines are only `static` signatures of functions the set un-statics, each re-added without
    `static`; everything else added is the include or one EXPORT_SYMBOL per function.
    """
    body = SHIPPED.read_text().split("\n--- a/", 1)[1]
    removed = [l[1:] for l in body.splitlines() if l.startswith("-") and not l.startswith("--- a/")]
    added = [l[1:] for l in body.splitlines() if l.startswith("+") and not l.startswith("+++ b/")]
    unstatic = {f.name for f in exports.functions if f.unstatic}
    assert removed and all(r.startswith("static ") and r.split("(")[0].split()[-1] in unstatic for r in removed)
    assert [r.removeprefix("static ") for r in removed] == [a for a in added if a in
                                                            {r.removeprefix("static ") for r in removed}]
    exported = sorted(a[len("EXPORT_SYMBOL("):-2] for a in added if a.startswith("EXPORT_SYMBOL("))
    assert exported == sorted(f.name for f in exports.functions)
    others = [a for a in added if not a.startswith("EXPORT_SYMBOL(") and a not in {r[7:] for r in removed}]
    assert set(others) == {f"#include <{exports.include}>"}
    assert not any(l.startswith(" ") for l in body.splitlines())  # no context lines


UPSTREAM = Path(os.environ.get("GTP5G_UPSTREAM_GIT", "/work/.mirror/free5gc+gtp5g/repo"))


@pytest.mark.skipif(not (UPSTREAM / "HEAD").exists() and not (UPSTREAM / ".git").exists(),
                    reason="no gtp5g git repository here (set GTP5G_UPSTREAM_GIT to a clone of free5gc/gtp5g)")
def test_shipped_patch_matches_the_tool_on_upstream_v0_10_2(exports, tmp_path):
    """A local-only check against real gtp5g: the shipped patch == patch-module on tag v0.10.2."""
    by_tool, by_patch = tmp_path / "tool", tmp_path / "patch"
    for dst in (by_tool, by_patch):
        subprocess.run(["git", "clone", "-q", "--branch", "v0.10.2", str(UPSTREAM), str(dst)], check=True,
                       capture_output=True)
    subprocess.run(["git", "apply", "--unidiff-zero", str(SHIPPED)], cwd=by_patch, check=True)
    patcher.patch(by_tool, exports)
    tool = {k: v for k, v in snapshot(by_tool).items() if not k.startswith((".gtp5g-op/", ".git/"))}
    assert tool == {k: v for k, v in snapshot(by_patch).items() if not k.startswith(".git/")}


def _upstream_sources() -> list[Path]:
    """Real gtp5g releases from GTP5G_UPSTREAM (tarballs or trees; scripts/test sets ../shared/upstream's)."""
    import re

    return [Path(p) for p in re.split(r"[:\s]+", os.environ.get("GTP5G_UPSTREAM", "")) if p and Path(p).exists()]


def _unpack(source: Path, dst: Path) -> Path:
    import tarfile

    if source.is_dir():
        shutil.copytree(source, dst, symlinks=True)
        return dst
    dst.mkdir()
    with tarfile.open(source) as tar:
        tar.extractall(dst, filter="data")
    (top,) = list(dst.iterdir())
    return top


UPSTREAM_SOURCES = _upstream_sources()
_NO_UPSTREAM = "GTP5G_UPSTREAM names no gtp5g release tarball or tree (scripts/test sets ../shared/upstream)"


@pytest.mark.parametrize("source", UPSTREAM_SOURCES or [None], ids=lambda p: p.name if p else "none")
def test_real_release_patch_check_revert(source, exports, tmp_path):
    """On a real release: every function it has becomes exported, a second run changes nothing, revert
    restores it byte for byte; functions the release lacks (policePacket before v0.9) are absent."""
    if source is None:
        pytest.skip(_NO_UPSTREAM)
    tree = _unpack(source, tmp_path / "src")
    before = snapshot(tree)
    result = patcher.patch(tree, exports)
    assert result.changed
    after = states(tree, exports)
    assert set(after.values()) <= {State.EXPORTED, State.ABSENT}, after
    assert after["gtp5g_encap_recv"] == State.EXPORTED
    if "v0.8" in source.name:
        assert after["policePacket"] == State.ABSENT
    assert not patcher.patch(tree, exports).changed
    patcher.revert(tree)
    assert {k: v for k, v in snapshot(tree).items() if not k.startswith(".gtp5g-op/")} == before


def test_shipped_patch_matches_the_tool_on_the_v0_10_2_release(exports, tmp_path):
    """The shipped patch == patch-module on the real v0.10.2 release (tarball or tree in GTP5G_UPSTREAM)."""
    release = [s for s in UPSTREAM_SOURCES if "v0.10.2" in s.name]
    if not release:
        pytest.skip("GTP5G_UPSTREAM has no gtp5g v0.10.2 (scripts/test sets ../shared/upstream)")
    if shutil.which("patch") is None:
        pytest.skip("patch is not installed")
    by_tool = _unpack(release[0], tmp_path / "tool")
    by_patch = _unpack(release[0], tmp_path / "patch")
    subprocess.run(["patch", "-p1", "-s", "-i", str(SHIPPED)], cwd=by_patch, check=True)
    patcher.patch(by_tool, exports)
    tool = {k: v for k, v in snapshot(by_tool).items() if not k.startswith(".gtp5g-op/")}
    assert tool == snapshot(by_patch)


def test_export_extra_function_and_missing_explicit_one(v10, exports):
    extra = patcher.load_export_set(extra=["gtp1u_udp_encap_recv"])
    patcher.patch(v10, extra)
    assert states(v10, extra)["gtp1u_udp_encap_recv"] is State.EXPORTED
    before = snapshot(v10)
    with pytest.raises(OpError, match="no_such_function not found"):
        patcher.patch(v10, patcher.load_export_set(extra=["no_such_function"]))
    assert snapshot(v10) == before


def test_function_moved_to_another_file_is_found(v10, tmp_path):
    set_file = tmp_path / "set.toml"
    set_file.write_text('[[function]]\nname = "ip4_find_route"\nfile = "src/gtpu/route.c"\n')
    status = patcher.check(v10, patcher.load_export_set(set_file))[0]
    assert status.file == "src/gtpu/pktinfo.c" and "not src/gtpu/route.c" in status.note


def test_static_without_unstatic_permission_is_refused(v10, tmp_path):
    set_file = tmp_path / "set.toml"
    set_file.write_text('[[function]]\nname = "gtp5g_encap_recv"\nfile = "src/gtpu/encap.c"\nunstatic = false\n')
    with pytest.raises(OpError, match="unstatic = false"):
        patcher.patch(v10, patcher.load_export_set(set_file))


def test_not_a_gtp5g_tree_is_refused(tmp_path, exports):
    (tmp_path / "Makefile").write_text("all:\n\ttrue\n")
    with pytest.raises(UsageError, match="does not look like a gtp5g source tree"):
        patcher.patch(tmp_path, exports)
    with pytest.raises(UsageError, match="gtp5g source tree .*/nope does not exist"):
        patcher.check(tmp_path / "nope", exports)
    with pytest.raises(UsageError, match="Makefile is a regular file, not a directory"):
        patcher.check(tmp_path / "Makefile", exports)


def test_half_edited_trees_are_refused(v10, exports):
    encap = v10 / "src/gtpu/encap.c"
    text = encap.read_text()
    # someone dropped `static` from the definition only: the function is still file-local
    encap.write_text(text.replace("static int gtp5g_encap_recv(struct sock *sk,",
                                  "int gtp5g_encap_recv(struct sock *sk,"))
    before = snapshot(v10)
    with pytest.raises(OpError, match="half-edited.*forward declaration at line 17"):
        patcher.patch(v10, exports)
    assert snapshot(v10) == before
    # someone added EXPORT_SYMBOL but left the function static
    encap.write_text(text.replace("    return ret;\n}\n\nstatic int gtp1u",
                                  "    return ret;\n}\nEXPORT_SYMBOL(gtp5g_encap_recv);\n\nstatic int gtp1u"))
    with pytest.raises(OpError, match="half-edited.*still static"):
        patcher.patch(v10, exports)
    assert not (v10 / ".gtp5g-op").exists()


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def test_local_git_edits_on_target_lines_are_refused(v10, exports):
    _git(v10, "init", "-q")
    _git(v10, "-c", "user.email=t@t", "-c", "user.name=t", "add", ".")
    _git(v10, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "release")
    pdr = v10 / "src/pfcp/pdr.c"
    text = pdr.read_text()
    pdr.write_text(text.replace("    return NULL;\n}\n", "    return NULL; /* local tweak */\n}\n", 2))
    with pytest.raises(OpError, match="local edits at lines .* pdr_find_by_gtp1u"):
        patcher.patch(v10, exports)
    # an edit far from the target lines is fine
    pdr.write_text(text.replace("return pdr && pdr->teid == teid;", "return pdr != NULL && pdr->teid == teid;"))
    patcher.patch(v10, exports)
    assert states(v10, exports)["pdr_find_by_gtp1u"] is State.EXPORTED


def test_read_only_file_is_refused(v10, exports):
    target = v10 / "src/gtpu/pktinfo.c"
    target.chmod(0o444)
    before = snapshot(v10)
    with pytest.raises(EnvironmentProblem, match="read-only"):
        patcher.patch(v10, exports)
    assert snapshot(v10) == before


def test_failure_mid_write_leaves_every_file_as_it_was(v10, exports, monkeypatch):
    before = snapshot(v10)
    real_replace = os.replace
    calls = {"targets": 0}

    def failing_replace(src, dst):
        if str(dst).endswith(".c") and ".gtp5g-op" not in Path(dst).parts:  # a source file, not a backup
            calls["targets"] += 1
            if calls["targets"] == 3:  # two files already renamed into place
                raise OSError(28, "No space left on device (injected)")
        return real_replace(src, dst)

    monkeypatch.setattr(patcher.os, "replace", failing_replace)
    with pytest.raises(OSError, match="injected"):
        patcher.patch(v10, exports)
    monkeypatch.setattr(patcher.os, "replace", real_replace)
    assert calls["targets"] == 3 + 2  # the failing rename, then the two renamed files put back
    assert snapshot(v10) == before  # no half-changed file, no temp file, no state left behind


def test_failure_while_saving_backups_leaves_no_trace(v10, exports, monkeypatch):
    before = snapshot(v10)
    real_replace = os.replace

    def failing_replace(src, dst):
        if "originals" in Path(dst).parts and Path(dst).name == "pktinfo.c":
            raise OSError(5, "Input/output error (injected)")
        return real_replace(src, dst)

    monkeypatch.setattr(patcher.os, "replace", failing_replace)
    with pytest.raises(OSError, match="injected"):
        patcher.patch(v10, exports)
    assert snapshot(v10) == before


def test_revert_refuses_when_patched_file_was_edited_since(v10, exports):
    patcher.patch(v10, exports)
    trtcm = v10 / "src/gtpu/trTCM.c"
    trtcm.write_text(trtcm.read_text() + "/* my change */\n")
    before = snapshot(v10)
    with pytest.raises(OpError, match="trTCM.c changed since gtp5g-op patched it"):
        patcher.revert(v10)
    assert snapshot(v10) == before


def test_scanner_ignores_comments_strings_macros_and_calls():
    src = CSource(
        '#define CALL(x) foo(x)\n'
        '/* int foo(int a) { } */\n'
        'static const char *s = "foo(";\n'
        'static int foo(int,\n        int);\n'
        'static struct ops o = { .cb = foo };\n'
        'int bar(void) { return foo(1, 2); }\n'
        'static int foo(int a,\n               int b) {\n    return a + b;\n}\n'
        'int foo_bar(int a) { return a; }\n'
    )
    kinds = [(d.kind, bool(d.static)) for d in src.decls("foo")]
    assert kinds == [("declaration", True), ("definition", True)]
    assert src.line_of(src.decls("foo")[1].name_pos) == 8


def test_inline_function_is_refused(v10, tmp_path):
    pkt = v10 / "src/gtpu/pktinfo.c"
    pkt.write_text(pkt.read_text().replace("void gtp5g_push_header(", "inline void gtp5g_push_header("))
    status = next(s for s in patcher.check(v10, patcher.load_export_set()) if s.name == "gtp5g_push_header")
    assert status.conflict and "inline" in status.conflict


# ---------------------------------------------------------------- the command


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_cli_check_diff_patch_revert(v10):
    res = run("patch-module", "--src", str(v10), "--check", "--json")
    assert res.exit_code == 1
    doc = json.loads(res.output)
    assert doc["ok"] is False and doc["functions"][0]["state"] == "static"
    res = run("patch-module", "--src", str(v10), "--diff")
    assert res.exit_code == 0 and "+EXPORT_SYMBOL(policePacket);" in res.output
    res = run("patch-module", "--src", str(v10))
    assert res.exit_code == 0 and "patched 4 file(s)" in res.output
    res = run("patch-module", "--src", str(v10))
    assert "nothing to do" in res.output and "no file changed" in res.output
    res = run("patch-module", "--src", str(v10), "--check")
    assert res.exit_code == 0 and "all exported" in res.output
    res = run("patch-module", "--src", str(v10), "--revert")
    assert res.exit_code == 0 and "restored src/gtpu/encap.c" in res.output
    res = run("patch-module", "--src", str(v10), "--revert")
    assert "nothing to revert" in res.output


def test_cli_errors_are_one_line(tmp_path):
    res = CliRunner().invoke(main, ["patch-module", "--src", str(tmp_path)])
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and "gtp5g-op: error:" in res.output and "fix:" in res.output


def test_cli_help_has_examples():
    res = run("patch-module", "--help")
    assert "Examples:" in res.output and "--revert" in res.output


def test_root_patching_a_tree_another_user_owns_follows_none_of_their_symlinks(open_tmp, exports):
    """uid 65534 owns the tree root patches and plants symlinks at the predictable temp name and in the
    state directory. The old code opened ``.encap.c.gtp5g-op.tmp`` with open(..., "wb"): root truncated
    the symlink's target, wrote the user's encap.c into it and gave it encap.c's mode (0664 here)."""
    from hostile import NOBODY, as_user, require_root

    require_root("needs root to play the victim of uid 65534")
    tmp_path = open_tmp
    victim = tmp_path / "root-only"
    victim.write_text("precious\n")
    victim.chmod(0o600)
    root = tmp_path / "user-tree"
    shutil.copytree(MINI / "v0.10", root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.chown(name, NOBODY, NOBODY)

    def plant() -> None:
        os.symlink(victim, root / "src" / "gtpu" / ".encap.c.gtp5g-op.tmp")
        (root / patcher.STATE_DIR).mkdir()
        os.symlink(victim, root / patcher.STATE_DIR / ".gitignore")

    as_user(plant)
    result = patcher.patch(root, exports)
    assert result.changed and "src/gtpu/encap.c" in result.changed
    assert victim.read_text() == "precious\n" and (victim.stat().st_mode & 0o777) == 0o600
    assert not (root / patcher.STATE_DIR / ".gitignore").is_symlink()
    assert patcher.revert(root).restored
    assert victim.read_text() == "precious\n"

    # A state directory that is itself a symlink (to a directory of root's): refused, nothing written there.
    elsewhere = tmp_path / "root-dir"
    elsewhere.mkdir(mode=0o755)
    as_user(lambda: os.symlink(elsewhere, root / patcher.STATE_DIR))
    with pytest.raises(UsageError, match="symlink"):
        patcher.patch(root, exports)
    assert os.listdir(elsewhere) == []
    assert victim.read_text() == "precious\n"
