"""Apply, check, diff and revert the gtp5g export set on a gtp5g source tree of any release.

Functions are found by their definition, never by line number: comments, string literals and
preprocessor lines are masked out, then ``NAME(`` at file scope followed by a balanced parameter list
and ``{`` is the definition, followed by ``;`` a declaration. A hand-written scanner is used on purpose:
C parsers for Python (pycparser) need preprocessed input, which means the kernel's whole include tree
and config; the few shapes needed here (multi-line signatures, a brace on the signature line,
static forward declarations) are covered by the scanner and its tests.

State for ``revert`` lives in ``DIR/.gtp5g-op/``: the original bytes of each file the tool changed and
the SHA-256 of the original and of the patched content, so revert restores byte for byte and refuses
when the user edited a patched file since.
"""

from __future__ import annotations

import bisect
import difflib
import enum
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import subprocess
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gtp5g_op import DATA_DIR, userfiles
from gtp5g_op.errors import EnvironmentProblem, OpError, UsageError

log = logging.getLogger(__name__)

STATE_DIR = ".gtp5g-op"
MANIFEST = "manifest.json"
ORIGINALS = "originals"
SET_FILE = "gtp5g-exports.toml"
_IDENT = re.compile(r"^[A-Za-z_]\w*$")


# ---------------------------------------------------------------- export set (data in patches/)


@dataclass(frozen=True)
class ExportSpec:
    """One function of the export set."""

    name: str
    file: str | None  # expected file; None: search the whole tree
    unstatic: bool = True
    required: bool = False
    role: str = ""


@dataclass(frozen=True)
class ExportSet:
    name: str
    include: str
    functions: tuple[ExportSpec, ...]


def default_set_path() -> Path:
    """The bundled export set (``patches/``, shipped as package data), or ``$GTP5G_OP_PATCHES``."""
    env = os.environ.get("GTP5G_OP_PATCHES")
    candidates = [Path(env)] if env else []
    candidates.append(DATA_DIR / "patches")
    for directory in candidates:
        if (directory / SET_FILE).is_file():
            return directory / SET_FILE
    raise EnvironmentProblem(
        f"the bundled export set {SET_FILE} was not found (looked in {', '.join(map(str, candidates))})",
        fix="pass --set FILE, or set GTP5G_OP_PATCHES to the directory holding it",
    )


def load_export_set(path: Path | None = None, extra: Sequence[str] = ()) -> ExportSet:
    """Read an export set TOML file; ``extra`` names are added as required, un-static-able functions."""
    path = path or default_set_path()
    text = userfiles.read_text(path, "export set", fix="give an export set TOML file like patches/gtp5g-exports.toml")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"export set {path} is not valid TOML: {exc}", fix="check the file's TOML syntax") from exc
    meta = doc.get("set", {})
    specs: dict[str, ExportSpec] = {}
    for item in doc.get("function", []):
        name = item.get("name", "")
        if not _IDENT.match(name):
            raise UsageError(f"export set {path}: bad function name {name!r}", fix="use a C identifier")
        specs[name] = ExportSpec(
            name=name,
            file=item.get("file"),
            unstatic=bool(item.get("unstatic", False)),
            required=bool(item.get("required", False)),
            role=str(item.get("role", "")),
        )
    for name in extra:
        if not _IDENT.match(name):
            raise UsageError(f"--export {name!r} is not a C function name", fix="e.g. --export gtp5g_rx")
        old = specs.get(name)
        specs[name] = ExportSpec(
            name=name,
            file=old.file if old else None,
            unstatic=True,
            required=True,
            role=old.role if old else "added with --export",
        )
    if not specs:
        raise UsageError(f"export set {path} names no functions", fix="add [[function]] tables")
    return ExportSet(
        name=str(meta.get("name", Path(path).stem)),
        include=str(meta.get("include", "linux/module.h")),
        functions=tuple(specs.values()),
    )


# ---------------------------------------------------------------- C scanning


_MASK = re.compile(
    r"""//[^\n]*                       # line comment
      | /\*.*?\*/                      # block comment
      | "(?:\\.|[^"\\\n])*"            # string literal
      | '(?:\\.|[^'\\\n])*'            # char literal
      | ^[ \t]*\#(?:[^\n]*\\\n)*[^\n]*  # preprocessor line with continuations
    """,
    re.DOTALL | re.MULTILINE | re.VERBOSE,
)


