// molink-lite dashboard: polls /v1/stats and /metrics, draws everything with the DOM and <canvas>.
// No libraries, nothing fetched from elsewhere. Data from the server is only ever set as text (textContent),
// never parsed as HTML.
"use strict";

const POLL_MS = 2000;
const HISTORY = 150;           // chart points kept (5 minutes at 2 s)
const KEY_STORE = "molink-lite-api-key";
const points = [];             // chart history: {t, tput, ttft, itl}
let timer = null;

// ------------------------------------------------------------------ API key
function apiKey() { try { return localStorage.getItem(KEY_STORE) || ""; } catch (e) { return ""; } }
function setKey(k) { try { if (k) localStorage.setItem(KEY_STORE, k); else localStorage.removeItem(KEY_STORE); } catch (e) {} }

// "#key=..." in the address (never sent to the server) stores the key and is removed from the address
(function keyFromHash() {
  const m = /(?:^#|&)key=([^&]*)/.exec(location.hash);
  if (m) {
    setKey(decodeURIComponent(m[1]));
    window.history.replaceState(null, "", location.pathname + location.search);
  }
})();

function needKey(message) {
  document.getElementById("keybox").hidden = false;
  document.getElementById("keyerr").textContent = message || "";
  document.getElementById("forget").hidden = true;
}

document.getElementById("keyform").addEventListener("submit", (ev) => {
  ev.preventDefault();
  setKey(document.getElementById("key").value.trim());
  document.getElementById("key").value = "";
  document.getElementById("keybox").hidden = true;
  poll();
});
document.getElementById("forget").addEventListener("click", () => { setKey(""); needKey(""); });

async function get(path) {
  const headers = {};
  const k = apiKey();
  if (k) headers["Authorization"] = "Bearer " + k;
  const r = await fetch(path, { headers, cache: "no-store" });
  if (r.status === 401) {
    const err = new Error(k ? "the API key was refused" : "");
    err.auth = true;
    throw err;
  }
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return path.endsWith("metrics") ? r.text() : r.json();
}

// ------------------------------------------------------------------ Prometheus text format
function parseMetrics(text) {
  const out = {};   // name -> [{labels, value}]
  const line = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
  const label = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
  for (const raw of text.split("\n")) {
    if (!raw || raw[0] === "#") continue;
    const m = line.exec(raw);
    if (!m) continue;
    const labels = {};
    if (m[2]) for (const l of m[2].matchAll(label)) labels[l[1]] = l[2].replace(/\\(.)/g, (_, c) => c === "n" ? "\n" : c);
    (out[m[1]] = out[m[1]] || []).push({ labels, value: parseFloat(m[3]) });
  }
  return out;
}

function sample(metrics, name, labels) {
  for (const s of metrics[name] || []) {
    if (Object.entries(labels || {}).every(([k, v]) => s.labels[k] === v)) return s.value;
  }
  return null;
}

// quantile of a Prometheus histogram over all its series (every model's buckets summed by bound; linear inside the
// bucket, as histogram_quantile does)
function quantile(metrics, name, q) {
  const byLe = new Map();
  for (const s of metrics[name + "_bucket"] || []) {
    const le = parseFloat(s.labels.le);
    byLe.set(le, (byLe.get(le) || 0) + s.value);
  }
  const buckets = [...byLe].map(([le, n]) => ({ le, n })).sort((a, b) => a.le - b.le);
  if (!buckets.length) return null;
  const total = buckets[buckets.length - 1].n;
  if (!total) return null;
  const rank = q * total;
  let prevLe = 0, prevN = 0;
  for (const b of buckets) {
    if (b.n >= rank) {
      if (!isFinite(b.le)) return prevLe;
      return prevLe + (b.le - prevLe) * (b.n > prevN ? (rank - prevN) / (b.n - prevN) : 0);
    }
    prevLe = b.le; prevN = b.n;
  }
  return prevLe;
}

// ------------------------------------------------------------------ formatting
function ms(s) { return s == null ? "–" : s < 1 ? (1000 * s).toFixed(s < 0.01 ? 2 : 1) + " ms" : s.toFixed(2) + " s"; }
function bytes(b) {
  if (b == null || !isFinite(b)) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; }
  return b.toFixed(i ? 1 : 0) + " " + u[i];
}
function num(x, d) { return x == null || !isFinite(x) ? "–" : Number(x).toFixed(d || 0); }

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "title") e.title = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return e;
}
function setText(id, text) { document.getElementById(id).textContent = text; }

