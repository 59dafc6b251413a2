// prunepilot dashboard: plain JS over the /v1 API, plotly.js served by the API itself (no CDN).
"use strict";

const state = { key: null, jobs: [], problem: null, data: null, selectedJob: null };
const COLORS = ["#4c6ef5", "#f76707", "#2b8a3e", "#c2255c", "#7048e8", "#0b7285", "#e67700", "#495057"];
const AXIS_LABEL = { macs_ratio: "MACs (share of dense)", latency_ms: "latency (ms, predicted or measured)",
                     size_ratio: "size on disk (share of dense)", params_ratio: "parameters (share of dense)" };
const BUDGET_RESOURCE = { macs_ratio: "flops", size_ratio: "size", params_ratio: "params" };

// ------------------------------------------------------------------ auth & fetch

// The key is kept in this tab's sessionStorage, not localStorage: it is not persisted past the tab.
// A key an earlier version left in localStorage is dropped.
const KEY_ITEM = "prunepilot-key";

function readKey() {
  localStorage.removeItem(KEY_ITEM);
  const m = location.hash.match(/key=([^&]+)/);
  if (m) {
    sessionStorage.setItem(KEY_ITEM, decodeURIComponent(m[1]));
    // out of the address bar and the history; the rest of the fragment (job=...) stays
    const rest = location.hash.slice(1).split("&").filter((part) => !part.startsWith("key=")).join("&");
    history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
  }
  return sessionStorage.getItem(KEY_ITEM);
}

async function api(path) {
  const headers = state.key ? { Authorization: "Bearer " + state.key } : {};
  const r = await fetch(path, { headers });
  if (r.status === 401) { askKey(); throw new Error("unauthorized"); }
  if (!r.ok) { throw new Error(path + ": HTTP " + r.status); }
  return r;
}

function askKey() {
  document.getElementById("keyform").hidden = false;
  document.getElementById("conn").textContent = "an API key is needed";
}

document.getElementById("keyform").addEventListener("submit", (e) => {
  e.preventDefault();
  state.key = document.getElementById("keyinput").value.trim();
  sessionStorage.setItem(KEY_ITEM, state.key);
  document.getElementById("keyform").hidden = true;
  refreshJobs();
});

// ------------------------------------------------------------------ jobs list (live)

const pct = (x) => (x == null ? "" : (100 * x).toFixed(1) + "%");

function finalAcc(job) {
  const f = job.result && job.result.figures && job.result.figures.pruned;
  return f ? pct(f.accuracy) : "";
}

// Every value shown comes from the API and much of it from users (job name, error, arch, data set,
// layer names): the page is built from elements and text nodes only, never from markup strings.
function el(tag, props, ...children) {
  const node = Object.assign(document.createElement(tag), props || {});
  node.append(...children.filter((c) => c != null).map((c) => (c instanceof Node ? c : String(c))));
  return node;
}

