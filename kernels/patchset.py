"""The project's llama.cpp patch set (``kernels/patches/*.patch``), applied to a source tree before a build.

``kernels/build.py`` and ``kernels/wheel.py`` build the engine from the pinned llama-cpp-python sdist; with the
patches, the libraries gain what the pinned API lacks (each patch's header says what and why; ``molink-lite
doctor`` lists the ones a loaded library carries, from ``llama_molink_patches()``). A library built without them
(pip's own source build) keeps working: the stage falls back to the paths the pinned API has.

The applier is exact (no fuzz: every context and removed line must match, at the hunk's line or anywhere else in
the file), pure standard library (Windows build hosts need no ``patch`` or ``git``), and reversible: the applied
set is recorded in ``<tree>/.molink-patches/``, so a tree can move between patch sets (or back to none) without
being unpacked again, which keeps CMake's build folder and its incremental rebuilds valid.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

PATCH_DIR = Path(__file__).resolve().parent / "patches"
STATE_DIR = ".molink-patches"
_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class PatchError(RuntimeError):
    """A patch does not apply to the tree (a different llama.cpp source, or a hand-edited one)."""


@dataclass
class Hunk:
    old_start: int
    old: List[str] = field(default_factory=list)  # context and removed lines, with their line ends
    new: List[str] = field(default_factory=list)  # context and added lines


@dataclass
class FilePatch:
    path: str
    hunks: List[Hunk] = field(default_factory=list)


def patch_files(patch_dir: Path = PATCH_DIR) -> List[Path]:
    """The patch set, in the order it is applied (file name order)."""
    return sorted(patch_dir.glob("*.patch")) if patch_dir.is_dir() else []


def digest(patches: Sequence[Path]) -> str:
    """A short hash of the patch set's names and contents (part of build keys)."""
    h = hashlib.sha256()
    for p in patches:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def parse(text: str) -> List[FilePatch]:
    """The files and hunks of a unified diff (``git diff`` output: ``a/`` and ``b/`` prefixes)."""
    files: List[FilePatch] = []
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            target = lines[i + 1][4:].strip().split("\t")[0]
            if target == "/dev/null" or not target.startswith("b/"):
                raise PatchError(f"only edits of existing files with a/ b/ paths are supported: {target}")
            path = target[2:]
            if Path(path).is_absolute() or ".." in Path(path).parts:
                raise PatchError(f"unsafe path in patch: {path}")
            files.append(FilePatch(path))
            i += 2
            continue
        m = _HUNK.match(line)
        if m:
            if not files:
                raise PatchError("hunk before any file header")
            hunk = Hunk(int(m.group(1)))
            n_old = int(m.group(2) or 1)
            n_new = int(m.group(4) or 1)
            i += 1
            while i < len(lines) and (len(hunk.old) < n_old or len(hunk.new) < n_new):
                body = lines[i]
                tag, rest = body[:1], body[1:]
                if body.startswith("\\"):  # "\ No newline at end of file": the previous line has no line end
                    for side in (hunk.old, hunk.new):
                        if side and side[-1].endswith("\n"):
                            side[-1] = side[-1][:-1]
                elif tag == " " or body in ("\n", "\r\n"):
                    rest = rest if tag == " " else body
                    hunk.old.append(rest)
                    hunk.new.append(rest)
                elif tag == "-":
                    hunk.old.append(rest)
                elif tag == "+":
                    hunk.new.append(rest)
                else:
                    raise PatchError(f"malformed hunk line: {body!r}")
                i += 1
            if len(hunk.old) != n_old or len(hunk.new) != n_new:
                raise PatchError(f"truncated hunk in {files[-1].path}")
            files[-1].hunks.append(hunk)
            continue
        i += 1
    if not files:
        raise PatchError("no file in patch")
    return files


