// Building pages from text: every value goes in as a text node, never as HTML, so a dataset
// row or a model's answer cannot inject markup into the console.

/** h("a", {href: "#/jobs", class: "x"}, "text", child, [more]) */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function clear(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export function when(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  return new Date(seconds * 1000).toLocaleString();
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function num(v, digits = 4) {
  if (v === null || v === undefined) return "—";
  return Number.isInteger(v) ? String(v) : Number(v).toPrecision(digits);
}

export function badge(status) {
  return h("span", { class: `badge ${status}` }, status);
}

/** A Problem Details error as a block: the detail, then each error with its line or place
 * (left out when the detail already says all of it). `alert: false` for a box that is
 * redrawn as the user types, which a screen reader would otherwise announce each time. */
export function problem(err, { alert = true } = {}) {
  const p = err.problem || {};
  const errors = p.errors || [];
  const where = (e) => (e.line ? `${numberedAs(p.container)} ${e.line}` : e.loc ? e.loc.join(".") : "");
  const said = errors.length === 1 && err.message.endsWith(errors[0].msg);
  const items = said ? [] : errors.map((e) => h("li", {}, where(e) ? h("strong", {}, `${where(e)}${e.field ? ` (${e.field})` : ""}: `) : "", e.msg));
  const more = p.total_errors && p.total_errors > items.length ? h("p", {}, `${p.total_errors} problems in all.`) : null;
  return h("div", { class: "error", role: alert ? "alert" : null }, h("p", {}, err.message), items.length ? h("ul", { class: "problems" }, items) : null, more);
}

/** What a dataset error's or warning's number counts (service.contract.numbered_as): a JSONL
 * file's lines, else the rows of a JSON array, Parquet or CSV file. */
export function numberedAs(container) {
  return ["json", "parquet", "csv"].includes(container) ? "row" : "line";
}

/** A message that outlives the page it came from (an upload that ended after the user moved
 * on), in the status region of the header, until it is dismissed or replaced. */
export function notify(...children) {
  const box = document.getElementById("notice");
  const close = h("button", { type: "button", class: "close", "aria-label": "Dismiss" }, "×");
  close.addEventListener("click", () => clear(box));
  clear(box, h("div", { class: "card notice" }, children, close));
}

export function table(headers, rows, caption) {
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      {},
      caption ? h("caption", {}, caption) : null,
      h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, rows),
    ),
  );
}

/** Text with `code` spans (the API's descriptions use them) as text and <code> nodes. */
export function prose(text) {
  return text.split("`").map((part, i) => (i % 2 ? h("code", {}, part) : part));
}

/** A labelled input; its hint is tied to it (aria-describedby) so a screen reader reads it. */
export function field(label, input, hint) {
  const id = input.id || `f-${label.toLowerCase().replace(/[^a-z0-9]+/g, "-")}`;
  input.id = id;
  if (hint) input.setAttribute("aria-describedby", `${id}-hint`);
  return h("div", { class: "field" }, h("label", { for: id }, label), input, hint ? h("small", { id: `${id}-hint` }, prose(hint)) : null);
}

export function dl(pairs) {
  return h("dl", { class: "facts" }, pairs.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}
