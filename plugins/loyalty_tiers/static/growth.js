/* "At risk, in full" and "Growing" (issue 18), with the campaign CSV link.
   Loaded after app.js and uses its helpers (h, put, byId, n, money, when, day, tierCell, api, showError).
   Counts are for everyone; the lists and the export only for the customer permission. */
"use strict";

const RISK_KIND_LABELS = { next_run: "Next run downgrades", return: "A return would drop", streak: "Streak ends (30-day window)" };
const GROWTH_KIND_LABELS = { moved_up: "Moved up", near_next: "Near the next tier" };
const growthState = {
  risk: { kind: "", offset: 0, limit: 25 },
  grow: { kind: "", offset: 0, limit: 25, runs: 7 },
};

function countsTable(id, counts, labels) {
  const kinds = Object.keys(counts.by_kind);
  const tiers = Object.keys(counts.by_tier[kinds[0]] || {});
  return h("table", { id, class: "kind-counts" },
    h("thead", {}, h("tr", {}, h("th", {}, "Tier"), kinds.map((k) => h("th", { class: "num" }, labels[k] || k)))),
    h("tbody", {},
      tiers.map((t) => h("tr", { "data-tier": t }, h("td", {}, tierCell(t)),
        kinds.map((k) => h("td", { class: "num", "data-kind": k }, n(counts.by_tier[k][t]))))),
      h("tr", { class: "total" }, h("td", {}, h("b", {}, "All tiers")),
        kinds.map((k) => h("td", { class: "num", "data-kind": k, id: `${id}-${k}` }, h("b", {}, n(counts.by_kind[k])))))));
}

function pager(prefix, r, state, load) {
  const pages = Math.max(1, Math.ceil(r.total / r.limit));
  return h("span", {},
    h("button", { type: "button", disabled: r.offset === 0, onclick: () => { state.offset = Math.max(0, state.offset - state.limit); load().catch(showError); } }, "‹ Prev"),
    h("span", { class: "muted", id: `${prefix}-page` }, ` page ${Math.floor(r.offset / r.limit) + 1} / ${pages} `),
    h("button", { type: "button", disabled: r.offset + r.limit >= r.total, onclick: () => { state.offset += state.limit; load().catch(showError); } }, "Next ›"));
}

function kindSelect(id, labels, state, load) {
  const sel = h("select", { id }, h("option", { value: "" }, "All kinds"),
    Object.entries(labels).map(([k, v]) => h("option", { value: k, selected: state.kind === k }, v)));
  sel.addEventListener("change", () => { state.kind = sel.value; state.offset = 0; load().catch(showError); });
  return sel;
}

function customerButton(c) {
  return h("button", { class: "link-button", type: "button", onclick: () => showCustomer(c.customer_id) }, c.name || c.customer_id);
}

function riskDecides(c) {
  if (c.kind === "return") return `A return of the ${money(c.purchase.amount)} purchase of ${day(c.purchase.date)} (returnable until ${day(c.returnable_until)}) drops them; any return of ${money(c.return_needed)} or more does`;
  if (c.kind === "next_run") return `The next run (as of ${day(c.next_run_as_of)}) drops them: their purchase of ${day(c.leaves_window)} leaves the window`;
  return `Drops after ${when(c.drops_after)} unless they buy${c.method === "exact" ? "" : " (at the latest)"}`;
}

function growDecides(c) {
  if (c.kind === "moved_up") return `Moved up from ${c.from} to ${c.to} in the run as of ${day(c.moved_at)}`;
  return `${money(c.amount_needed)} more to ${c.next_tier}`;
}

