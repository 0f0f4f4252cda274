"""The dashboard's page: self-contained (no CDN, nothing fetched but /api/state), its charts
inline SVG drawn by its own small script, every value from the run (a site's name, a drop's
reason) set with textContent, never parsed as markup. The Content-Security-Policy allows
this page's own script and style (by hash) and nothing else."""

from __future__ import annotations

import base64
import hashlib

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1d2330; background: #f4f6fa; }
header { display: flex; gap: 1em; align-items: baseline; padding: 12px 20px; background: #1d2330; color: #fff; }
header h1 { font-size: 18px; margin: 0; }
#status.live { color: #7ee2a8; } #status.down { color: #ff9d8a; }
main { padding: 16px 20px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(160px, 1fr)); gap: 12px; }
.card, figure { background: #fff; border-radius: 8px; padding: 10px 14px; margin: 0;
  box-shadow: 0 1px 3px rgba(0, 0, 0, .12); }
.card .label, figcaption { color: #5b6477; font-size: 12px; text-transform: uppercase; }
.card .value { font-size: 24px; font-variant-numeric: tabular-nums; }
progress { width: 100%; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(220px, 1fr)); gap: 12px;
  margin: 16px 0; }
svg { width: 100%; height: auto; display: block; }
svg .axis { stroke: #c5cad6; } svg text { font-size: 10px; fill: #5b6477; }
svg polyline { fill: none; stroke: #2f6fde; stroke-width: 2; } svg circle { fill: #2f6fde; }
table { border-collapse: collapse; width: 100%; background: #fff; border-radius: 8px; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid #e6e9f0; white-space: nowrap; }
td.wrap { white-space: normal; overflow-wrap: anywhere; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.on { color: #16803c; font-weight: 600; } .off { color: #b3261e; font-weight: 600; }
"""

SCRIPT = """
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const NS = "http://www.w3.org/2000/svg";
  // Each chart: its key, the digits its labels show, and the values its y axis always spans.
  const CHARTS = [["accuracy", 4, [0, 1]], ["loss", 4, []], ["epsilon", 3, [0]], ["seconds", 2, [0]],
    ["sites", 0, [0]]];
  const series = [];
  // The token is in the cookie now: keep it out of the address bar and the history.
  if (location.search) history.replaceState(null, "", location.pathname);

  const num = (v, digits) => (v === null || v === undefined ? "-" : Number(v).toFixed(digits));
  const ago = (t, now) => (t === null || t === undefined ? "never"
    : Math.max(0, now - t) < 2 ? "now" : Math.round(Math.max(0, now - t)) + " s ago");

  function svg(tag, attributes, text) {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attributes)) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function chart(key, digits, spans) {
    const box = $("chart-" + key);
    const W = 320, H = 160, L = 48, R = 10, T = 10, B = 22;
    const points = series.filter((r) => r[key] !== null && r[key] !== undefined && isFinite(r[key]));
    box.replaceChildren(svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
      svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
    if (!points.length) {
      box.append(svg("text", { x: (W + L) / 2, y: H / 2, "text-anchor": "middle" },
        key === "epsilon" && series.length ? "no differential privacy" : "no data yet"));
      return;
    }
    const xs = points.map((r) => r.round), ys = points.map((r) => Number(r[key])).concat(spans);
    let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    if (y0 === y1) { y1 += Math.abs(y1) || 1; }
    const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
    const py = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
    const at = points.map((r) => px(r.round).toFixed(1) + "," + py(Number(r[key])).toFixed(1));
    box.append(svg("polyline", { points: at.join(" ") }));
    const last = points[points.length - 1];
    box.append(svg("circle", { cx: px(last.round), cy: py(Number(last[key])), r: 3 }));
    box.append(svg("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, num(y1, digits)));
    box.append(svg("text", { x: L - 4, y: H - B, "text-anchor": "end" }, num(y0, digits)));
    box.append(svg("text", { x: L, y: H - 6 }, "round " + x0));
    box.append(svg("text", { x: W - R, y: H - 6, "text-anchor": "end" }, "round " + x1));
  }

  function cell(row, value, className) {
    const td = document.createElement("td");
    td.textContent = value;
    if (className) td.className = className;
    row.append(td);
  }

  function sites(rows, now) {
    const body = $("sites").tBodies[0];
    body.replaceChildren();
    for (const s of rows) {
      const tr = document.createElement("tr");
      tr.dataset.site = s.site;
      cell(tr, s.site);
      cell(tr, s.connected ? "connected" : "disconnected", s.connected ? "on" : "off");
      cell(tr, ago(s.last_seen, now));
      cell(tr, String(s.sampled), "num");
      cell(tr, String(s.aggregated), "num");
      cell(tr, s.last_round === null ? "-" : String(s.last_round), "num");
      cell(tr, String(s.drops), "num");
      cell(tr, Object.entries(s.drop_reasons).map(([k, n]) => k + " \\u00d7" + n).join(", ") || "-");
      cell(tr, s.last_drop || "-", "wrap");
      cell(tr, num(s.epsilon, 3), "num");
      body.append(tr);
    }
  }

  function render(s) {
    $("run").textContent = "run " + s.run_id;
    $("round").textContent = String(s.round);
    $("rounds").textContent = String(s.rounds);
    $("progress").max = Math.max(1, s.rounds);
    $("progress").value = s.round;
    $("accuracy").textContent = num(s.accuracy, 4);
    $("loss").textContent = num(s.loss, 4);
    $("epsilon").textContent = num(s.epsilon, 3);
    $("connected").textContent = String(s.connected);
    for (const [key, digits, spans] of CHARTS) chart(key, digits, spans);
    sites(s.sites, s.now);
  }

  function status(text, live) {
    $("status").textContent = text;
    $("status").className = live ? "live" : "down";
  }

  async function poll() {
    try {
      const since = series.length ? series[series.length - 1].round : 0;
      const reply = await fetch("/api/state?since=" + since, { credentials: "same-origin", cache: "no-store" });
      if (!reply.ok) throw new Error("HTTP " + reply.status);
      const s = await reply.json();
      for (const r of s.series) if (!series.length || r.round > series[series.length - 1].round) series.push(r);
      render(s);
      status(s.round >= s.rounds ? "complete" : "live", true);
      $("updated").textContent = "updated " + new Date(s.now * 1000).toLocaleTimeString();
    } catch (err) {
      status("server unreachable (" + err.message + "): the run may have ended", false);
    }
    setTimeout(poll, 1000);
  }
  poll();
})();
"""

BODY = """
<header><h1>fedcore</h1><span id="run"></span><span id="status"></span></header>
<main>
<section class="cards">
  <div class="card"><div class="label">round</div>
    <div class="value"><span id="round">0</span> / <span id="rounds">-</span></div>
    <progress id="progress" max="1" value="0"></progress></div>
  <div class="card"><div class="label">accuracy</div><div class="value" id="accuracy">-</div></div>
  <div class="card"><div class="label">loss</div><div class="value" id="loss">-</div></div>
  <div class="card"><div class="label">epsilon</div><div class="value" id="epsilon">-</div></div>
  <div class="card"><div class="label">sites connected</div><div class="value" id="connected">-</div></div>
</section>
<section class="charts">
  <figure><figcaption>accuracy</figcaption><svg id="chart-accuracy" viewBox="0 0 320 160"></svg></figure>
  <figure><figcaption>loss</figcaption><svg id="chart-loss" viewBox="0 0 320 160"></svg></figure>
  <figure><figcaption>epsilon</figcaption><svg id="chart-epsilon" viewBox="0 0 320 160"></svg></figure>
  <figure><figcaption>seconds per round</figcaption><svg id="chart-seconds" viewBox="0 0 320 160"></svg></figure>
  <figure><figcaption>sites aggregated</figcaption><svg id="chart-sites" viewBox="0 0 320 160"></svg></figure>
</section>
<table id="sites"><thead><tr><th>site</th><th>state</th><th>last seen</th><th>rounds</th>
  <th>aggregated</th><th>last round</th><th>drops</th><th>drop reasons</th><th>last drop</th>
  <th>epsilon</th></tr></thead><tbody></tbody></table>
<p id="updated"></p>
</main>
"""

PAGE = (
    '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
    '<meta name="viewport" content="width=device-width, initial-scale=1">'
    f"<title>fedcore dashboard</title><style>{STYLE}</style></head>"
    f"<body>{BODY}<script>{SCRIPT}</script></body></html>\n"
)


def _digest(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src {_digest(SCRIPT)}; style-src {_digest(STYLE)}; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
