"""The package layout keeps its import direction: cli -> tools -> {serving, stage} -> model, wire.

The gateway (serving/) and the stage (stage/) meet only in wire/ (``wire/protocol.py``): neither imports the
other, and importing the gateway never loads the native llama library.

Read from the import statements (``ast``), so a new upward import fails here before review.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "molink_lite"

# what each part of the package may import from the others ("" is molink_lite/__init__.py: the version)
ALLOWED: Dict[str, Set[str]] = {
    "cli": {"tools", "serving", "stage", "model", "wire", "kernels", ""},
    "tools": {"serving", "stage", "model", "wire", ""},
    "serving": {"model", "wire", ""},  # never stage/: the two sides meet in wire/protocol.py
    "stage": {"model", "wire", ""},
    "model": {""},
    "wire": {""},
    "kernels": set(),  # standalone build scripts: standard library only
    "": set(),
}


def _part(parts: List[str]) -> str:
    """Which part of the package a dotted path inside molink_lite belongs to."""
    if not parts:
        return ""
    head = parts[0]
    return "cli" if head == "cli" else head


def _imports(path: Path, rel: List[str]) -> List[List[str]]:
    """Dotted targets (inside molink_lite, as lists) imported by the module at ``rel`` (path parts)."""
    pkg = rel[:-1]  # the module's package, relative to molink_lite
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else list(pkg)
                mod = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "molink_lite":
                mod = node.module.split(".")[1:]
            else:
                continue
            if not node.module:  # from . import x: x may be a module
                out.extend(mod + [a.name] for a in node.names)
            else:
                out.append(mod)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "molink_lite":
                    out.append(a.name.split(".")[1:])
    return out


def violations(pkg_dir: Path, mapped: Optional[Dict[str, Path]] = None) -> List[str]:
    """Every import that goes against :data:`ALLOWED`, as 'file: imports target' lines."""
    dirs = {"": pkg_dir, **(mapped or {})}
    bad = []
    for prefix, d in dirs.items():
        for f in sorted(d.rglob("*.py")):
            rel = ([prefix] if prefix else []) + list(f.relative_to(d).with_suffix("").parts)
            if rel[-1] == "__init__":
                rel = rel[:-1] + ["__init__"]
            src = "cli" if rel == ["cli"] else ("" if rel == ["__init__"] else rel[0])
            for target in _imports(f, rel):
                dst = _part(target)
                if dst == "__version__":
                    dst = ""
                if dst != src and dst not in ALLOWED.get(src, set()):
                    bad.append(f"{f.relative_to(ROOT) if f.is_relative_to(ROOT) else f}: "
                               f"{src or 'molink_lite'} imports molink_lite.{'.'.join(target)}")
    return bad


def test_imports_flow_one_way():
    bad = violations(PKG, {"kernels": ROOT / "kernels"})
    assert not bad, "imports against the layering (cli -> tools -> {serving, stage} -> model, wire):\n" + "\n".join(bad)


def test_runtime_never_imports_tools():
    for part in ("serving", "stage", "model", "wire"):
        assert "tools" not in ALLOWED[part]


def test_checker_catches_an_upward_import(tmp_path):
    pkg = tmp_path / "molink_lite"
    for sub in ("stage", "serving", "tools", "wire"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "stage" / "server.py").write_text("from ..serving.gateway import Gateway\n")
    (pkg / "wire" / "codec.py").write_text("import molink_lite.tools.bench_serve\n")
    (pkg / "serving" / "gateway.py").write_text("from ..stage.server import x\nfrom .scheduler import y\n")
    (pkg / "tools" / "bench.py").write_text("from ..serving import gateway\n")
    bad = violations(pkg)
    assert len(bad) == 3, bad
    assert any("serving imports molink_lite.stage.server" in b for b in bad)
    assert any("stage imports molink_lite.serving.gateway" in b for b in bad)
    assert any("wire imports molink_lite.tools.bench_serve" in b for b in bad)


def test_no_top_level_tools_folder():
    assert not (ROOT / "tools").exists(), "tools live in molink_lite/tools/"


def test_every_package_folder_has_one_job_documented():
    for sub in ("serving", "stage", "model", "wire", "tools"):
        init = PKG / sub / "__init__.py"
        assert init.is_file() and ast.get_docstring(ast.parse(init.read_text())), f"{init} needs a docstring"


def test_serving_and_stage_meet_only_in_the_protocol():
    assert "stage" not in ALLOWED["serving"] and "serving" not in ALLOWED["stage"]


@pytest.mark.parametrize("module", ["molink_lite.serving.gateway", "molink_lite.serving.cluster",
                                    "molink_lite.serving.launcher", "molink_lite.wire.protocol"])
def test_importing_the_gateway_does_not_load_the_llama_library(module):
    """A fresh interpreter imports the gateway side: no llama_cpp module, no libllama/ggml mapped in memory."""
    code = ("import sys, importlib; importlib.import_module(%r); "
            "mods = [m for m in sys.modules if m.split('.')[0] in ('llama_cpp',)]; "
            "maps = open('/proc/self/maps').read() if sys.platform.startswith('linux') else ''; "
            "libs = sorted({l.split('/')[-1] for l in maps.splitlines() if 'llama' in l.split('/')[-1] "
            "or 'ggml' in l.split('/')[-1]}); "
            "print(mods, libs); sys.exit(1 if mods or libs else 0)") % module
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert r.returncode == 0, f"importing {module} loaded the llama library: {r.stdout} {r.stderr[-2000:]}"
