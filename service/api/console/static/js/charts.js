// Live metric charts: one uPlot chart per family (loss, rewards, logps, ...), training and
// eval series together, step on the x-axis, values on hover (uPlot's legend), optional
// smoothing. Points are keyed by step, so the history and the live stream can overlap.

import uPlot from "../vendor/uplot/uPlot.esm.js";
import { h } from "./dom.js";

/** A metric for a person: learning rates (5e-6) and small rewards in scientific notation,
 * the rest to 4 significant digits (uPlot's default of 3 decimals showed them all as 0). */
export function number(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "—";
  if (v !== 0 && Math.abs(v) < 1e-3) return v.toExponential(2);
  return String(Number(v.toPrecision(4)));
}

const COMPACT = new Intl.NumberFormat("en", { notation: "compact", maximumSignificantDigits: 3 });

/** An axis label: large values short (620M, 150K), which the axis' fixed width cut to their
 * last digits ("?20000000"); the rest as {@link number}. */
export function axisNumber(v) {
  if (typeof v === "number" && Math.abs(v) >= 1e5) return COMPACT.format(v);
  return number(v);
}

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04"];
const SMOOTHING = 0.6; // TensorBoard's default weight for its exponential moving average

// What an engineer reads first; the rest (throughput, memory, ...) follow by name.
const FIRST = ["loss", "rewards", "accuracy", "margins", "logps", "logits", "grad_norm", "learning_rate"];
const TIMING = new Set(["runtime", "samples_per_second", "steps_per_second"]);
const SKIP = new Set(["epoch"]); // shown as progress, not a curve

/** The chart a metric belongs on: eval_ and training series of one quantity share it. */
export function family(name) {
  const base = name.startsWith("eval_") ? name.slice(5) : name;
  if (SKIP.has(base)) return null;
  if (TIMING.has(base)) return "eval timing";
  if (/accurac(y|ies)$/.test(base)) return "accuracy";
  const slash = base.indexOf("/");
  return slash > 0 ? base.slice(0, slash) : base;
}

function rank(fam) {
  const i = FIRST.indexOf(fam);
  return i >= 0 ? String(i).padStart(3, "0") : `z${fam}`;
}

function smooth(values) {
  let last = null;
  return values.map((v) => {
    if (v === null || v === undefined) return null;
    last = last === null ? v : last * SMOOTHING + v * (1 - SMOOTHING);
    return last;
  });
}

export class Charts {
  constructor(container) {
    this.container = container;
    this.points = new Map(); // step -> {metric: value}
    this.charts = new Map(); // family -> {plot, series, box}
    this.smoothed = false;
    this.pending = false;
  }

  add(step, values) {
    this.points.set(step, { ...(this.points.get(step) || {}), ...values });
    if (!this.pending) {
      this.pending = true;
      requestAnimationFrame(() => {
        this.pending = false;
        this.draw();
      });
    }
  }

  setSmoothing(on) {
    this.smoothed = on;
    this.draw();
  }

  width() {
    const w = this.container.clientWidth || 600;
    return w >= 900 ? Math.floor((w - 24) / 2) : w;
  }

  draw() {
    const steps = [...this.points.keys()].sort((a, b) => a - b);
    const byFamily = new Map();
    for (const values of this.points.values()) {
      for (const name of Object.keys(values)) {
        const fam = family(name);
        if (fam === null) continue;
        if (!byFamily.has(fam)) byFamily.set(fam, new Set());
        byFamily.get(fam).add(name);
      }
    }
    const families = [...byFamily.keys()].sort((a, b) => rank(a).localeCompare(rank(b)));
    const known = this.charts.size;
    for (const fam of families) {
      const series = [...byFamily.get(fam)].sort();
      const data = [steps, ...series.map((n) => steps.map((s) => this.points.get(s)[n] ?? null))];
      const shown = this.smoothed ? [steps, ...data.slice(1).map(smooth)] : data;
      this.render(fam, series, shown, data);
    }
    if (this.charts.size !== known) {
      for (const fam of families) this.container.append(this.charts.get(fam).box); // keep the order
    }
  }

  render(fam, series, data, raw) {
    let chart = this.charts.get(fam);
    if (chart && chart.series.join() !== series.join()) {
      chart.plot.destroy();
      chart.box.remove();
      chart = null;
    }
    if (!chart) {
      const box = h("figure", { class: "chart", dataset: { family: fam } }, h("figcaption", {}, fam));
      this.container.append(box);
      const plot = new uPlot(
        {
          width: this.width(),
          height: 220,
          scales: { x: { time: false } },
          axes: [{ label: "step" }, { values: (u, splits) => splits.map(axisNumber), size: 72 }],
          series: [
            { label: "step" },
            ...series.map((name, i) => ({
              label: name,
              stroke: COLORS[i % COLORS.length],
              width: name.startsWith("eval_") ? 2 : 1.5,
              dash: name.startsWith("eval_") ? [6, 4] : undefined,
              points: { show: name.startsWith("eval_") },
              spanGaps: true,
              value: (u, v) => number(v),
            })),
          ],
        },
        data,
        box,
      );
      chart = { plot, series, box };
      this.charts.set(fam, chart);
    } else {
      chart.plot.setData(data);
    }
    // What a test (or a curious user) can read without parsing the canvas.
    const count = raw.slice(1).reduce((n, ys) => n + ys.filter((v) => v !== null).length, 0);
    chart.box.dataset.points = String(count);
  }

  resize() {
    for (const { plot } of this.charts.values()) plot.setSize({ width: this.width(), height: 220 });
  }

  destroy() {
    for (const { plot } of this.charts.values()) plot.destroy();
    this.charts.clear();
  }
}
