// lmech lab page: lists runs and sweeps, follows a run's curves while it runs, starts playground runs.
// Everything shown comes from the JSON endpoints of lmech.lab.app; text is always set with textContent.
"use strict";

const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"];
const LIVE = new Set(["starting", "running"]);
const lab = { info: null, selected: null, charts: new Map(), timer: null, token: 0 };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

async function getJSON(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (err) { body = null; }
  if (!response.ok) throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  return body;
}

function fmt(value) {
  if (value === null || value === undefined) return "-";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toPrecision(4);
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function tick(value) {
  if (value === null || value === undefined) return "";
  const size = Math.abs(value);
  return size !== 0 && (size < 1e-2 || size >= 1e5) ? value.toExponential(1) : String(+value.toPrecision(3));
}

function showError(id, message) {
  const node = document.getElementById(id);
  node.textContent = message || "";
  node.hidden = !message;
}

function badge(node, state) {
  node.textContent = state;
  node.className = `badge state-${state}`;
  node.hidden = false;
}

// -- lists ------------------------------------------------------------------------------------------
async function refreshLists() {
  try {
    const [runs, sweeps] = await Promise.all([getJSON("/api/runs"), getJSON("/api/sweeps")]);
    const body = document.querySelector("#runs-table tbody");
    body.replaceChildren(...runs.runs.map((run) => {
      const params = Object.entries(run.params || {}).map(([k, v]) => `${k}=${fmt(v)}`).join(" ");
      const row = el("tr", { dataset: { runId: run.id } },
        el("td", { class: "id" }, run.id), el("td", {}, el("span", { class: `badge state-${run.state}` }, run.state)),
        el("td", {}, run.last_step >= 0 ? run.last_step : "-"), el("td", { class: "small" }, params));
      if (lab.selected && lab.selected.kind === "run" && lab.selected.id === run.id) row.classList.add("selected");
      row.addEventListener("click", () => { location.hash = `run=${encodeURIComponent(run.id)}`; });
      return row;
    }));
    if (!runs.runs.length) body.append(el("tr", {}, el("td", { colspan: "4", class: "muted" }, "no runs yet")));
    const sbody = document.querySelector("#sweeps-table tbody");
    sbody.replaceChildren(...sweeps.sweeps.map((sweep) => {
      const states = Object.entries(sweep.states).map(([k, v]) => `${v} ${k}`).join(", ");
      const row = el("tr", { dataset: { sweep: sweep.name } }, el("td", { class: "id" }, sweep.name),
        el("td", {}, sweep.runs), el("td", { class: "small" }, states));
      row.addEventListener("click", () => { location.hash = `sweep=${encodeURIComponent(sweep.name)}`; });
      return row;
    }));
    if (!sweeps.sweeps.length) sbody.append(el("tr", {}, el("td", { colspan: "3", class: "muted" }, "no sweeps yet")));
  } catch (err) {
    showError("detail-error", `could not list the store: ${err.message}`);
  }
}

// -- playground -------------------------------------------------------------------------------------
async function loadForm(experiment) {
  const box = document.getElementById("pg-fields");
  box.replaceChildren();
  showError("pg-error", "");
  try {
    const form = await getJSON(`/api/playground/${encodeURIComponent(experiment)}`);
    for (const field of form.fields) {
      let input;
      if (field.kind === "choice") {
        input = el("select", { name: field.key, id: `pg-${field.key}` },
          ...field.choices.map((choice) => el("option", { value: choice }, choice)));
        input.value = String(field.default);
      } else {
        input = el("input", { name: field.key, id: `pg-${field.key}`, type: field.kind === "text" ? "text" : "number",
                              step: field.kind === "int" ? "1" : "any", value: String(field.default) });
      }
      box.append(el("label", {}, field.key, input));
    }
  } catch (err) {
    showError("pg-error", err.message);
  }
}

async function startRun(event) {
  event.preventDefault();
  showError("pg-error", "");
  const button = document.getElementById("pg-start");
  const values = {};
  for (const input of document.querySelectorAll("#pg-fields [name]")) values[input.name] = input.value;
  const payload = { experiment: document.getElementById("pg-experiment").value, values,
                    seed: document.getElementById("pg-seed").value };
  button.disabled = true;
  try {
    const started = await getJSON("/api/playground", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(payload) });
    location.hash = `run=${encodeURIComponent(started.id)}`;
    refreshLists();
  } catch (err) {
    showError("pg-error", err.message);
  } finally {
    button.disabled = false;
  }
}

