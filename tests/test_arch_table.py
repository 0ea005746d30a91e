"""README's architecture table is generated from molink_lite.model.archs and up to date."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool():
    from molink_lite.tools import gen_arch_table

    return gen_arch_table


def test_readme_arch_table_is_current():
    tool = _tool()
    assert tool.is_current(ROOT / "README.md"), "run: python -m molink_lite.tools.gen_arch_table"


def test_table_lists_every_rule_and_refusal():
    from molink_lite.model.archs import RULES, UNSUPPORTED

    block = _tool().render()
    for name, rule in RULES.items():
        assert f"| `{name}` | {rule.level} |" in block
    for name in UNSUPPORTED:
        assert f"- `{name}`: " in block


def test_check_mode(tmp_path):
    tool = _tool()
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- archs:start -->\nold\n<!-- archs:end -->\n\nrest\n")
    assert tool.main(["--check", "--readme", str(readme)]) == 1
    assert tool.main(["--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\n<!-- archs:start -->\n") and text.endswith("<!-- archs:end -->\n\nrest\n")
    assert tool.main(["--check", "--readme", str(readme)]) == 0
    readme.write_text("no markers\n")
    with pytest.raises(ValueError):
        tool.main(["--check", "--readme", str(readme)])


def test_doctor_and_plan_say_whether_a_model_splits_and_at_which_level(tiny_models, gemma3_path):
    """Before anything starts (issue 30): `doctor --model` and `plan` name the split level, or why not."""
    import subprocess
    import sys

    from molink_lite.model import archs
    from molink_lite.model.archs import EXACT, ULP, split_support

    assert split_support("llama")[0] == EXACT and "bit-identical" in split_support("llama")[1]
    level, why = split_support("gemma")
    assert level == ULP and "max logit difference" in why
    assert split_support("gemma3n")[0] is None and "gemma3n.cpp adds per-layer inputs" in split_support("gemma3n")[1]
    assert split_support("glm4")[0] == archs.BOUNDED and "within 0.0001" in split_support("glm4")[1]
    assert split_support("nosucharch")[0] is None and "no split rule" in split_support("nosucharch")[1]
    r = subprocess.run([sys.executable, "-m", "molink_lite.cli", "doctor", "--model", tiny_models("llama")],
                       capture_output=True, text=True, timeout=120)
    assert "split: llama can be split, level exact" in r.stdout, r.stdout
    r = subprocess.run([sys.executable, "-m", "molink_lite.cli", "plan", "--model", gemma3_path, "--host", "4GB,cpu"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "split: gemma3 can be split, level" in r.stdout, r.stdout