// ------------------------------------------------------------------ rendering
function render(stats, metrics) {
  const models = stats.models && stats.models.length ? stats.models : [{ name: stats.model, placement: stats.placement,
                                                                        replacements: stats.replacements }];
  setText("model", models.map(x => x.name).join(", "));
  const badge = document.getElementById("status");
  badge.textContent = stats.status;
  badge.className = "badge " + stats.status;
  setText("updated", "updated " + new Date().toLocaleTimeString());

  const m = stats.metrics || {};
  const r10 = m.last_10s || {}, r60 = m.last_60s || {};
  setText("tput10", num(r10.tokens_per_s, 1));
  setText("tput60", num(r60.tokens_per_s, 1));
  setText("ttft", ms(r60.ttft_s));
  setText("itl", ms(r60.inter_token_s));
  setText("ttft-q", "p50 / p95: " + ms(quantile(metrics, "molink_time_to_first_token_seconds", 0.5)) + " / "
          + ms(quantile(metrics, "molink_time_to_first_token_seconds", 0.95)));
  setText("itl-q", "p50 / p95: " + ms(quantile(metrics, "molink_inter_token_latency_seconds", 0.5)) + " / "
          + ms(quantile(metrics, "molink_inter_token_latency_seconds", 0.95)));
  const byStatus = m.requests || {};
  const total = Object.values(byStatus).reduce((a, b) => a + b, 0);
  setText("requests", String(total));
  setText("requests-by", Object.entries(byStatus).map(([k, v]) => k + ": " + v).join("  ") || "none yet");
  const running = (stats.pipelines || []).reduce((a, p) => a + (p.running || 0), 0);
  setText("load", running + " / " + (stats.queued || 0));
  setText("tokens", num(m.prompt_tokens) + " prompt, " + num(m.generation_tokens) + " generated tokens");

  points.push({ t: Date.now(), tput: r10.tokens_per_s || 0,
                 ttft: r10.ttft_s == null ? null : 1000 * r10.ttft_s,
                 itl: r10.inter_token_s == null ? null : 1000 * r10.inter_token_s });
  while (points.length > HISTORY) points.shift();
  drawChart("chart-tput", [{ key: "tput", color: "#58a6ff", name: "tokens/s" }]);
  drawChart("chart-lat", [{ key: "ttft", color: "#d2a8ff", name: "time to first token" },
                          { key: "itl", color: "#3fb950", name: "inter-token" }]);

  renderModels(stats, models);
  renderPipelines(stats, metrics, models);
  renderLinks(stats, models);
  renderPlacement(models);
  renderEvents(stats);
}

// one section per model (a gateway may serve several): its state, names, rates and pipelines
function renderModels(stats, models) {
  const box = document.getElementById("models");
  document.getElementById("models-box").hidden = !(stats.models && stats.models.length > 1);
  box.replaceChildren();
  for (const x of stats.models || []) {
    const mm = x.metrics || {};
    const r10 = mm.last_10s || {}, r60 = mm.last_60s || {};
    const reqs = Object.values(mm.requests || {}).reduce((a, b) => a + b, 0);
    const idle = x.idle ? "idle unload after " + num(x.idle.idle_unload_s) + " s (released " + num(x.idle.released)
      + "x, loaded " + num(x.idle.loaded) + "x)" : "";
    box.append(el("div", { class: "model-section", "data-model": x.name, "data-state": x.state },
      el("div", { class: "head" },
        el("span", { class: "name" }, x.name), el("span", { class: "badge " + x.state.replace(" ", "-") }, x.state),
        el("span", { class: "muted" }, x.state_detail || ""),
        (x.aliases || []).length ? el("span", {}, "also: " + x.aliases.join(", ")) : el("span", {}, "")),
      el("div", { class: "head" },
        el("span", {}, num(r10.tokens_per_s, 1) + " tokens/s (10 s)"),
        el("span", {}, "TTFT " + ms(r60.ttft_s) + ", inter-token " + ms(r60.inter_token_s)),
        el("span", {}, reqs + " requests, " + num(mm.generation_tokens) + " tokens generated"),
        el("span", {}, "queued " + num(x.queued) + ", pipelines " + (x.pipelines || []).length),
        el("span", { class: "muted" }, idle))));
  }
}

