"""kernels/patchset.py: the engine patch set is applied exactly, all or nothing, and can be undone.

Synthetic trees here (fast); tests/test_kernels.py and tests/test_wheel.py build the pinned llama.cpp with the real
patch set and run the split-exactness tests on it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "kernels"))
import patchset  # noqa: E402

PATCH = """# demo: one edit in two files
diff --git a/src/a.c b/src/a.c
--- a/src/a.c
+++ b/src/a.c
@@ -1,4 +1,5 @@
 int a(void) {
-    return 1;
+    // patched
+    return 2;
 }
 
@@ -8,3 +9,3 @@
 int c(void) {
-    return 3;
+    return 4;
 }
diff --git a/include/a.h b/include/a.h
--- a/include/a.h
+++ b/include/a.h
@@ -1,2 +1,3 @@
 int a(void);
+int patched(void);
 int c(void);
"""

A_C = "int a(void) {\n    return 1;\n}\n\nint b(void) {\n    return 0;\n}\nint c(void) {\n    return 3;\n}\n"
A_H = "int a(void);\nint c(void);\n"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    (tmp_path / "include").mkdir()
    (tmp_path / "src" / "a.c").write_text(A_C)
    (tmp_path / "include" / "a.h").write_text(A_H)
    return tmp_path


def _patch(tmp_path: Path, text: str = PATCH, name: str = "0001-demo.patch") -> Path:
    d = tmp_path / "patches"
    d.mkdir(exist_ok=True)
    p = d / name
    p.write_text(text)
    return p


def test_apply_then_undo_restores_the_tree(tree: Path, tmp_path: Path) -> None:
    p = _patch(tmp_path)
    assert patchset.ensure(tree, [p], log=lambda m: None) == ["0001-demo.patch"]
    assert "return 2;" in (tree / "src" / "a.c").read_text() and "return 4;" in (tree / "src" / "a.c").read_text()
    assert "int patched(void);" in (tree / "include" / "a.h").read_text()
    assert patchset.applied(tree) == ["0001-demo.patch"]
    # again: nothing to do (the recorded set is the wanted one)
    assert patchset.ensure(tree, [p], log=lambda m: pytest.fail(m)) == ["0001-demo.patch"]
    patchset.ensure(tree, [], log=lambda m: None)
    assert (tree / "src" / "a.c").read_text() == A_C and (tree / "include" / "a.h").read_text() == A_H
    assert patchset.applied(tree) == []


def test_a_changed_patch_replaces_the_applied_one(tree: Path, tmp_path: Path) -> None:
    patchset.ensure(tree, [_patch(tmp_path)], log=lambda m: None)
    v2 = _patch(tmp_path, PATCH.replace("return 2;", "return 22;"))  # same name, new content
    patchset.ensure(tree, [v2], log=lambda m: None)
    text = (tree / "src" / "a.c").read_text()
    assert "return 22;" in text and "return 2;\n" not in text and "// patched" in text


def test_a_hunk_that_does_not_match_changes_nothing(tree: Path, tmp_path: Path) -> None:
    (tree / "include" / "a.h").write_text("int a(void);\nint other(void);\n")  # the second file differs
    with pytest.raises(patchset.PatchError, match="a.h"):
        patchset.ensure(tree, [_patch(tmp_path)], log=lambda m: None)
    assert (tree / "src" / "a.c").read_text() == A_C  # the first file was not touched either
    assert patchset.applied(tree) == []


def test_hunks_are_found_when_lines_moved(tree: Path, tmp_path: Path) -> None:
    (tree / "src" / "a.c").write_text("// a new first line\n// and a second\n" + A_C)
    patchset.ensure(tree, [_patch(tmp_path)], log=lambda m: None)
    assert "return 4;" in (tree / "src" / "a.c").read_text()


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside.c"])
def test_paths_outside_the_tree_are_refused(tree: Path, tmp_path: Path, path: str) -> None:
    bad = PATCH.replace("b/include/a.h", "b/" + path.lstrip("/") if path.startswith("..") else path)
    with pytest.raises(patchset.PatchError):
        patchset.ensure(tree, [_patch(tmp_path, bad)], log=lambda m: None)


def test_the_project_patches_parse_and_say_what_they_do() -> None:
    patches = patchset.patch_files()
    assert [p.name for p in patches][:1] == ["0001-stage-output.patch"]
    for p in patches:
        files = patchset.parse(p.read_text())
        assert files and all(f.hunks for f in files)
        assert patchset.describe([p])[p.name], f"{p.name} has no header line saying what it does"
    touched = {f.path for f in patchset.parse(patches[0].read_text())}
    assert {"include/llama.h", "src/llama-context.cpp", "ggml/include/ggml.h"} <= touched
    assert len(patchset.digest(patches)) == 16
