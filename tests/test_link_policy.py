"""serving/link_policy.py: the codec and micro-batches a pipeline picks from its measured links (pure rules; the
gateway over a slow relay is tests/test_pipelining.py::test_codec_chosen_from_the_link)."""

from __future__ import annotations

from molink_lite.serving import link_policy as lp

GPU = {"n_embd": 4096, "lanes": 1, "backend": "CUDA0", "max_seqs": 64}
CPU = {**GPU, "backend": "cpu"}


def _choose(links, rtt, infos, codec="auto", mb=None, rows=64):
    return lp.choose(codec_opt=codec, mb_opt=mb, links=links, path_rtt_s=rtt, infos=infos, rows=rows)


def test_a_slow_link_gets_int8_and_a_fast_one_f16():
    # 64 rows x 4096 values in f16: 42 ms at 100 Mbit/s, 4.2 ms at 1 Gbit/s (the 5 ms budget sits between)
    c = _choose([{"rtt_ms": 20, "mbit": 100}], 0.02, [GPU, GPU])
    assert c.codec == "int8" and "41.9 ms" in c.why and "100 Mbit/s" in c.why
    assert _choose([{"rtt_ms": 1, "mbit": 1000}], 0.001, [GPU, GPU]).codec == "f16"
    # the slowest link decides; a small model's rounds are small (16 x 640 at 100 Mbit/s: 1.6 ms)
    assert _choose([{"mbit": 10_000}, {"mbit": 100}], 0.02, [GPU, GPU, GPU]).codec == "int8"
    assert _choose([{"mbit": 100}], 0.02, [{**CPU, "n_embd": 640}] * 2, rows=16).codec == "f16"


def test_a_fixed_codec_or_no_link_is_kept():
    c = _choose([{"mbit": 10}], 0.02, [GPU, GPU], codec="f32")
    assert c.codec == "f32" and "set by --codec" in c.why
    assert _choose([], None, [GPU]).codec == "f16"  # one stage: no stage-to-stage link


def test_micro_batches_double_for_gpu_stages_on_a_slow_path():
    assert _choose([{"mbit": 100}], 0.020, [GPU, GPU]).micro_batches == 4
    assert _choose([{"mbit": 1000}], 0.001, [GPU, GPU]).micro_batches == 2   # LAN: one per stage
    assert _choose([{"mbit": 100}], 0.020, [CPU, CPU]).micro_batches == 2    # CPU steps outweigh the link
    assert _choose([{"mbit": 100}], 0.020, [{**GPU, "lanes": 2}] * 2).micro_batches == 8
    assert _choose([], 0.020, [GPU]).micro_batches == 1                       # one stage: nothing to overlap
    c = _choose([{"mbit": 100}], 0.020, [GPU, GPU], mb=3)
    assert c.micro_batches == 3 and "set by --micro-batches" in c.why
    assert _choose([{"mbit": 100}], None, [GPU, GPU]).micro_batches == 2       # unmeasured path


def test_summary_says_what_and_why():
    s = _choose([{"mbit": 100}], 0.020, [GPU, GPU]).summary()
    assert s["codec"] == "int8" and s["micro_batches"] == 4 and "GPU stages" in s["why"]