def _find(lines: List[str], block: List[str], hint: int) -> int:
    """Index where ``block`` occurs in ``lines``: at ``hint`` if it does, else its only other occurrence."""
    n = len(block)
    if lines[hint:hint + n] == block:
        return hint
    hits = [k for k in range(len(lines) - n + 1) if lines[k:k + n] == block]
    if len(hits) != 1:
        return -1
    return hits[0]


def _apply_file(root: Path, fp: FilePatch, reverse: bool, dry_run: bool) -> None:
    path = root / fp.path
    if not path.is_file():
        raise PatchError(f"{fp.path}: no such file in {root}")
    lines = path.read_bytes().decode("utf-8").splitlines(keepends=True)
    shift = 0
    for h in fp.hunks:
        old, new = (h.new, h.old) if reverse else (h.old, h.new)
        at = _find(lines, old, max(0, h.old_start - 1 + shift))
        if at < 0:
            raise PatchError(f"{fp.path}: hunk at line {h.old_start} does not apply "
                             f"({'is it applied?' if not reverse else 'was it applied?'})")
        lines[at:at + len(old)] = new
        shift += len(new) - len(old)
    if not dry_run:
        path.write_bytes("".join(lines).encode("utf-8"))


def apply(root: Path, patch: Path, *, reverse: bool = False) -> None:
    """Apply (or undo) one patch to the tree at ``root``; all or nothing: every hunk is checked first."""
    files = parse(patch.read_text(encoding="utf-8"))
    for fp in files:
        _apply_file(root, fp, reverse, dry_run=True)
    for fp in files:
        _apply_file(root, fp, reverse, dry_run=False)


def applied(root: Path) -> List[str]:
    """Names of the patches recorded as applied to ``root``, in order."""
    state = root / STATE_DIR / "applied.json"
    if not state.is_file():
        return []
    return list(json.loads(state.read_text(encoding="utf-8")))


def ensure(root: Path, patches: Sequence[Path], log=print) -> List[str]:
    """Bring the tree at ``root`` to exactly ``patches`` (an empty list: the pristine source): undoes a recorded
    set that differs (newest first, from the recorded copies), then applies the new one. Returns the names."""
    state_dir = root / STATE_DIR
    want = [(p.name, p.read_bytes()) for p in patches]
    have = applied(root)
    have_bytes = [(n, (state_dir / n).read_bytes()) for n in have] if have else []
    if have_bytes == want:
        return [n for n, _ in want]
    for name in reversed(have):
        log(f"undoing patch {name}")
        apply(root, state_dir / name, reverse=True)
        (state_dir / name).unlink()
        _record(state_dir, [n for n in applied(root) if n != name])
    for p in patches:
        log(f"applying patch {p.name}")
        apply(root, p)
        state_dir.mkdir(exist_ok=True)
        shutil.copyfile(p, state_dir / p.name)
        _record(state_dir, applied(root) + [p.name])
    return [p.name for p in patches]


def _record(state_dir: Path, names: List[str]) -> None:
    state_dir.mkdir(exist_ok=True)
    (state_dir / "applied.json").write_text(json.dumps(names), encoding="utf-8")


def describe(patches: Sequence[Path]) -> Dict[str, str]:
    """name -> the first line of its header comment (what it does)."""
    out: Dict[str, str] = {}
    for p in patches:
        first = next((ln[2:].strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.startswith("# ")), "")
        out[p.name] = first
    return out


def split_header(text: str) -> Tuple[str, str]:
    """(header comment, diff) of a patch file; the header is the lines before the first ``diff``/``---``."""
    m = re.search(r"^(diff --git |--- )", text, re.M)
    return (text[:m.start()], text[m.start():]) if m else (text, "")


def main(argv: Optional[Sequence[str]] = None) -> int:  # pragma: no cover - a convenience for developers
    import argparse

    ap = argparse.ArgumentParser(description="apply (or undo, with --none) the patch set to a llama.cpp tree")
    ap.add_argument("tree", type=Path)
    ap.add_argument("--none", action="store_true", help="bring the tree back to the pristine source")
    a = ap.parse_args(argv)
    print(ensure(a.tree, [] if a.none else patch_files()))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
