"""Settings as objects: every option of ``stage``, ``gateway`` and ``serve`` reaches its config, and a stage
config survives the trip through its own argv (what ``serve`` starts its stage children with).

Fast: no processes, no model. An option added to one of these commands and not wired into its config
(``cli.stage_config`` / ``gateway_config`` / ``serve_config``) fails here, as ``serve --lanes`` once would have.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from molink_lite import cli
from molink_lite.serving.config import (ClusterConfig, GatewayConfig, GatewaySecurity, HttpLimits, PipelineConfig,
                                        ServeConfig)
from molink_lite.serving.speculative import SpecConfig
from molink_lite.stage.config import ConfigError, EngineConfig, JoinConfig, LinkSecurity, StageConfig

BUILDERS = {"stage": cli.stage_config, "gateway": cli.gateway_config, "serve": cli.serve_config}

# options that are intentionally not part of a config, and why
NOT_CONFIG: Dict[Tuple[str, str], str] = {
    ("stage", "--lib"): "applied to the process before llama.cpp loads (main() sets LLAMA_CPP_LIB_PATH)",
    ("serve", "--lib"): "applied to the process before llama.cpp loads; the stage children inherit the environment",
}

# values for options whose value has a form (anything else gets one made from its type, choices or default)
VALUES: Dict[str, str] = {
    "--pipeline": "ws://10.0.0.1:9001,ws://10.0.0.2:9001",
    "--next": "ws://10.0.0.2:9001",
    "--join": "http://10.0.0.9:8000",
    "--advertise": "wss://10.0.0.3:9001",
    "--layers": "2-5",
    "--max-memory": "6GB",
    "--alias": "small=tiny",
    "--idle-unload": "90",
    "--step-costs": "5",
    "--ring-via": "ws://10.0.0.1:9001=ws://10.0.0.7:9101",
}

# options that only work with another one: given together, and the option's own value must show in what changed
COMPANIONS: Dict[str, List[str]] = {
    "--tls-cert": ["--tls-key", "key.pem"],
    "--tls-key": ["--tls-cert", "cert.pem"],
    "--mmproj": ["--model", "m.gguf"],   # the gateway's: a joined model's projector
}


def _subparsers(parser: argparse.ArgumentParser) -> Dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def _options(sub: argparse.ArgumentParser) -> List[argparse.Action]:
    return [a for a in sub._actions if a.option_strings and not isinstance(a, (argparse._HelpAction,
                                                                               argparse._VersionAction))]


def _value(action: argparse.Action) -> str:
    """A valid value for ``action`` that differs from its default."""
    opt = action.option_strings[-1]
    if opt in VALUES:
        return VALUES[opt]
    if action.choices:
        return next(str(c) for c in action.choices if c != action.default)
    if action.type is int:
        return str((action.default if isinstance(action.default, int) else 0) + 3)
    if action.type in (float, cli._seconds):
        return str((action.default if isinstance(action.default, (int, float)) else 0) + 1.5)
    if action.type is None and (action.default is None or isinstance(action.default, (str, list))):
        return f"{action.dest}-value"
    raise AssertionError(f"test_config: no way to make a value for {opt} (type {action.type}): add it to VALUES")


def _argv(action: argparse.Action) -> List[str]:
    opt = action.option_strings[-1]
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction)):
        return [opt]
    if isinstance(action, (argparse._StoreAction, argparse._AppendAction)) and action.nargs is None:
        return [opt, _value(action)]
    raise AssertionError(f"test_config: {opt} is a {type(action).__name__}; teach _argv about it")


def _leaves(obj: Any, prefix: str = "") -> Dict[str, Any]:
    """A config as {dotted field path: value}, nested configs flattened."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            out.update(_leaves(getattr(obj, f.name), f"{prefix}{f.name}."))
        return out
    return {prefix.rstrip("."): obj}


def _build(cmd: str, argv: List[str]):
    return BUILDERS[cmd](cli.build_parser().parse_args([cmd, *argv]))