def mask_c(text: str) -> str:
    """``text`` with comments, literals and preprocessor lines blanked; same length, newlines kept."""
    return _MASK.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


@dataclass
class Decl:
    """A file-scope declaration or definition of a function."""

    kind: str  # "definition" | "declaration"
    start: int  # first character of the specifiers
    name_pos: int
    end: int  # one past the closing brace (definition) or the semicolon (declaration)
    static: list[int]  # offsets of each `static` keyword among the specifiers
    inline: bool


class CSource:
    """One C file, masked and indexed for file-scope look-ups."""

    def __init__(self, text: str):
        self.text = text
        self.masked = mask_c(text)
        self.blocks = self._top_blocks()
        self._starts = [b[0] for b in self.blocks]

    def _top_blocks(self) -> list[tuple[int, int]]:
        blocks, depth, open_at = [], 0, 0
        for i, ch in enumerate(self.masked):
            if ch == "{":
                if depth == 0:
                    open_at = i
                depth += 1
            elif ch == "}" and depth:
                depth -= 1
                if depth == 0:
                    blocks.append((open_at, i))
        return blocks

    def at_file_scope(self, pos: int) -> bool:
        i = bisect.bisect_right(self._starts, pos) - 1
        return i < 0 or not (self.blocks[i][0] < pos <= self.blocks[i][1])

    def _block_at(self, pos: int) -> tuple[int, int] | None:
        i = bisect.bisect_left(self._starts, pos)
        return self.blocks[i] if i < len(self.blocks) and self.blocks[i][0] == pos else None

    def _close_paren(self, open_pos: int) -> int | None:
        depth = 0
        for i in range(open_pos, len(self.masked)):
            ch = self.masked[i]
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth == 0:
                    return i
        return None

    def _decl_start(self, name_pos: int) -> int:
        """Start of the specifiers before ``name_pos``: after the previous ``;``, ``}`` or ``{``."""
        i = name_pos - 1
        while i >= 0 and self.masked[i] not in ";}{)":
            i -= 1
        i += 1
        while i < name_pos and self.masked[i].isspace():
            i += 1
        return i

    def _after_signature(self, close: int) -> int:
        """Index of the first character after ``)`` and any attribute macros like ``__acquires(x)``."""
        i = close + 1
        n = len(self.masked)
        while True:
            while i < n and self.masked[i].isspace():
                i += 1
            m = re.compile(r"[A-Za-z_]\w*").match(self.masked, i)
            if not m:
                return i
            i = m.end()
            while i < n and self.masked[i].isspace():
                i += 1
            if i < n and self.masked[i] == "(":
                end = self._close_paren(i)
                if end is None:
                    return n
                i = end + 1

    def decls(self, name: str) -> list[Decl]:
        """Every file-scope declaration and definition of function ``name``."""
        found = []
        for m in re.finditer(rf"\b{re.escape(name)}\s*\(", self.masked):
            if not self.at_file_scope(m.start()):
                continue
            start = self._decl_start(m.start())
            specifiers = self.masked[start : m.start()]
            if not specifiers.strip() or not re.fullmatch(r"[\w\s\*]+", specifiers):
                continue
            close = self._close_paren(m.end() - 1)
            if close is None:
                continue
            after = self._after_signature(close)
            if after >= len(self.masked):
                continue
            statics = [start + s.start() for s in re.finditer(r"\bstatic\b", specifiers)]
            inline = bool(re.search(r"\b(__always_)?inline\b|\b__inline__\b", specifiers))
            if self.masked[after] == "{":
                block = self._block_at(after)
                if block is None:
                    continue
                found.append(Decl("definition", start, m.start(), block[1] + 1, statics, inline))
            elif self.masked[after] in ";,":
                semi = self.masked.find(";", after)
                found.append(Decl("declaration", start, m.start(), semi + 1, statics, inline))
        return found

    def exports(self, name: str) -> list[int]:
        """Offsets of ``EXPORT_SYMBOL(name);`` / ``EXPORT_SYMBOL_GPL(name);`` at file scope."""
        pattern = rf"\bEXPORT_SYMBOL(?:_GPL)?\s*\(\s*{re.escape(name)}\s*\)\s*;"
        return [m.start() for m in re.finditer(pattern, self.masked) if self.at_file_scope(m.start())]

    def line_of(self, pos: int) -> int:
        return self.text.count("\n", 0, pos) + 1

    def has_include(self, header: str) -> bool:
        return re.search(rf"^[ \t]*#[ \t]*include[ \t]*<{re.escape(header)}>", self.text, re.MULTILINE) is not None

    def include_insert_pos(self) -> int:
        """Where a new ``#include <...>`` goes: after the last system include before the first body."""
        limit = self.blocks[0][0] if self.blocks else len(self.text)
        best = None
        for m in re.finditer(r"^[ \t]*#[ \t]*include[ \t]*<[^>\n]*>[^\n]*\n", self.text, re.MULTILINE):
            if m.start() < limit:
                best = m.end()
        if best is not None:
            return best
        first = re.search(r"^[ \t]*#[ \t]*include\b", self.text, re.MULTILINE)
        return first.start() if first else 0


