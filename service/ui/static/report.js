// A version's build report, for people: what was tried, what the gate measured,
// why this precision, what was fused or repaired, where the time went.

import { latencyChart } from "./charts.js";
import { bytes, h, label, number, tierText } from "./dom.js";

const HIGHER_IS_BETTER = ["cosine_similarity", "top1_agreement", "exact_match"];
const LOWER_IS_BETTER = ["max_abs_error", "max_rel_error"];
const METRIC_NAMES = {
  cosine_similarity: "cosine (mean)",
  cosine_similarity_min: "cosine (min)",
  top1_agreement: "top-1 agreement",
  exact_match: "exact match",
  max_abs_error: "max abs error",
  max_rel_error: "max rel error",
  nonfinite: "non-finite",
};
const SHOWN_ELSEWHERE = new Set([
  "backend", "device", "precision", "signature", "max_batch_size", "artifact_bytes", "cache_key",
  "requested_precision", "choice", "calibration", "validation", "candidates", "accuracy", "tolerance",
  "latency_ms", "timings_s", "fusion", "transform", "repair",
]);

function section(title, ...body) {
  return h("section", { class: "report-section" }, h("h3", null, title), ...body);
}

function table(attrs, head, rows) {
  return h("div", { class: "table-wrap" },
    h("table", attrs, h("thead", null, h("tr", null, head.map((cell) => h("th", { scope: "col" }, cell)))),
      h("tbody", null, rows)));
}

function facts(pairs) {
  return h("dl", { class: "facts" },
    pairs.filter(([, value]) => value !== null && value !== undefined && value !== "")
      .map(([name, value]) => h("div", null, h("dt", null, name), h("dd", null, value))));
}

// Any JSON value as readable text or a nested list (for fields this page does not know yet).
function generic(value) {
  if (value === null || value === undefined) return "–";
  if (Array.isArray(value)) {
    if (!value.length) return "none";
    if (value.every((item) => typeof item !== "object" || item === null)) return value.join(", ");
    return h("ul", { class: "plain" }, value.map((item) => h("li", null, generic(item))));
  }
  if (typeof value === "object") {
    return h("dl", { class: "facts compact" },
      Object.entries(value).map(([key, item]) => h("div", null, h("dt", null, label(key)), h("dd", null, generic(item)))));
  }
  return typeof value === "number" ? number(value, 4) : String(value);
}

function deviceText(device) {
  if (!device) return null;
  const inner = device.device || {};
  const name = inner.name || inner.model || inner.kind || "";
  return `${name}${device.backend_version ? ` · ${device.backend} ${device.backend_version}` : ""}`.trim();
}

function verdict(metric, value, tolerance) {
  if (metric === "nonfinite") return value > 0 ? "fail" : "pass";
  const threshold = tolerance?.[metric];
  if (threshold === undefined || value === undefined || value === null) return null;
  if (HIGHER_IS_BETTER.includes(metric)) return value >= threshold ? "pass" : "fail";
  if (LOWER_IS_BETTER.includes(metric)) return value <= threshold ? "pass" : "fail";
  return null;
}

function metricText(metric, value) {
  if (typeof value !== "number") return "–";
  if (metric === "nonfinite") return String(value);
  if (metric in METRIC_NAMES && !LOWER_IS_BETTER.includes(metric)) return value.toFixed(5); // ratios near 1
  return value === 0 ? "0" : value.toPrecision(3);
}

function thresholdText(metric, tolerance) {
  const threshold = tolerance?.[metric];
  if (threshold === undefined) return "";
  return HIGHER_IS_BETTER.includes(metric) ? `≥ ${threshold}` : `≤ ${threshold}`;
}