// -- detail: one run ---------------------------------------------------------------------------------
function clearDetail(title) {
  clearTimeout(lab.timer);
  lab.token += 1;
  for (const chart of lab.charts.values()) chart.plot.destroy();
  lab.charts.clear();
  document.getElementById("charts").replaceChildren();
  document.getElementById("more-charts").replaceChildren();
  document.getElementById("more").hidden = true;
  document.getElementById("tables").replaceChildren();
  document.getElementById("figures").replaceChildren();
  document.getElementById("detail-title").textContent = title;
  document.getElementById("detail-message").textContent = "";
  document.getElementById("run-state").hidden = true;
  document.getElementById("report-link").hidden = true;
  showError("detail-error", "");
  return lab.token;
}

function drawPanel(panel, steps, series) {
  const key = panel.title;
  const data = [steps, ...panel.series.map((name) => series[name])];
  const existing = lab.charts.get(key);
  if (existing && existing.names === panel.series.join("|") && existing.logy === panel.logy) {
    existing.plot.setData(data);
    return;
  }
  if (existing) { existing.plot.destroy(); existing.box.remove(); }
  const box = el("div", { class: "chart", dataset: { panel: key } }, el("h4", {}, key));
  document.getElementById(panel.main ? "charts" : "more-charts").append(box);
  const width = Math.max(380, box.clientWidth || 420);
  const opts = {
    width, height: 230,
    scales: { x: { time: false }, y: panel.logy ? { distr: 3 } : {} },
    axes: [{ label: "step" }, { size: 60, values: (u, ticks) => ticks.map(tick) }],
    series: [{ label: "step" }, ...panel.series.map((name, i) => ({
      label: name, stroke: PALETTE[i % PALETTE.length], width: 1.6, spanGaps: true }))],
  };
  const plot = new uPlot(opts, data, box);
  lab.charts.set(key, { plot, box, names: panel.series.join("|"), logy: panel.logy });
}

