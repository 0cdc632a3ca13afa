// The inspector's front end: hash routes, one render function per view, SVG charts
// drawn by hand. Every number comes from the read-only JSON endpoints under /api/.
"use strict";

const COLORS = { api: "#2f6fde", propagation: "#e07b20", batch: "#2a9d5c", structural: "#8a8fa0",
  compressed: "#9b59b6" };
const EXTRA = ["#c0392b", "#16a085", "#7f8c2d", "#d35400", "#34495e"];
const EDGE = { DATA: "#2f6fde", CONTROL: "#e07b20", GPU_SYNC: "#2a9d5c", COMPILER: "#9b59b6" };
const view = document.getElementById("view");
let summary = null;
let liveLsn = 0;
let renders = 0;

function color(source, k) { return COLORS[source] || EXTRA[k % EXTRA.length]; }
function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function qs(params) {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") p.set(k, v);
  const s = p.toString();
  return s ? "?" + s : "";
}
function pageLink(id, lsn) { return `<a href="#/page/${id}${qs({ lsn })}" class="pagelink">${esc(id)}</a>`; }
function lsnLink(page, lsn) { return `<a href="#/page/${page}${qs({ lsn })}" class="lsnlink">${esc(lsn)}</a>`; }

async function api(path) {
  const r = await fetch("/api/" + path);
  const body = await r.json();
  if (!r.ok) throw new Error(`${body.error.type}: ${body.error.message}`);
  return body;
}
function showError(e) {
  const box = document.getElementById("error");
  box.hidden = !e;
  box.textContent = e ? e.message : "";
}

function route() {
  const [path, query] = (location.hash.slice(1) || "/timeline").split("?");
  const parts = path.split("/").filter(Boolean);
  return { name: parts[0] || "timeline", arg: parts[1], params: Object.fromEntries(new URLSearchParams(query || "")) };
}

async function render() {
  const r = route();
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("on", a.dataset.view === r.name);
  showError(null);
  delete view.dataset.done;
  const gen = ++renders;
  try {
    summary = await api("summary");
    document.getElementById("where").textContent =
      `${summary.kind} ${summary.path} · ${summary.pages} pages · last LSN ${summary.last_lsn}`;
    const fn = { timeline, pages, page, graph, stats }[r.name] || timeline;
    await fn(r);
  } catch (e) {
    showError(e);
  }
  // Marks which address the view on screen shows (tests wait for it).
  if (gen === renders) view.dataset.done = location.hash;
}

// -- timeline --------------------------------------------------------------------------
function fmtUs(us, withDate) {
  // Microseconds since the Unix epoch as UTC time (to the microsecond).
  const d = new Date(Math.floor(us / 1000)).toISOString();
  const frac = String(Math.floor(us % 1e6)).padStart(6, "0");
  return (withDate ? d.slice(0, 10) + " " : "") + d.slice(11, 19) + "." + frac;
}