// Accuracy per output and batch size against the tolerance; each cell says pass or fail in words.
export function accuracyTable(accuracy, tolerance, caption) {
  const results = accuracy?.results || [];
  const metrics = Object.keys(METRIC_NAMES).filter((metric) =>
    results.some((r) => Object.values(r.outputs || {}).some((o) => o[metric] !== undefined)));
  const rows = results.flatMap((result) => Object.entries(result.outputs || {}).map(([output, values]) =>
    h("tr", null,
      h("td", null, h("code", null, output)),
      h("td", { class: "num" }, String(result.batch_size)),
      metrics.map((metric) => {
        const outcome = verdict(metric, values[metric], tolerance);
        return h("td", { class: `num${outcome ? ` ${outcome}` : ""}` },
          metricText(metric, values[metric]),
          outcome ? h("span", { class: "verdict" }, outcome === "pass" ? " ✓ pass" : " ✕ fail") : null);
      }))));
  const head = ["output", "batch", ...metrics.map((metric) => {
    const limit = thresholdText(metric, tolerance);
    return limit ? [METRIC_NAMES[metric], h("br"), h("span", { class: "muted" }, limit)] : METRIC_NAMES[metric];
  })];
  return [
    caption ? h("p", { class: "muted" }, caption) : null,
    table({ id: "accuracy-table", class: "data" }, head, rows),
  ];
}

const CANDIDATE_FIELDS = new Set(["precision", "accepted", "latency_ms", "artifact_bytes", "rejection", "reason"]);

// Whatever else a build says about a candidate (a repair, for one), folded away.
function candidateExtras(candidate) {
  const extra = Object.fromEntries(Object.entries(candidate).filter(([key]) => !CANDIDATE_FIELDS.has(key)));
  if (!Object.keys(extra).length) return null;
  return h("details", { class: "extras" }, h("summary", null, Object.keys(extra).map(label).join(", ")), generic(extra));
}

function candidatesTable(candidates, chosen) {
  const sizes = [...new Set(candidates.flatMap((c) => Object.keys(c.latency_ms || {}).map(Number)))].sort((a, b) => a - b);
  const rows = candidates.map((c) => h("tr", { class: c.precision === chosen ? "chosen" : null },
    h("td", null, h("strong", null, c.precision), c.precision === chosen ? h("span", { class: "tag" }, "chosen") : null),
    h("td", null, c.accepted ? "✓ within tolerance" : `✕ ${[].concat(c.rejection || c.reason || "rejected").join("; ")}`,
      candidateExtras(c)),
    sizes.map((s) => h("td", { class: "num" }, c.latency_ms?.[String(s)] !== undefined ? number(c.latency_ms[String(s)], 4) : "–")),
    h("td", { class: "num" }, bytes(c.artifact_bytes))));
  return table({ id: "candidates-table", class: "data" },
    ["precision", "accuracy gate", ...sizes.map((s) => `ms @ batch ${s}`), "size"], rows);
}

function fusionSection(fusion) {
  const body = [];
  if (fusion.nodes_before !== undefined) {
    body.push(h("p", null, `${fusion.nodes_before} nodes before optimisation, ${fusion.nodes_after} after.`));
  }
  const before = fusion.op_counts_before || {};
  const after = fusion.op_counts_after || {};
  const ops = [...new Set([...Object.keys(before), ...Object.keys(after)])].sort();
  if (ops.length) {
    body.push(table({ class: "data compact" }, ["op type", "before", "after"],
      ops.map((op) => h("tr", null, h("td", null, h("code", null, op)), h("td", { class: "num" }, before[op] ?? 0), h("td", { class: "num" }, after[op] ?? 0)))));
  }
  if (fusion.fused_nodes?.length) {
    body.push(h("p", null, "Fused layers:"), h("ul", { class: "chips" },
      fusion.fused_nodes.map((node) => h("li", null, h("code", null, node.op_type || "?"), ` ${node.name || ""}`))));
  }
  const rest = Object.fromEntries(Object.entries(fusion).filter(([key]) =>
    !["nodes_before", "nodes_after", "op_counts_before", "op_counts_after", "fused_nodes", "removed_nodes"].includes(key)));
  if (Object.keys(rest).length) body.push(generic(rest));
  return section("Fused layers", ...body);
}

function timingsSection(timings) {
  const total = timings.total || Object.values(timings).reduce((a, b) => a + b, 0);
  const phases = Object.entries(timings).filter(([phase]) => phase !== "total");
  return section("Build time",
    h("ul", { class: "timings" }, phases.map(([phase, seconds]) => {
      const share = total ? Math.round((seconds / total) * 100) : 0;
      return h("li", null,
        h("span", { class: "phase" }, phase),
        h("meter", { min: "0", max: "100", value: String(share), "aria-label": `${phase} ${share}% of the build` }),
        h("span", { class: "num" }, seconds < 0.01 ? "< 0.01 s" : `${number(seconds, 2)} s`));
    })),
    h("p", { class: "muted" }, `${number(total, 2)} s in all`));
}