# ---------------------------------------------------------------- analysis


class State(str, enum.Enum):
    EXPORTED = "exported"
    GLOBAL = "global only"
    STATIC = "static"
    ABSENT = "absent"


@dataclass
class FunctionStatus:
    """What the tree says about one function of the set, and the edit it needs."""

    spec: ExportSpec
    state: State
    file: str | None = None  # relative path where it is defined
    line: int | None = None  # line of the definition
    moved: bool = False  # defined elsewhere than the set's file
    conflict: str | None = None  # why this function cannot be patched safely
    fix: str = ""  # what to do about the conflict
    note: str = ""

    @property
    def name(self) -> str:
        return self.spec.name

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "state": self.state.value,
            "file": self.file,
            "line": self.line,
            "required": self.spec.required,
            "conflict": self.conflict,
            "fix": self.fix or None,
            "note": self.note,
        }


@dataclass
class _Edit:
    pos: int
    delete: int
    insert: str
    line: int  # the line this edit touches, for the local-edit check
    function: str


@dataclass
class Plan:
    """The result of analysing a tree: statuses, the new content of each file to change."""

    root: Path
    export_set: ExportSet
    statuses: list[FunctionStatus]
    originals: dict[str, bytes] = field(default_factory=dict)
    updated: dict[str, bytes] = field(default_factory=dict)
    touched_lines: dict[str, list[tuple[int, str]]] = field(default_factory=dict)

    @property
    def conflicts(self) -> list[FunctionStatus]:
        return [s for s in self.statuses if s.conflict]

    @property
    def missing_required(self) -> list[FunctionStatus]:
        return [s for s in self.statuses if s.state is State.ABSENT and s.spec.required]

    def diff(self, context: int = 3) -> str:
        """The plan as a unified diff, ``git apply``-able from the tree's top (a/ b/ prefixes).

        ``context=0`` gives hunks without surrounding lines; apply those with ``patch -p1`` or
        ``git apply --unidiff-zero``.
        """
        out = []
        for rel in sorted(self.updated):
            old = self.originals[rel].decode("utf-8", "surrogateescape").splitlines(keepends=True)
            new = self.updated[rel].decode("utf-8", "surrogateescape").splitlines(keepends=True)
            for line in difflib.unified_diff(old, new, f"a/{rel}", f"b/{rel}", n=context):
                out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
        return "".join(out)


def is_gtp5g_tree(root: Path) -> bool:
    """A gtp5g source tree: a Makefile naming the gtp5g module and its GTP-U encap source."""
    makefile = root / "Makefile"
    if not makefile.is_file():
        return False
    try:
        text = makefile.read_text(errors="replace")
    except OSError:
        return False
    names_module = re.search(r"MODULE_NAME\s*[:?]?=\s*gtp5g\b|obj-m\s*[:+]?=\s*gtp5g\.o", text)
    encap = (root / "src" / "gtpu" / "encap.c").is_file() or (root / "encap.c").is_file()
    return bool(names_module) and encap


