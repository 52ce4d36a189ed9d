// uPlot charts: live series over time, and latency per batch size. Lines differ by dash
// as well as colour, and every chart has a legend with words.

/* global uPlot */

const PALETTE = ["#2f6fdf", "#d9622b", "#1d9a6c", "#8a4fd3", "#c2417a", "#6b7280"];
const DASHES = [[], [6, 4], [2, 3], [10, 3, 2, 3], [1, 2], [4, 2]];

function seriesStyle(index) {
  return { stroke: PALETTE[index % PALETTE.length], dash: DASHES[index % DASHES.length], width: 2 };
}

const CLOCK = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });

function clock(unixSeconds) {
  return CLOCK.format(new Date(unixSeconds * 1000));
}

function compact(value) {
  return Math.abs(value) >= 1000 ? `${+(value / 1000).toPrecision(3)}k` : `${+value.toPrecision(3)}`;
}

function sizeOf(container, height) {
  return { width: Math.max(container.clientWidth, 200), height };
}

// Keeps a chart as wide as its container.
function fit(chart, container, height) {
  const observer = new ResizeObserver(() => chart.setSize(sizeOf(container, height)));
  observer.observe(container);
  return observer;
}

export class TimeChart {
  constructor(container, { lines, unit, height = 170 }) {
    this.container = container;
    const options = {
      ...sizeOf(container, height),
      legend: { live: true },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(max || 0, 1e-9) * 1.15] } },
      axes: [
        { stroke: "#5b6472", grid: { stroke: "#eef0f3" }, space: 70, values: (u, ticks) => ticks.map(clock) },
        { stroke: "#5b6472", grid: { stroke: "#eef0f3" }, size: 64, values: (u, ticks) => ticks.map((t) => `${compact(t)}${unit}`) },
      ],
      series: [{ label: "time", value: (u, v) => (v === null || v === undefined ? "–" : clock(v)) }, ...lines.map((line, index) => ({ label: line.label, spanGaps: false, points: { show: false }, ...seriesStyle(index), value: (u, v) => (v === null || v === undefined ? "–" : `${+v.toPrecision(4)}${unit}`) }))],
    };
    this.keys = lines.map((line) => line.key);
    this.chart = new uPlot(options, [[], ...this.keys.map(() => [])], container);
    this.observer = fit(this.chart, container, height);
  }

  update(traffic) {
    this.chart.setData([traffic.t, ...this.keys.map((key) => traffic[key])]);
  }

  destroy() {
    this.observer.disconnect();
    this.chart.destroy();
  }
}

// Median latency per batch size of each candidate the build tried (x: batch size).
export function latencyChart(container, candidates) {
  const sizes = [...new Set(candidates.flatMap((c) => Object.keys(c.latency_ms || {}).map(Number)))].sort((a, b) => a - b);
  const measured = candidates.filter((c) => Object.keys(c.latency_ms || {}).length);
  const height = 220;
  const chart = new uPlot(
    {
      ...sizeOf(container, height),
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: false }, y: { range: (u, min, max) => [0, Math.max(max || 0, 1e-9) * 1.15] } },
      axes: [
        { label: "batch size", stroke: "#5b6472", grid: { stroke: "#eef0f3" }, splits: () => sizes },
        { label: "ms per run", stroke: "#5b6472", grid: { stroke: "#eef0f3" }, size: 60 },
      ],
      series: [
        { label: "batch" },
        ...measured.map((c, index) => ({
          label: c.precision, ...seriesStyle(index),
          points: { show: true, size: 7 },
          value: (u, v) => (v === null || v === undefined ? "–" : `${+v.toPrecision(3)} ms`),
        })),
      ],
    },
    [sizes, ...measured.map((c) => sizes.map((s) => c.latency_ms[String(s)] ?? null))],
    container,
  );
  return { chart, observer: fit(chart, container, height), destroy() { this.observer.disconnect(); chart.destroy(); } };
}