function renderPipelines(stats, metrics, models) {
  const box = document.getElementById("pipelines");
  box.replaceChildren();
  let shown = null;
  for (const p of stats.pipelines || []) {
    if (models.length > 1 && p.model !== shown) {   // several models: their pipelines under their name
      shown = p.model;
      box.append(el("h3", { class: "model-name" }, "model " + p.model));
    }
    const sch = p.scheduler || {};
    const head = el("div", { class: "head" },
      el("span", { class: "name" }, p.name), el("span", { class: "badge " + p.state }, p.state),
      el("span", {}, "load " + num(100 * (p.load || 0)) + "%"),
      el("span", {}, "running " + p.running + ", queued " + p.queued),
      el("span", {}, "KV reserved " + num(p.kv_reserved) + " / " + num(p.n_ctx)),
      el("span", {}, "completed " + num(sch.completed) + ", failed " + num(sch.failed)),
      el("span", {}, "failures " + p.failures + ", recoveries " + p.recoveries),
      prefixCache(p.prefix_cache),
      el("span", { class: "muted" }, "prefill chunk " + p.prefill_chunk + ", micro-batches " + p.micro_batches));
    const cols = ["#", "stage", "host", "layers", "backend", "GPU layers", "memory (RSS)", "GGUF", "steps",
                  "rows/step", "step time", "live seqs", "KV used"];
    const table = el("table", {}, el("thead", {}, el("tr", {}, ...cols.map(c => el("th", {}, c)))));
    const body = el("tbody");
    // an up pipeline: stage_info (hello) + stages (counters); a down one: stages is its list of URLs
    const stages = Array.isArray(p.stages) ? p.stages : [];
    const infos = p.stage_info && p.stage_info.length ? p.stage_info
      : stages.map(u => (typeof u === "string" ? { url: u } : {}));
    const counters = stages.filter(s => s && typeof s === "object");
    const n = infos.length;
    for (let i = 0; i < n; i++) {
      const inf = infos[i] || {};
      const st = counters[i] || {};
      const idx = String(i);
      const stepS = sample(metrics, "molink_stage_step_seconds",
                           p.model != null ? { model: p.model, pipeline: p.name, stage: idx } : { pipeline: p.name, stage: idx });
      const layers = inf.layer_start != null ? inf.layer_start + "-" + (inf.layer_stop - 1) : "?";
      body.append(el("tr", { class: "stage", "data-layers": layers },
        el("td", {}, idx), el("td", { class: "mono" }, inf.url || ""), el("td", {}, inf.host || "?"),
        el("td", { class: "mono" }, layers + (inf.n_layer_total ? " of " + inf.n_layer_total : "")),
        el("td", {}, inf.backend || "?"), el("td", { class: "num" }, num(inf.n_gpu_layers)),
        el("td", { class: "num" }, bytes(st.rss_bytes)), el("td", { class: "num" }, bytes(inf.model_bytes)),
        el("td", { class: "num" }, num(st.steps)),
        el("td", { class: "num" }, st.steps ? num(st.rows / st.steps, 1) : "–"),
        el("td", { class: "num" }, ms(stepS)), el("td", { class: "num" }, num(st.live_seqs)),
        el("td", { class: "num" }, num(st.kv_positions) + (inf.n_ctx ? " / " + inf.n_ctx : ""))));
    }
    if (!n) body.append(el("tr", {}, el("td", { colspan: String(cols.length), class: "muted" },
                                        p.error || "no stage information (pipeline not up)")));
    if (p.stages_error) body.append(el("tr", {}, el("td", { colspan: String(cols.length), class: "error" },
                                                    "stages: " + p.stages_error)));
    table.append(body);
    box.append(el("div", { class: "pipeline", "data-model": p.model || "" }, head, table));
  }
  if (!(stats.pipelines || []).length) box.append(el("p", { class: "muted" }, "no pipeline yet (stages are joining)"));
}

