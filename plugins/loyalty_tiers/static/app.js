/* Loyalty tiers page: vanilla JS, inline SVG charts, no build step, no CDN.
   Every string from the data goes through textContent (customer names come from the POS). */
"use strict";

const TIER_COLORS = {
  "Evergreen": "var(--t-evergreen)", "Bloom": "var(--t-bloom)", "Sprout": "var(--t-sprout)",
  "Seed": "var(--t-seed)", "First Time Buyer": "var(--t-ftb)", "None": "var(--t-none)",
};
const SVGNS = "http://www.w3.org/2000/svg";
const fmtInt = new Intl.NumberFormat("en-US");
const fmtPct = new Intl.NumberFormat("en-US", { style: "percent", maximumFractionDigits: 1 });

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "style") el.setAttribute("style", v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) el.setAttribute(k, String(v));
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function byId(id) { return document.getElementById(id); }
function put(id, ...nodes) { const el = byId(id); el.replaceChildren(...nodes.filter((x) => x !== null && x !== undefined && x !== false)); return el; }
function n(v) { return v === null || v === undefined ? "–" : fmtInt.format(v); }
function money(m) { return m ? "$" + Number(m.dollars).toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 }) : "–"; }
function day(iso) { return iso ? iso.slice(0, 10) : "–"; }
function when(iso) { return iso ? iso.replace("T", " ").replace("Z", " UTC") : "–"; }
function swatch(tier) { return h("span", { class: "swatch", style: `background:${TIER_COLORS[tier] || "var(--t-none)"}` }); }
function tierCell(tier) { return h("span", { class: "tier" }, swatch(tier), tier || "–"); }

