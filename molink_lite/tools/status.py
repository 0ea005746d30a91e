"""``molink-lite status [URL]``: a running gateway's ``/v1/stats`` as a terminal summary (what the dashboard shows).

Everything shown comes from the gateway (treated as untrusted: values are formatted defensively, control
characters in strings are replaced so a hostile gateway cannot drive the terminal).
"""

from __future__ import annotations

import json
import re
import ssl
import time
import urllib.error
import urllib.request
from typing import Any, List, Optional

DEFAULT_URL = "http://127.0.0.1:8000"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_BYTES = 16 << 20


class StatusError(RuntimeError):
    """The gateway could not be asked (unreachable, refused the key, answered something else)."""


def stats_url(url: str) -> str:
    """``.../v1/stats`` from a gateway address given as http(s)://host:port[/v1][/]."""
    base = url.strip().rstrip("/")
    if not re.match(r"^https?://", base):
        base = "http://" + base
    if base.endswith("/v1"):
        base = base[:-3]
    return base + "/v1/stats"


def fetch(url: str, api_key: Optional[str] = None, timeout: float = 15.0,
          context: Optional[ssl.SSLContext] = None) -> dict:
    """The gateway's ``/v1/stats``; raises :class:`StatusError` with a one-line reason."""
    target = stats_url(url)
    req = urllib.request.Request(target, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
            raw = r.read(MAX_BYTES + 1)
    except urllib.error.HTTPError as e:
        if e.code == 401:
            why = "it refused the one given" if api_key else "none given"
            raise StatusError(f"{target}: the gateway needs an API key ({why}): pass --api-key-file FILE or set "
                              f"MOLINK_API_KEY") from None
        raise StatusError(f"{target}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise StatusError(f"cannot reach {target}: {getattr(e, 'reason', e)}") from None
    if len(raw) > MAX_BYTES:
        raise StatusError(f"{target}: answer larger than {MAX_BYTES} bytes")
    try:
        body = json.loads(raw)
    except ValueError:
        raise StatusError(f"{target}: the answer is not JSON (is this a molink-lite gateway?)") from None
    if not isinstance(body, dict) or not isinstance(body.get("pipelines"), list):
        raise StatusError(f"{target}: the answer is not molink-lite's /v1/stats")
    return body


# ---------------------------------------------------------------- formatting
def _s(v: Any, limit: int = 120) -> str:
    return _CONTROL.sub("?", str("" if v is None else v))[:limit]


def _n(v: Any, digits: int = 0) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "-"
    return f"{v:.{digits}f}"


def _ms(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "-"
    return f"{1e3 * v:.1f} ms" if v < 1 else f"{v:.2f} s"


def _bytes(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if v < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return "-"  # pragma: no cover


def _d(v: Any) -> dict:
    return v if isinstance(v, dict) else {}


def _l(v: Any) -> list:
    return v if isinstance(v, list) else []


def _table(rows: List[List[str]], indent: str = "  ") -> List[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def render(stats: dict, url: str = "") -> str:
    """The summary, as lines of text: the gateway's totals, then one section per model (its state, rates,
    pipelines with their stages and links, and its placement in join mode)."""
    models = [_d(x) for x in _l(stats.get("models"))] or [
        {"name": stats.get("model"), "state": stats.get("status"), "placement": stats.get("placement")}]
    pipes = [_d(p) for p in _l(stats.get("pipelines"))]
    out = [f"gateway {_s(url)}  status {_s(stats.get('status'))}  "
           f"model{'s' if len(models) > 1 else ''} {', '.join(_s(x.get('name')) for x in models)}"]
    out += _rates(_d(stats.get("metrics")), stats.get("queued"), _d(stats.get("router")))
    for mod in models:
        name = mod.get("name")
        if len(models) > 1:
            detail = _s(mod.get("state_detail"), 300)
            out += ["", f"== model {_s(name)}  {_s(mod.get('state'))}" + (f" ({detail})" if detail else "")]
            if mod.get("aliases"):
                out.append(f"aliases: {', '.join(_s(a) for a in _l(mod.get('aliases')))}")
            out += _rates(_d(mod.get("metrics")), mod.get("queued"), _d(mod.get("router")))
        mine = [p for p in pipes if p.get("model") in (None, name)]
        for p in mine:
            out += _pipeline(p)
        out += _placement(_l(mod.get("placement")))
    return "\n".join(out)


def _rates(m: dict, queued: Any, router: dict) -> List[str]:
    r10, r60 = _d(m.get("last_10s")), _d(m.get("last_60s"))
    by_status = _d(m.get("requests"))
    total = sum(v for v in by_status.values() if isinstance(v, int))
    return [f"requests {total} ({', '.join(f'{_s(k)}: {_n(v)}' for k, v in by_status.items()) or 'none yet'}); "
            f"tokens {_n(m.get('prompt_tokens'))} prompt, {_n(m.get('generation_tokens'))} generated",
            f"throughput {_n(r10.get('tokens_per_s'), 1)} tokens/s (last 10 s), {_n(r60.get('tokens_per_s'), 1)} "
            f"(last 60 s); time to first token {_ms(r60.get('ttft_s'))}, inter-token {_ms(r60.get('inter_token_s'))} "
            f"(60 s means)",
            f"queued {_n(queued)}; " + ", ".join(f"{_s(k)} {_n(v)}" for k, v in router.items())]


def _pipeline(p: dict) -> List[str]:
    out: List[str] = []
    sch = _d(p.get("scheduler"))
    out += ["", f"pipeline {_s(p.get('name'))}  {_s(p.get('state'))}  load {_n(100 * (p.get('load') or 0))}%  "
                f"running {_n(p.get('running'))}, queued {_n(p.get('queued'))}  KV reserved "
                f"{_n(p.get('kv_reserved'))}/{_n(p.get('n_ctx'))}  completed {_n(sch.get('completed'))}, failed "
                f"{_n(sch.get('failed'))}  failures {_n(p.get('failures'))}, recoveries {_n(p.get('recoveries'))}"]
    if p.get("error"):
        out.append(f"  error: {_s(p.get('error'), 300)}")
    lc = _d(p.get("link_choice"))
    if lc:
        out.append(f"  links: {_s(lc.get('why'), 400)}")
    if p.get("ring"):   # closing the ring: tokens straight from the last stage to the first
        out.append(f"  ring: {_s(p.get('ring'), 300)}, {_n(sch.get('ring_rounds'))} rounds without the gateway")
    pc = _d(p.get("prefix_cache"))
    if pc:
        rate = pc.get("hit_rate")
        rate_s = f"{_n(100 * rate)}%" if isinstance(rate, (int, float)) and not isinstance(rate, bool) else "-"
        out.append(f"  prefix cache: hits {rate_s} "
                   f"({_n(pc.get('hits'))}/{_n(pc.get('lookups'))}), {_n(pc.get('tokens_reused'))} tokens reused, "
                   f"{_n(pc.get('entries'))} entries in {_n(pc.get('cells'))}/{_n(pc.get('budget'))} cells, "
                   f"{_n(pc.get('evictions'))} evicted" if pc.get("enabled") else "  prefix cache: off")
    infos = [_d(i) for i in _l(p.get("stage_info"))]
    counters = [_d(c) for c in _l(p.get("stages")) if isinstance(c, dict)]
    if not infos:
        infos = [{"url": u} for u in _l(p.get("stages")) if isinstance(u, str)]
    rows = [["#", "stage", "host", "layers", "backend", "gpu layers", "memory", "steps", "rows/step", "step",
             "live seqs", "KV used"]]
    for i, inf in enumerate(infos):
        c = counters[i] if i < len(counters) else {}
        a, b = inf.get("layer_start"), inf.get("layer_stop")
        layers = f"{_n(a)}-{_n(b - 1 if isinstance(b, int) else None)}" if a is not None else "?"
        if inf.get("n_layer_total") is not None:
            layers += f" of {_n(inf.get('n_layer_total'))}"
        steps, nrows, busy = c.get("steps"), c.get("rows"), c.get("busy_s")
        ok = isinstance(steps, (int, float)) and steps > 0
        rows.append([str(i), _s(inf.get("url")), _s(inf.get("host"), 40) or "?", layers,
                     _s(inf.get("backend"), 40) or "?", _n(inf.get("n_gpu_layers")), _bytes(c.get("rss_bytes")),
                     _n(steps), _n(nrows / steps, 1) if ok and isinstance(nrows, (int, float)) else "-",
                     _ms(busy / steps) if ok and isinstance(busy, (int, float)) else "-",
                     _n(c.get("live_seqs")), f"{_n(c.get('kv_positions'))}/{_n(inf.get('n_ctx'))}"])
    out += _table(rows) if len(rows) > 1 else ["  (no stage information: the pipeline is not up)"]
    if p.get("stages_error"):
        out.append(f"  stages: {_s(p.get('stages_error'), 300)}")
    for i, k in enumerate(_l(p.get("links"))):
        k = _d(k)
        out.append(f"  link {i} -> {_s(k.get('to'))}: rtt {_n(k.get('rtt_ms'), 2)} ms, {_n(k.get('mbit'))} Mbit/s")
    for e in _l(p.get("events"))[-5:]:
        e = _d(e)
        at = e.get("at")
        when = time.strftime("%H:%M:%S", time.localtime(at)) if isinstance(at, (int, float)) else "?"
        out.append(f"  {when} {_s(e.get('event'))}: {_s(e.get('message'), 200)}")
    return out


def _placement(plans: list) -> List[str]:
    out: List[str] = []
    if plans:
        plan = _d(plans[-1])
        out += ["", "placement:"]
        for pp in _l(plan.get("pipelines")):
            pp = _d(pp)
            for st in _l(pp.get("stages")):
                st = _d(st)
                h = _d(st.get("host"))
                out.append(f"  {_s(pp.get('name'))}: layers {_s(st.get('layers'))} on {_s(h.get('name'))} "
                           f"({_s(h.get('backend'))}, {_bytes(h.get('memory_bytes'))} offered)")
            for k in _l(pp.get("links")):
                k = _d(k)
                out.append(f"  {_s(pp.get('name'))}: link {_s(k.get('from'))} -> {_s(k.get('to'))} "
                           f"{_s(k.get('route'))}, rtt {_n(k.get('rtt_ms'), 2)} ms, {_n(k.get('mbit'))} Mbit/s")
        for u in _l(plan.get("unused")):
            u = _d(u)
            out.append(f"  unused: {_s(_d(u.get('host')).get('name'))}: {_s(u.get('reason'), 200)}")
    return out