// Plotly draws labels through its own small HTML subset (links, bold, ...): escaped, a user's string
// is shown as written rather than interpreted.
function plotlyText(s) {
  return String(s).replace(/[&<>]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;" }[c]));
}

function jobRow(job) {
  const progress = 0.8 * job.progress + 0.2 * job.finetune_progress;
  const fill = el("span");
  fill.style.width = `${(100 * progress).toFixed(0)}%`;
  const created = new Date(job.created_at + (job.created_at.endsWith("Z") ? "" : "Z")).toLocaleString();
  const tr = el("tr", {},
    el("td", { title: job.id }, job.name || job.id.slice(0, 8)),
    el("td", {}, el("span", { className: `status ${job.status}` }, job.status), job.error ? el("div", { className: "error" }, job.error) : null),
    el("td", {}, job.agent), el("td", {}, job.arch), el("td", {}, job.budget), el("td", {}, pct(job.best_accuracy)), el("td", {}, finalAcc(job)),
    el("td", {}, el("span", { className: "bar" }, fill), " ",
      el("span", { className: "progress-text" }, `${(100 * progress).toFixed(0)}% · ${job.evaluations} evals`)),
    el("td", {}, created));
  if (job.phase) { tr.children[1].append(el("div", { className: "muted phase" }, job.phase)); }
  tr.dataset.job = job.id;
  if (state.problem === job.problem_key) tr.classList.add("selected");
  tr.addEventListener("click", () => selectProblem(job.problem_key));
  return tr;
}

function renderJobs() {
  document.getElementById("jobs-empty").hidden = state.jobs.length > 0;
  document.getElementById("jobs").hidden = state.jobs.length === 0;
  document.querySelector("#jobs tbody").replaceChildren(...state.jobs.map(jobRow));
}

async function refreshJobs() {
  try {
    const page = await (await api("/v1/jobs?limit=200")).json();
    state.jobs = page.items;
    document.getElementById("conn").textContent = `${page.total} jobs · updated ${new Date().toLocaleTimeString()}`;
    if (!state.problem) {
      const m = location.hash.match(/job=([0-9a-f]+)/);
      const chosen = (m && state.jobs.find((j) => j.id === m[1])) || state.jobs[0];
      if (chosen) { state.problem = chosen.problem_key; }
    }
    renderJobs();
    await refreshDevices();
    if (state.problem) { await refreshProblem(); }
  } catch (err) { document.getElementById("conn").textContent = String(err.message || err); }
}

// ------------------------------------------------------------------ devices (remote latency targets)

const when = (t) => (t ? new Date(t + (t.endsWith("Z") || t.includes("+") ? "" : "Z")).toLocaleString() : "never");

function deviceRow(d) {
  const jobs = el("td", {});
  d.jobs.forEach((j, i) => {
    const link = el("a", { href: `#job=${j.id}`, title: j.id }, j.name || j.id.slice(0, 8));
    link.addEventListener("click", (e) => {
      e.preventDefault();
      const job = state.jobs.find((x) => x.id === j.id);
      if (job) { selectProblem(job.problem_key); }
    });
    jobs.append(...(i ? [", "] : []), link, " ", el("span", { className: `status ${j.status}` }, j.status));
  });
  const agent = d.connected ? el("span", { className: "status succeeded" }, "connected")
    : el("span", { className: "status cancelled" }, d.fingerprint ? "disconnected" : "never registered");
  return el("tr", {}, el("td", {}, d.name), el("td", {}, agent), el("td", {}, d.backend || ""),
    el("td", { className: "fingerprint" }, d.fingerprint || ""), el("td", {}, when(d.last_seen)), el("td", {}, d.entries),
    el("td", {}, d.calibrations), el("td", {}, `${d.tasks.open} / ${d.tasks.done}`), jobs);
}

async function refreshDevices() {
  const devices = await (await api("/v1/devices")).json();
  document.getElementById("devices-section").hidden = devices.length === 0;
  document.querySelector("#devices tbody").replaceChildren(...devices.map(deviceRow));
}

// ------------------------------------------------------------------ problem view

function selectProblem(key) {
  state.problem = key;
  renderJobs();
  refreshProblem();
}

async function refreshProblem() {
  state.data = await (await api(`/v1/problems/${state.problem}/compare`)).json();
  document.getElementById("problem").hidden = false;
  const d = state.data;
  const limits = Object.entries(d.limits).map(([r, v]) => `${r} ≤ ${(100 * v).toFixed(0)}%`).join(", ");
  document.getElementById("problem-title").textContent = `${d.arch} on ${d.dataset}, ${limits} · ${d.jobs.length} job(s)`;
  renderCharts();
}

function trialsOf(job) {
  const cols = state.data.columns;
  return (state.data.trials[job.id] || []).map((row) => Object.fromEntries(cols.map((c, i) => [c, row[i]])));
}

function paretoFront(points, x) {
  const pts = points.filter((p) => p[x] != null).sort((a, b) => a[x] - b[x] || b.accuracy - a.accuracy);
  const front = [];
  let best = -Infinity;
  for (const p of pts) { if (p.accuracy > best) { front.push(p); best = p.accuracy; } }
  return front;
}

function layout(title, xtitle, ytitle, extra) {
  return Object.assign({ title: { text: title, font: { size: 14 } }, margin: { l: 55, r: 15, t: 40, b: 45 },
    xaxis: { title: { text: xtitle } }, yaxis: { title: { text: ytitle } }, legend: { orientation: "h", y: -0.2 },
    hovermode: "closest" }, extra || {});
}

function renderCharts() {
  const d = state.data;
  const x = document.getElementById("xaxis").value;
  const feasibleOnly = document.getElementById("feasible-only").checked;
  const jobs = d.jobs.slice().reverse();
  const scatter = [], evals = [], time = [], bars = [], sens = [];
  jobs.forEach((job, i) => {
    const color = COLORS[i % COLORS.length];
    const name = plotlyText(`${job.agent}${jobs.filter((j) => j.agent === job.agent).length > 1 ? " " + job.id.slice(0, 6) : ""}`);
    const all = trialsOf(job).filter((t) => t.kind !== "sensitivity" && (!feasibleOnly || t.feasible));
    scatter.push({ type: "scatter", mode: "markers", name, x: all.map((t) => t[x]), y: all.map((t) => t.accuracy),
      marker: { color, size: 6, opacity: 0.65 }, legendgroup: name, meta: { role: "trials", agent: job.agent, job: job.id },
      text: all.map((t) => `step ${t.step}${t.feasible ? "" : " (over budget)"}`) });
    const front = paretoFront(all, x);
    scatter.push({ type: "scatter", mode: "lines", name: name + " Pareto front", x: front.map((t) => t[x]), y: front.map((t) => t.accuracy),
      line: { color, dash: "dot", shape: "hv" }, legendgroup: name, showlegend: false, meta: { role: "pareto", agent: job.agent } });
    const ordered = trialsOf(job).filter((t) => t.kind !== "sensitivity");
    let best = -Infinity, clock = 0;
    const be = [], bt = [], steps = [], times = [];
    for (const t of ordered) {
      clock += t.wall_time_s;
      if (t.feasible && t.accuracy > best) { best = t.accuracy; }
      if (best > -Infinity) { be.push(best); bt.push(best); steps.push(t.step + 1); times.push(clock); }
    }
    evals.push({ type: "scatter", mode: "lines+markers", name, x: steps, y: be, line: { color, shape: "hv" }, marker: { size: 4 } });
    time.push({ type: "scatter", mode: "lines+markers", name, x: times, y: bt, line: { color, shape: "hv" }, marker: { size: 4 } });
    const strat = d.best_strategy[job.id];
    if (strat) {
      bars.push({ type: "bar", name, x: Object.keys(strat).map(plotlyText), y: Object.values(strat), marker: { color } });
    }
    for (const [layer, pts] of Object.entries(groupBy(d.sensitivity[job.id] || [], "layer"))) {
      pts.sort((a, b) => a.ratio - b.ratio);
      sens.push({ type: "scatter", mode: "lines+markers", name: plotlyText(layer), x: pts.map((p) => p.ratio), y: pts.map((p) => p.accuracy) });
    }
  });
  const shapes = [];
  const budgetResource = BUDGET_RESOURCE[x];
  if (budgetResource && d.limits[budgetResource] != null) {
    shapes.push({ type: "line", xref: "x", yref: "paper", x0: d.limits[budgetResource], x1: d.limits[budgetResource], y0: 0, y1: 1,
      line: { color: "#b42318", dash: "dash", width: 1.5 } });
  }
  Plotly.react("scatter", scatter, layout("Every trial: search accuracy vs cost, Pareto front per agent", AXIS_LABEL[x],
    "search accuracy (validation, adaptive BN)", { shapes }), { responsive: true, displaylogo: false });
  Plotly.react("best-evals", evals, layout("Best so far vs evaluations", "evaluations", "best accuracy within budget"),
    { responsive: true, displaylogo: false });
  Plotly.react("best-time", time, layout("Best so far vs wall time", "search time (s, sum of evaluations)", "best accuracy within budget"),
    { responsive: true, displaylogo: false });
  Plotly.react("ratios", bars, layout("Per-layer pruning ratio of each agent's best strategy", "layer (depth order)", "ratio removed",
    { barmode: "group", xaxis: { tickangle: -45, automargin: true } }), { responsive: true, displaylogo: false });
  const sensDiv = document.getElementById("sensitivity");
  sensDiv.hidden = sens.length === 0;
  if (sens.length) {
    Plotly.react("sensitivity", sens, layout("Sensitivity scan: accuracy vs ratio, one layer at a time", "ratio removed", "accuracy"),
      { responsive: true, displaylogo: false });
  }
  renderFinals(jobs);
}

function groupBy(items, key) {
  return items.reduce((acc, it) => { (acc[it[key]] = acc[it[key]] || []).push(it); return acc; }, {});
}

// The final network against each budgeted resource as measured (the report's budget_check);
// blank for a job reported before the check existed.
function budgetCell(check) {
  if (!check) { return ""; }
  const over = Object.entries(check).filter(([, c]) => !c.met);
  if (!over.length) { return "met"; }
  return "over: " + over.map(([r, c]) => `${r} ${c.measured == null ? "not measured" : pct(c.measured)} > ${pct(c.limit)}`).join(", ");
}

function renderFinals(jobs) {
  const rows = [];
  for (const job of jobs) {
    const r = job.result;
    if (!r || !r.figures) { continue; }
    const p = r.figures.pruned, dn = r.figures.dense_finetuned || r.figures.dense;
    const b1 = p.latency_ms["1"];
    const cells = [job.agent, job.id.slice(0, 8), pct(p.accuracy), pct(dn.accuracy), (100 * r.accuracy_drop).toFixed(2),
      pct(r.macs_ratio), pct(r.params_ratio), pct(r.size_ratio), b1 != null ? b1.toFixed(2) + " ms" : "",
      r.latency_speedup["1"] ? r.latency_speedup["1"].toFixed(2) + "x" : "", budgetCell(r.budget_check)];
    rows.push(el("tr", {}, ...cells.map((c) => el("td", {}, c))));
  }
  document.querySelector("#finals tbody").replaceChildren(...rows);
}

async function download(format) {
  const r = await api(`/v1/problems/${state.problem}/export?format=${format}`);
  const url = URL.createObjectURL(await r.blob());
  const a = Object.assign(document.createElement("a"), { href: url, download: `prunepilot-${state.problem}.${format}` });
  document.body.appendChild(a); a.click(); a.remove(); URL.revokeObjectURL(url);
}

document.getElementById("xaxis").addEventListener("change", renderCharts);
document.getElementById("feasible-only").addEventListener("change", renderCharts);
document.getElementById("export-csv").addEventListener("click", () => download("csv"));
document.getElementById("export-json").addEventListener("click", () => download("json"));

state.key = readKey();
refreshJobs();
setInterval(refreshJobs, 2000);
