"""`molink-lite bench --workload chat-turns`: the pure parts (prompts, summary, table) fast; the run itself slow."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from molink_lite.tools.bench_serve import (CHAT_PREFIX, CHAT_SUFFIX, chat_turn_messages, chat_user_message,
                                           completion_turn_prompt, format_chat_table, prefix_cache_args,
                                           summarize_chat)


def test_user_messages_are_deterministic_sized_and_distinct():
    m = chat_user_message(0, 1, 400)
    assert m == chat_user_message(0, 1, 400)
    assert m.startswith("Conversation 0, part 1: ") and m.endswith(".")
    for conv, turn, n in ((0, 1, 400), (2, 3, 50), (7, 5, 1000), (1, 1, 9)):
        body = chat_user_message(conv, turn, n).split(":", 1)[1]
        # a word or a full stop is about a token, the heading about 8 (the demo model's tokenizer: exactly)
        assert n <= 8 + len(body.split()) + body.count(".") <= n + 1
    firsts = {chat_user_message(c, t, 400).split(":")[0] for c in range(3) for t in range(1, 6)}
    assert len(firsts) == 15   # every conversation and turn differs from its first words on
    assert chat_user_message(0, 2, 400) != chat_user_message(1, 2, 400)


def test_completion_prompts_extend_the_previous_turn_and_its_reply_exactly():
    replies = [" Sure, the river", "", " And\nthen: ünïcode ✓"]
    prompt, prev = "", []
    for turn in range(1, 4):
        user = chat_user_message(1, turn, 20)
        new = completion_turn_prompt(prompt, replies[turn - 2] if turn > 1 else "", user)
        if turn == 1:
            assert new == f"{CHAT_PREFIX}{user}{CHAT_SUFFIX}"
        else:
            assert new.startswith(prompt + replies[turn - 2])
            assert new[len(prompt + replies[turn - 2]):] == f"\n{CHAT_PREFIX}{user}{CHAT_SUFFIX}"
        prev.append(new)
        prompt = new
    assert all(b.startswith(a) for a, b in zip(prev, prev[1:]))


def test_chat_messages_carry_every_previous_turn_and_reply():
    m1 = chat_turn_messages([], None, "hello")
    assert m1 == [{"role": "user", "content": "hello"}]
    m2 = chat_turn_messages(m1, "hi there", "more")
    assert m2 == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
                  {"role": "user", "content": "more"}]
    assert m1 == [{"role": "user", "content": "hello"}]   # not changed in place
    m3 = chat_turn_messages(m2, "", "again")
    assert m3[:3] == m2 and m3[3] == {"role": "assistant", "content": ""} and len(m3) == 5


def test_prefix_cache_args():
    assert prefix_cache_args(None) == []
    assert prefix_cache_args("off", 100) == ["--prefix-cache", "off"]
    assert prefix_cache_args("on") == ["--prefix-cache", "on"]
    assert prefix_cache_args("on", 0) == ["--prefix-cache", "on", "--prefix-cache-cells", "0"]
    with pytest.raises(ValueError):
        prefix_cache_args("yes")


def _turn(t, ttft, ptok, reused=None):
    return {"turn": t, "ttft_ms": ttft, "reply": "x", "prompt_tokens": ptok, "cached_tokens": None,
            "reused_tokens": reused}


def test_summary_medians_ratios_and_table():
    on = [[_turn(1, 100, 410), _turn(2, 110, 830, 420), _turn(3, 120, 1250, 840)],
          [_turn(1, 90, 410), _turn(2, 130, 830, 420), _turn(3, 100, 1250, 840)],
          [_turn(1, 300, 410), _turn(2, 120, 830, 420), _turn(3, 110, 1250, 840)]]
    off = [[_turn(1, 100, 410), _turn(2, 200, 830), _turn(3, 300, 1250)],
           [_turn(1, 100, 410), _turn(2, 220, 830), _turn(3, 320, 1252)]]
    s = summarize_chat({"on": on, "off": off}, 3)
    rows = s["turns"]
    assert [r["turn"] for r in rows] == [1, 2, 3]
    assert rows[0]["ttft_on_ms"] == 100 and rows[1]["ttft_on_ms"] == 120 and rows[2]["ttft_on_ms"] == 110
    assert rows[1]["ttft_off_ms"] == 210 and rows[2]["ttft_off_ms"] == 310
    assert rows[1]["reused_tokens_on"] == 420 and rows[1]["reused_tokens_off"] is None
    assert rows[0]["reused_tokens_on"] is None and rows[1]["cached_tokens_on"] is None
    assert rows[2]["prompt_tokens_off"] == 1251 and rows[0]["errors_on"] == 0
    assert s["ttft_turn3_over_turn1"]["on"] == pytest.approx(1.1)
    assert s["ttft_turn3_over_turn1"]["off"] == pytest.approx(3.1)
    json.dumps(s)   # goes into the JSON output as is

    text = format_chat_table(s, 3)
    lines = text.splitlines()
    assert lines[0].split() == ["turn", "prompt", "tokens", "reused", "(on)", "TTFT", "cache", "on", "TTFT", "cache",
                                "off", "on/off"]
    assert lines[1].split() == ["1", "410", "-", "100", "ms", "100", "ms", "1.00x"]
    assert lines[2].split() == ["2", "830", "420", "120", "ms", "210", "ms", "0.57x"]
    assert lines[3].split()[:3] == ["3", "1250/1251", "840"]   # conversations diverged: both counts shown
    assert lines[-1] == "TTFT turn 3 / turn 1: cache on 1.10x, cache off 3.10x"


def test_summary_with_failures_and_short_conversations():
    on = [[_turn(1, 100, 410), {"turn": 2, "error": "HTTP 503: down"}]]
    off = [[_turn(1, 100, 410), _turn(2, 200, 830)]]
    s = summarize_chat({"on": on, "off": off}, 3)
    r1, r2, r3 = s["turns"]
    assert r2["ttft_on_ms"] is None and r2["errors_on"] == 1 and r3["errors_on"] == 1
    assert r3["ttft_off_ms"] is None and r3["errors_off"] == 1
    assert s["ttft_turn3_over_turn1"] == {"on": None, "off": None}
    text = format_chat_table(s, 3)
    assert "1 failed (on)" in text.splitlines()[2]
    assert text.splitlines()[3].split()[:5] == ["3", "-", "-", "-", "-"]
    assert text.splitlines()[-1] == "TTFT turn 3 / turn 1: cache on -, cache off -"


def test_cli_accepts_the_chat_workload_options():
    from molink_lite.cli import build_parser

    a = build_parser().parse_args(["bench", "--workload", "chat-turns", "--turns", "3", "--turn-len", "50",
                                   "--reply-tokens", "4", "--conversations", "1", "--prefix-cache-cells", "0"])
    assert (a.workload, a.turns, a.turn_len, a.reply_tokens, a.conversations, a.prefix_cache_cells) == \
        ("chat-turns", 3, 50, 4, 1, 0)
    d = build_parser().parse_args(["bench"])
    assert d.workload == "concurrency" and d.prefix_cache_cells is None


@pytest.mark.slow
def test_chat_turns_runs_cache_on_and_off_in_one_invocation(tiny_models, tmp_path):
    model = tiny_models("llama", n_layer=4, n_embd=64, n_head=4, n_vocab=512)
    out = tmp_path / "c.json"
    r = subprocess.run([sys.executable, "-m", "molink_lite.cli", "bench", "--model", model, "--workload",
                        "chat-turns", "--turns", "3", "--turn-len", "40", "--reply-tokens", "4", "--conversations",
                        "2", "--delay-ms", "5", "--threads", "1", "--ctx", "1024", "--json", str(out),
                        "--workdir", str(tmp_path / "w")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "TTFT turn 3 / turn 1: cache on" in r.stdout
    data = json.loads(out.read_text())
    assert data["workload"] == "chat-turns" and data["ok"]
    assert [row["turn"] for row in data["turns"]] == [1, 2, 3]
    for row in data["turns"]:
        assert row["ttft_on_ms"] > 0 and row["ttft_off_ms"] > 0 and row["errors_on"] == row["errors_off"] == 0
    p = [row["prompt_tokens_off"] for row in data["turns"]]
    assert p[0] < p[1] < p[2]
    assert set(data["ttft_turn3_over_turn1"]) == {"on", "off"}
    assert {len(c) for m in ("on", "off") for c in data["conversations"][m]} == {3}
    # the cache-on gateway took turn 2's and 3's shared prefix from the cache; the cache-off one never did
    assert all(row["reused_tokens_on"] for row in data["turns"][1:])
    assert not any(row["reused_tokens_off"] for row in data["turns"])


def test_sse_messages_until_done_across_chunk_boundaries():
    import asyncio
    from types import SimpleNamespace

    from molink_lite.tools.bench_serve import _sse

    raw = b'data: {"a": 1}\n\n: comment\n\ndata: {"b": 2}\n\ndata: [DONE]\n\ndata: {"c": 3}\n\n'

    async def chunks():
        for i in range(0, len(raw), 7):   # split anywhere
            yield raw[i:i + 7]

    async def collect():
        r = SimpleNamespace(content=SimpleNamespace(iter_any=chunks))
        return [m async for m in _sse(r)]

    assert asyncio.run(collect()) == [{"a": 1}, {"b": 2}]
