/* Loyalty tiers page, the customer view's second half (issue 18): the sales that count and those
   that do not (and why), paged from api/customers/{id}/sales, and the tier history with the sync's
   action on the customer in each run (the detail's `runs`). Uses app.js's helpers (h, put, byId,
   api, when, day, money, tierCell); every string from the data goes through textContent. */
"use strict";

const SALES_PER_PAGE = 10;

function salesTable(kind, data) {
  const rows = data.sales.map((s) => h("tr", { "data-sale": s.sale_id, "data-kind": s.kind },
    h("td", {}, when(s.date)),
    h("td", { class: "num" }, s.amount ? money(s.amount) : "–"),
    h("td", {}, s.status || "–"),
    h("td", { class: "sale-reason" }, s.reason, ...s.notes.map((note) => h("div", { class: "muted sale-note" }, note)))));
  const pager = h("div", { class: "toolbar" },
    h("span", { class: "muted", id: `${kind}-count` }, `${fmtInt.format(data.total)} sale${data.total === 1 ? "" : "s"}`),
    h("span", { class: "spacer" }),
    h("button", { type: "button", id: `${kind}-prev`, disabled: data.page <= 1, onclick: () => loadSales(kind, data.customer_id, data.page - 1) }, "‹ Newer"),
    h("span", { class: "muted", id: `${kind}-page` }, `page ${data.page} / ${data.pages}`),
    h("button", { type: "button", id: `${kind}-next`, disabled: data.page >= data.pages, onclick: () => loadSales(kind, data.customer_id, data.page + 1) }, "Older ›"));
  if (!data.sales.length) return [pager, h("p", { class: "muted" }, "None.")];
  const table = h("table", { id: `${kind}-table` },
    h("thead", {}, h("tr", {}, h("th", {}, "Date"), h("th", { class: "num" }, "Amount"), h("th", {}, "Status"),
      h("th", {}, kind === "sales-counting" ? "How it counts" : "Why it does not count"))),
    h("tbody", {}, rows));
  return [pager, table];
}

async function loadSales(kind, customerId, page) {
  const counting = kind === "sales-counting";
  try {
    const data = await api(`api/customers/${encodeURIComponent(customerId)}/sales?counting=${counting}&page=${page}&per_page=${SALES_PER_PAGE}`);
    const box = put(kind, ...salesTable(kind, data));
    box.dataset.loaded = "true";
    if (counting) {
      put("sales-check", data.matches_master
        ? `These add up to the lifetime value ${money(data.lifetime_value)} and ${data.order_count} order(s) of the master, as of ${when(data.as_of)}.`
        : h("b", { style: "color:var(--bad)" }, `These add up to ${money(data.lifetime_value)} and ${data.order_count} order(s), not the master's figures: the order store changed since the run (re-run the day).`));
    }
  } catch (err) {
    put(kind, h("p", { class: "error-text", style: "color:var(--bad)" }, String(err && err.message ? err.message : err)));
  }
}

function runsTable(runs) {
  if (!runs || !runs.length) return h("p", { class: "muted" }, "No run folders kept (runs/): pruned runs keep counts only.");
  return h("table", { id: "customer-runs", class: "tier-history" },
    h("thead", {}, h("tr", {}, h("th", {}, "Run (as of)"), h("th", {}, "Tier"), h("th", {}, "Change"), h("th", {}, "What the sync did"))),
    h("tbody", {}, runs.map((r) => h("tr", { "data-run": r.run_key, "data-action": r.sync.kind },
      h("td", {}, when(r.as_of), r.published ? "" : h("span", { class: "muted" }, " (not published)")),
      h("td", { class: "run-tier" }, r.tier ? tierCell(r.tier) : "–"),
      h("td", { class: "muted" }, r.change ? `${r.change.from || "(new)"} → ${r.change.to}` : "–"),
      h("td", { class: "run-action" }, r.sync.text)))));
}

/* Called by app.js once the customer's detail is on the page. */
function showCustomerExtras(c) {
  const detail = byId("customer-detail");
  if (!detail) return;
  const history = byId("customer-history");
  if (history) history.replaceChildren(runsTable(c.runs));
  detail.append(
    h("h2", {}, "Sales that count"),
    h("p", { class: "muted", id: "sales-check" }),
    h("div", { id: "sales-counting" }, h("p", { class: "muted" }, "Reading the order store…")),
    h("h2", {}, "Sales that do not count"),
    h("div", { id: "sales-not-counting" }, h("p", { class: "muted" }, "Reading the order store…")));
  loadSales("sales-counting", c.customer_id, 1);
  loadSales("sales-not-counting", c.customer_id, 1);
}
