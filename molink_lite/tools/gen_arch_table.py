#!/usr/bin/env python3
"""Generate the README's architecture table from ``molink_lite.model.archs``.

Rewrites the text between ``<!-- archs:start -->`` and ``<!-- archs:end -->`` in README.md
with a Markdown table of :data:`molink_lite.model.archs.RULES` (name and notes) and a list of
:data:`molink_lite.model.archs.UNSUPPORTED` with the reasons.

    python -m molink_lite.tools.gen_arch_table            # rewrite README.md (from a checkout)
    python -m molink_lite.tools.gen_arch_table --check    # exit 1 if README.md is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..model.archs import BOUNDED, EXACT, RULES, ULP, UNSUPPORTED

ROOT = Path(__file__).resolve().parents[2]

START = "<!-- archs:start -->"
END = "<!-- archs:end -->"
README = ROOT / "README.md"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render() -> str:
    """The Markdown that goes between the markers (no markers, ends with a newline)."""
    count = {lv: sum(r.level == lv for r in RULES.values()) for lv in (EXACT, ULP, BOUNDED)}
    lines = [
        f"{len(RULES)} architectures (llama.cpp names, `general.architecture`), {count[EXACT]} `exact`, "
        f"{count[ULP]} `ulp`, {count[BOUNDED]} `bounded`. Levels, each proven by `tests/test_archs_exact.py`: "
        "`exact`: the logits of a 2- and 3-stage chain are bit-identical to the whole model's (f32 wire); `ulp`: "
        "llama.cpp rescales hidden states entering a later stage, which then starts from values within "
        "1 float32 ulp of the whole model's (measured max logit difference and greedy agreement given); "
        "`bounded`: later stages run the same computation summed in another order (no route through llama.cpp "
        "keeps it): greedy tokens identical and the logits within a stated bound of the whole model's, enforced "
        "by the test (how the bound was chosen is given).",
        "",
        "| Architecture | Level | Split notes |",
        "|---|---|---|",
    ]
    for name in sorted(RULES):
        r = RULES[name]
        notes = r.notes + (f"; {r.measured}" if r.measured else "")
        lines.append(f"| `{name}` | {r.level} | {_cell(notes) or '—'} |")
    lines += ["", "Refused (no level holds):", ""]
    for name in sorted(UNSUPPORTED):
        lines.append(f"- `{name}`: {_cell(UNSUPPORTED[name])}")
    return "\n".join(lines) + "\n"


def update(text: str) -> str:
    """``text`` (a README) with the block between the markers replaced by :func:`render`."""
    a = text.find(START)
    b = text.find(END)
    if a < 0 or b < 0 or b < a:
        raise ValueError(f"README has no '{START}' ... '{END}' block")
    return text[: a + len(START)] + "\n" + render() + text[b:]


def is_current(path: Path = README) -> bool:
    text = Path(path).read_text(encoding="utf-8")
    return update(text) == text


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the README block is stale, change nothing")
    ap.add_argument("--readme", type=Path, default=README, help="README to update (default: %(default)s)")
    args = ap.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    new = update(text)
    if args.check:
        if new != text:
            print(f"{args.readme}: architecture table is stale; run python -m molink_lite.tools.gen_arch_table", file=sys.stderr)
            return 1
        return 0
    if new != text:
        args.readme.write_text(new, encoding="utf-8")
        print(f"{args.readme}: architecture table updated ({len(RULES)} supported, {len(UNSUPPORTED)} refused)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
