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


class _Chan:
    async def request(self, meta, arrays=None, timeout=30):
        return {"type": "pong"}, {}


class _Chain:
    """A chain whose stage-to-stage link measures ``mbit`` (set by the test); it records the codecs it was told."""

    def __init__(self, infos):
        self.infos, self.urls, self.codec, self.mbit, self.told = infos, ["ws://a", "ws://b"], "f16", 1000.0, []
        self.channels = [_Chan(), _Chan()]

    async def probe(self):
        return [{"to": "ws://b", "rtt_ms": 20.0, "mbit": self.mbit}]

    async def set_codec(self, codec):
        self.told.append(codec)
        self.codec = codec


def test_links_measured_again_while_up_change_the_codec_without_a_reconnect():
    """ChainLifecycle.relink (every --relink-interval seconds while up): a link that got slower switches the stages
    to int8 and is kept in the pipeline's events; one that did not change leaves everything as it was."""
    import asyncio

    from molink_lite.serving.pipeline import Pipeline

    async def run():
        p = Pipeline(["ws://a", "ws://b"], codec="auto", relink_s=300.0)
        chain = _Chain([GPU, GPU])
        p.chain = p.lifecycle.chain = chain
        await p.lifecycle.relink()  # 1 Gbit/s, 20 ms: f16, and 4 micro-batches for GPU stages
        assert (p.codec, p.max_inflight, chain.told) == ("f16", 4, [])
        chain.mbit = 100.0  # the link got slower
        await p.lifecycle.relink()
        assert (p.codec, chain.told, p.link_choice.codec) == ("int8", ["int8"], "int8")
        assert [e["event"] for e in p.events] == ["links", "links"] and "int8" in p.events[-1]["message"]
        await p.lifecycle.relink()  # no change: nothing told, nothing logged
        assert chain.told == ["int8"] and len(p.events) == 2
        assert p.lifecycle.relink_s == 300.0
        assert Pipeline(["ws://a", "ws://b"], codec="f16", max_inflight=2, relink_s=300.0).lifecycle.relink_s == 0

    asyncio.run(run())
