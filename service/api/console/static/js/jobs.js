// The jobs list: status and label filters, cursor paging, an admin's tenant filter. The
// filters and the page live in the fragment (#/jobs?status=running&cursor=...), so a page can
// be bookmarked and Back returns to the page a job was opened from. While a job in view is
// queued or running, the page is read again every few seconds.

import { api, session } from "./api.js";
import { badge, clear, duration, field, h, table, when } from "./dom.js";

const STATUSES = ["", "queued", "running", "succeeded", "failed", "cancelled"];
const PAGE = 20;
const REFRESH_MS = 5000;
const IDLE_REFRESH_MS = 15000;

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
  const cursor = params.get("cursor");
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
  const prev = h("button", { type: "button", disabled: !cursor, onclick: () => go(null) }, "← Newest");
  const next = h("button", { type: "button", disabled: true }, "Older →");
  clear(
    page,
    h("div", { class: "page-head" }, h("h1", {}, "Jobs"), h("a", { class: "button", href: "#/new" }, "New job")),
    form,
    results,
    h("div", { class: "pager" }, prev, next),
  );
  document.title = "Jobs · ftune";

  function go(at, { fromFilters = false } = {}) {
    const q = new URLSearchParams();
    const shown = fromFilters ? { status: status.value, label: label.value.trim(), tenant: tenant?.value.trim() || "" } : filters;
    for (const [k, v] of Object.entries(shown)) if (v) q.set(k, v);
    if (at) q.set("cursor", at);
    location.hash = `#/jobs${q.toString() ? `?${q}` : ""}`;
  }
  const apply = () => go(null, { fromFilters: true });

  let timer = null;
  let left = false;
  async function load() {
    if (document.hidden && results.childNodes.length) {
      timer = setTimeout(load, REFRESH_MS); // nobody is looking: no request
      return;
    }
    let list = null;
    let unanswered = false;
    try {
      list = await api("/jobs", {
        query: { status: filters.status, label: filters.label, tenant: filters.tenant, limit: PAGE, cursor },
      });
    } catch (err) {
      clear(results, h("div", { class: "error", role: "alert" }, err.message));
      unanswered = err.status === 0; // a refusal (a stale cursor, a 403) would only repeat
    }
    if (left) return;
    if (list) {
      const headers = ["Job", "Status", "Phase", "Progress", "ETA", "Base model", "Method", "Labels", "Created"];
      if (session.caller?.admin) headers.push("Tenant");
      clear(
        results,
        list.items.length
          ? table(headers, list.items.map(jobRow), cursor ? "Jobs, newest first (an older page)" : "Jobs, newest first")
          : h("p", { class: "muted" }, "No jobs match."),
      );
      next.disabled = !list.next_cursor;
      next.onclick = () => go(list.next_cursor);
    }
    // Moving jobs (or an answer that did not come) are read again; an older page of finished
    // jobs does not change and is left alone, but the newest page gets the jobs submitted
    // since (by a teammate, the CLI, a policy), less often.
    const moving = unanswered || (list && list.items.some((j) => j.status === "queued" || j.status === "running"));
    if (moving) timer = setTimeout(load, REFRESH_MS);
    else if (!cursor) timer = setTimeout(load, IDLE_REFRESH_MS);
  }

  await load();
  return () => {
    left = true;
    clearTimeout(timer);
  };
}
