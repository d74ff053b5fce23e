// Datasets: the list, an upload by drag and drop (or a file picker) that shows the API's
// validation errors line by line, and a dataset's page with its report and preview rows.

import { api, session } from "./api.js";
import { bytes, clear, dl, field, h, notify, numberedAs, problem, table, when } from "./dom.js";

const PREVIEW_ROWS = 10;

function text(value) {
  if (value === undefined || value === null) return "";
  if (typeof value === "string") return value;
  if (typeof value === "boolean") return value ? "true (good)" : "false (bad)";
  // An answer a chat trains on before its completion is marked as the CLI marks it, and the
  // functions a message calls are shown as name(arguments).
  const said = (m) => [m.content, ...(m.tool_calls || []).map((c) => `${c.function.name}(${JSON.stringify(c.function.arguments)})`)].filter(Boolean).join(" ");
  return value.map((m) => `${m.role}${m.weight ? " (trained)" : ""}: ${said(m)}`).join("\n");
}

// The preview's columns for each kind of dataset (what training sees of its rows).
const COLUMNS = {
  preference: [["Prompt", "prompt"], ["Chosen", "chosen"], ["Rejected", "rejected"]],
  sft: [["Prompt", "prompt"], ["Completion", "completion"]],
  unpaired: [["Prompt", "prompt"], ["Completion", "completion"], ["Label", "label"]],
};

// Columns a file of another layout names (the upload's *_field parameters).
const MAPPED = [
  ["prompt_field", "Prompt column"],
  ["chosen_field", "Chosen column"],
  ["rejected_field", "Rejected column"],
  ["system_field", "System column"],
  ["history_field", "History column"],
  ["completion_field", "Completion column (sft, kto)"],
  ["label_field", "Label column (kto)"],
  ["messages_field", "Messages column (sft chats)"],
];

/** A valid dataset name made of a file's name (as the CLI makes one): without its
 * extensions, other characters than a name may hold made `_`. */
export function nameOf(fileName) {
  const stem = fileName.replace(/\.gz$/i, "").replace(/\.[^.]*$/, "") || fileName;
  return stem.replace(/[^\p{L}\p{N}_ .,:()+-]+/gu, "_").trim().slice(0, 128) || "dataset";
}

function uploader(onDone) {
  const name = h("input", { name: "name", maxlength: 128, placeholder: "the file's name" });
  const input = h("input", { type: "file", id: "dataset-file", accept: ".jsonl,.json,.csv,.parquet,.gz,.ndjson", tabindex: "-1" });
  const result = h("div", { "aria-live": "polite", id: "upload-result" });
  const skip = h("input", { type: "checkbox", name: "skip_invalid" });
  const fraction = h("input", { type: "number", name: "max_invalid_fraction", min: 0, max: 1, step: "any", value: "0.01", inputmode: "decimal" });
  const columns = Object.fromEntries(MAPPED.map(([key]) => [key, h("input", { name: key, spellcheck: "false", maxlength: 128 })]));
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
    const from = location.hash; // the user may go on elsewhere while a large file goes up
    clear(result, h("p", { class: "muted" }, `Uploading ${file.name} (${bytes(file.size)})…`));
    const type = /\.csv$/i.test(file.name) ? "text/csv" : file.type || "application/octet-stream";
    const query = { name: name.value.trim() || nameOf(file.name) };
    for (const [key, el] of Object.entries(columns)) query[key] = el.value.trim();
    if (skip.checked) Object.assign(query, { on_invalid: "skip", max_invalid_fraction: fraction.value });
    try {
      const ds = await api("/datasets", { method: "POST", query, body: file, type });
      const link = h("a", { href: `#/datasets/${ds.id}` }, ds.id);
      clear(result, h("p", { class: "ok" }, `Stored ${ds.rows} rows as `, link));
      if (location.hash === from) onDone(ds);
      else notify(h("p", { class: "ok" }, `${file.name}: stored ${ds.rows} rows as `, h("a", { href: `#/datasets/${ds.id}` }, ds.id)));
    } catch (err) {
      clear(result, h("h3", {}, `${file.name} was not stored`), problem(err));
      if (location.hash !== from) notify(h("p", {}, `${file.name} was not stored: ${err.message} `, h("a", { href: from }, "Details")));
    }
    input.value = "";
  }

  return h(
    "section",
    { class: "card", "aria-labelledby": "h-upload" },
    h("h2", { id: "h-upload" }, "Upload"),
    field("Name", name, "Leave it empty to name the dataset after its file."),
    h(
      "details",
      { class: "upload-options" },
      h("summary", {}, "Columns and invalid rows"),
      h("p", { class: "muted" }, "For a file whose layout is not read as it is (README, \"Dataset formats\"): the columns that hold each part."),
      h("div", { class: "columns" }, MAPPED.map(([key, label]) => field(label, columns[key]))),
      h("label", { class: "inline" }, skip, " Leave invalid rows out (listed with the dataset) instead of refusing the file"),
      field("Most invalid rows, as a fraction", fraction, "With invalid rows left out: past this share of the rows the file is refused."),
    ),
    zone,
    input,
    result,
  );
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
      ? h("ul", { class: "warnings" }, ds.warnings.map((w) => h("li", {}, h("strong", {}, `${w.kind} (${w.count}): `), w.msg, w.lines?.length ? ` — ${numberedAs(ds.container)}s ${w.lines.join(", ")}` : "")))
      : h("p", { class: "muted" }, "None."),
    ds.skipped?.length ? [h("h2", {}, "Skipped rows"), h("ul", { class: "problems" }, ds.skipped.map((p) => h("li", {}, h("strong", {}, `${numberedAs(ds.container)} ${p.line}${p.field ? ` (${p.field})` : ""}: `), p.msg)))] : null,
    h("h2", {}, `Preview: the first ${preview.rows.length} rows as training sees them`),
    table(
      ["#", ...columns.map(([title]) => title)],
      preview.rows.map((r, i) => h("tr", {}, h("td", {}, String(i + 1)), ...columns.map(([, key]) => h("td", {}, h("pre", { class: "cell" }, text(r[key])))))),
    ),
  );
}
