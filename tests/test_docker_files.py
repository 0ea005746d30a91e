"""Static checks of docker/ (no Docker needed): compose.yaml parses, its stage and gateway commands
are accepted by molink-lite's real argument parser, the gateway's pipeline matches the stage
services and ports, and the Dockerfiles end in a runtime stage with ENTRYPOINT molink-lite."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from molink_lite.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value, env=None):
    """Compose-style ${VAR}, ${VAR:-default}, ${VAR-default}, $VAR, $$ substitution, recursively."""
    env = env or {}
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m):
        name = m.group(1) or m.group(4)
        op, default = m.group(2), m.group(3) or ""
        val = env.get(name)
        if op == ":-" and not val:
            return default
        if op == "-" and val is None:
            return default
        return val or ""

    parts = value.split("$$")
    return "$".join(_VAR.sub(sub, p) for p in parts)


@pytest.fixture(scope="module")
def compose():
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and "services" in data
    return interpolate(data)


def _command(svc) -> list:
    cmd = svc["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(x) for x in cmd]


def _parse(argv):
    try:
        return build_parser().parse_args(argv)
    except SystemExit as e:  # argparse reports bad options by exiting
        pytest.fail(f"molink-lite rejects {argv}: exit {e.code}")


def _stages(compose):
    out = {}
    for name, svc in compose["services"].items():
        argv = _command(svc)
        if argv and argv[0] == "stage":
            out[name] = _parse(argv)
    return out


def _gateway(compose):
    gws = [(n, s) for n, s in compose["services"].items() if _command(s)[:1] == ["gateway"]]
    assert len(gws) == 1, f"expected one gateway service, got {[n for n, _ in gws]}"
    return gws[0]


def test_compose_commands_parse_with_real_cli(compose):
    services = compose["services"]
    assert set(services) >= {"stage0", "stage1", "gateway"}
    for name, svc in services.items():
        argv = _command(svc)
        assert argv[0] in ("stage", "gateway"), f"{name}: unexpected command {argv}"
        ns = _parse(argv)
        assert ns.cmd == argv[0]


def test_stages_tile_demo_model_by_default(compose):
    stages = _stages(compose)
    assert len(stages) == 2
    ranges = sorted(tuple(int(x) for x in ns.layers.split("-")) for ns in stages.values())
    assert ranges == [(0, 8), (9, 17)]
    for name, ns in stages.items():
        assert ns.model in (None, ""), f"{name}: default MODEL should mean the demo model"
        assert ns.host == "0.0.0.0", f"{name} must listen on all interfaces inside its container"


def test_stages_follow_model_env(compose):
    yaml = pytest.importorskip("yaml")
    env = {"MODEL": "/models/m.gguf", "STAGE0_LAYERS": "0-13", "STAGE1_LAYERS": "14-27"}
    data = interpolate(yaml.safe_load(COMPOSE.read_text()), env)
    stages = _stages(data)
    assert {ns.model for ns in stages.values()} == {"/models/m.gguf"}
    assert sorted(ns.layers for ns in stages.values()) == ["0-13", "14-27"]
    for svc in data["services"].values():
        if _command(svc)[0] == "stage":
            assert any(str(v).endswith(":/models:ro") for v in svc.get("volumes", []))


def test_pipeline_matches_stage_services(compose):
    stages = _stages(compose)
    gw_name, gw = _gateway(compose)
    ns = _parse(_command(gw))
    assert len(ns.pipeline) == 1
    urls = ns.pipeline[0].split(",")
    in_order = sorted(stages.items(), key=lambda kv: int(kv[1].layers.split("-")[0]))
    assert urls == [f"ws://{name}:{s.port}" for name, s in in_order]
    assert len({s.port for s in stages.values()}) == len(stages)
    # every stage but the last forwards to the next one by service name
    for (name, s), nxt in zip(in_order, urls[1:]):
        assert s.next in (None, nxt), f"{name} --next {s.next} != {nxt}"
    assert in_order[-1][1].next is None
    # the gateway starts after the stages are healthy
    deps = gw["depends_on"]
    assert set(deps) == set(stages)
    assert all(d.get("condition") == "service_healthy" for d in deps.values())
    for name in stages:
        assert "healthcheck" in compose["services"][name]


def test_gateway_published_with_health_check(compose):
    _, gw = _gateway(compose)
    ns = _parse(_command(gw))
    assert ns.host == "0.0.0.0"
    assert any(str(p).endswith(f":{ns.port}") for p in gw["ports"])
    assert any(str(p).split(":")[0] == "8000" for p in gw["ports"])
    test = " ".join(gw["healthcheck"]["test"])
    assert f"127.0.0.1:{ns.port}/health" in test


def test_stage_healthchecks_use_their_ports(compose):
    for name, ns in _stages(compose).items():
        test = " ".join(compose["services"][name]["healthcheck"]["test"])
        assert str(ns.port) in test


def test_compose_build_context_is_repo_root(compose):
    for svc in compose["services"].values():
        b = svc["build"]
        ctx = (DOCKER / b["context"]).resolve()
        assert (ctx / "pyproject.toml").is_file()
        assert (ctx / b["dockerfile"]).is_file()


# ---------------------------------------------------------------- Dockerfiles
def _instructions(path: Path):
    """(KEYWORD, args) per instruction, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        s = line.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        kw, _, rest = buf.partition(" ")
        out.append((kw.upper(), rest.strip()))
        buf = ""
    return out