def _changed(cmd: str, action: argparse.Action) -> Tuple[List[str], Dict[str, Any]]:
    """(argv, {field: new value}) for the option of ``action`` given a non-default value, against ``cmd`` alone:
    the fields this option sets."""
    opt = action.option_strings[-1]
    argv = _argv(action)
    base = _leaves(_build(cmd, []))
    diff = {k: v for k, v in _leaves(_build(cmd, argv + COMPANIONS.get(opt, []))).items() if base[k] != v}
    if opt in COMPANIONS:  # only the fields that hold this option's own value
        diff = {k: v for k, v in diff.items() if argv[-1] in str(v)}
    return argv, diff


def _cases():
    subs = _subparsers(cli.build_parser())
    for cmd in BUILDERS:
        for action in _options(subs[cmd]):
            yield pytest.param(cmd, action.option_strings[-1], id=f"{cmd} {action.option_strings[-1]}")


@pytest.mark.parametrize("cmd,opt", list(_cases()))
def test_every_option_reaches_the_config(cmd, opt):
    """``cmd OPT VALUE`` builds a config that differs from ``cmd`` alone, in the field(s) OPT is for."""
    if (cmd, opt) in NOT_CONFIG:
        return
    action = next(a for a in _options(_subparsers(cli.build_parser())[cmd]) if a.option_strings[-1] == opt)
    argv, diff = _changed(cmd, action)
    assert diff, (f"`{cmd} {' '.join(argv)}` leaves the config as it was: wire {opt} into cli.{cmd}_config (or add "
                  f"it to NOT_CONFIG with the reason)")
    if len(argv) == 2:  # the value itself is somewhere in what changed
        given = argv[1]
        shown = " ".join(str(v) for v in diff.values())
        assert given in shown or given in ("on", "off") or given.split(",")[0] in shown or (
            "=" in given and all(x in shown for x in given.split("="))), (cmd, opt, diff)


def test_options_reach_distinct_fields():
    """No two options of a command set the same field (one of them would be lost)."""
    subs = _subparsers(cli.build_parser())
    for cmd in BUILDERS:
        owner: Dict[str, str] = {}
        for action in _options(subs[cmd]):
            opt = action.option_strings[-1]
            if (cmd, opt) in NOT_CONFIG:
                continue
            for k in _changed(cmd, action)[1]:
                assert k not in owner, f"{cmd}: {opt} and {owner[k]} both set {k}"
                owner[k] = opt


def test_not_config_allow_list_is_current():
    subs = _subparsers(cli.build_parser())
    for (cmd, opt), why in NOT_CONFIG.items():
        assert why and opt in subs[cmd]._option_string_actions, f"NOT_CONFIG lists {cmd} {opt}, which is gone"


def test_stage_defaults_agree_with_the_parser():
    assert _build("stage", []) == StageConfig()


FULL = StageConfig(
    model="/models/m.gguf", layers="3-7", host="10.0.0.5", port=9100, next_url="wss://10.0.0.6:9101", codec="int8",
    engine=EngineConfig(n_ctx=1024, max_seqs=8, n_batch=64, n_gpu_layers=0, threads=3, flash_attn="off", lanes=2,
                        device_sampling=True),
    security=LinkSecurity(secret_file="/keys/cluster.key", tls="auto", tls_cert="c.pem", tls_key="k.pem",
                          insecure=True),
    cache_dir="/tmp/cache", ready_file="/tmp/ready", drain_timeout=2.5, metrics_port=9200, metrics_host="0.0.0.0",
    mmproj="/m/mmproj.gguf", image_min_tokens=64, step_costs_s=0.0)
JOINED = StageConfig(join=JoinConfig(url="https://gw:8000", max_memory="6GB", advertise="ws://h:9001", name="box"),
                     metrics_port=0)


@pytest.mark.parametrize("cfg", [StageConfig(), FULL, JOINED], ids=["defaults", "full", "joined"])
def test_stage_config_round_trips_through_its_argv(cfg):
    assert _build("stage", cfg.to_argv()) == cfg


