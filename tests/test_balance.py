"""Layer split policies: balanced by compute (LM head on the last stage) or even by layer count."""

from __future__ import annotations

import pytest

from molink_lite.model.split import SplitError, _balanced_bounds, balanced_ranges, plan_ranges, stage_costs


@pytest.mark.parametrize("layers,head,k,want", [
    ([1] * 12, 0, 3, [0, 4, 8, 12]),
    ([1] * 10, 5, 2, [0, 7, 10]),          # the head weighs 5 layers: the last stage takes fewer
    ([3, 1, 1, 1, 1, 1], 0, 2, [0, 2, 6]),
    ([1] * 4, 100, 2, [0, 3, 4]),           # a huge head: the last stage keeps a single layer
    ([1] * 4, 0, 4, [0, 1, 2, 3, 4]),
    ([5], 7, 1, [0, 1]),
])
def test_balanced_bounds(layers, head, k, want):
    got = _balanced_bounds(layers, head, k)
    assert got == want
    assert all(a < b for a, b in zip(got, got[1:]))  # every stage holds a layer


def test_balanced_on_gemma3_270m(gemma3_path):
    layers, head = stage_costs(gemma3_path)
    assert len(layers) == 18 and head > sum(layers)  # 262k x 640 tied head outweighs all layers
    assert [str(r) for r in balanced_ranges(gemma3_path, 2)] == ["0-16", "17-17"]
    assert [str(r) for r in plan_ranges(gemma3_path, 2, "even")] == ["0-8", "9-17"]
    with pytest.raises(SplitError, match="cannot split 18 layers into 19"):
        balanced_ranges(gemma3_path, 19)
    with pytest.raises(SplitError, match="unknown split policy"):
        plan_ranges(gemma3_path, 2, "random")