// a pipeline's prefix cache (its /v1/stats "prefix_cache"): hit rate, prompt tokens not prefilled, cells held
function prefixCache(pc) {
  if (!pc) return el("span", { class: "prefix muted" }, "");
  if (!pc.enabled) return el("span", { class: "prefix muted", "data-enabled": "0" }, "prefix cache off");
  const rate = pc.hit_rate == null ? "–" : num(100 * pc.hit_rate) + "%";
  return el("span", { class: "prefix", "data-enabled": "1", "data-hit-rate": pc.hit_rate == null ? "" : String(pc.hit_rate),
                      title: num(pc.entries) + " cached prefixes in " + num(pc.cells) + " of " + num(pc.budget)
                             + " KV cells, " + num(pc.evictions) + " evicted" },
    "prefix cache " + rate + " hits (" + num(pc.hits) + "/" + num(pc.lookups) + "), " + num(pc.tokens_reused)
    + " tokens reused");
}

function renderLinks(stats, models) {
  const body = document.querySelector("#links tbody");
  body.replaceChildren();
  const routes = {};   // "pipeline|to host" -> route, from the placement plans (join mode; pipeline names are unique)
  for (const x of models) {
    const plan = (x.placement || []).slice(-1)[0];
    for (const pp of (plan && plan.pipelines) || []) for (const k of pp.links || []) routes[pp.name + "|" + k.to] = k;
  }
  let rows = 0;
  for (const p of stats.pipelines || []) {
    const infos = p.stage_info || [];
    const planned = Object.entries(routes).filter(([k]) => k.startsWith(p.name + "|")).map(([, v]) => v);
    if (planned.length) {
      for (const k of planned) {
        body.append(el("tr", {}, el("td", {}, p.name), el("td", {}, k.from), el("td", {}, k.to),
          el("td", {}, k.route || "direct"), el("td", { class: "num" }, k.rtt_ms == null ? "–" : num(k.rtt_ms, 2) + " ms"),
          el("td", { class: "num" }, k.mbit == null ? "–" : num(k.mbit, 0) + " Mbit/s")));
        rows++;
      }
      continue;
    }
    (p.links || []).forEach((k, i) => {
      const from = infos[i] ? (infos[i].host + " " + infos[i].url) : "stage " + i;
      body.append(el("tr", {}, el("td", {}, p.name), el("td", { class: "mono" }, from),
        el("td", { class: "mono" }, k.to), el("td", {}, "direct"),
        el("td", { class: "num" }, num(k.rtt_ms, 2) + " ms"), el("td", { class: "num" }, num(k.mbit, 0) + " Mbit/s")));
      rows++;
    });
  }
  if (!rows) body.append(el("tr", {}, el("td", { colspan: "6", class: "muted" },
                                         "no stage-to-stage link measured (one stage, or a fixed --prefill-chunk)")));
}

function renderPlacement(models) {
  const box = document.getElementById("placement");
  box.replaceChildren();
  let any = false;
  for (const x of models) {
    const plan = (x.placement || []).slice(-1)[0];
    if (!plan) {
      if (x.state === "placing" || x.state === "no capacity") {
        box.append(el("p", { class: x.state === "no capacity" ? "error" : "muted" }, x.name + ": " + x.state_detail));
        any = true;
      }
      continue;
    }
    any = true;
    renderPlan(box, plan, x.replacements || []);
  }
  document.getElementById("placement-box").hidden = !any;
}

function renderPlan(box, plan, replacements) {
  box.append(el("p", { class: "muted" }, (plan.model && plan.model.name) + ": " + (plan.model && plan.model.n_layer)
                + " layers, context " + plan.n_ctx + ", " + plan.n_seqs + " sequences"));
  const table = el("table", {}, el("thead", {}, el("tr", {}, ...["pipeline", "host", "backend", "layers", "memory offered",
                                                                   "estimated memory", "estimated step"].map(c => el("th", {}, c)))));
  const body = el("tbody");
  for (const pp of plan.pipelines || []) for (const s of pp.stages || []) {
    body.append(el("tr", {}, el("td", {}, pp.name || "?"), el("td", {}, s.host && s.host.name),
      el("td", {}, s.host && s.host.backend), el("td", { class: "mono" }, s.layers),
      el("td", { class: "num" }, bytes(s.host && s.host.memory_bytes)), el("td", { class: "num" }, bytes(s.est_bytes)),
      el("td", { class: "num" }, ms(s.est_sec))));
  }
  for (const u of plan.unused || []) {
    body.append(el("tr", {}, el("td", { class: "muted" }, "unused"), el("td", {}, u.host && u.host.name),
      el("td", {}, u.host && u.host.backend), el("td", { colspan: "4", class: "muted" }, u.reason)));
  }
  table.append(body);
  box.append(table);
  for (const r of replacements) {
    box.append(el("p", {}, "layers " + r.layers + " moved to " + r.host + (r.seconds != null ? " in " + num(r.seconds, 1) + " s" : "")));
  }
}