def _final_stage(path: Path):
    ins = _instructions(path)
    froms = [i for i, (k, _) in enumerate(ins) if k == "FROM"]
    assert len(froms) >= 2, f"{path.name}: expected a multi-stage build"
    return ins[froms[-1]:]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_entrypoint_and_runtime_stage(path):
    final = _final_stage(path)
    entry = [json.loads(a) for k, a in final if k == "ENTRYPOINT"]
    assert entry and entry[-1] == ["molink-lite"]
    cmd = [json.loads(a) for k, a in final if k == "CMD"]
    assert cmd and cmd[-1] == ["serve", "--host", "0.0.0.0"]
    assert _parse(cmd[-1]).cmd == "serve"
    users = [a for k, a in final if k == "USER"]
    assert users and users[-1] not in ("root", "0")
    vols = " ".join(a for k, a in final if k == "VOLUME")
    assert ".cache/molink-lite" in vols
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in final, "the runtime stage takes the venv the builder made"
    for tool in ("build-essential", "cmake", "nvcc"):
        assert not any(k == "RUN" and tool in a and "apt-get" in a for k, a in final), tool


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_llama_cpp_python_like_pyproject(path):
    pin = re.search(r'"llama-cpp-python==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    m = re.search(r"^ARG LLAMA_CPP_PYTHON_VERSION=(\S+)", path.read_text(), re.M)
    assert m and m.group(1) == pin


def test_cuda_dockerfile_builds_with_cuda():
    text = (DOCKER / "Dockerfile.cuda").read_text()
    assert re.search(r'^ARG CUDA_ARCHITECTURES="86;89;90"$', text, re.M)
    assert "-DGGML_CUDA=on" in text
    assert "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}" in text
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert "devel" in froms[0] and "runtime" in froms[-1]


def test_cpu_dockerfile_base():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_VERSION=3\.11$", text, re.M)
    assert re.search(r"^ARG BASE_IMAGE=python:\$\{PYTHON_VERSION\}-slim$", text, re.M)
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert all(f == "${BASE_IMAGE}" for f in froms)
    assert "build-essential" in text and "cmake" in text
    assert '".[demo]"' in text


def test_dockerignore_keeps_sources_out_of_caches():
    lines = {l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
             if l.strip() and not l.startswith("#")}
    assert {".venv", ".ci-venv", ".dev", ".whl"} <= lines
    for needed in ("pyproject.toml", "README.md", "molink_lite"):
        assert needed not in lines