def _require_tree(root: Path) -> Path:
    root = userfiles.check(Path(root).expanduser(), "gtp5g source tree", kinds={userfiles.DIRECTORY},
                           fix="pass --src with the top directory of a gtp5g checkout")
    if not is_gtp5g_tree(root):
        raise UsageError(
            f"{root} does not look like a gtp5g source tree (no Makefile building gtp5g.o "
            "with src/gtpu/encap.c)",
            fix="pass the top directory of a gtp5g checkout, e.g. git clone https://github.com/free5gc/gtp5g",
        )
    return root.resolve()


def _c_files(root: Path) -> list[str]:
    files = []
    for path in sorted(root.rglob("*.c")):
        rel = path.relative_to(root)
        if rel.parts[0] == STATE_DIR or path.name.endswith(".mod.c"):
            continue
        files.append(rel.as_posix())
    return files


class _Tree:
    """Lazily read and scanned C files of one tree."""

    def __init__(self, root: Path):
        self.root = root
        self.sources: dict[str, CSource] = {}
        self.raw: dict[str, bytes] = {}
        self._all: list[str] | None = None

    def get(self, rel: str) -> CSource | None:
        if rel not in self.sources:
            path = self.root / rel
            if not path.is_file():
                return None
            data = path.read_bytes()
            self.raw[rel] = data
            self.sources[rel] = CSource(data.decode("utf-8", "surrogateescape"))
        return self.sources[rel]

    def all_files(self) -> list[str]:
        if self._all is None:
            self._all = _c_files(self.root)
        return self._all


def _classify(spec: ExportSpec, rel: str, src: CSource, defs: list[Decl]) -> FunctionStatus:
    definition = defs[0]
    decls = [d for d in src.decls(spec.name) if d.kind == "declaration"]
    exports = src.exports(spec.name)
    line = src.line_of(definition.name_pos)
    static_def = bool(definition.static)
    static_decls = [d for d in decls if d.static]
    is_static = static_def or bool(static_decls)
    status = FunctionStatus(spec, State.ABSENT, rel, line)
    restore = f"restore {rel} from the release (git checkout -- {rel}) and run patch-module again"
    if len(defs) > 1:
        lines = ", ".join(str(src.line_of(d.name_pos)) for d in defs)
        status.conflict = f"defined {len(defs)} times in {rel} (lines {lines}, #ifdef variants?)"
        status.fix = "export it by hand"
    elif static_def and len(static_decls) < len(decls):
        status.conflict = f"{rel}:{line} defines it static but a forward declaration is not (local edits?)"
        status.fix = restore
    elif not static_def and static_decls:
        where = src.line_of(static_decls[0].name_pos)
        status.conflict = (
            f"half-edited: {rel}:{line} dropped `static` from the definition but the forward "
            f"declaration at line {where} is still static, so the function stays file-local"
        )
        status.fix = restore
    elif is_static and exports:
        status.conflict = (
            f"half-edited: {rel} has EXPORT_SYMBOL({spec.name}) at line {src.line_of(exports[0])} "
            f"but the function is still static at line {line}"
        )
        status.fix = restore
    elif len(exports) > 1:
        status.conflict = f"{rel} exports {spec.name} {len(exports)} times"
        status.fix = "remove the duplicate EXPORT_SYMBOL lines"
    elif definition.inline:
        status.conflict = f"{rel}:{line} is inline; exporting it would change the generated code"
        status.fix = "export it by hand, or leave it out of the set"
    if is_static:
        status.state = State.STATIC
    elif exports:
        status.state = State.EXPORTED
    else:
        status.state = State.GLOBAL
    if status.state is State.STATIC and not spec.unstatic and not status.conflict:
        status.conflict = f"static in {rel}:{line} and the export set says unstatic = false"
        status.fix = f"set unstatic = true for {spec.name} in the set file, or pass --export {spec.name}"
    return status


def _locate(tree: _Tree, spec: ExportSpec) -> FunctionStatus:
    candidates = [spec.file] if spec.file else []
    for rel in candidates:
        src = tree.get(rel)
        if src is not None:
            defs = [d for d in src.decls(spec.name) if d.kind == "definition"]
            if defs:
                return _classify(spec, rel, src, defs)
    for rel in tree.all_files():
        if rel in candidates:
            continue
        src = tree.get(rel)
        defs = [d for d in src.decls(spec.name) if d.kind == "definition"] if src else []
        if defs:
            status = _classify(spec, rel, src, defs)
            status.moved = bool(spec.file)
            if spec.file:
                status.note = f"found in {rel}, not {spec.file}"
            return status
    status = FunctionStatus(spec, State.ABSENT)
    if spec.file and not (tree.root / spec.file).is_file():
        status.note = f"{spec.file} is not in this release"
    else:
        status.note = "no definition in this tree"
    return status


