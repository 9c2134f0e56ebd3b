/* The "Tier sync" tab of one DAG run (the plugin's dag_run external view): vanilla JS, no build step.
   The UI opens run?dag_id=..&run_id=.. in an iframe; the API answers from the run's folder. Every
   section says why it is empty (not reached, pruned); every string goes through textContent. */
"use strict";

const fmt = new Intl.NumberFormat("en-US");
const DIRECTIONS = [["upgrade", "Upgrades"], ["downgrade", "Downgrades"], ["new tier", "New"], ["re-assert", "Re-asserted"]];
const KINDS = [["upgrade", "Upgrades"], ["downgrade", "Downgrades"], ["new", "New"], ["other", "Other"]];

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined && v !== false) el.setAttribute(k, String(v));
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
function byId(id) { return document.getElementById(id); }
function put(id, ...nodes) { byId(id).replaceChildren(...nodes.filter((x) => x)); }
function n(v) { return v === null || v === undefined ? "not recorded" : fmt.format(v); }
function when(iso) { return iso ? iso.replace("T", " ").replace("Z", " UTC") : "not recorded"; }
function stat(label, value, id, kind) { return h("div", { class: `stat ${kind || ""}` }, h("div", { class: "v", id }, value), h("div", { class: "l" }, label)); }
function row(label, value, id) { return [h("dt", {}, label), h("dd", { id }, value)]; }

/* A section with nothing to show says why, and whether the run did not reach it or was pruned. */
function unavailable(section, id) {
  const what = section.state === "pruned" ? "Pruned" : "Not available";
  return h("p", { class: "muted missing", id: `${id}-missing`, "data-state": section.state }, h("b", {}, `${what}: `), section.reason);
}

function byTierTable(id, rows, kinds) {
  return h("table", { id },
    h("thead", {}, h("tr", {}, h("th", {}, "Tier"), kinds.map(([, label]) => h("th", { class: "num" }, label)))),
    h("tbody", {}, rows.map((r) => h("tr", { "data-tier": r.tier }, h("td", {}, r.tier),
      kinds.map(([k]) => h("td", { class: "num", "data-kind": k }, n(r[k])))))));
}

function renderPlan(p) {
  if (p.state !== "ok") { put("plan", unavailable(p, "plan")); return; }
  const b = p.circuit_breaker;
  const verdict = !b ? h("p", { id: "plan-breaker" }, "Circuit breaker: not recorded in the plan")
    : h("p", { id: "plan-breaker", class: b.tripped ? "bad" : "good" },
      b.tripped ? (b.allowed_by_param ? "Circuit breaker: tripped, overridden by allow_mass_change" : "Circuit breaker: tripped")
        : "Circuit breaker: not tripped",
      ` (${n(b.changes)} of ${n(b.managed)} managed customers change group, limit ${Math.round((b.max_move_fraction || 0) * 100)}%; ` +
      `${n(b.downgrades)} downgrades, limit ${n(b.max_downgrades)})`,
      (b.reasons || []).length ? h("ul", {}, b.reasons.map((r) => h("li", {}, r))) : null);
  const flags = [];
  if (p.dry_run) flags.push("dry run: nothing written");
  if (p.writes_allowed === false && p.skipped_reason) flags.push(`writes skipped: ${p.skipped_reason}`);
  if (p.left_out_by_approval) flags.push(`left out by the approval: ${n(p.left_out_by_approval.downgrades)} downgrades`);
  put("plan",
    h("div", { class: "stats" }, stat("Planned moves", n(p.planned_moves), "plan-planned"),
      DIRECTIONS.map(([k, label]) => stat(label, n(p.by_direction[k]), `plan-${k.replace(" ", "-")}`))),
    verdict,
    p.by_tier.length ? byTierTable("plan-by-tier", p.by_tier, DIRECTIONS) : h("p", { class: "muted" }, "The plan moves nobody."),
    flags.length ? h("p", { class: "note", id: "plan-flags" }, flags.join(" · ")) : null);
}

const APPROVAL_TEXT = {
  not_needed: "Not needed", requested: "Waiting for an answer", approved_all: "Approved: apply all",
  approved_upgrades_only: "Approved: upgrades only", aborted: "Aborted", timed_out: "Timed out: nothing written",
  failed: "Could not be answered",
};

function renderApproval(a) {
  if (a.state !== "ok") { put("approval", unavailable(a, "approval")); return; }
  const items = [row("Decision", APPROVAL_TEXT[a.status] || a.status, "approval-status")];
  if (a.status === "not_needed") items.push(row("Why", a.reason, "approval-reason"));
  if (a.requested_at) items.push(row("Asked at", when(a.requested_at), "approval-asked"));
  if (a.deadline) items.push(row("Deadline", when(a.deadline), "approval-deadline"));
  if (a.option) items.push(row("Option", a.option, "approval-option"));
  if (a.responded_by) items.push(row("Decided by", a.responded_by, "approval-by"));
  if (a.responded_at && a.status !== "requested") items.push(row("Decided at", when(a.responded_at), "approval-at"));
  if (a.comment) items.push(row("Comment", a.comment, "approval-comment"));
  if (a.reason && a.status !== "not_needed") items.push(row("Reason", a.reason, "approval-why"));
  put("approval", h("div", { class: "detail" }, h("dl", {}, items.flat())));
}