async function timeline(r) {
  const p = r.params;
  const axis = p.axis === "time" ? "time" : "lsn";
  const t = await api("timeline" + qs({ axis: p.axis, lo: p.lo, hi: p.hi, page: p.page, source: p.source, bins: 120 }));
  const spans = t.ranges.filter(Boolean);
  const sel = p.blo ? { lo: p.blo, hi: p.bhi }
    : axis === "lsn" ? { lo: t.lo, hi: t.hi }
    : spans.length ? { lo: spans[0][0], hi: spans[spans.length - 1][1] } : { lo: 1, hi: 0 };
  const log = await api("log" + qs({ lo: sel.lo, hi: sel.hi, page: p.page, source: p.source, limit: 200 }));
  const names = Object.keys(t.series);
  const opts = t.sources.map(s => `<option ${s === p.source ? "selected" : ""}>${esc(s)}</option>`).join("");
  const range = axis === "lsn" ? `LSN ${t.lo} … ${t.hi}` : `${fmtUs(t.lo, true)} … ${fmtUs(t.hi)} UTC`;
  view.innerHTML = `
    <h2>Timeline</h2>
    <div class="controls">
      <span class="toggle">x axis <button id="axis-lsn" class="${axis === "lsn" ? "on" : ""}">LSN</button><button id="axis-time" class="${axis === "time" ? "on" : ""}">time</button></span>
      <label>page <input id="f-page" size="6" value="${esc(p.page || "")}"></label>
      <label>source <select id="f-source"><option value="">all</option>${opts}</select></label>
      <button id="f-apply">filter</button>
      <button id="zoom-out" ${p.lo || p.hi ? "" : "disabled"}>zoom out</button>
      <span class="muted" id="t-range">${esc(range)} · drag across the chart to zoom, click a bar for its records</span>
    </div>
    <div class="legend">${names.map((n, k) => `<span><i style="background:${color(n, k)}"></i>${esc(n)}</span>`).join("")}</div>
    <svg id="chart" width="960" height="220" data-axis="${axis}"></svg>
    <h3>Records (LSN ${esc(sel.lo)} … ${esc(sel.hi)}): ${log.total}${log.truncated ? ", first 200 shown" : ""}</h3>
    <table id="log"><tr><th>LSN</th><th>time</th><th>page</th><th>epoch</th><th>source</th><th>bytes</th><th>kind</th></tr>
    ${log.rows.map(d => `<tr><td>${lsnLink(d.page, d.lsn)}</td><td>${esc(d.time)}</td><td>${pageLink(d.page)}</td>
      <td>${d.base_epoch} → ${d.epoch}</td><td>${esc(d.source)}</td><td>${d.bytes}</td><td>${d.kind}</td></tr>`).join("")}</table>`;
  drawTimeline(t, names, p, axis);
  const go = extra => { location.hash = "#/timeline" + qs({ ...p, ...extra }); };
  document.getElementById("f-apply").onclick = () => go({
    page: document.getElementById("f-page").value.trim(), source: document.getElementById("f-source").value, blo: "", bhi: "" });
  document.getElementById("zoom-out").onclick = () => go({ lo: "", hi: "", blo: "", bhi: "" });
  for (const a of ["lsn", "time"]) {
    document.getElementById("axis-" + a).onclick = () => {
      if (a !== axis) go({ axis: a === "time" ? "time" : "", lo: "", hi: "", blo: "", bhi: "" });
    };
  }
}

