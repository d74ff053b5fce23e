// The new-job form: the common fields with the API's own defaults, bounds and help text (read
// from the OpenAPI document, so they cannot drift from the contract), the GPU memory estimate
// before submitting, and the exact JSON that will be POSTed.

import { api, session } from "./api.js";
import { clear, field, h, problem } from "./dom.js";

let schemas = null;
async function contract() {
  if (!schemas) {
    const resp = await fetch("/docs/openapi.json", { cache: "no-store" });
    schemas = (await resp.json()).components.schemas;
  }
  return schemas;
}

function numberInput(prop, name, { optional = false } = {}) {
  const min = prop.minimum ?? prop.exclusiveMinimum;
  const input = h("input", {
    type: "number",
    name,
    step: "any",
    min: min ?? null,
    max: prop.maximum ?? null,
    inputmode: "decimal",
    value: prop.default ?? "",
    placeholder: optional ? "not set" : null,
  });
  return input;
}

function hint(prop) {
  const def = prop.default === undefined ? "" : ` Default: ${JSON.stringify(prop.default)}.`;
  return `${prop.description || ""}${def}`;
}

// What a dataset's rows are, in the dataset list: which methods can train on it.
const KINDS = { preference: "preference pairs", sft: "prompt/completion rows (sft)", unpaired: "rated completions (kto)" };

/** A random key; crypto.randomUUID exists only on https or localhost, and a console may be
 * served over plain http inside a cluster. */