function table(id, headers, rows) {
  const node = el("table", { id }, el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", {}, h)))));
  const body = el("tbody");
  for (const row of rows) body.append(el("tr", {}, ...row.map((cell) => (cell instanceof Node ? el("td", {}, cell) : el("td", {}, fmt(cell))))));
  node.append(body);
  return node;
}

function renderRunTables(run) {
  const box = document.getElementById("tables");
  box.replaceChildren();
  if (run.checks && run.checks.length) {
    box.append(el("h3", {}, "Checks"), table("checks-table", ["quantity", "predicted", "measured", "rel. err", "tolerance", "pass"],
      run.checks.map((c) => [c.quantity, c.predicted, c.measured, c.rel_err, c.tolerance,
        el("span", { class: c.passed ? "pass" : "fail" }, c.passed ? "PASS" : "FAIL")])));
  }
  const result = Object.entries(run.result || {});
  if (result.length) box.append(el("h3", {}, "Result"), table("result-table", ["quantity", "value"], result));
  const config = Object.entries(run.config || {});
  if (config.length) {
    box.append(el("details", { id: "config" }, el("summary", {}, `Config (${config.length} keys, seed ${run.seed})`),
      table("config-table", ["key", "value"], [["seed", run.seed], ...config])));
  }
  const figures = document.getElementById("figures");
  figures.replaceChildren(...(run.figures || []).map((name) => el("img", {
    src: `/api/runs/${encodeURIComponent(run.id)}/figures/${encodeURIComponent(name)}?t=${Date.now()}`, alt: name })));
}

async function followRun(id) {
  const token = clearDetail(id);
  let last = null;
  const poll = async () => {
    if (token !== lab.token) return;
    try {
      // status first, then metrics: a run reads "done" only after its last metrics are written, so the
      // metrics fetched after a final status are complete (fetched together, they could predate it)
      const run = await getJSON(`/api/runs/${encodeURIComponent(id)}`);
      const metrics = await getJSON(`/api/runs/${encodeURIComponent(id)}/metrics`);
      if (token !== lab.token) return;
      showError("detail-error", "");
      badge(document.getElementById("run-state"), run.state);
      const status = run.status || {};
      const step = status.last_step >= 0 ? `step ${status.last_step}` : "";
      document.getElementById("detail-message").textContent = [run.experiment, step, status.message].filter(Boolean).join(" · ");
      for (const panel of metrics.panels) drawPanel(panel, metrics.step, metrics.series);
      const others = metrics.panels.filter((panel) => !panel.main).length;
      document.getElementById("more").hidden = others === 0;
      document.getElementById("more-summary").textContent = `${others} more panels: every other logged scalar`;
      if (!LIVE.has(run.state)) {
        const link = document.getElementById("report-link");
        link.href = `/runs/${encodeURIComponent(id)}/report`;
        link.hidden = false;
      }
      if (run.state !== last) { renderRunTables(run); last = run.state; }
      if (LIVE.has(run.state)) lab.timer = setTimeout(poll, lab.info.poll_ms);
      else refreshLists();
    } catch (err) {
      showError("detail-error", err.message);
      if (LIVE.has(last)) lab.timer = setTimeout(poll, 3 * lab.info.poll_ms);  // a live run: try again
    }
  };
  await poll();
}

// -- detail: one sweep -------------------------------------------------------------------------------
async function showSweep(name) {
  const token = clearDetail(name);
  try {
    const sweep = await getJSON(`/api/sweeps/${encodeURIComponent(name)}`);
    if (token !== lab.token) return;
    document.getElementById("detail-message").textContent =
      `${sweep.experiment} · grid ${sweep.grid_keys.join(", ") || "-"} · ${sweep.rows.length} runs`;
    const link = document.getElementById("report-link");
    link.href = `/sweeps/${encodeURIComponent(name)}/report`;
    link.hidden = false;
    const columns = sweep.columns.filter((c) => c !== "message" && c !== "ran");
    document.getElementById("tables").append(el("h3", {}, "Runs"),
      table("sweep-table", columns, sweep.rows.map((row) => columns.map((c) => row[c]))));
  } catch (err) {
    showError("detail-error", err.message);
  }
}

function route() {
  const hash = location.hash.slice(1);
  const [kind, ...rest] = hash.split("=");
  const id = decodeURIComponent(rest.join("="));
  if (kind === "run" && id) { lab.selected = { kind, id }; followRun(id); }
  else if (kind === "sweep" && id) { lab.selected = { kind, id }; showSweep(id); }
  for (const row of document.querySelectorAll("#runs-table tbody tr")) {
    row.classList.toggle("selected", kind === "run" && row.dataset.runId === id);
  }
}

async function init() {
  try {
    lab.info = await getJSON("/api/info");
  } catch (err) {
    showError("detail-error", `the lab server did not answer: ${err.message}`);
    return;
  }
  document.getElementById("root").textContent = lab.info.root;
  const select = document.getElementById("pg-experiment");
  select.replaceChildren(...lab.info.playground.map((name) => el("option", { value: name }, name)));
  select.addEventListener("change", () => loadForm(select.value));
  if (lab.info.playground.length) await loadForm(select.value);
  document.getElementById("pg-form").addEventListener("submit", startRun);
  window.addEventListener("hashchange", route);
  await refreshLists();
  setInterval(refreshLists, 3000);
  route();
}

init();