function signatureSection(signature) {
  const rows = [...(signature.inputs || []).map((t) => ["input", t]), ...(signature.outputs || []).map((t) => ["output", t])]
    .map(([role, t]) => h("tr", null, h("td", null, role), h("td", null, h("code", null, t.name)), h("td", null, t.dtype),
      h("td", null, `[${(t.shape || []).map((d) => (d < 0 ? "?" : d)).join(", ")}]`)));
  return section("Signature",
    table({ class: "data compact" }, ["", "name", "dtype", "shape"], rows),
    signature.batchable ? null : h("p", { class: "muted" }, `Not batched: ${signature.unbatched_reason}`));
}

// Returns {element, destroy} for the report of one version's status.
export function renderReport(status) {
  const charts = [];
  const parts = [];
  const report = status.report;
  const error = status.error;
  if (error) {
    // A version in fallback serves, but not the precision that was asked for.
    const heading = status.state === "fallback"
      ? `Serving, not as requested (fallback: ${error.type}): `
      : `Build failed (${error.type}): `;
    parts.push(h("div", { class: "callout error", role: "alert" }, h("strong", null, heading), error.message));
    if (error.details?.accuracy) {
      parts.push(section("Accuracy that failed the gate", accuracyTable(error.details.accuracy, error.details.tolerance)));
    }
  }
  if (!report) {
    if (!error) parts.push(h("p", { class: "muted" }, "The report appears when the build finishes."));
    return { element: h("div", { id: "report" }, parts), destroy() {} };
  }
  const requested = report.requested_precision;
  parts.push(facts([
    ["precision", requested && requested !== report.precision ? `${report.precision} (asked: ${requested})` : report.precision],
    ["serving", tierText(status.serving)],
    ["backend", report.backend],
    ["device", deviceText(report.device)],
    ["max batch", report.max_batch_size],
    ["engine size", bytes(report.artifact_bytes)],
    ["build time", report.timings_s?.total !== undefined ? `${number(report.timings_s.total, 2)} s` : null],
    ["cache key", report.cache_key ? h("code", { title: report.cache_key }, report.cache_key.slice(0, 12)) : null],
  ]));
  if (report.choice) {
    parts.push(section("Why this precision", h("p", { class: "choice" }, report.choice),
      report.calibration && Object.keys(report.calibration).length ? h("p", { class: "muted" },
        `Calibration: ${Object.entries(report.calibration).map(([k, v]) => `${label(k)} ${v}`).join(", ")}`) : null,
      report.validation ? h("p", { class: "muted" },
        `Validation: ${Object.entries(report.validation).map(([k, v]) => `${label(k)} ${v}`).join(", ")}`) : null));
  }
  if (report.candidates?.length) {
    const chartBox = h("div", { id: "latency-chart", class: "chart" });
    parts.push(section("Candidates and latency", candidatesTable(report.candidates, report.precision),
      h("h4", null, "Latency per batch size"), chartBox));
    charts.push(() => latencyChart(chartBox, report.candidates));
  }
  if (report.accuracy) {
    parts.push(section(`Accuracy of ${report.precision} against FP32`, accuracyTable(report.accuracy, report.tolerance,
      `${report.accuracy.sample_count} validation samples; each metric against its tolerance.`)));
  } else if (report.precision === "fp32") {
    parts.push(section("Accuracy", h("p", { class: "muted" }, "FP32 is the reference model itself: no accuracy comparison is needed.")));
  }
  if (report.repair) parts.push(section("Precision repair", generic(report.repair)));
  if (report.fusion) parts.push(fusionSection(report.fusion));
  if (report.transform) parts.push(section("Precision transform", generic(report.transform)));
  if (report.timings_s) parts.push(timingsSection(report.timings_s));
  if (report.signature) parts.push(signatureSection(report.signature));
  const extra = Object.fromEntries(Object.entries(report).filter(([key]) => !SHOWN_ELSEWHERE.has(key)));
  if (Object.keys(extra).length) parts.push(section("More", generic(extra)));
  const element = h("div", { id: "report" }, parts);
  let built = [];
  return {
    element,
    // Charts measure their container, so they are drawn once the report is in the page.
    mount() { built = charts.map((make) => make()); },
    destroy() { built.forEach((chart) => chart.destroy()); },
  };
}