def test_round_trip_covers_every_stage_field():
    """Every field of StageConfig is set to a non-default value in FULL or JOINED (a new field must be added)."""
    default = _leaves(StageConfig())
    covered = {k for c in (FULL, JOINED) for k, v in _leaves(c).items() if v != default[k]}
    assert covered == set(default), f"not covered by the round trip: {sorted(set(default) - covered)}"


def test_serve_stage_children_get_the_serve_options(tmp_path):
    """``serve``'s engine options and codec reach its stage processes (their argv comes from the config)."""
    from molink_lite.model.split import LayerRange
    from molink_lite.serving.launcher import stage_argv

    cfg = _build("serve", ["--ctx", "256", "--max-seqs", "4", "--lanes", "2", "--threads", "1", "--n-gpu-layers", "0",
                           "--flash-attn", "on", "--device-sampling", "on", "--codec", "f32"])
    argv = stage_argv(cfg.stage, "/models/m.gguf", LayerRange(2, 4), 0, tmp_path / "ready")
    child = _build("stage", argv)
    assert child.engine == cfg.stage.engine == EngineConfig(n_ctx=256, max_seqs=4, lanes=2, threads=1,
                                                            n_gpu_layers=0, flash_attn="on", device_sampling=True)
    assert (child.codec, cfg.gateway.pipeline.codec) == ("f32", "f32")
    assert (child.model, child.layers, child.host, child.port) == ("/models/m.gguf", "2-3", "127.0.0.1", 0)
    assert child.ready_file == str(tmp_path / "ready") and child.security.secret_file is None


def test_gateway_config_groups():
    cfg = _build("gateway", ["--pipeline", "ws://a:1,ws://b:2", "--pipeline", "wss://c:3", "--micro-batches", "4",
                             "--speculative", "off", "--max-queue", "7", "--model", "m.gguf", "--ctx", "512"])
    assert cfg.pipelines == (("ws://a:1", "ws://b:2"), ("wss://c:3",))
    assert cfg.pipeline == PipelineConfig(max_inflight=4, spec=SpecConfig("off", 8, 3))
    assert cfg.max_queue == 7 and cfg.join == ClusterConfig(model="m.gguf", n_ctx=512)
    kw = cfg.pipeline.pipeline_kwargs(name="p0", key=None)
    assert kw["max_inflight"] == 4 and kw["name"] == "p0" and kw["spec"].mode == "off"
    import inspect

    from molink_lite.serving.pipeline import Pipeline

    params = inspect.signature(Pipeline.__init__).parameters
    assert set(kw) <= set(params), f"PipelineConfig keywords Pipeline does not take: {set(kw) - set(params)}"


@pytest.mark.parametrize("cmd", ["gateway", "serve"])
def test_prefix_cache_options(cmd):
    """``--prefix-cache on|off`` and ``--prefix-cache-cells N`` reach every pipeline's keywords (on, 0 by default)."""
    def pipeline(cfg):
        return cfg.pipeline if cmd == "gateway" else cfg.gateway.pipeline

    argv = ["--pipeline", "ws://a:1"] if cmd == "gateway" else []
    on = pipeline(_build(cmd, argv))
    assert (on.prefix_cache, on.prefix_cache_cells) == (True, 0) == (PipelineConfig().prefix_cache,
                                                                    PipelineConfig().prefix_cache_cells)
    off = pipeline(_build(cmd, argv + ["--prefix-cache", "off", "--prefix-cache-cells", "4096"]))
    assert (off.prefix_cache, off.prefix_cache_cells) == (False, 4096)
    kw = off.pipeline_kwargs(name="p0")
    assert (kw["prefix_cache"], kw["prefix_cache_cells"]) == (False, 4096)
    per_key = pipeline(_build(cmd, argv + ["--prefix-cache", "per-key"]))
    assert (per_key.prefix_cache, per_key.prefix_cache_per_key, on.prefix_cache_per_key) == (True, True, False)
    assert per_key.pipeline_kwargs(name="p0")["prefix_cache_per_key"] is True
    with pytest.raises(SystemExit):
        _build(cmd, argv + ["--prefix-cache", "maybe"])


