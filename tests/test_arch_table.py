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