function renderMoves(m) {
  if (m.state !== "ok" && m.state !== "pruned") { put("moves", unavailable(m, "moves")); return; }
  put("moves",
    m.state === "pruned" ? unavailable(m, "moves") : null,
    h("div", { class: "stats" }, stat("Tier changes", n(m.changes), "moves-changes"),
      KINDS.map(([k, label]) => stat(label, n(m.by_direction[k]), `moves-${k}`))),
    m.by_tier.length ? byTierTable("moves-by-tier", m.by_tier, KINDS) : h("p", { class: "muted" }, "No customer changed tier in this run."));
}

function renderSync(s) {
  if (s.state !== "ok" && !(s.state === "pruned" && s.written !== undefined)) { put("sync", unavailable(s, "sync")); return; }
  const state = s.dry_run ? "Dry run: nothing written" : s.synced ? "Synced" : `Not synced${s.skipped_reason ? `: ${s.skipped_reason}` : ""}`;
  const failures = s.failures || [];
  put("sync",
    s.state === "pruned" ? unavailable(s, "sync") : null,
    h("p", { id: "sync-state" }, state),
    h("div", { class: "stats" },
      stat("Written", n(s.written), "sync-written", "good"),
      stat("Failed", n(s.failed), "sync-failed", s.failed ? "bad" : ""),
      stat("Skipped", n(s.skipped), "sync-skipped"),
      stat("Protected", n(s.protected), "sync-protected"),
      stat("Changed in POS", n(s.changed_in_pos), "sync-changed")),
    s.group_counts_match === true || s.group_counts_match === false
      ? h("p", { id: "sync-groups" }, s.group_counts_match ? "Group counts match the CSV" : "Group counts do NOT match the CSV") : null,
    failures.length ? h("table", { id: "sync-failures" },
      h("thead", {}, h("tr", {}, h("th", {}, "Customer id"), h("th", {}, "Error"))),
      h("tbody", {}, failures.map((f) => h("tr", {}, h("td", {}, f.customer_id), h("td", {}, f.error))))) : null,
    s.failures_total > failures.length ? h("p", { class: "note" }, `${n(s.failures_total - failures.length)} more failures in the sync log`) : null);
}

function renderValidation(v) {
  if (v.state !== "ok" && !(v.state === "pruned" && v.success !== undefined)) { put("validation", unavailable(v, "validation")); return; }
  put("validation",
    v.state === "pruned" ? unavailable(v, "validation") : null,
    h("p", {}, h("b", { id: "validation-result", class: v.success ? "good" : "bad" }, v.success ? "Passed" : "Failed"),
      v.evaluated !== undefined ? ` · ${n(v.successful)} of ${n(v.evaluated)} expectations met on ${n(v.row_count)} rows` : ""),
    (v.failed_details || []).length ? h("ul", { id: "validation-failed" }, v.failed_details.map((d) =>
      h("li", { "data-expectation": d.expectation }, h("b", {}, d.expectation), d.message ? `: ${d.message}` : "",
        d.unexpected_count !== undefined ? ` (${n(d.unexpected_count)} unexpected)` : ""))) : null,
    (v.warnings || []).length ? h("p", { class: "note" }, `Warnings: ${v.warnings.map((w) => w.expectation).join(", ")}`) : null);
}

async function main() {
  const params = new URLSearchParams(location.search);
  const dagId = params.get("dag_id") || "", runId = params.get("run_id") || "";
  try {
    if (!runId) throw new Error("No run id in the address: open this page from a DAG run's \"Tier sync\" tab.");
    const res = await fetch(`api/runs/${encodeURIComponent(runId)}?dag_id=${encodeURIComponent(dagId)}`,
      { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (res.status === 401) throw new Error("Your Airflow session has expired: reload the page to log in again.");
    if (!res.ok) {
      let detail = "";
      try { detail = (await res.json()).detail; } catch (e) { detail = ""; }
      throw new Error(detail || `HTTP ${res.status}`);
    }
    const run = await res.json();
    put("run-line", run.as_of ? `Run ${run.run_id} · as of ${when(run.as_of)} · folder runs/${run.key}/` : `Run ${run.run_id}`);
    const notice = byId("notice");
    if (run.message) { notice.hidden = false; notice.replaceChildren(h("p", { id: "notice-text" }, run.message)); }
    if (run.found === "folder" || run.found === "pruned") {
      byId("content").hidden = false;
      renderPlan(run.plan); renderApproval(run.approval); renderMoves(run.moves); renderSync(run.sync); renderValidation(run.validation);
    }
    document.body.dataset.found = run.found;
  } catch (err) {
    const box = byId("error");
    box.hidden = false;
    box.textContent = String(err && err.message ? err.message : err);
  } finally {
    byId("main").setAttribute("aria-busy", "false");
    document.body.dataset.ready = "true";
  }
}

main();
