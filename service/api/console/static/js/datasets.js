// Datasets: the list, an upload by drag and drop (or a file picker) that shows the API's
// validation errors line by line, and a dataset's page with its report and preview rows.

import { api, session } from "./api.js";
import { bytes, clear, dl, field, h, problem, table, when } from "./dom.js";

const PREVIEW_ROWS = 10;

function text(value) {
  if (value === undefined || value === null) return "";
  if (typeof value === "string") return value;
  if (typeof value === "boolean") return value ? "true (good)" : "false (bad)";
  return value.map((m) => `${m.role}: ${m.content}`).join("\n");
}

// The preview's columns for each kind of dataset (what training sees of its rows).
const COLUMNS = {
  preference: [["Prompt", "prompt"], ["Chosen", "chosen"], ["Rejected", "rejected"]],
  sft: [["Prompt", "prompt"], ["Completion", "completion"]],
  unpaired: [["Prompt", "prompt"], ["Completion", "completion"], ["Label", "label"]],
};

function uploader(onDone) {
  const name = h("input", { name: "name", value: "dataset", required: true, maxlength: 128 });
  const input = h("input", { type: "file", id: "dataset-file", accept: ".jsonl,.json,.csv,.parquet,.gz,.ndjson" });
  const result = h("div", { "aria-live": "polite", id: "upload-result" });
  const zone = h(
    "label",
    { class: "drop", for: "dataset-file", tabindex: "0" },
    h("strong", {}, "Drop a dataset file here"),
    " or press Enter to choose one (JSONL, JSON, CSV, Parquet; gzip allowed)",
  );
  zone.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      input.click();
    }
  });
  for (const kind of ["dragenter", "dragover"]) {
    zone.addEventListener(kind, (e) => {
      e.preventDefault();
      zone.classList.add("over");
    });
  }
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]);
  });
  input.addEventListener("change", () => input.files.length && send(input.files[0]));

  async function send(file) {
    clear(result, h("p", { class: "muted" }, `Uploading ${file.name} (${bytes(file.size)})…`));
    const type = /\.csv$/i.test(file.name) ? "text/csv" : file.type || "application/octet-stream";
    try {
      const ds = await api("/datasets", { method: "POST", query: { name: name.value || file.name }, body: file, type });
      clear(result, h("p", { class: "ok" }, `Stored ${ds.rows} rows as `, h("a", { href: `#/datasets/${ds.id}` }, ds.id)));
      onDone(ds);
    } catch (err) {
      clear(result, h("h3", {}, `${file.name} was not stored`), problem(err));
    }
    input.value = "";
  }

  return h("section", { class: "card", "aria-labelledby": "h-upload" }, h("h2", { id: "h-upload" }, "Upload"), field("Name", name), zone, input, result);
}

function datasetRow(ds) {
  return h(
    "tr",
    {},
    h("td", {}, h("a", { href: `#/datasets/${ds.id}` }, ds.id)),
    h("td", {}, ds.name),
    h("td", {}, String(ds.rows)),
    h("td", {}, ds.format),
    h("td", {}, bytes(ds.bytes)),
    h("td", {}, ds.warnings?.length ? String(ds.warnings.length) : "—"),
    h("td", {}, when(ds.created_at)),
    session.caller?.admin ? h("td", {}, ds.tenant) : null,
  );
}

export async function datasetsPage(page) {
  const list = h("div");
  const cursors = [null];
  const more = h("button", { type: "button", hidden: true, onclick: () => load(true) }, "More");
  clear(page, h("h1", {}, "Datasets"), uploader((ds) => (location.hash = `#/datasets/${ds.id}`)), h("h2", {}, "Stored"), list, more);
  document.title = "Datasets · ftune";
  const rows = [];

  const failed = h("div", { class: "error", role: "alert", hidden: true });
  more.after(failed);

  async function load(next) {
    let found;
    try {
      found = await api("/datasets", { query: { limit: 20, cursor: next ? cursors.at(-1) : null } });
    } catch (err) {
      if (!next) throw err; // the page itself could not load: the router shows why
      failed.hidden = false;
      failed.textContent = `Could not load more datasets: ${err.message}`;
      return;
    }
    failed.hidden = true;
    rows.push(...found.items.map(datasetRow));
    cursors.push(found.next_cursor);
    more.hidden = !found.next_cursor;
    const headers = ["Dataset", "Name", "Rows", "Format", "Size", "Warnings", "Created"];
    if (session.caller?.admin) headers.push("Tenant");
    clear(list, rows.length ? table(headers, rows) : h("p", { class: "muted" }, "No datasets yet: upload one."));
  }
  await load(false);
}

export async function datasetPage(page, id) {
  const ds = await api(`/datasets/${encodeURIComponent(id)}`);
  document.title = `${ds.name} · ftune`;
  const preview = await api(`/datasets/${encodeURIComponent(id)}/rows`, { query: { limit: PREVIEW_ROWS } });
  const columns = COLUMNS[ds.kind] || COLUMNS.preference;
  const stats = ds.stats
    ? Object.entries(ds.stats)
        .filter(([, v]) => v !== null && !(typeof v === "object" && Object.keys(v).length === 0))
        .map(([k, v]) => [k.replace(/_/g, " "), typeof v === "object" ? Object.entries(v).map(([s, n]) => `${s} ${Math.round(n)}`).join(", ") : String(v)])
    : [];
  clear(
    page,
    h("div", { class: "page-head" }, h("h1", {}, ds.name), h("a", { class: "button", href: `#/new?dataset=${ds.id}` }, "Train on it")),
    dl([
      ["Id", h("code", {}, ds.id)],
      ["Format", `${ds.format} (read as ${ds.source_format || "—"}, ${ds.container || "—"}${ds.compressed ? ", gzip" : ""})`],
      ["Rows", String(ds.rows)],
      ["Skipped rows", String(ds.skipped_rows || 0)],
      ["Stored", `${bytes(ds.bytes)} (uploaded ${bytes(ds.source_bytes)})`],
      ["sha256", h("code", { class: "hash" }, ds.sha256)],
      ["Created", when(ds.created_at)],
      ...stats,
    ]),
    h("h2", {}, "Warnings"),
    ds.warnings?.length
      ? h("ul", { class: "warnings" }, ds.warnings.map((w) => h("li", {}, h("strong", {}, `${w.kind} (${w.count}): `), w.msg, w.lines?.length ? ` — lines ${w.lines.join(", ")}` : "")))
      : h("p", { class: "muted" }, "None."),
    ds.skipped?.length ? [h("h2", {}, "Skipped rows"), h("ul", { class: "problems" }, ds.skipped.map((p) => h("li", {}, h("strong", {}, `line ${p.line}${p.field ? ` (${p.field})` : ""}: `), p.msg)))] : null,
    h("h2", {}, `Preview: the first ${preview.rows.length} rows as training sees them`),
    table(
      ["#", ...columns.map(([title]) => title)],
      preview.rows.map((r, i) => h("tr", {}, h("td", {}, String(i + 1)), ...columns.map(([, key]) => h("td", {}, h("pre", { class: "cell" }, text(r[key])))))),
    ),
  );
}