function drawTimeline(t, names, p, axis) {
  const svg = document.getElementById("chart");
  const W = 960, H = 220, L = 40, B = 24, n = t.edges.length - 1;
  const totals = Array.from({ length: n }, (_, i) => names.reduce((s, k) => s + t.series[k][i], 0));
  const max = Math.max(1, ...totals);
  const bw = (W - L) / Math.max(1, n);
  const label = i => axis === "lsn" ? `LSN ${t.edges[i]}` : fmtUs(t.edges[i]);
  const binText = i => axis === "lsn" ? `LSN ${t.edges[i]}…${t.edges[i + 1] - 1}`
    : `${fmtUs(t.edges[i])} … ${fmtUs(t.edges[i + 1] - 1)}${t.ranges[i] ? ` (LSN ${t.ranges[i][0]}…${t.ranges[i][1]})` : ""}`;
  let out = `<line x1="${L}" y1="${H - B}" x2="${W}" y2="${H - B}" stroke="#999"/>` +
    `<text x="${L - 4}" y="12" text-anchor="end">${max}</text><text x="${L - 4}" y="${H - B}" text-anchor="end">0</text>`;
  for (let i = 0; i < n; i++) {
    let y = H - B;
    names.forEach((name, k) => {
      const v = t.series[name][i];
      if (!v) return;
      const h = (v / max) * (H - B - 10);
      y -= h;
      out += `<rect class="bar" data-bin="${i}" x="${L + i * bw}" y="${y}" width="${Math.max(1, bw - 1)}" height="${h}" fill="${color(name, k)}"><title>${esc(binText(i))}: ${v} ${esc(name)}${t.times[i] ? "\n" + t.times[i] : ""}</title></rect>`;
    });
  }
  [[0, "start"], [Math.floor(n / 2), "middle"], [n - 1, "end"]].forEach(([i, anchor]) => {
    if (i < 0 || (anchor !== "start" && i === 0)) return;
    const x = anchor === "end" ? L + (i + 1) * bw : L + i * bw;
    out += `<text class="tick" x="${x}" y="${H - 8}" text-anchor="${anchor}">${esc(label(i))}</text>`;
  });
  out += `<rect id="brush" y="0" height="${H - B}" fill="#6cb4ff" opacity="0.3" width="0"/>`;
  svg.innerHTML = out;
  const bin = x => Math.min(n - 1, Math.max(0, Math.floor((x - L) / bw)));
  let start = null;
  const xOf = e => e.clientX - svg.getBoundingClientRect().left;
  svg.onmousedown = e => { start = xOf(e); };
  svg.onmousemove = e => {
    if (start === null) return;
    const b = document.getElementById("brush"), x = xOf(e);
    b.setAttribute("x", Math.min(start, x)); b.setAttribute("width", Math.abs(x - start));
  };
  svg.onmouseup = e => {
    const x = xOf(e), a = bin(Math.min(start ?? x, x)), z = bin(Math.max(start ?? x, x));
    const drag = start !== null && Math.abs(x - start) > 4;
    start = null;
    const base = { axis: p.axis, page: p.page, source: p.source, lo: p.lo, hi: p.hi };
    if (drag) location.hash = "#/timeline" + qs({ ...base, lo: t.edges[a], hi: t.edges[z + 1] - 1 });
    else if (axis === "lsn") location.hash = "#/timeline" + qs({ ...base, blo: t.edges[a], bhi: t.edges[a + 1] - 1 });
    else if (t.ranges[a]) location.hash = "#/timeline" + qs({ ...base, blo: t.ranges[a][0], bhi: t.ranges[a][1] });
  };
}

// -- pages -----------------------------------------------------------------------------
async function pages(r) {
  const list = await api("pages" + qs({ limit: 500 }));
  const sel = r.params.heat || (list.rows[0] && list.rows[0].id);
  const mode = r.params.mode || "count";
  view.innerHTML = `
    <h2>Pages (${list.total}${list.total > list.rows.length ? `, first ${list.rows.length} shown` : ""})</h2>
    <div class="cols"><div>
    <table id="pages"><tr><th>id</th><th>size</th><th>epoch</th><th>location</th><th>deltas</th><th>bytes written</th><th>last LSN</th><th>metadata</th><th>heat</th></tr>
    ${list.rows.map(p => `<tr><td>${pageLink(p.id)}</td><td>${p.size}</td><td>${p.epoch}</td><td>${esc(p.location)}</td>
      <td>${p.deltas}</td><td>${p.bytes_written}</td><td>${p.last_lsn === null ? "" : lsnLink(p.id, p.last_lsn)}</td><td><code>${esc(JSON.stringify(p.metadata))}</code></td>
      <td><a href="#/pages${qs({ heat: p.id, mode, hoff: r.params.hoff })}">show</a></td></tr>`).join("")}</table></div>
    <div id="heatbox"></div></div>
    <div id="heatallbox"></div>`;
  if (sel) await heatmap(sel, mode);
  await heatAcross(r.params, mode);
}