async function api(path) {
  const res = await fetch(path, { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (res.status === 401) throw new Error("Your Airflow session has expired: reload the page to log in again.");
  if (res.status === 403 || res.status === 429) {  // the permission or the hourly limit: the server says which
    let detail = "";
    try { detail = (await res.json()).detail; } catch (e) { detail = ""; }
    throw new Error(detail || (res.status === 403 ? "Your Airflow role may not see this." : "Too many requests: try again later."));
  }
  if (!res.ok) throw new Error(`${path}: HTTP ${res.status}`);
  return res.json();
}

function showError(err) {
  const box = byId("error");
  box.hidden = false;
  box.textContent = String(err && err.message ? err.message : err);
}

/* ---------- header, KPIs ---------- */

function badge(text, kind, id) { return h("span", { class: `badge ${kind}`, id }, text); }

function renderHeader(sum) {
  put("run-line", sum.as_of
    ? `As of ${when(sum.as_of)} · run ${sum.run_id || "–"}`
    : "No run yet");
  const badges = [];
  const sync = sum.sync;
  if (sync) {
    if (sync.errors) badges.push(badge(`Sync: ${n(sync.errors)} errors`, "bad", "badge-sync"));
    else if (sync.dry_run) badges.push(badge("Sync: dry run", "warn", "badge-sync"));
    else if (sync.synced === false) badges.push(badge("Sync: not run", "warn", "badge-sync"));
    else badges.push(badge("Sync OK", "good", "badge-sync"));
    if (sync.group_counts_match === true) badges.push(badge("Groups match", "good", "badge-groups"));
    else if (sync.group_counts_match === false) badges.push(badge("Groups do not match", "bad", "badge-groups"));
  } else badges.push(badge("No sync yet", "neutral", "badge-sync"));
  const q = sum.validation;
  if (q) badges.push(q.success ? badge("Data quality passed", "good", "badge-quality") : badge("Data quality FAILED", "bad", "badge-quality"));
  else badges.push(badge("No data-quality result", "neutral", "badge-quality"));
  put("badges", ...badges);
}

function kpi(label, value, id) { return h("div", { class: "kpi" }, h("div", { class: "l" }, label), h("div", { class: "v", id }, value)); }

function renderKpis(sum, risk, movesData) {
  const last = movesData.runs.length ? movesData.runs[movesData.runs.length - 1] : null;
  put("kpis",
    kpi("Customers", n(sum.total_customers), "kpi-customers"),
    kpi("In a tier", n(sum.distribution.filter((d) => d.tier !== "None").reduce((a, d) => a + d.count, 0)), "kpi-tiered"),
    kpi("Upgrades, last run", last ? n(last.upgrades) : "–", "kpi-upgrades"),
    kpi("Downgrades, last run", last ? n(last.downgrades) : "–", "kpi-downgrades"),
    kpi("At risk (30 days)", n(risk.total), "kpi-at-risk"),
  );
}

/* ---------- current distribution ---------- */

function renderDistribution(sum) {
  if (!sum.has_master) { put("distribution", h("p", { class: "muted" }, "No master CSV yet.")); return; }
  const max = Math.max(1, ...sum.distribution.map((d) => d.count));
  const rows = sum.distribution.map((d) => h("div", { class: "bar-row", "data-tier": d.tier },
    h("div", {}, tierCell(d.tier)),
    h("div", { class: "bar-track" }, h("div", { class: "bar-fill", style: `width:${(100 * d.count) / max}%;background:${TIER_COLORS[d.tier] || "var(--t-none)"}` })),
    h("div", { class: "bar-num" }, h("b", { class: "tier-count" }, n(d.count)), h("span", { class: "muted" }, ` · ${fmtPct.format(d.share)}`)),
  ));
  const table = h("table", {},
    h("thead", {}, h("tr", {}, h("th", {}, "Tier"), h("th", { class: "num" }, "Customers"), h("th", { class: "num" }, "Lifetime value"))),
    h("tbody", {}, sum.distribution.map((d) => h("tr", {}, h("td", {}, tierCell(d.tier)), h("td", { class: "num" }, n(d.count)), h("td", { class: "num" }, money(d.lifetime_value))))),
  );
  put("distribution", ...rows, h("details", {}, h("summary", { class: "muted" }, "Lifetime value per tier"), table));
}

/* ---------- charts ---------- */

function niceMax(v) {
  if (v <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function axisY(svg, x0, x1, y0, y1, max, ticks, fmt) {
  for (let i = 0; i <= ticks; i++) {
    const v = (max * i) / ticks;
    const y = y0 - ((y0 - y1) * i) / ticks;
    svg.append(s("line", { x1: x0, x2: x1, y1: y, y2: y, class: "grid-line" }));
    svg.append(s("text", { x: x0 - 6, y: y + 4, "text-anchor": "end" }, fmt(v)));
  }
}

function renderHistory(hist) {
  const pts = hist.points;
  if (!pts.length) { put("history", h("p", { class: "muted" }, "No tier history yet.")); return; }
  const W = 640, H = 260, L = 52, R = 16, T = 12, B = 30;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "Customers per tier over time" });
  const max = niceMax(Math.max(...pts.flatMap((p) => Object.values(p.counts))));
  axisY(svg, L, W - R, H - B, T, max, 4, (v) => fmtInt.format(Math.round(v)));
  const xs = (i) => (pts.length === 1 ? (L + W - R) / 2 : L + ((W - R - L) * i) / (pts.length - 1));
  const ys = (v) => H - B - ((H - B - T) * v) / max;
  const step = Math.max(1, Math.ceil(pts.length / 6));
  pts.forEach((p, i) => {
    const last = i === pts.length - 1;
    if (!last && (i % step !== 0 || pts.length - 1 - i < step)) return;  // keep labels apart
    const x = Math.min(Math.max(xs(i), L + 30), W - R - 30);
    svg.append(s("text", { x, y: H - 10, "text-anchor": "middle" }, day(p.as_of)));
  });
  for (const tier of hist.tiers) {
    const color = TIER_COLORS[tier];
    const coords = pts.map((p, i) => [xs(i), ys(p.counts[tier] || 0)]);
    if (coords.length > 1) svg.append(s("polyline", { points: coords.map((c) => c.join(",")).join(" "), fill: "none", stroke: color, "stroke-width": 2 }));
    const r = pts.length > 60 ? 0 : 3.5;
    coords.forEach(([x, y], i) => { if (r || i === coords.length - 1) svg.append(s("circle", { cx: x, cy: y, r: r || 3, fill: color }, s("title", {}, `${tier} ${day(pts[i].as_of)}: ${pts[i].counts[tier] || 0}`))); });
    if (pts.length <= 3) {  // few runs yet: label the points so the chart still says something
      const [x, y] = coords[coords.length - 1];
      svg.append(s("text", { x: x + 8, y: y + 4 }, `${tier} ${fmtInt.format(pts[pts.length - 1].counts[tier] || 0)}`));
    }
  }
  const legend = h("div", { class: "legend" }, hist.tiers.map((t) => h("span", {}, swatch(t), t)));
  put("history", svg, legend, h("div", { class: "note" }, `${pts.length} run${pts.length === 1 ? "" : "s"} in tier_history.csv`));
}

function renderMoves(data) {
  const runs = data.runs;
  if (!runs.length) { put("moves", h("p", { class: "muted" }, "No runs yet.")); put("moves-table"); return; }
  // Upgrades above the line, downgrades below, on one symmetric scale. New customers (every
  // customer on the first run) are labelled, not drawn: they would dwarf the daily moves.
  const W = 960, H = 200, L = 52, R = 16, T = 18, B = 28;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "Upgrades and downgrades per run" });
  const max = niceMax(Math.max(1, ...runs.map((r) => Math.max(r.upgrades, r.downgrades))));
  const zero = T + (H - B - T) / 2;
  const scale = (H - B - T) / 2 / max;
  svg.append(s("line", { x1: L, x2: W - R, y1: zero, y2: zero, class: "grid-line" }));
  svg.append(s("line", { x1: L, x2: W - R, y1: T, y2: T, class: "grid-line", "stroke-dasharray": "2 4" }));
  svg.append(s("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "grid-line", "stroke-dasharray": "2 4" }));
  svg.append(s("text", { x: L - 6, y: T + 4, "text-anchor": "end" }, `+${fmtInt.format(max)}`));
  svg.append(s("text", { x: L - 6, y: zero + 4, "text-anchor": "end" }, "0"));
  svg.append(s("text", { x: L - 6, y: H - B + 4, "text-anchor": "end" }, `−${fmtInt.format(max)}`));
  const slot = (W - L - R) / Math.max(runs.length, 6);
  const bw = Math.max(3, Math.min(40, slot * 0.6));
  const step = Math.max(1, Math.ceil(runs.length / 10));
  runs.forEach((r, i) => {
    const x = L + slot * i + (slot - bw) / 2;
    const hu = r.upgrades * scale, hd = r.downgrades * scale;
    const tip = `${day(r.as_of)}: ${r.upgrades} upgrades, ${r.downgrades} downgrades, ${r.new} new`;
    const g = s("g", {}, s("title", {}, tip));
    g.append(s("rect", { x: x - 2, y: T, width: bw + 4, height: H - B - T, fill: "transparent" }));
    g.append(s("rect", { x, y: zero - hu, width: bw, height: hu, fill: "var(--good)" }));
    g.append(s("rect", { x, y: zero, width: bw, height: hd, fill: "var(--bad)" }));
    if (r.new) g.append(s("text", { x: x + bw / 2, y: zero - hu - 4, "text-anchor": "middle", style: "fill:var(--t-ftb)" }, `+${fmtInt.format(r.new)} new`));
    svg.append(g);
    if (i % step === 0 || i === runs.length - 1) svg.append(s("text", { x: x + bw / 2, y: H - 8, "text-anchor": "middle" }, day(r.as_of)));
  });
  put("moves", svg, h("div", { class: "legend" },
    h("span", {}, h("span", { class: "swatch", style: "background:var(--good)" }), "upgrades"),
    h("span", {}, h("span", { class: "swatch", style: "background:var(--bad)" }), "downgrades"),
    h("span", {}, h("span", { class: "swatch", style: "background:var(--t-ftb)" }), "new customers (given their first tier), labelled")));
  const recent = runs.slice(-8).reverse();
  put("moves-table", h("table", { id: "moves-runs" },
    h("thead", {}, h("tr", {}, h("th", {}, "Run (as of)"), h("th", { class: "num" }, "Upgrades"), h("th", { class: "num" }, "Downgrades"),
      h("th", { class: "num" }, "New"), h("th", { class: "num" }, "Synced moves"), h("th", {}, "Most common changes"))),
    h("tbody", {}, recent.map((r) => h("tr", { "data-run": r.key },
      h("td", {}, when(r.as_of)), h("td", { class: "num run-upgrades" }, n(r.upgrades)), h("td", { class: "num run-downgrades" }, n(r.downgrades)),
      h("td", { class: "num run-new" }, n(r.new)), h("td", { class: "num" }, n(r.synced_updates)),
      h("td", { class: "muted" }, Object.entries(r.top_transitions).slice(0, 3).map(([k, v]) => `${k}: ${v}`).join(" · ") || "–"))))));
}

/* ---------- sync and data quality ---------- */

function stat(label, value, kind, id) { return h("div", { class: `stat ${kind || ""}` }, h("div", { class: "v", id }, value), h("div", { class: "l" }, label)); }

function renderSync(sync) {
  if (!sync) { put("sync", h("p", { class: "muted" }, "No sync log yet (tier_sync_log.json).")); return; }
  const stats = h("div", { class: "stats" },
    stat("Updated", n(sync.updated), "", "sync-updated"),
    stat("Protected", n(sync.protected), "", "sync-protected"),
    stat("Errors", n(sync.errors), sync.errors ? "bad" : "good", "sync-errors"),
    stat("API requests", n(sync.api_requests), "", "sync-requests"),
    stat("429 responses", n(sync.rate_limited), sync.rate_limited ? "bad" : "", "sync-429"),
    stat("Groups match", sync.group_counts_match === null || sync.group_counts_match === undefined ? "–" : sync.group_counts_match ? "Yes" : "No",
      sync.group_counts_match === false ? "bad" : sync.group_counts_match ? "good" : "", "sync-groups-match"),
  );
  const groups = sync.group_counts.length ? h("table", { id: "group-counts" },
    h("thead", {}, h("tr", {}, h("th", {}, "Group (tier)"), h("th", { class: "num" }, "Expected"), h("th", { class: "num" }, "Actual"),
      h("th", { class: "num" }, "Missing"), h("th", { class: "num" }, "Unexpected"), h("th", {}, ""))),
    h("tbody", {}, sync.group_counts.map((g) => h("tr", {}, h("td", {}, tierCell(g.tier)), h("td", { class: "num" }, n(g.expected)),
      h("td", { class: "num" }, n(g.actual)), h("td", { class: "num" }, n(g.missing)), h("td", { class: "num" }, n(g.unexpected)),
      h("td", {}, g.match ? "✓" : h("b", { style: "color:var(--bad)" }, "✗")))))) : null;
  const notes = [];
  notes.push(`Run ${sync.run_id || "–"}, finished ${when(sync.finished_at)}.`);
  if (sync.dry_run) notes.push("Dry run: nothing was written to Lightspeed.");
  if (sync.skipped_reason) notes.push(`Not synced: ${sync.skipped_reason}.`);
  if (sync.circuit_breaker_tripped) notes.push(`Circuit breaker tripped: ${sync.circuit_breaker_reasons.join("; ")}.`);
  if (sync.changed_in_pos) notes.push(`${sync.changed_in_pos} customers were changed in the POS meanwhile and left alone.`);
  const errs = sync.error_details.length ? h("details", {}, h("summary", { style: "color:var(--bad)" }, `${sync.error_details.length} error details`),
    h("pre", {}, sync.error_details.map((e) => JSON.stringify(e)).join("\n"))) : null;
  put("sync", stats, groups, errs, h("div", { class: "note" }, notes.join(" ")));
}

function renderQuality(q) {
  if (!q) { put("quality", h("p", { class: "muted" }, "No data-quality result yet (validation/latest.json).")); return; }
  const stats = h("div", { class: "stats" },
    stat("Result", q.success ? "Passed" : "Failed", q.success ? "good" : "bad", "quality-result"),
    stat("Checks", n(q.evaluated), "", "quality-evaluated"),
    stat("Passed", n(q.successful), "", "quality-successful"),
    stat("Failed", n(q.failed.length), q.failed.length ? "bad" : "", "quality-failed"),
    stat("Rows checked", n(q.row_count), "", "quality-rows"),
  );
  const note = (c) => c.message || c.description || c.expectation || "";
  const details = q.failed_details.length ? q.failed_details : q.failed.map((f) => ({ expectation: f }));
  const failed = details.length ? h("ul", { id: "quality-failures" }, details.map((c) => h("li", { style: "color:var(--bad)", title: c.description || "" }, note(c)))) : null;
  const warnings = q.warnings.length ? h("div", {}, h("div", { class: "l muted" }, "Warnings (do not block the run):"),
    h("ul", { id: "quality-warnings" }, q.warnings.map((w) => h("li", { style: "color:var(--warn)", title: w.description || "" }, note(w))))) : null;
  const link = q.data_docs
    ? h("p", {}, h("a", { href: "data-docs/index.html", target: "_blank", rel: "noopener", id: "data-docs-link" }, "Open the Data Docs ↗"))
    : h("p", { class: "muted" }, "No Data Docs site was written.");
  put("quality", stats, failed, warnings, link, h("div", { class: "note" }, `Run ${q.run_key || "–"}. ${q.notes.join(" ")}`));
}

/* ---------- at risk ---------- */

const riskState = { offset: 0, limit: 25, days: 30 };

async function loadRisk() {
  const r = await api(`api/at-risk?within_days=${riskState.days}&limit=${riskState.limit}&offset=${riskState.offset}`);
  renderRisk(r);
  return r;
}

function renderRisk(r) {
  put("risk-rule", `Sprout only through ${r.rule.min_purchases}+ purchases in ${r.rule.window_days} days (lifetime value below ${money(r.rule.below_lifetime_value)}): if they buy nothing, they drop once their 3rd-newest purchase leaves the window.`);
  put("risk-count", `${n(r.total)} customer${r.total === 1 ? "" : "s"}`).id = "risk-count";
  const pages = Math.max(1, Math.ceil(r.total / r.limit));
  const page = Math.floor(r.offset / r.limit) + 1;
  put("risk-page", `page ${page} / ${pages}`);
  byId("risk-prev").disabled = r.offset === 0;
  byId("risk-next").disabled = r.offset + r.limit >= r.total;
  // days-left histogram
  if (r.total) {
    const W = 960, H = 90, L = 30, B = 18, T = 8;
    const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "At-risk customers by days left" });
    const counts = new Map(r.by_days_left.map((b) => [b.days_left, b.count]));
    const maxDays = Math.max(r.within_days, 1);
    const max = Math.max(...counts.values());
    const bw = (W - L - 10) / (maxDays + 1);
    for (let d = 0; d <= maxDays; d++) {
      const c = counts.get(d) || 0;
      const hh = ((H - B - T) * c) / max;
      svg.append(s("rect", { x: L + d * bw + 1, y: H - B - hh, width: Math.max(1, bw - 2), height: hh, fill: "var(--warn)" }, s("title", {}, `${c} drop in ${d} days`)));
      if (d % 5 === 0) svg.append(s("text", { x: L + d * bw + bw / 2, y: H - 4, "text-anchor": "middle" }, `${d}d`));
    }
    svg.append(s("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, String(max)));
    put("risk-chart", svg);
  } else put("risk-chart");
  if (!r.customers_visible && r.total) {
    put("risk", h("p", { class: "muted", id: "risk-hidden" }, "Who they are is customer data: your Airflow role sees the counts only."));
    return;
  }
  if (!r.customers.length) {
    put("risk", h("p", { class: "muted" }, r.as_of ? `Nobody drops a tier within ${r.within_days} days.` : "No master CSV yet."));
    return;
  }
  put("risk", h("table", { id: "risk-table" },
    h("thead", {}, h("tr", {}, h("th", {}, "Customer"), h("th", {}, "Code"), h("th", { class: "num" }, "Lifetime value"),
      h("th", { class: "num" }, "Purchases (30 d)"), h("th", {}, "Last order"), h("th", {}, "Drops after"), h("th", { class: "num" }, "Days left"), h("th", {}, "Drops to"))),
    h("tbody", {}, r.customers.map((c) => h("tr", { "data-customer": c.customer_id },
      h("td", {}, h("button", { class: "link-button", type: "button", onclick: () => showCustomer(c.customer_id) }, c.name || c.customer_id)),
      h("td", {}, c.customer_code), h("td", { class: "num" }, money(c.lifetime_value)), h("td", { class: "num" }, n(c.purchases_last_30_days)),
      h("td", {}, day(c.last_order)), h("td", {}, when(c.drops_after), c.method === "exact" ? "" : h("span", { class: "muted", title: "Order store not readable: latest possible date from Last Order" }, " (at the latest)")),
      h("td", { class: "num" }, n(c.days_left)), h("td", {}, tierCell(c.drops_to)))))));
}

/* ---------- search ---------- */

function customerDetail(c) {
  const hist = c.tier_history && c.tier_history.length ? h("table", { class: "tier-history" },
    h("thead", {}, h("tr", {}, h("th", {}, "Run (as of)"), h("th", {}, "From"), h("th", {}, "To"), h("th", {}, ""))),
    h("tbody", {}, c.tier_history.map((e) => h("tr", {}, h("td", {}, when(e.as_of)), h("td", {}, e.from ? tierCell(e.from) : h("span", { class: "muted" }, "(new)")),
      h("td", {}, tierCell(e.to)), h("td", { class: "muted" }, e.kind))))) : h("p", { class: "muted" }, "No tier changes recorded in the run folders.");
  const risk = c.at_risk
    ? h("span", { style: "color:var(--warn)" }, `drops to ${c.at_risk.drops_to} after ${when(c.at_risk.drops_after)} (${c.at_risk.days_left} days) unless they buy`)
    : "no";
  const why = c.explanation;
  const whyBlock = why ? h("div", { id: "customer-why" },
    h("h2", {}, "Why this tier"),
    h("p", { id: "customer-because", "data-rule": why.because.rule }, why.because.text),
    h("h2", {}, "What would change it"),
    h("ul", { id: "customer-next" },
      ...why.next_up.map((s) => h("li", { "data-kind": s.kind, "data-tier": s.tier }, s.text)),
      ...(why.keeps ? [h("li", { "data-kind": "keeps" }, why.keeps.text)] : []),
      ...(why.drops ? [h("li", { "data-kind": "drops" }, why.drops.text)] : []),
      ...(why.next_up.length || why.keeps || why.drops ? [] : [h("li", { class: "muted" }, "Top tier; nothing short of large returns changes it.")])),
    h("p", { class: "muted" }, `As of ${when(why.as_of)}, by the same tier table as the pipeline.`))
    : h("p", { class: "muted" }, "No explanation: the order store could not be read.");
  return h("div", { class: "detail", id: "customer-detail", "data-customer": c.customer_id },
    h("h2", {}, c.name || c.customer_id),
    h("dl", {},
      h("dt", {}, "Tier"), h("dd", { id: "customer-tier" }, tierCell(c.tier)),
      h("dt", {}, "Lifetime value (CLV)"), h("dd", { id: "customer-clv" }, money(c.lifetime_value)),
      h("dt", {}, "Orders"), h("dd", {}, `${c.order_count} (last ${day(c.last_order)}), ${c.purchases_last_30_days} in the last 30 days`),
      h("dt", {}, "Previous tier"), h("dd", {}, c.previous_tier || "–", c.tier_changed_at ? ` (changed ${day(c.tier_changed_at)})` : ""),
      h("dt", {}, "Loyalty member"), h("dd", {}, c.loyalty_member ? "yes" : "no"),
      h("dt", {}, "At risk"), h("dd", {}, risk),
      h("dt", {}, "Customer code"), h("dd", {}, c.customer_code || "–"),
      h("dt", {}, "Email"), h("dd", {}, c.email || "–"),
      h("dt", {}, "Customer id"), h("dd", {}, h("code", {}, c.customer_id))),
    whyBlock,
    h("h2", {}, "Tier history and what the sync did"), h("div", { id: "customer-history" }, hist));
}

async function showCustomer(id) {
  try {
    const c = await api(`api/customers/${encodeURIComponent(id)}`);
    put("customer", customerDetail(c));
    if (typeof showCustomerExtras === "function") showCustomerExtras(c);  // customer.js: sales, runs
    byId("customer").scrollIntoView({ behavior: "smooth", block: "start" });
  } catch (err) { showError(err); }
}

async function doSearch(ev) {
  ev.preventDefault();
  const q = byId("search-q").value.trim();
  put("customer");
  if (q.length < 2) { put("search-status", "Type at least 2 characters."); put("search-results"); return; }
  put("search-status", "Searching…");
  try {
    const r = await api(`api/search?q=${encodeURIComponent(q)}&limit=10`);
    if (!r.total) { put("search-status", "No customer matches."); put("search-results"); return; }
    put("search-status", r.match === "exact" ? `${r.total} match${r.total === 1 ? "" : "es"}` : `${r.total} starting with “${q}”${r.total > r.customers.length ? `, first ${r.customers.length}` : ""}`);
    if (r.customers.length === 1) {  // the customer's own view: the full record, email included
      put("search-results");
      await showCustomer(r.customers[0].customer_id);
      return;
    }
    put("search-results", h("table", { id: "search-table" },
      h("thead", {}, h("tr", {}, h("th", {}, "Customer"), h("th", {}, "Email"), h("th", {}, "Code"), h("th", {}, "Tier"), h("th", { class: "num" }, "Lifetime value"))),
      h("tbody", {}, r.customers.map((c) => h("tr", { "data-customer": c.customer_id },
        h("td", {}, h("button", { class: "link-button", type: "button", onclick: () => showCustomer(c.customer_id) }, c.name || c.customer_id)),
        h("td", { class: "masked-email" }, c.email || "–"),
        h("td", {}, c.customer_code), h("td", {}, tierCell(c.tier)), h("td", { class: "num" }, money(c.lifetime_value)))))));
  } catch (err) { showError(err); put("search-status"); }
}

/* ---------- boot ---------- */

async function main() {
  byId("search-form").addEventListener("submit", doSearch);
  byId("risk-days").addEventListener("change", (e) => { riskState.days = Number(e.target.value); riskState.offset = 0; loadRisk().catch(showError); });
  byId("risk-prev").addEventListener("click", () => { riskState.offset = Math.max(0, riskState.offset - riskState.limit); loadRisk().catch(showError); });
  byId("risk-next").addEventListener("click", () => { riskState.offset += riskState.limit; loadRisk().catch(showError); });
  try {
    const sum = await api("api/summary");
    renderHeader(sum);
    if (!sum.has_data) {
      byId("empty-dir").textContent = sum.data_dir;
      byId("empty").hidden = false;
      return;
    }
    byId("content").hidden = false;
    if (!sum.access.customers) {  // aggregates only: say why, instead of a search that would be refused
      put("search-card", h("h2", {}, "Find a customer"), h("p", { class: "muted", id: "customer-access-note" }, sum.access.message));
    }
    renderDistribution(sum);
    renderSync(sum.sync);
    renderQuality(sum.validation);
    put("risk", h("p", { class: "muted" }, "Working out drop dates from the order store…"));
    // Each section renders as soon as its data arrives (the at-risk dates take longest).
    const hist = api("api/history").then((d) => { renderHistory(d); return d; });
    const movesData = api("api/moves").then((d) => { renderMoves(d); return d; });
    const risk = loadRisk();
    renderKpis(sum, await risk, await movesData);
    await hist;
  } catch (err) {
    showError(err);
  } finally {
    byId("main").setAttribute("aria-busy", "false");
    document.body.dataset.ready = "true";
  }
}

main();
