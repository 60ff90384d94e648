// Fleet page: a table of workers and five charts, fed by Server-Sent Events from /api/fleet/events.
// Every value from the broker is untrusted: it only ever reaches the page as textContent.
"use strict";
const WINDOW_S = 15 * 60;
const MAX_SERIES = 12;
const STATES = new Set(["ready", "starting", "draining", "offline", "stale", "unknown"]);
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
  "#bcbd22", "#17becf", "#393b79", "#637939"];
let samples = [];
const charts = {};

const metrics = {
  "chart-mem": (w) => w.gpus.length ? w.gpus.reduce((a, g) => a + g.usedMib, 0) : w.rssMib,
  "chart-kv": (w) => w.kvCacheUsage == null ? null : 100 * w.kvCacheUsage,
  "chart-run": (w) => w.running == null ? null : w.running + (w.waiting || 0),
  "chart-tok": (w) => w.genTokPerS,
  "chart-ttft": (w) => w.ttftMsP50,
};

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text == null ? "-" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
}

function gpuText(w) {
  if (!w.gpus.length) return w.rssMib == null ? "-" : `cpu (RSS ${w.rssMib} MiB)`;
  return w.gpus.map((g) => `${g.index}: ${g.usedMib}/${g.totalMib} MiB`).join(", ");
}

function storeText(s) {
  if (!s) return ["-", ""];
  if (!s.healthy) return [`${s.backend} DOWN`, "down"];
  return [s.latencyMs == null ? s.backend : `${s.backend} ${s.latencyMs.toFixed(1)} ms`, ""];
}

function renderTable(sample) {
  const body = document.querySelector("#workers tbody");
  body.replaceChildren();
  for (const w of sample.workers) {
    const row = document.createElement("tr");
    row.dataset.worker = w.worker;  // a data attribute holds text; it is never parsed as markup
    cell(row, w.worker);
    cell(row, w.state, STATES.has(w.state) ? `state-${w.state}` : "");
    cell(row, w.model);
    cell(row, w.quantization);
    cell(row, (w.projects || []).join(", "));
    cell(row, w.adapters ? Object.entries(w.adapters).map(([p, a]) => `${p}: ${a}`).join(", ") : "-");
    cell(row, gpuText(w));
    cell(row, w.kvCacheUsage == null ? null : `${Math.round(100 * w.kvCacheUsage)}%`);
    cell(row, w.running == null ? null : `${w.running}/${w.waiting}`);
    cell(row, w.genTokPerS == null ? null : w.genTokPerS.toFixed(0));
    cell(row, w.ttftMsP50 == null ? null : `${w.ttftMsP50.toFixed(0)} ms`);
    const [store, cls] = storeText(w.store);
    cell(row, store, cls);
    cell(row, `${w.lastSeenS.toFixed(0)}s ago`);
    body.appendChild(row);
  }
}

function renderCharts() {
  const ids = [...new Set(samples.flatMap((s) => s.workers.map((w) => w.worker)))].sort().slice(0, MAX_SERIES);
  const xs = samples.map((s) => s.t);
  for (const [id, read] of Object.entries(metrics)) {
    const el = document.getElementById(id);
    const data = [xs, ...ids.map((wid) => samples.map((s) => {
      const w = s.workers.find((x) => x.worker === wid);
      return w ? read(w) : null;
    }))];
    const key = ids.join("\u0000");
    if (!charts[id] || charts[id].key !== key) {
      if (charts[id]) charts[id].plot.destroy();
      const series = [{}, ...ids.map((wid, i) => ({ label: wid, stroke: COLORS[i % COLORS.length], spanGaps: false }))];
      const plot = new uPlot({ width: 500, height: 200, series, scales: { x: { time: true } } }, data, el);
      charts[id] = { plot, key };
    } else {
      charts[id].plot.setData(data);
    }
    el.dataset.points = String(xs.length);
    el.dataset.lastX = xs.length ? String(xs[xs.length - 1]) : "";
  }
}

function render() {
  const cutoff = Date.now() / 1000 - WINDOW_S;
  samples = samples.filter((s) => s.t >= cutoff);
  if (samples.length) renderTable(samples[samples.length - 1]);
  renderCharts();
}

const events = new EventSource("/api/fleet/events");
events.addEventListener("history", (e) => { samples = JSON.parse(e.data).samples; render(); });
events.addEventListener("sample", (e) => { samples.push(JSON.parse(e.data)); render(); });
events.onopen = () => { document.getElementById("conn").textContent = "live"; };
events.onerror = () => { document.getElementById("conn").textContent = "reconnecting..."; };