def _edits_for(status: FunctionStatus, src: CSource) -> list[_Edit]:
    name = status.name
    edits: list[_Edit] = []
    if status.state is State.STATIC:
        for decl in src.decls(name):
            for pos in decl.static:
                end = pos + len("static")
                while end < len(src.text) and src.text[end] in " \t":
                    end += 1
                edits.append(_Edit(pos, end - pos, "", src.line_of(pos), name))
    if status.state in (State.STATIC, State.GLOBAL):
        definition = next(d for d in src.decls(name) if d.kind == "definition")
        brace = definition.end - 1
        eol = src.text.find("\n", brace)
        rest = src.masked[brace + 1 : eol if eol >= 0 else len(src.text)]
        line = src.line_of(brace)
        export = f"EXPORT_SYMBOL({name});\n"
        if eol < 0:
            edits.append(_Edit(len(src.text), 0, "\n" + export, line, name))
        elif rest.strip():
            raise OpError(f"{name}: code follows its closing brace on line {line}; cannot place EXPORT_SYMBOL",
                          fix="put the closing brace on its own line, or export it by hand")
        else:
            edits.append(_Edit(eol + 1, 0, export, line, name))
    return edits


def _apply(text: str, edits: Iterable[_Edit]) -> str:
    for edit in sorted(edits, key=lambda e: e.pos, reverse=True):
        text = text[: edit.pos] + edit.insert + text[edit.pos + edit.delete :]
    return text


def analyse(root: Path, export_set: ExportSet) -> Plan:
    """Read the tree and work out each function's state and the new content of each file to change."""
    root = _require_tree(root)
    tree = _Tree(root)
    statuses = [_locate(tree, spec) for spec in export_set.functions]
    plan = Plan(root, export_set, statuses)
    per_file: dict[str, list[_Edit]] = {}
    for status in statuses:
        if status.conflict or status.state in (State.ABSENT, State.EXPORTED):
            continue
        per_file.setdefault(status.file, []).extend(_edits_for(status, tree.get(status.file)))
    for rel, edits in per_file.items():
        src = tree.get(rel)
        if not src.has_include(export_set.include):
            pos = src.include_insert_pos()
            edits.append(_Edit(pos, 0, f"#include <{export_set.include}>\n", src.line_of(pos), "#include"))
        plan.originals[rel] = tree.raw[rel]
        plan.updated[rel] = _apply(src.text, edits).encode("utf-8", "surrogateescape")
        plan.touched_lines[rel] = sorted({(e.line, e.function) for e in edits})
    return plan


# ---------------------------------------------------------------- safety checks


def _git_changed_lines(root: Path, rel: str) -> list[tuple[int, int]] | None:
    """Line ranges (new side) where ``rel`` differs from git HEAD; None when not in a git work tree."""
    if shutil.which("git") is None:
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "diff", "--no-color", "-U0", "HEAD", "--", rel],
            capture_output=True, text=True, timeout=30, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    ranges = []
    for m in re.finditer(r"^@@ -\d+(?:,\d+)? \+(\d+)(?:,(\d+))? @@", out.stdout, re.MULTILINE):
        start, count = int(m.group(1)), int(m.group(2) or 1)
        ranges.append((start, start + max(count, 1) - 1))
    return ranges


def _check_local_edits(plan: Plan, manifest: dict) -> None:
    """Refuse when git shows local edits on the very lines the plan changes (not made by this tool)."""
    for rel, touched in plan.touched_lines.items():
        if rel in manifest.get("files", {}):
            continue  # the file's differences from HEAD include this tool's own earlier edits
        ranges = _git_changed_lines(plan.root, rel)
        for line, function in touched:
            for lo, hi in ranges or ():
                if lo - 1 <= line <= hi + 1:
                    raise OpError(
                        f"{rel} has local edits at lines {lo}-{hi}, next to line {line} that the patch "
                        f"changes for {function}; a mix of hand edits and this patch is not safe",
                        fix=f"look at `git -C {plan.root} diff -- {rel}`, then commit or revert those "
                        "edits and run patch-module again",
                    )