function renderEvents(stats) {
  const list = document.getElementById("events");
  list.replaceChildren();
  const evs = [];
  for (const p of stats.pipelines || []) for (const e of p.events || []) evs.push({ ...e, pipeline: p.name });
  evs.sort((a, b) => b.at - a.at);
  for (const e of evs.slice(0, 30)) {
    list.append(el("li", { class: e.event }, new Date(1000 * e.at).toLocaleTimeString() + "  " + e.pipeline + " "
                   + (e.event === "down" ? "DOWN" : "UP") + ": " + e.message));
  }
  const rs = stats.router || {};
  const extra = ["replayed", "parked", "recovered", "expired", "overloaded"].filter(k => rs[k]).map(k => k + " " + rs[k]);
  if (extra.length) list.append(el("li", { class: "muted" }, "requests " + extra.join(", ")));
  if (!list.children.length) list.append(el("li", { class: "muted" }, "no failures or recoveries"));
}

// ------------------------------------------------------------------ charts (hand-drawn)
function drawChart(id, series) {
  const canvas = document.getElementById(id);
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 600, h = canvas.clientHeight || 180;
  if (canvas.width !== Math.round(w * dpr)) { canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr); }
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const left = 48, right = 10, top = 22, bottom = 20;
  let max = 0;
  for (const s of series) for (const p of points) if (p[s.key] != null) max = Math.max(max, p[s.key]);
  max = niceMax(max);
  g.font = "11px system-ui, sans-serif";
  g.strokeStyle = "#2a3540"; g.fillStyle = "#8a96a3"; g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = top + (h - top - bottom) * i / 4;
    g.beginPath(); g.moveTo(left, y); g.lineTo(w - right, y); g.stroke();
    const v = max * (1 - i / 4);
    g.fillText(v >= 100 ? v.toFixed(0) : v.toFixed(v >= 10 ? 1 : 2), 4, y + 4);
  }
  const now = points.length ? points[points.length - 1].t : Date.now();
  // the x axis covers the history kept: at least a minute, at most HISTORY polls
  const span = Math.min(HISTORY * POLL_MS, Math.max(60000, points.length ? now - points[0].t : 0));
  g.fillText("-" + (span >= 120000 ? Math.round(span / 60000) + " min" : Math.round(span / 1000) + " s"), left, h - 5);
  g.fillText("now", w - right - 22, h - 5);
  let lx = left;
  for (const s of series) {
    g.fillStyle = s.color; g.fillRect(lx, 6, 10, 10);
    g.fillStyle = "#d8dee6"; g.fillText(s.name, lx + 14, 15);
    lx += g.measureText(s.name).width + 34;
    g.strokeStyle = s.color; g.lineWidth = 2; g.beginPath();
    let pen = false;
    for (const p of points) {
      if (p[s.key] == null) { pen = false; continue; }
      const x = left + (w - left - right) * (1 - (now - p.t) / span);
      const y = top + (h - top - bottom) * (1 - p[s.key] / max);
      if (pen) g.lineTo(x, y); else g.moveTo(x, y);
      pen = true;
    }
    g.stroke();
  }
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

// ------------------------------------------------------------------ polling
async function poll() {
  clearTimeout(timer);
  try {
    const [stats, text] = await Promise.all([get("/v1/stats"), get("/metrics")]);
    document.getElementById("error").hidden = true;
    document.getElementById("forget").hidden = !apiKey();
    render(stats, parseMetrics(text));
  } catch (e) {
    if (e.auth) { needKey(e.message); return; }   // polling resumes when a key is entered
    const box = document.getElementById("error");
    box.hidden = false;
    box.textContent = "cannot reach the gateway: " + e.message;
  }
  timer = setTimeout(poll, POLL_MS);
}

window.addEventListener("resize", () => {
  drawChart("chart-tput", [{ key: "tput", color: "#58a6ff", name: "tokens/s" }]);
  drawChart("chart-lat", [{ key: "ttft", color: "#d2a8ff", name: "time to first token" },
                          { key: "itl", color: "#3fb950", name: "inter-token" }]);
});
poll();
