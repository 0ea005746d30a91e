"""Layer placement over hosts (serving/placement.py) and the `molink-lite plan` dry run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from molink_lite.serving.placement import HostSpec, ModelCost, PlacementError, parse_host, parse_size, plan

MiB = 1 << 20


def _llama(tiny_models) -> str:
    return tiny_models("llama", n_layer=8, n_embd=64, n_head=4, n_vocab=512)


def _cpu(name: str, memory: int, spl=None) -> HostSpec:
    return HostSpec(name=name, backend="cpu", memory_bytes=int(memory), sec_per_layer=spl)


def _check_tiles(p, n_layer: int) -> None:
    for pipe in p.pipelines:
        covered = [i for s in pipe for i in range(s.layers.start, s.layers.stop)]
        assert covered == list(range(n_layer)), [str(s.layers) for s in pipe]
        for s in pipe:
            assert s.est_bytes <= s.host.memory_bytes


def _layers(p, pipeline: int = 0):
    return {s.host.name: s.layers for s in p.pipelines[pipeline]}


# ---------------------------------------------------------------- parsing

@pytest.mark.parametrize("text,want", [("24GB", 24 * 10 ** 9), ("8GiB", 8 << 30), ("16G", 16 << 30),
                                       ("512MB", 512 * 10 ** 6), ("512M", 512 << 20), ("1.5GiB", 3 << 29),
                                       ("1000", 1000)])
def test_parse_size(text, want):
    assert parse_size(text) == want


def test_parse_host():
    h = parse_host("16G,cuda,name=box1")
    assert (h.name, h.backend, h.memory_bytes, h.sec_per_layer) == ("box1", "cuda", 16 << 30, None)
    h = parse_host("8GiB,cpu,sec_per_layer=0.002,address=10.0.0.2:9001")
    assert (h.backend, h.sec_per_layer, h.address) == ("cpu", 0.002, "10.0.0.2:9001")


@pytest.mark.parametrize("text,match", [("24GB", "expected MEMORY,BACKEND"), ("24XB,cuda", "bad memory size"),
                                        ("24GB,tpu", "backend must be one of"), ("24GB,cpu,color=red", "unknown option"),
                                        ("24GB,cpu,sec_per_layer=fast", "must be a number"),
                                        ("24GB,cpu,mbit=-5", "mbit must be > 0"), ("24GB,cpu,rtt_ms=x", "number"),
                                        ("0GB,cpu", "must be > 0")])
def test_parse_host_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_host(text)


# ---------------------------------------------------------------- placement

def test_demo_model_split_over_two_hosts(gemma3_path):
    cost = ModelCost(gemma3_path)
    assert cost.n_layer == 18 and cost.head_bytes > sum(cost.layer_bytes)  # tied 262k-token head
    half = cost.min_total_bytes(2) // 2 + 64 * MiB
    assert half < cost.min_total_bytes(1)  # neither host holds the model alone
    p = plan(gemma3_path, [_cpu("a", half), _cpu("b", half)])
    assert len(p.pipelines) == 1 and len(p.pipelines[0]) == 2 and not p.unused
    _check_tiles(p, 18)
    text = p.describe()
    assert "pipeline 1: 2 stage(s)" in text and "bottleneck" in text and "MiB /" in text
    assert json.loads(json.dumps(p.to_dict()))["pipelines"][0]["stages"][0]["start"] == 0
    assert "links (gateway" not in text and p.to_dict()["pipelines"][0]["link_choice"] is None  # no link given


def test_the_plan_says_which_codec_and_micro_batches_the_links_call_for(gemma3_path):
    """Hosts given with the link into them (mbit=, rtt_ms=): the plan says what a gateway with --codec auto and no
    --micro-batches picks there (serving/link_policy.py), and why."""
    half = ModelCost(gemma3_path).min_total_bytes(2) // 2 + 64 * MiB
    hosts = [HostSpec("a", "cuda", half), parse_host(f"{half},cuda,name=b,mbit=20,rtt_ms=20")]
    p = plan(gemma3_path, hosts, n_seqs=64)
    text = p.describe()
    assert "links (gateway with --codec auto, no --micro-batches): codec int8" in text, text
    c = p.to_dict()["pipelines"][0]["link_choice"]
    assert c["codec"] == "int8" and c["micro_batches"] == 4 and "20 Mbit/s" in c["why"]
    fast = plan(gemma3_path, [HostSpec("a", "cpu", half), parse_host(f"{half},cpu,name=b,mbit=1000,rtt_ms=1")])
    c = fast.to_dict()["pipelines"][0]["link_choice"]
    assert (c["codec"], c["micro_batches"]) == ("f16", 2)


def test_one_host_is_enough(tiny_models):
    path = _llama(tiny_models)
    cost = ModelCost(path)
    p = plan(path, [_cpu("a", cost.min_total_bytes(1))])
    assert [[str(s.layers) for s in pipe] for pipe in p.pipelines] == [["0-7"]]


def test_small_host_gets_fewer_than_an_even_share(tiny_models):
    path = _llama(tiny_models)
    cost = ModelCost(path)
    big = _cpu("big", cost.min_total_bytes(1) - 1)   # cannot hold it alone
    small = _cpu("small", max(cost.stage_bytes(6, 8), cost.stage_bytes(0, 2)))  # room for ~2 layers
    even = plan(path, [_cpu("x", big.memory_bytes), _cpu("y", big.memory_bytes)])
    assert sorted(s.layers.n for s in even.pipelines[0]) == [4, 4]  # the even share with equal hosts
    p = plan(path, [big, small])
    _check_tiles(p, 8)
    got = _layers(p)
    assert got["small"].n < 4 < got["big"].n


def test_host_below_one_layer_is_excluded(tiny_models):
    path = _llama(tiny_models)
    cost = ModelCost(path)
    tiny = _cpu("tiny", cost.min_host_bytes() - 1)
    p = plan(path, [tiny, _cpu("a", cost.min_total_bytes(1))])
    assert [s.host.name for s in p.pipelines[0]] == ["a"]
    [(host, why)] = p.unused
    assert host.name == "tiny" and "needs at least" in why and "for one layer + KV" in why and "has" in why
    assert "unused hosts:" in p.describe()


def test_more_hosts_than_needed_form_replicas(tiny_models):
    path = _llama(tiny_models)
    cost = ModelCost(path)
    whole = cost.min_total_bytes(1)
    p = plan(path, [_cpu(n, whole) for n in "abc"])
    assert [[s.host.name for s in pipe] for pipe in p.pipelines] == [["a"], ["b"], ["c"]]
    # four hosts that each hold about half: two 2-stage pipelines; a fifth half-host is left over
    half = cost.min_total_bytes(2) // 2 + 4 * MiB
    p = plan(path, [_cpu(n, half) for n in "abcde"])
    assert [len(pipe) for pipe in p.pipelines] == [2, 2]
    _check_tiles(p, 8)
    assert [(h.name, "left over" in why) for h, why in p.unused] == [("e", True)]


def test_faster_host_gets_more_layers(tiny_models):
    path = _llama(tiny_models)
    cost = ModelCost(path)
    mem = cost.min_total_bytes(1) - 1
    p = plan(path, [_cpu("slow", mem, spl=0.004), _cpu("fast", mem, spl=0.001)])
    _check_tiles(p, 8)
    got = _layers(p)
    assert got["fast"].n > got["slow"].n
    # default speeds: cuda counts as 10x cpu
    p = plan(path, [_cpu("cpu", mem), HostSpec("gpu", "cuda", mem)])
    got = _layers(p)
    assert got["gpu"].n > got["cpu"].n


def test_smollm3_stages_start_at_multiples_of_4(tiny_models):
    path = tiny_models("smollm3", n_layer=12, n_embd=64, n_head=4, n_vocab=512)
    cost = ModelCost(path)
    mem = cost.min_total_bytes(1) - 1
    # two equal hosts: without the rule the cut would be at layer 6 (6 layers vs 6 + the LM head)
    p = plan(path, [_cpu("a", mem), _cpu("b", mem)])
    _check_tiles(p, 12)
    assert [str(s.layers) for s in p.pipelines[0]] == ["0-7", "8-11"]
    assert cost.refusal(0, 6) is None and "multiple of 4" in cost.refusal(6, 12)
    mem3 = max(cost.stage_bytes(0, 4), cost.stage_bytes(4, 8), cost.stage_bytes(8, 12)) + 1
    p = plan(path, [_cpu(n, mem3) for n in "xyz"])
    assert [str(s.layers) for s in p.pipelines[0]] == ["0-3", "4-7", "8-11"]


def test_not_enough_memory_names_the_shortfall(tiny_models):
    path = _llama(tiny_models)
    cost = ModelCost(path)
    each = cost.min_total_bytes(2) // 2 - 2 * MiB
    with pytest.raises(PlacementError, match=r"cannot hold .*needs at least .*MiB.* missing"):
        plan(path, [_cpu("a", each), _cpu("b", each)])
    with pytest.raises(PlacementError, match="no host can hold even one layer"):
        plan(path, [_cpu("a", MiB)])
    with pytest.raises(PlacementError, match="no hosts"):
        plan(path, [])


def test_unsupported_architecture_is_refused(tiny_models):
    from molink_lite.model import archs

    path = tiny_models("llama", n_layer=4, n_embd=64, n_head=4, n_vocab=512)
    rule = archs.RULES.pop("llama")   # an architecture without a rule (none of the test models lacks one)
    try:
        with pytest.raises(PlacementError, match="architecture 'llama' is not supported"):
            plan(path, [_cpu("a", 1 << 30)])
    finally:
        archs.RULES["llama"] = rule


# ---------------------------------------------------------------- CLI

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "molink_lite.cli", "plan", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_plan_prints_a_table():
    r = _cli("--host", "1GB,cpu", "--host", "1GB,cpu")
    assert r.returncode == 0, r.stderr
    assert "pipeline 1" in r.stdout and "pipeline 2" in r.stdout and "0-17 (18)" in r.stdout
    assert "memory used / available" in r.stdout


def test_cli_plan_json(tiny_models):
    r = _cli("--model", _llama(tiny_models), "--host", "1GB,cpu,name=box1", "--json", "--ctx", "1024")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["n_ctx"] == 1024 and d["pipelines"][0]["stages"][0]["host"]["name"] == "box1"


@pytest.mark.parametrize("spec,match", [("lots,cpu", "bad memory size"), ("1GB,tpu", "backend"),
                                        ("1MB,cpu", "cannot hold")])
def test_cli_plan_errors_exit_2(spec, match):
    r = _cli("--host", spec)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and match in r.stderr, r.stderr


@pytest.mark.parametrize("arch", ["glm4moe", "lfm2", "qwen35", "gpt-oss", "llama4"])
def test_new_architectures_are_placed(tiny_models, arch):
    """Placement reads the split rules of the newer architectures: NextN blocks are not layers (glm4moe),
    per-layer arrays and stage refusals (hybrids, llama4's 4-layer stages) are honoured."""
    from molink_lite.model.archs import SplitContext, rule_for
    from molink_lite.model.split import read_model_info

    path = tiny_models(arch, n_layer=12, n_embd=64, n_head=4, n_vocab=512)
    info = read_model_info(path)
    assert info.n_layer == (11 if arch == "glm4moe" else 12)
    cost = ModelCost(path)
    big = cost.min_total_bytes(1) - 1  # no host holds the model alone
    p = plan(path, [_cpu(n, big) for n in "abc"])
    _check_tiles(p, info.n_layer)
    meta = cost.meta
    assert p.pipelines
    for pipe in p.pipelines:
        assert len(pipe) > 1
        for s in pipe:
            ctx = SplitContext(arch, info.n_layer, s.layers.start, s.layers.stop, meta, info.n_vocab)
            assert rule_for(arch).refusal(ctx) is None, str(s.layers)