def _check_writable(root: Path, rels: Iterable[str]) -> None:
    """Refuse read-only files: no write bit (root's os.access ignores modes) or not writable at all."""
    for rel in rels:
        path = root / rel
        no_write_bit = not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
        if no_write_bit or not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK):
            raise EnvironmentProblem(
                f"{rel} (or its directory) is read-only; nothing was changed",
                fix=f"make it writable (chmod u+w {path}) or patch a writable copy of the tree",
            )


# ---------------------------------------------------------------- state and atomic writes


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _state_dir(root: Path) -> Path:
    return root / STATE_DIR


def read_manifest(root: Path) -> dict:
    path = _state_dir(root) / MANIFEST
    if not path.is_file():
        return {"version": 1, "files": {}}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise OpError(f"{path} is unreadable: {exc}", fix=f"inspect or remove {path}") from exc


def write_new_temp(path: Path, data: bytes, mode_from: Path | None = None, mode: int = 0o600) -> Path:
    """Write ``data`` to a new temp file next to ``path``; return the temp path (rename is the caller's).

    The tree may belong to another user than the one patching it (root): the temp file gets a random
    name and is created with O_EXCL|O_NOFOLLOW, so a symlink planted there is never written through.
    Its mode is ``mode_from``'s when that file exists, else ``mode``. On any error nothing is left.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.gtp5g-op.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with open(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
            if mode_from is not None and mode_from.exists():
                mode = stat.S_IMODE(mode_from.stat().st_mode)
            os.fchmod(fh.fileno(), mode)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def real_dir(path: Path) -> Path:
    """Create directory ``path`` if missing; refuse a symlink (or anything else) planted in its place."""
    path.mkdir(exist_ok=True)
    if path.is_symlink() or not path.is_dir():
        raise UsageError(f"{path} is a symlink or not a directory; gtp5g-op keeps its state there",
                         f"remove {path} (gtp5g-op recreates it)")
    return path


def write_files_atomically(root: Path, contents: dict[str, bytes], previous: dict[str, bytes]) -> None:
    """Replace every file in ``contents`` or none: temp files first, then renames, rolled back on error.

    ``previous`` holds the bytes each file has now, used to restore renamed files when a later step fails.
    """
    temps: dict[str, Path] = {}
    renamed: list[str] = []
    try:
        for rel, data in contents.items():
            temps[rel] = write_new_temp(root / rel, data, mode_from=root / rel)
        for rel, tmp in temps.items():
            os.replace(tmp, root / rel)
            renamed.append(rel)
    except BaseException:
        for rel in reversed(renamed):
            try:
                os.replace(write_new_temp(root / rel, previous[rel], mode_from=root / rel), root / rel)
            except OSError:  # pragma: no cover - the disk failed twice; say which file is off
                log.error("could not restore %s; its original is in %s", rel, _state_dir(root))
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise


def _save_state(root: Path, manifest: dict, originals: dict[str, bytes]) -> None:
    state = real_dir(_state_dir(root))
    os.replace(write_new_temp(state / ".gitignore", b"*\n"), state / ".gitignore")
    for rel, data in originals.items():
        target = state / ORIGINALS / rel
        parent = state
        for part in (ORIGINALS, *Path(rel).parent.parts):
            parent = real_dir(parent / part)
        os.replace(write_new_temp(target, data), target)
    manifest_path = state / MANIFEST
    os.replace(write_new_temp(manifest_path, json.dumps(manifest, indent=2).encode()), manifest_path)


# ---------------------------------------------------------------- the operations


@dataclass
class PatchResult:
    plan: Plan
    changed: list[str]  # relative paths written

    @property
    def statuses(self) -> list[FunctionStatus]:
        return self.plan.statuses


def _raise_conflicts(plan: Plan) -> None:
    if plan.conflicts:
        first = plan.conflicts[0]
        more = f" (and {len(plan.conflicts) - 1} more)" if len(plan.conflicts) > 1 else ""
        raise OpError(f"refusing to patch {first.name}: {first.conflict}{more}; nothing was changed",
                      fix=first.fix)
    if plan.missing_required:
        names = ", ".join(s.name for s in plan.missing_required)
        raise OpError(f"{names} not found in {plan.root} (asked for explicitly); nothing was changed",
                      fix="check the name, or drop --export / required for a release that lacks it")


def plan_patch(root: Path, export_set: ExportSet) -> Plan:
    """Analyse and run every safety check; raise OpError instead of returning an unsafe plan."""
    plan = analyse(root, export_set)
    _raise_conflicts(plan)
    _check_local_edits(plan, read_manifest(plan.root))
    return plan


def patch(root: Path, export_set: ExportSet) -> PatchResult:
    """Apply the export set: all files change, or none do. A second run changes nothing."""
    plan = plan_patch(root, export_set)
    if not plan.updated:
        return PatchResult(plan, [])
    _check_writable(plan.root, plan.updated)
    manifest = read_manifest(plan.root)
    old_manifest = json.loads(json.dumps(manifest))
    new_originals: dict[str, bytes] = {}
    for rel, data in plan.originals.items():
        entry = manifest["files"].get(rel)
        if entry is None:
            new_originals[rel] = data
            manifest["files"][rel] = {"original_sha256": _sha(data)}
        manifest["files"][rel]["patched_sha256"] = _sha(plan.updated[rel])
    manifest["functions"] = sorted(set(manifest.get("functions", [])) | {
        s.name for s in plan.statuses if s.file in plan.updated})
    try:
        _save_state(plan.root, manifest, new_originals)
        write_files_atomically(plan.root, plan.updated, plan.originals)
    except BaseException:
        _restore_state(plan.root, old_manifest, new_originals)
        raise
    log.info("patched %d file(s) in %s", len(plan.updated), plan.root)
    return PatchResult(plan, sorted(plan.updated))


def _restore_state(root: Path, old_manifest: dict, added: dict[str, bytes]) -> None:
    """Undo ``_save_state`` after a failed write."""
    state = _state_dir(root)
    for rel in added:
        (state / ORIGINALS / rel).unlink(missing_ok=True)
    if old_manifest.get("files"):
        path = state / MANIFEST
        os.replace(write_new_temp(path, json.dumps(old_manifest, indent=2).encode()), path)
    else:
        shutil.rmtree(state, ignore_errors=True)


def check(root: Path, export_set: ExportSet) -> list[FunctionStatus]:
    """Each function's state in the tree, without changing anything."""
    return analyse(root, export_set).statuses


