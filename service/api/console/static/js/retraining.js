// The retraining loop by eye: feedback streams (counts, snapshots) and policies (trigger,
// gate, runs with each gate check's numbers, the promoted model).

import { api, session } from "./api.js";
import { badge, clear, dl, h, num, table, when } from "./dom.js";

const PAGE = 20;

function stream(s) {
  return h(
    "article",
    { class: "card" },
    h("h3", {}, s.name, session.caller?.admin ? ` (${s.tenant})` : ""),
    dl([
      ["Format", s.format],
      ["Events", String(s.events)],
      ["Duplicates", String(s.duplicates)],
      ["Pairs", String(s.pairs)],
      ["Ratings waiting for a pair", String(s.pending_ratings)],
      ["Snapshots", String(s.snapshots)],
      ["Updated", when(s.updated_at)],
    ]),
    s.recent_snapshots?.length
      ? table(
          ["Version", "Dataset", "Pairs", "By", "Made"],
          s.recent_snapshots.map((snap) =>
            h("tr", {},
              h("td", {}, `v${snap.version}`),
              h("td", {}, h("a", { href: `#/datasets/${snap.dataset.id}` }, snap.dataset.id)),
              h("td", {}, `${snap.dataset.rows} (up to pair ${snap.pairs_end})`),
              h("td", {}, snap.by),
              h("td", {}, when(snap.created_at)),
            ),
          ),
          "Newest snapshots",
        )
      : null,
  );
}

function trigger(t) {
  const parts = [];
  if (t.min_new_pairs) parts.push(`${t.min_new_pairs} new pairs`);
  if (t.cron) parts.push(`cron ${t.cron} (UTC)`);
  if (t.min_interval_seconds) parts.push(`at least ${t.min_interval_seconds} s apart`);
  return parts.join(", ") || "—";
}

function gate(g) {
  const parts = [];
  for (const [metric, bound] of Object.entries(g.at_least || {})) parts.push(`${metric} ≥ ${bound}`);
  for (const [metric, bound] of Object.entries(g.at_most || {})) parts.push(`${metric} ≤ ${bound}`);
  for (const [metric, better] of Object.entries(g.not_worse_than_promoted || {})) {
    parts.push(`${metric} no worse than the promoted run's (${better} is better)`);
  }
  if (g.tolerance) parts.push(`tolerance ${g.tolerance}`);
  return parts.join("; ") || "—";
}

function checks(run) {
  if (!run.gate?.length) return run.decision ? run.decision_reason || "" : "—";
  return h(
    "ul",
    { class: "checks" },
    run.gate.map((c) =>
      h("li", { class: c.passed ? "pass" : "fail" },
        h("strong", {}, c.passed ? "✓ " : "✗ "),
        c.metric ? `${c.metric} ${num(c.value)} vs ${num(c.bound)} (${c.rule})` : c.rule,
        h("small", {}, ` ${c.note}`),
      ),
    ),
  );
}

function evalMetrics(metrics) {
  const shown = Object.entries(metrics).filter(([k]) => k.startsWith("eval_") && !/runtime|per_second/.test(k));
  return shown.map(([k, v]) => `${k} ${num(v)}`).join(", ") || "—";
}

function policy(p) {
  const promoted = p.promoted;
  return h(
    "article",
    { class: "card policy", dataset: { policy: p.name } },
    h("h3", {}, p.name, session.caller?.admin ? ` (${p.tenant})` : "", p.spec.enabled === false ? " (disabled)" : ""),
    dl([
      ["Stream", p.spec.stream],
      ["Trigger", trigger(p.spec.trigger)],
      ["Gate", gate(p.spec.gate)],
      ["Base model", p.spec.template.base_model],
      ["Status", p.status?.message || "—"],
      ["Last fired", when(p.last_fired_at)],
    ]),
    h("h4", {}, "Promoted model"),
    promoted
      ? dl([
          ["Run", `#${promoted.number}`],
          ["Job", h("a", { href: `#/jobs/${promoted.job_id}` }, promoted.job_id)],
          ["Promoted", when(promoted.promoted_at)],
          ["Eval metrics", evalMetrics(promoted.metrics)],
          ["Artifacts", promoted.artifacts.map((a) => `${a.kind}: ${a.uri}`).join("; ") || "—"],
          ["Published", promoted.published?.join(", ") || "—"],
        ])
      : h("p", { class: "muted" }, "None yet."),
    h("h4", {}, "Runs"),
    p.runs?.length
      ? table(
          ["Run", "Fired", "Why", "Job", "Status", "Decision", "Gate checks"],
          [...p.runs].reverse().map((r) =>
            h("tr", { class: "run" },
              h("td", {}, `#${r.number}`),
              h("td", {}, when(r.fired_at)),
              h("td", {}, r.reason),
              h("td", {}, h("a", { href: `#/jobs/${r.job_id}` }, r.job_id)),
              h("td", {}, badge(r.status)),
              h("td", { class: "decision" }, r.decision ? badge(r.decision) : "—", r.decision_reason ? h("small", {}, ` ${r.decision_reason}`) : null),
              h("td", {}, checks(r)),
            ),
          ),
        )
      : h("p", { class: "muted" }, "No runs yet."),
  );
}

export async function retrainingPage(page) {
  // The lists hold the records; each one's page adds the scheduler's status and the snapshots.
  const [streamList, policyList] = await Promise.all([api("/feedback", { query: { limit: PAGE } }), api("/policies", { query: { limit: PAGE } })]);
  const [streams, policies] = await Promise.all([
    // An admin lists every tenant's: each record is read from its own tenant.
    Promise.all(streamList.items.map((s) => api(`/feedback/${encodeURIComponent(s.name)}`, { query: { tenant: s.tenant } }))),
    Promise.all(policyList.items.map((p) => api(`/policies/${encodeURIComponent(p.name)}`, { query: { tenant: p.tenant } }))),
  ]);
  document.title = "Retraining · ftune";
  clear(
    page,
    h("h1", {}, "Retraining"),
    h("section", { "aria-labelledby": "h-policies" },
      h("h2", { id: "h-policies" }, "Policies"),
      policies.length ? policies.map(policy) : h("p", { class: "muted" }, "No policies: PUT /v1/policies/{name} makes one."),
    ),
    h("section", { "aria-labelledby": "h-streams" },
      h("h2", { id: "h-streams" }, "Feedback streams"),
      streams.length ? h("div", { class: "grid" }, streams.map(stream)) : h("p", { class: "muted" }, "No feedback yet: POST /v1/feedback/{stream}."),
    ),
  );
}