async function heatAcross(params, mode) {
  // One row per page (100 at a time), each page's bytes cut into at most 64 cells.
  const off = Number(params.hoff || 0), limit = 100;
  const h = await api("heat" + qs({ mode, offset: off, limit, cols: 64 }));
  const vals = h.rows.flatMap(row => row.cells).filter(v => v > 0);
  const lo = mode === "recency" && vals.length ? Math.min(...vals) : 0;
  const shade = v => {
    if (!v) return "#eef1f5";
    const f = h.max > lo ? (v - lo) / (h.max - lo) : 1;
    return `hsl(${mode === "count" ? 20 : 210}, 85%, ${80 - 50 * f}%)`;
  };
  const C = 10, LBL = 56;
  let out = "";
  h.rows.forEach((row, k) => {
    const y = k * (C + 1);
    out += `<a href="#/pages${qs({ heat: row.page, mode, hoff: off || "" })}"><text class="hrow" x="${LBL - 6}" y="${y + C - 1}" text-anchor="end">${row.page}</text></a>`;
    const per = Math.ceil(row.size / row.cells.length);
    row.cells.forEach((v, c) => {
      out += `<rect class="hcell" data-page="${row.page}" x="${LBL + c * (C + 1)}" y="${y}" width="${C}" height="${C}" fill="${shade(v)}"><title>page ${row.page}, bytes from ${Math.floor(c * row.size / row.cells.length)} (≈${per} per cell): ${mode === "count" ? `${v} deltas` : v ? `last LSN ${v}` : "not written"}</title></rect>`;
    });
  });
  const more = off + limit < h.total, less = off > 0;
  document.getElementById("heatallbox").innerHTML = `
    <h3>Heat across pages by ${mode} (pages ${h.total ? off + 1 : 0} … ${off + h.rows.length} of ${h.total})</h3>
    <p class="muted">one row per page, its bytes in up to ${h.cols} cells; ${mode === "count" ? "darker: written by more deltas" : "darker: written more recently"}; click a page id for its byte-level map.
      ${less ? `<a id="heat-prev" href="#/pages${qs({ heat: params.heat, mode, hoff: Math.max(0, off - limit) || "" })}">◀ previous pages</a>` : ""}
      ${more ? `<a id="heat-next" href="#/pages${qs({ heat: params.heat, mode, hoff: off + limit })}">next pages ▶</a>` : ""}</p>
    <svg id="heatall" width="${LBL + 64 * (C + 1)}" height="${Math.max(C, h.rows.length * (C + 1))}">${out}</svg>`;
}

async function heatmap(id, mode) {
  const h = await api(`pages/${id}/heat${qs({ mode })}`);
  const other = mode === "count" ? "recency" : "count";
  const shade = v => {
    if (!v) return "#eef1f5";
    const f = h.max ? v / h.max : 0;
    return `hsl(${mode === "count" ? 20 : 210}, 85%, ${85 - 55 * f}%)`;
  };
  document.getElementById("heatbox").innerHTML = `
    <h3>Heat map of page ${pageLink(id)} by ${mode} <a href="#/pages${qs({ heat: id, mode: other })}">(by ${other})</a></h3>
    <p class="muted">${h.size} bytes${h.cell_bytes > 1 ? `, ${h.cell_bytes} per cell` : ""}; ${mode === "count" ? "darker: written more often" : "darker: written more recently"}; max ${h.max}</p>
    <div class="heat" id="heat">${h.cells.map((v, i) => `<div style="background:${shade(v)}" title="byte ${i * h.cell_bytes}: ${mode} ${v}"></div>`).join("")}</div>`;
}