def check_ok(statuses: Sequence[FunctionStatus]) -> bool:
    """True when every function the release has (and every required one) is exported."""
    return all(
        s.state is State.EXPORTED or (s.state is State.ABSENT and not s.spec.required) for s in statuses
    )


@dataclass
class RevertResult:
    restored: list[str]
    unchanged: list[str]


def revert(root: Path) -> RevertResult:
    """Put back every file this tool changed, byte for byte; refuse if one was edited since."""
    root = _require_tree(root)
    manifest = read_manifest(root)
    files = manifest.get("files", {})
    if not files:
        return RevertResult([], [])
    originals: dict[str, bytes] = {}
    current: dict[str, bytes] = {}
    unchanged = []
    for rel, entry in sorted(files.items()):
        path = root / rel
        backup = _state_dir(root) / ORIGINALS / rel
        data = backup.read_bytes() if backup.is_file() else None
        if data is None or _sha(data) != entry["original_sha256"]:
            raise OpError(f"the saved original of {rel} is missing or damaged ({backup}); nothing was changed",
                          fix=f"restore {rel} from the gtp5g release by hand")
        now = path.read_bytes() if path.is_file() else b""
        if _sha(now) == entry["original_sha256"]:
            unchanged.append(rel)
            continue
        if _sha(now) != entry["patched_sha256"]:
            raise OpError(
                f"{rel} changed since gtp5g-op patched it; reverting would throw those edits away, "
                "so nothing was changed",
                fix=f"undo your edits to {rel}, or take the original yourself: cp {backup} {path}",
            )
        originals[rel] = data
        current[rel] = now
    _check_writable(root, originals)
    write_files_atomically(root, originals, current)
    shutil.rmtree(_state_dir(root), ignore_errors=True)
    return RevertResult(sorted(originals), unchanged)