@pytest.mark.parametrize("make,match", [
    (lambda: StageConfig(port=70000), "--port"),
    (lambda: StageConfig(layers="5-2"), "empty range"),
    (lambda: StageConfig(next_url="http://x:1"), "--next must start with ws://"),
    (lambda: StageConfig(model="m.gguf", join=JoinConfig(url="http://gw:8000")), "drop --model"),
    (lambda: StageConfig(codec="bf16"), "--codec"),
    (lambda: EngineConfig(lanes=9), "--lanes"),
    (lambda: EngineConfig(max_seqs=300), "--max-seqs"),
    (lambda: LinkSecurity(tls_cert="c.pem"), "go together"),
    (lambda: StageConfig(drain_timeout=0), "--drain-timeout"),
    (lambda: GatewayConfig(pipelines=[["http://a:1"]]), "must start with ws:// or wss://"),
    (lambda: GatewayConfig(recover_timeout=0), "--recover-timeout"),
    (lambda: GatewayConfig(max_queue=0), "--max-queue"),
    (lambda: HttpLimits(max_connections=0), "--max-connections"),
    (lambda: HttpLimits(write_timeout=-1), "--write-timeout"),
    (lambda: HttpLimits(keepalive_timeout=0), "--keepalive-timeout"),
    (lambda: PipelineConfig(heartbeat_timeout=0), "--heartbeat-timeout"),
    (lambda: PipelineConfig(spec=SpecConfig("auto", k=99)), "--spec-k"),
    (lambda: PipelineConfig(prefix_cache_cells=-1), "--prefix-cache-cells"),
    (lambda: GatewaySecurity(tls="on"), "--tls"),
    (lambda: ServeConfig(stage=StageConfig(codec="f32"), gateway=GatewayConfig(pipeline=PipelineConfig(codec="f16"))),
     "codec"),
    (lambda: PipelineConfig(codec="bf16"), "--codec must be auto or one of"),
    (lambda: GatewayConfig(draft_model="d.gguf", pipeline=PipelineConfig(spec=SpecConfig("off"))), "--draft-model"),
    (lambda: ServeConfig(stage=StageConfig(), stages=0), "--stages"),
])
def test_configs_reject_bad_settings_clearly(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_cli_reports_a_config_error_and_exits_2(capsys):
    a = cli.build_parser().parse_args(["gateway", "--pipeline", "ws://a:1", "--max-queue", "0"])
    assert a.func(a) == 2
    assert "error: --max-queue must be >= 1" in capsys.readouterr().err


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------- what the config modules import
ROOT = Path(__file__).resolve().parent.parent


def _module_imports(path: Path) -> List[str]:
    """Absolute dotted names a module of molink_lite imports (relative ones resolved)."""
    rel = path.relative_to(ROOT).with_suffix("").parts
    pkg = list(rel[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                out += [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
            else:
                out.append(node.module or "")
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def _module_file(name: str) -> Path:
    p = ROOT.joinpath(*name.split("."))
    return p / "__init__.py" if p.is_dir() else p.with_suffix(".py")


def test_stage_config_imports_the_standard_library_only():
    for name in _module_imports(ROOT / "molink_lite" / "stage" / "config.py"):
        assert name.split(".")[0] in sys.stdlib_module_names, f"stage/config.py imports {name}"


def test_serving_config_pulls_in_neither_llama_cpp_nor_stage():
    """serving/config.py and everything of molink_lite it imports, transitively."""
    seen, todo = set(), ["molink_lite.serving.config"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        if not path.is_file():  # "from .x import name": name is not a module
            continue
        for imp in _module_imports(path):
            assert not imp.startswith(("llama_cpp", "molink_lite.stage")), f"{name} imports {imp}"
            if imp.startswith("molink_lite"):
                todo.append(imp)