// -- page history ----------------------------------------------------------------------
async function page(r) {
  let id = r.arg;
  if (!id) {
    const list = await api("pages" + qs({ limit: 1 }));
    if (!list.rows.length) { view.innerHTML = "<p>No pages.</p>"; return; }
    id = list.rows[0].id;
  }
  const offset = Number(r.params.offset || 0);
  const v = await api(`pages/${id}/version${qs({ lsn: r.params.lsn, offset, length: 512 })}`);
  const [hist, bl] = await Promise.all([api(`pages/${id}/history`), api(`pages/${id}/blame`)]);
  const k = v.versions.indexOf(v.version_lsn);
  const prev = k > 0 ? v.versions[k - 1] : null;
  const next = k >= 0 && k + 1 < v.versions.length ? v.versions[k + 1] : null;
  view.innerHTML = `
    <h2>Page ${esc(id)} at LSN ${v.lsn}</h2>
    <div class="controls">
      <button id="prev" ${prev === null ? "disabled" : ""}>◀ older</button>
      <span>version written at LSN <b id="vlsn">${v.version_lsn ?? "—"}</b> (${k + 1} of ${v.versions.length})</span>
      <button id="next" ${next === null ? "disabled" : ""}>newer ▶</button>
      <a href="#/timeline${qs({ page: id })}">this page on the timeline</a>
    </div>
    <p class="muted">${v.size} bytes; highlighted: bytes this version changed.
      ${v.size > 512 ? `Bytes ${offset} … ${Math.min(v.size, offset + 512) - 1}; <a href="#/page/${id}${qs({ lsn: r.params.lsn, offset: Math.max(0, offset - 512) })}">before</a> · <a href="#/page/${id}${qs({ lsn: r.params.lsn, offset: offset + 512 })}">after</a>` : ""}</p>
    <div class="hex" id="hex">${hexView(v)}</div>
    <div class="cols"><div>
    <h3>Versions</h3>
    <table id="history"><tr><th>LSN</th><th>epoch</th><th>time</th><th>source</th><th>bytes</th><th>changed</th></tr>
    ${hist.rows.map(h => `<tr><td>${lsnLink(id, h.lsn)}</td><td>${h.epoch}</td><td>${esc(h.time)}</td><td>${esc(h.source)}</td>
      <td>${h.bytes}</td><td><code>${esc(h.preview)}</code></td></tr>`).join("")}</table></div><div>
    <h3>Blame (current bytes)</h3>
    <table id="blame"><tr><th>bytes</th><th>LSN</th><th>time</th><th>source</th><th>value</th></tr>
    ${bl.ranges.map(b => `<tr><td>${b.start} … ${b.stop - 1}</td><td>${b.lsn !== undefined ? lsnLink(id, b.lsn) : ""}</td>
      <td>${esc(b.time || "")}</td><td>${esc(b.source || b.status.replace("_", " "))}</td><td><code>${esc(b.preview_hex)}</code></td></tr>`).join("")}</table>
    </div></div>`;
  document.getElementById("prev").onclick = () => { location.hash = `#/page/${id}${qs({ lsn: prev })}`; };
  document.getElementById("next").onclick = () => { location.hash = `#/page/${id}${qs({ lsn: next })}`; };
}

function hexView(v) {
  const bytes = v.hex.match(/../g) || [];
  const changed = new Set(v.changed);
  let out = "";
  for (let row = 0; row < bytes.length; row += 16) {
    let hex = "", ascii = "";
    for (let i = row; i < Math.min(row + 16, bytes.length); i++) {
      const b = parseInt(bytes[i], 16);
      const ch = b >= 32 && b < 127 ? esc(String.fromCharCode(b)) : ".";
      hex += (changed.has(i) ? `<b>${bytes[i]}</b>` : bytes[i]) + " ";
      ascii += changed.has(i) ? `<b>${ch}</b>` : ch;
    }
    const pad = "   ".repeat(16 - Math.min(16, bytes.length - row));
    out += `${(v.offset + row).toString(16).padStart(8, "0")}  ${hex}${pad} ${ascii}\n`;
  }
  return out || "(empty)";
}

// -- graph -----------------------------------------------------------------------------
async function graph(r) {
  const g = await api("graph" + qs({ lsn: r.params.lsn }));
  view.innerHTML = `
    <h2>Dependency graph at LSN ${g.lsn}${g.lsn === g.last_lsn ? " (now)" : ""}</h2>
    <div class="controls">
      <label>LSN <input id="g-lsn" type="range" min="0" max="${g.last_lsn}" value="${g.lsn}"></label>
      <input id="g-lsn-n" size="7" value="${g.lsn}"> <button id="g-go">show</button>
      <a href="#/graph">now</a>
      <span class="legend">${Object.entries(EDGE).map(([k, c]) => `<span><i style="background:${c}"></i>${k}</span>`).join("")}
        <span><i style="background:#f5b041"></i>stale</span><span><i style="background:#e74c3c"></i>invalidated</span></span>
    </div>
    <svg id="graph" width="960" height="420"></svg>
    <table id="edges"><tr><th>parent</th><th>child</th><th>type</th></tr>
    ${g.edges.map(e => `<tr><td>${pageLink(e.parent)}</td><td>${pageLink(e.child)}</td><td>${e.type}</td></tr>`).join("")}</table>
    ${g.truncated ? `<p class="muted">first ${g.nodes.length} pages shown</p>` : ""}`;
  drawGraph(g);
  const slider = document.getElementById("g-lsn"), box = document.getElementById("g-lsn-n");
  slider.oninput = () => { box.value = slider.value; };
  slider.onchange = () => { location.hash = "#/graph" + qs({ lsn: slider.value }); };
  document.getElementById("g-go").onclick = () => { location.hash = "#/graph" + qs({ lsn: box.value.trim() }); };
}

