// Usage page: tokens per project today (bars), the last 14 days (chart) and the top clients, from /api/usage.
// Every name comes from the broker or Redis: it only ever reaches the page as textContent.
"use strict";
const MAX_SERIES = 12;
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
  "#bcbd22", "#17becf", "#393b79", "#637939"];
let chart = null;

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = String(text);
  row.appendChild(td);
  return td;
}

function renderToday(projects) {
  const body = document.querySelector("#today tbody");
  body.replaceChildren();
  const most = Math.max(1, ...projects.map((p) => p.today));
  for (const p of projects) {
    const row = document.createElement("tr");
    row.dataset.project = p.project;
    cell(row, p.project);
    cell(row, p.today.toLocaleString("en"));
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = `${(100 * p.today / most).toFixed(1)}%`;
    cell(row, "").appendChild(bar);
    body.appendChild(row);
  }
}

function renderClients(projects) {
  const body = document.querySelector("#clients tbody");
  body.replaceChildren();
  for (const p of projects) {
    for (const c of p.top) {
      const row = document.createElement("tr");
      row.dataset.client = c.client;
      cell(row, p.project);
      cell(row, c.client);
      cell(row, c.tokens.toLocaleString("en"));
      body.appendChild(row);
    }
  }
}

function renderChart(days, projects) {
  const el = document.getElementById("chart-days");
  const shown = projects.slice(0, MAX_SERIES);
  const xs = days.map((d) => Date.parse(`${d}T12:00:00Z`) / 1000);
  const data = [xs, ...shown.map((p) => p.series)];
  const key = shown.map((p) => p.project).join("\u0000");
  if (!chart || chart.key !== key) {
    if (chart) chart.plot.destroy();
    const series = [{}, ...shown.map((p, i) => ({ label: p.project, stroke: COLORS[i % COLORS.length], width: 2 }))];
    chart = { key, plot: new uPlot({ width: 700, height: 240, series, scales: { x: { time: true } } }, data, el) };
  } else {
    chart.plot.setData(data);
  }
  el.dataset.days = String(xs.length);
}

async function refresh() {
  try {
    const response = await fetch("/api/usage", { cache: "no-store" });
    const usage = await response.json();
    const source = document.getElementById("source");
    source.textContent = usage.error ? `${usage.source}: ${usage.error}` : `from ${usage.source}`;
    renderToday(usage.projects);
    renderClients(usage.projects);
    if (usage.days && usage.days.length) renderChart(usage.days, usage.projects);
  } catch (err) {
    document.getElementById("source").textContent = "reconnecting...";
  }
}

refresh();
setInterval(refresh, 5000);