function entriesTable(id, r, decides, toTier) {
  if (!r.customers_visible) {
    return r.total ? h("p", { class: "muted", id: `${id}-hidden` }, "Who they are is customer data: your Airflow role sees the counts only.") : null;
  }
  if (!r.customers.length) return h("p", { class: "muted" }, r.as_of ? "Nobody on this list." : "No master CSV yet.");
  return h("table", { id },
    h("thead", {}, h("tr", {}, h("th", {}, "Customer"), h("th", {}, "Kind"), h("th", {}, "Tier"), h("th", { class: "num" }, "Lifetime value"),
      h("th", {}, "What decides it"), h("th", {}, "To"))),
    h("tbody", {}, r.customers.map((c) => h("tr", { "data-customer": c.customer_id, "data-kind": c.kind },
      h("td", {}, customerButton(c)), h("td", {}, c.kind), h("td", {}, tierCell(c.tier)), h("td", { class: "num" }, money(c.lifetime_value)),
      h("td", {}, decides(c)), h("td", {}, tierCell(toTier(c)))))));
}

function notes(r) {
  return r.notes && r.notes.length ? h("p", { class: "note", style: "color:var(--warn)" }, r.notes.join(" ")) : null;
}

function exportLink(visible) {
  if (!visible) return h("span", { class: "muted", id: "campaign-export-note" }, "The campaign CSV needs the customer permission.");
  const runs = growthState.grow.runs;
  return h("a", { id: "campaign-export", href: `api/campaign.csv?runs=${runs}`, download: "" }, "Download the campaign CSV (at risk and growing) ⤓");
}

async function loadRiskFull() {
  const s = growthState.risk;
  const r = await api(`api/at-risk-full?limit=${s.limit}&offset=${s.offset}${s.kind ? `&kind=${s.kind}` : ""}`);
  put("risk-full-rule", r.as_of ? `As of ${when(r.as_of)}; next run as of ${when(r.next_run_as_of)}; returns accepted for ${r.return_window_days} days` : "");
  put("risk-full",
    countsTable("risk-full-counts", r.counts, RISK_KIND_LABELS), notes(r),
    h("div", { class: "toolbar" }, kindSelect("risk-full-kind", RISK_KIND_LABELS, s, loadRiskFull),
      h("span", { class: "muted", id: "risk-full-total" }, `${n(r.total)} entries`), h("span", { class: "spacer" }), pager("risk-full", r, s, loadRiskFull)),
    entriesTable("risk-full-table", r, riskDecides, (c) => c.drops_to));
  return r;
}

async function loadGrowing() {
  const s = growthState.grow;
  const r = await api(`api/growing?runs=${s.runs}&limit=${s.limit}&offset=${s.offset}${s.kind ? `&kind=${s.kind}` : ""}`);
  put("growing-rule", `moved up in the last ${r.runs.length} published run${r.runs.length === 1 ? "" : "s"}, or at most ${money(r.distance)} short of the next tier`);
  const runs = h("select", { id: "growing-runs" }, [1, 3, 7, 14, 30].map((v) => h("option", { value: v, selected: v === s.runs }, `last ${v} run${v === 1 ? "" : "s"}`)));
  runs.addEventListener("change", () => { s.runs = Number(runs.value); s.offset = 0; loadGrowing().catch(showError); });
  put("growing",
    countsTable("growing-counts", r.counts, GROWTH_KIND_LABELS), notes(r),
    h("div", { class: "toolbar" }, runs, kindSelect("growing-kind", GROWTH_KIND_LABELS, s, loadGrowing),
      h("span", { class: "muted", id: "growing-total" }, `${n(r.total)} entries`), h("span", { class: "spacer" }), pager("growing", r, s, loadGrowing)),
    entriesTable("growing-table", r, growDecides, (c) => (c.kind === "moved_up" ? c.to : c.next_tier)));
  put("campaign", exportLink(r.customers_visible));
  return r;
}

async function growthMain() {
  put("risk-full", h("p", { class: "muted" }, "Working out returns and the next run from the order store…"));
  put("growing", h("p", { class: "muted" }, "Working out who is growing…"));
  try {
    await Promise.all([loadRiskFull(), loadGrowing()]);
  } catch (err) {
    showError(err);
  } finally {
    document.body.dataset.growthReady = "true";
  }
}

growthMain();