function drawGraph(g) {
  // Layers by longest path from a root, so every edge points down.
  const depth = new Map(g.nodes.map(n => [n.id, 0]));
  for (let pass = 0; pass < g.nodes.length; pass++) {
    let moved = false;
    for (const e of g.edges) {
      if (depth.get(e.child) < depth.get(e.parent) + 1) { depth.set(e.child, depth.get(e.parent) + 1); moved = true; }
    }
    if (!moved) break;
  }
  const layers = [];
  for (const n of g.nodes) (layers[depth.get(n.id)] ||= []).push(n);
  const pos = new Map();
  const H = Math.max(420, layers.length * 90);
  layers.forEach((layer, d) => layer.forEach((n, i) => pos.set(n.id, [60 + (i + 0.5) * (880 / layer.length), 40 + d * 90])));
  const svg = document.getElementById("graph");
  svg.setAttribute("height", H);
  let out = `<defs><marker id="arrow" viewBox="0 0 10 10" refX="22" refY="5" markerWidth="7" markerHeight="7" orient="auto"><path d="M0,0L10,5L0,10z" fill="#666"/></marker></defs>`;
  for (const e of g.edges) {
    const [x1, y1] = pos.get(e.parent), [x2, y2] = pos.get(e.child);
    out += `<line x1="${x1}" y1="${y1}" x2="${x2}" y2="${y2}" stroke="${EDGE[e.type] || "#666"}" stroke-width="2" marker-end="url(#arrow)"><title>${e.parent} → ${e.child} ${e.type}</title></line>`;
  }
  for (const n of g.nodes) {
    const [x, y] = pos.get(n.id);
    const fill = n.invalidated ? "#e74c3c" : n.stale ? "#f5b041" : n.live ? "#dfe9f7" : "#ddd";
    out += `<a href="#/page/${n.id}"><circle class="node" data-id="${n.id}" cx="${x}" cy="${y}" r="16" fill="${fill}" stroke="#345"/>` +
      `<text x="${x}" y="${y + 4}" text-anchor="middle">${n.id}</text>` +
      `<text x="${x}" y="${y + 30}" text-anchor="middle" class="muted">${esc(n.name)}${n.stale ? " (stale)" : ""}${n.invalidated ? " (invalidated)" : ""}</text></a>`;
  }
  svg.innerHTML = out;
}

