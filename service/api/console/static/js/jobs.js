// The jobs list: status and label filters, cursor paging, an admin's tenant filter. The
// filters live in the fragment (#/jobs?status=running), so a page can be bookmarked.

import { api, session } from "./api.js";
import { badge, clear, duration, field, h, table, when } from "./dom.js";

const STATUSES = ["", "queued", "running", "succeeded", "failed", "cancelled"];
const PAGE = 20;

function progress(job) {
  const p = job.progress || {};
  if (!p.total_steps) return p.step ? `step ${p.step}` : "—";
  return h(
    "span",
    { class: "progress-cell" },
    h("progress", { max: p.total_steps, value: p.step, "aria-label": `${p.step} of ${p.total_steps} steps` }),
    ` ${p.step}/${p.total_steps}`,
  );
}

function labels(job) {
  const entries = Object.entries(job.spec.labels || {});
  return entries.length ? entries.map(([k, v]) => h("span", { class: "label" }, `${k}=${v}`)) : "—";
}

export function jobRow(job) {
  return h(
    "tr",
    {},
    h("td", {}, h("a", { href: `#/jobs/${job.id}` }, job.id)),
    h("td", {}, badge(job.status)),
    h("td", {}, job.phase || "—"),
    h("td", {}, progress(job)),
    h("td", {}, job.status === "running" ? duration(job.progress?.eta_seconds) : "—"),
    h("td", { class: "wrap" }, job.spec.base_model),
    h("td", {}, job.spec.method || "dpo"),
    h("td", {}, labels(job)),
    h("td", {}, when(job.created_at)),
    session.caller?.admin ? h("td", {}, job.tenant) : null,
  );
}

export async function jobsPage(page, params) {
  const filters = {
    status: params.get("status") || "",
    label: params.get("label") || "",
    tenant: params.get("tenant") || "",
  };
  const cursors = [null]; // cursor of each page seen, to go back
  const status = h("select", { name: "status" }, STATUSES.map((s) => h("option", { value: s, selected: s === filters.status }, s || "any")));
  const label = h("input", { name: "label", value: filters.label, placeholder: "key=value", pattern: "[^=]+=.*" });
  const tenant = session.caller?.admin ? h("input", { name: "tenant", value: filters.tenant, placeholder: "every tenant" }) : null;
  const form = h(
    "form",
    { class: "filters", role: "search", onsubmit: (e) => { e.preventDefault(); apply(); } },
    field("Status", status),
    field("Label", label),
    tenant ? field("Tenant", tenant) : null,
    h("button", { type: "submit" }, "Filter"),
  );
  const results = h("div", { "aria-live": "polite" });
  const prev = h("button", { type: "button", disabled: true, onclick: () => load(cursors.length - 3) }, "← Newer");
  const next = h("button", { type: "button", disabled: true, onclick: () => load(cursors.length - 1) }, "Older →");
  clear(
    page,
    h("div", { class: "page-head" }, h("h1", {}, "Jobs"), h("a", { class: "button", href: "#/new" }, "New job")),
    form,
    results,
    h("div", { class: "pager" }, prev, next),
  );
  document.title = "Jobs · ftune";

  function apply() {
    const q = new URLSearchParams();
    if (status.value) q.set("status", status.value);
    if (label.value.trim()) q.set("label", label.value.trim());
    if (tenant && tenant.value.trim()) q.set("tenant", tenant.value.trim());
    location.hash = `#/jobs${q.toString() ? `?${q}` : ""}`;
  }

  async function load(index) {
    cursors.length = index + 1;
    let list;
    try {
      list = await api("/jobs", {
        query: { status: filters.status, label: filters.label, tenant: filters.tenant, limit: PAGE, cursor: cursors[index] },
      });
    } catch (err) {
      clear(results, h("div", { class: "error", role: "alert" }, err.message));
      return;
    }
    cursors.push(list.next_cursor);
    const headers = ["Job", "Status", "Phase", "Progress", "ETA", "Base model", "Method", "Labels", "Created"];
    if (session.caller?.admin) headers.push("Tenant");
    clear(
      results,
      list.items.length
        ? table(headers, list.items.map(jobRow), `Jobs, newest first (page ${index + 1})`)
        : h("p", { class: "muted" }, "No jobs match."),
    );
    prev.disabled = index === 0;
    next.disabled = !list.next_cursor;
  }

  await load(0);
}