function newKey() {
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

function isObject(v) {
  return v && typeof v === "object" && !Array.isArray(v);
}

function merge(into, extra) {
  for (const [k, v] of Object.entries(extra)) {
    if (isObject(v) && isObject(into[k])) merge(into[k], v);
    else into[k] = v;
  }
  return into;
}

export async function newJobPage(page, params) {
  const s = await contract();
  const tpl = s.JobTemplate.properties;
  const hp = s.Hyperparameters.properties;
  const lora = s.Lora.properties;
  const quant = s.Quantization.properties;
  // A job trains on its own tenant's data: an admin's list is narrowed to the admin's tenant.
  const datasets = await api("/datasets", { query: { limit: 100, tenant: session.caller?.admin ? session.caller.tenant : null } });
  const wanted = params.get("dataset");
  if (wanted && !datasets.items.some((d) => d.id === wanted)) {
    // "Train on it" on a dataset older than the newest 100: fetched on its own.
    try {
      datasets.items.unshift(await api(`/datasets/${encodeURIComponent(wanted)}`));
    } catch {
      /* gone, or another tenant's: the list stays as it is and nothing is chosen */
    }
  }
  document.title = "New job · ftune";

  const inputs = {
    base_model: h("input", { name: "base_model", required: true, minlength: tpl.base_model.minLength, maxlength: tpl.base_model.maxLength, placeholder: "org/name or file:///models/...", value: params.get("base_model") || "", spellcheck: "false" }),
    dataset_id: h(
      "select",
      { name: "dataset_id", required: true },
      h("option", { value: "" }, "choose a dataset"),
      datasets.items.map((d) => h("option", { value: d.id, selected: d.id === wanted }, `${d.name} · ${d.rows} ${KINDS[d.kind] || "rows"} · ${d.id}`)),
    ),
    method: h("select", { name: "method" }, [].concat(tpl.method.enum || tpl.method.const).map((m) => h("option", { value: m, selected: m === tpl.method.default }, m))),
    beta: numberInput(hp.beta, "beta", { optional: true }),
    learning_rate: numberInput(hp.learning_rate, "learning_rate", { optional: true }),
    num_epochs: numberInput(hp.num_epochs, "num_epochs"),
    max_steps: numberInput(hp.max_steps, "max_steps", { optional: true }),
    r: numberInput(lora.r, "lora_r"),
    alpha: numberInput(lora.alpha, "lora_alpha"),
    bits: h("select", { name: "bits" }, quant.bits.enum.map((b) => h("option", { value: String(b), selected: b === quant.bits.default }, b === null ? "none (plain LoRA)" : `${b}-bit`))),
    destination: h("select", { name: "destination" }, ["store", "hub", "s3"].map((d) => h("option", { value: d }, d))),
    target: h("input", { name: "target", placeholder: "org/name for hub, s3://bucket/prefix/ for s3", spellcheck: "false" }),
    eval_prompts: h("textarea", { name: "eval_prompts", rows: 3, placeholder: "One prompt a line" }),
    extra: h("textarea", { name: "extra", rows: 3, class: "mono", placeholder: '{"hyperparameters": {"max_length": 512}, "labels": {"team": "search"}}', spellcheck: "false" }),
  };
  const estimate = h("div", { class: "estimate", "aria-live": "polite", id: "estimate" });
  const preview = h("pre", { class: "json", id: "spec-json" });
  const result = h("div", { "aria-live": "polite" });
  const submit = h("button", { type: "submit" }, "Submit job");
  const form = h(
    "form",
    { class: "job-form", novalidate: true },
    h("fieldset", {}, h("legend", {}, "Model and data"),
      field("Base model", inputs.base_model, tpl.base_model.description),
      field("Dataset", inputs.dataset_id, "A stored dataset of this tenant."),
      field("Method", inputs.method, tpl.method.description)),
    h("fieldset", {}, h("legend", {}, "Training"),
      field("Beta", inputs.beta, hint(hp.beta)),
      field("Learning rate", inputs.learning_rate, hint(hp.learning_rate)),
      field("Epochs", inputs.num_epochs, hint(hp.num_epochs)),
      field("Max steps", inputs.max_steps, `${hp.max_steps.description} When set, epochs are left out.`)),
    h("fieldset", {}, h("legend", {}, "Adapter"),
      field("LoRA r", inputs.r, hint(lora.r)),
      field("LoRA alpha", inputs.alpha, hint(lora.alpha)),
      field("Quantization", inputs.bits, hint(quant.bits))),
    h("fieldset", {}, h("legend", {}, "Output"),
      field("Destination", inputs.destination, "store: the service's own blob store (default); hub: a Hugging Face repo; s3: a prefix."),
      field("Repository or S3 prefix", inputs.target),
      field("Eval prompts", inputs.eval_prompts, tpl.eval_prompts.description)),
    h("fieldset", { class: "wide" }, h("legend", {}, "Other fields"),
      field("More of the spec (JSON, merged in)", inputs.extra, "Any other JobSpec field, as in the API reference at /docs.")),
    h("h2", {}, "GPU memory"),
    estimate,
    h("h2", {}, "The JSON it will POST to /v1/jobs"),
    preview,
    submit,
    result,
  );
  clear(page, h("h1", {}, "New job"), form);

  function build() {
    const number = (el) => (el.value === "" ? undefined : Number(el.value));
    const spec = {
      base_model: inputs.base_model.value.trim(),
      dataset_id: inputs.dataset_id.value,
      method: inputs.method.value,
      hyperparameters: { beta: number(inputs.beta), learning_rate: number(inputs.learning_rate) },
      lora: { r: number(inputs.r), alpha: number(inputs.alpha) },
      quantization: { bits: inputs.bits.value === "null" ? null : Number(inputs.bits.value) },
    };
    if (inputs.max_steps.value !== "") spec.hyperparameters.max_steps = number(inputs.max_steps);
    else spec.hyperparameters.num_epochs = number(inputs.num_epochs);
    const dest = inputs.destination.value;
    const target = inputs.target.value.trim();
    if (dest === "hub") spec.output = { destination: { type: "hub", repo_id: target } };
    if (dest === "s3") spec.output = { destination: { type: "s3", uri: target } };
    const prompts = inputs.eval_prompts.value.split("\n").map((p) => p.trim()).filter(Boolean);
    if (prompts.length) spec.eval_prompts = prompts;
    const extra = inputs.extra.value.trim();
    if (extra) {
      const parsed = JSON.parse(extra); // a SyntaxError is shown by the caller
      if (!isObject(parsed)) throw new SyntaxError("the extra fields must be a JSON object");
      merge(spec, parsed);
    }
    return spec;
  }

  let timer = null;
  let asked = 0;
  async function update() {
    let spec;
    try {
      spec = build();
      inputs.extra.setCustomValidity("");
    } catch (err) {
      inputs.extra.setCustomValidity(err.message);
      preview.textContent = `More of the spec: ${err.message}`;
      return null;
    }
    preview.textContent = JSON.stringify(spec, null, 2);
    clearTimeout(timer);
    timer = setTimeout(() => estimateFor(spec), 300);
    return spec;
  }

  async function estimateFor(spec) {
    if (spec.base_model.length < 3) {
      clear(estimate, h("p", { class: "muted" }, "Name a base model to see the estimate."));
      return;
    }
    const { dataset_id, eval_dataset_id, ...template } = spec;
    const mine = ++asked;
    try {
      const e = await api("/jobs/estimate", { method: "POST", json: template });
      if (mine !== asked) return;
      const verdict =
        e.fits === null ? (e.gpu_memory_gb ? "" : " No GPU memory limit is configured, so it is not checked at submit.")
          : e.fits ? ` Fits the workers' ${e.gpu_memory_gb} GB.`
            : ` More than the workers' ${e.gpu_memory_gb} GB: the submit will be refused.`;
      const said = e.total_gb === null ? e.summary : `${e.architecture}: ${e.summary}`;
      clear(estimate, h("p", { class: e.fits === false ? "error" : "" }, said.endsWith(".") ? said : `${said}.`, verdict));
    } catch (err) {
      if (mine === asked) clear(estimate, problem(err, { alert: false }));
    }
  }

  // The API's field paths, as the form's own fields (the rest stay as the API says them).
  const FIELDS = {
    "body.base_model": [inputs.base_model, "Base model"],
    "body.dataset_id": [inputs.dataset_id, "Dataset"],
    "body.method": [inputs.method, "Method"],
    "body.hyperparameters.beta": [inputs.beta, "Beta"],
    "body.hyperparameters.learning_rate": [inputs.learning_rate, "Learning rate"],
    "body.hyperparameters.num_epochs": [inputs.num_epochs, "Epochs"],
    "body.hyperparameters.max_steps": [inputs.max_steps, "Max steps"],
    "body.lora.r": [inputs.r, "LoRA r"],
    "body.lora.alpha": [inputs.alpha, "LoRA alpha"],
    "body.quantization.bits": [inputs.bits, "Quantization"],
    "body.output.destination.repo_id": [inputs.target, "Repository or S3 prefix"],
    "body.output.destination.uri": [inputs.target, "Repository or S3 prefix"],
    "body.eval_prompts": [inputs.eval_prompts, "Eval prompts"],
  };

  /** Whether the JSON of "More of the spec" holds the field at `path` (the API's loc after
   * "body"): an error there is the user's own JSON, named by its path in it. */
  function inExtra(path) {
    let node;
    try {
      node = JSON.parse(inputs.extra.value.trim() || "{}");
    } catch {
      return false;
    }
    for (const key of path) {
      if (!isObject(node) && !Array.isArray(node)) return false;
      if (!(key in node)) return false;
      node = node[key];
    }
    return path.length > 0;
  }

  /** Where the form holds the field an API error names: [element, label], or null. */
  function fieldOf(e) {
    if (!e.loc) return null;
    if (FIELDS[e.loc.join(".")]) return FIELDS[e.loc.join(".")];
    const path = e.loc[0] === "body" ? e.loc.slice(1) : null;
    return path && inExtra(path) ? [inputs.extra, `More of the spec, ${path.join(".")}`] : null;
  }

  /** The first error the API located in one of the form's fields: said with its label,
   * beside the submit button, the field marked and focused. */
  function showRefusal(err) {
    const located = (err.problem?.errors || []).find(fieldOf);
    if (!located) return clear(result, problem(err));
    const [el, label] = fieldOf(located);
    el.setAttribute("aria-invalid", "true");
    clear(result, h("div", { class: "error", role: "alert" }, h("strong", {}, `${label}: `), located.msg));
    el.focus();
  }

  // What the form must hold before anything is sent, said beside the field (the API would
  // answer with a pattern that names no field of this form).
  function missing(spec) {
    const dest = inputs.destination.value;
    if (!spec.base_model) return [inputs.base_model, "Name a base model: org/name on the Hub, or file:///models/..."];
    if (!spec.dataset_id) return [inputs.dataset_id, "Choose a dataset (upload one on the Datasets page)."];
    if (dest !== "store" && !inputs.target.value.trim()) {
      return [inputs.target, dest === "hub" ? "Name the Hub repository: org/name." : "Give the S3 prefix: s3://bucket/prefix/."];
    }
    return null;
  }

  // One submit, one job: the button waits for the answer, and a submit sent again with the
  // same spec (a retry after no answer) carries the same Idempotency-Key, which the API
  // answers with the job the first one made.
  let sent = { body: null, key: null };
  form.addEventListener("input", update);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (submit.disabled) return;
    const spec = await update();
    if (!spec) {
      // Nothing was sent: say why here, not under an answer to an earlier submit.
      clear(result, h("div", { class: "error", role: "alert" }, preview.textContent));
      inputs.extra.focus();
      return;
    }
    for (const el of Object.values(inputs)) el.removeAttribute("aria-invalid");
    const gap = missing(spec);
    if (gap) {
      const [el, why] = gap;
      el.setAttribute("aria-invalid", "true");
      clear(result, h("div", { class: "error", role: "alert" }, why));
      el.focus();
      return;
    }
    const body = JSON.stringify(spec);
    if (sent.body !== body) sent = { body, key: newKey() };
    clear(result, h("p", { class: "muted" }, "Submitting…"));
    submit.disabled = true;
    try {
      const job = await api("/jobs", { method: "POST", json: spec, headers: { "Idempotency-Key": sent.key } });
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      showRefusal(err);
    } finally {
      submit.disabled = false;
    }
  });
  await update();
}