// -- stats -----------------------------------------------------------------------------
async function stats() {
  const s = await api("stats");
  const charts = Object.entries(s.latency).map(([kind, h]) => {
    const title = `<h3>${kind.replace("_", " ")} latency (${h.count} samples)</h3>`;
    if (!h.count) return `<div>${title}<p class="muted">no samples in this view</p></div>`;
    return `<div>${title}${barChart(["p50", "p90", "p99", "max"], ["p50", "p90", "p99", "max"].map(q => h[q]), fmtNs)}</div>`;
  }).join("");
  const sizes = s.delta_payload_bytes;
  const w = s.writer;
  const writer = w ? `<h3>Writer latency</h3>
    <p class="muted" id="writer-when">published by the writer (pid ${w.pid}) at ${esc(w.time)}, LSN ${w.last_lsn}; it publishes at checkpoints and about once a second while it writes</p>
    <div class="cols" id="writer">${Object.entries(w.kinds).map(([kind, k]) => {
      const title = `<h3>${kind.replace("_", " ")} (${k.count} since start, ${k.samples} samples kept)</h3>`;
      if (!k.samples) return `<div>${title}<p class="muted">no samples</p></div>`;
      return `<div class="wkind" data-kind="${kind}">${title}${barChart(["p50", "p90", "p99", "max"], [k.p50_ns, k.p90_ns, k.p99_ns, k.max_ns], fmtNs)}
        ${barChart(k.hist.labels, k.hist.counts, String)}</div>`;
    }).join("")}</div>`
    : `<h3>Writer latency</h3><p class="muted" id="writer-when">${esc(s.writer_note)}</p>`;
  view.innerHTML = `<h2>Statistics</h2>
    ${writer}
    <h3>This view</h3>
    <p class="muted">The latency counters below count the work of the process that serves this view (reads), not the writer's;
      the payload histogram is measured from the log itself.</p>
    <div class="cols"><div><h3>delta payload bytes (${sizes.counts.reduce((a, b) => a + b, 0)} deltas)</h3>
      <div id="sizes">${barChart(sizes.labels, sizes.counts, String)}</div></div>${charts}</div>
    <table id="stats">${Object.entries(s.stats).map(([k, v]) => `<tr><th>${esc(k)}</th><td>${esc(v)}</td></tr>`).join("")}</table>`;
}
function barChart(labels, values, fmt) {
  const max = Math.max(1, ...values), w = Math.max(24, Math.min(60, 360 / labels.length));
  const bars = values.map((v, i) => `<rect x="${10 + i * w}" y="${130 - (v / max) * 110}" width="${w - 6}" height="${(v / max) * 110}" fill="#2f6fde"><title>${esc(labels[i])}: ${esc(fmt(v))}</title></rect>
    <text x="${10 + i * w + (w - 6) / 2}" y="146" text-anchor="middle">${esc(labels[i])}</text><text x="${10 + i * w + (w - 6) / 2}" y="${126 - (v / max) * 110}" text-anchor="middle">${esc(fmt(v))}</text>`).join("");
  return `<svg class="chart" width="${20 + labels.length * w}" height="150">${bars}</svg>`;
}
function fmtNs(ns) {
  if (!ns) return "0";
  if (ns < 1e3) return `${Math.round(ns)} ns`;
  if (ns < 1e6) return `${(ns / 1e3).toFixed(1)} µs`;
  return `${(ns / 1e6).toFixed(1)} ms`;
}

// -- live ------------------------------------------------------------------------------
// The feed marks the last event of each LSN with its id; after a dropped connection the
// browser reconnects on its own and sends that id back (Last-Event-ID), so the server
// resumes right after the last LSN this page saw.
let pending = null;
function follow() {
  if (!summary || !summary.live) return;
  liveLsn = summary.last_lsn;
  const badge = document.getElementById("live");
  badge.dataset.events = "0";
  badge.dataset.resumes = "0";
  let opened = false;
  const src = new EventSource("/api/events" + qs({ since: liveLsn }));
  src.onopen = () => {
    if (opened) badge.dataset.resumes = String(Number(badge.dataset.resumes) + 1);
    opened = true;
    badge.classList.add("on");
    badge.textContent = `live · LSN ${liveLsn}`;
  };
  src.onmessage = m => {
    const ev = JSON.parse(m.data);
    liveLsn = Math.max(liveLsn, ev.lsn);
    badge.dataset.events = String(Number(badge.dataset.events) + 1);
    if (m.lastEventId) badge.dataset.lastId = m.lastEventId;
    badge.textContent = `live · LSN ${liveLsn}`;
    // Redraw once per burst; a view pinned to an LSN redraws too (its "now" moved).
    clearTimeout(pending);
    pending = setTimeout(render, 300);
  };
  src.addEventListener("feed-error", m => { badge.classList.remove("on"); badge.textContent = "live feed stopped"; showError(new Error(JSON.parse(m.data))); src.close(); });
  src.onerror = () => { badge.classList.remove("on"); badge.textContent = `reconnecting after LSN ${liveLsn}`; };
}

window.addEventListener("hashchange", render);
render().then(follow);
