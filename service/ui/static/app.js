// kiln's page: an overview of engines and builds, one view per engine (versions, live
// traffic, build report), upload and delete. Views poll their one JSON endpoint while
// the tab is visible; the server caches each for a second.

import { ApiError, apiKey, getJSON, remove, uploadEngine } from "./api.js";
import { TimeChart } from "./charts.js";
import { $, ago, bytes, h, number, progressBar, replace, replicaList, replicasText, stateBadge, tierText } from "./dom.js";
import { renderReport } from "./report.js";

const main = $("#main");
let current = null; // the view on screen: {name, refresh(), destroy()}
let timer = null;
let pollSeconds = 2;

// ---- routing -------------------------------------------------------------------------

function route() {
  const match = location.hash.match(/^#\/engines\/([^/]+)(?:\/versions\/(\d+))?$/);
  const next = match ? engineView(decodeURIComponent(match[1]), match[2] ? Number(match[2]) : null) : overviewView();
  if (current) current.destroy();
  current = next;
  replace(main, current.element);
  refresh();
}

async function refresh() {
  clearTimeout(timer);
  const view = current;
  try {
    await view.refresh();
    $("#key-required").hidden = true;
    main.hidden = false;
    if ($("#banner").classList.contains("error")) hideBanner(); // the server answers again
  } catch (error) {
    if (view !== current) return;
    if (error instanceof ApiError && error.needsKey) showKeyRequired(error);
    else if (error.status === 404 && view.engine) {
      showBanner(`${error.message} (deleted?)`, "info"); // its last version went away
      location.hash = "#/";
      return;
    } else showBanner(error.message);
  }
  if (view === current) schedule();
}

function schedule() {
  clearTimeout(timer);
  if (document.visibilityState === "visible") timer = setTimeout(refresh, pollSeconds * 1000);
}

document.addEventListener("visibilitychange", () => (document.visibilityState === "visible" ? refresh() : clearTimeout(timer)));
window.addEventListener("hashchange", route);

// ---- messages and the API key --------------------------------------------------------

function showBanner(message, kind = "error") {
  const banner = $("#banner");
  banner.className = `banner ${kind}`;
  replace(banner, message);
  banner.hidden = false;
}

function hideBanner() {
  $("#banner").hidden = true;
}

// Without a (valid) key the page shows nothing of the server's: only this prompt.
function showKeyRequired(error) {
  current.clear();
  main.hidden = true;
  $("#key-required-message").textContent = error.message;
  $("#key-required").hidden = false;
  hideBanner();
}

$("#key-required-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("#key-required-input").value.trim();
  if (!key) return;
  apiKey.set(key);
  $("#key-required-input").value = "";
  refresh();
});

$("#key-button").addEventListener("click", () => {
  $("#key-input").value = "";
  $("#key-state").textContent = apiKey.get() ? "A key is set for this tab." : "No key is set.";
  $("#key-dialog").showModal();
});

$("#key-form").addEventListener("submit", (event) => {
  const action = event.submitter?.value;
  if (action === "save" && $("#key-input").value.trim()) apiKey.set($("#key-input").value.trim());
  if (action === "clear") apiKey.clear();
  if (action !== "cancel") refresh();
});

// ---- confirmation --------------------------------------------------------------------

function confirmAction(title, message, action) {
  const dialog = $("#confirm-dialog");
  $("#confirm-title").textContent = title;
  $("#confirm-message").textContent = message;
  $("#confirm-ok").textContent = action;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true }));
}

async function deletePath(path, what, thenHash) {
  if (!(await confirmAction(`Delete ${what}?`, `${what} will be unloaded and removed from the store. Requests to it will fail. This cannot be undone.`, "Delete"))) return;
  try {
    await remove(path);
    showBanner(`Deleted ${what}.`, "info");
    if (thenHash !== undefined && location.hash !== thenHash) location.hash = thenHash;
    else refresh();
  } catch (error) {
    showBanner(`Could not delete ${what}: ${error.message}`);
  }
}

// ---- overview ------------------------------------------------------------------------

function overviewView() {
  let cluster = false; // the server is one replica of several: rows show each state's count
  const engines = h("tbody");
  const builds = h("div", { id: "builds" });
  const server = h("p", { class: "muted", id: "server-line" });
  const element = h("div", { id: "view-overview" },
    h("div", { class: "view-head" }, h("div", null, h("h1", null, "Engines"), server)),
    h("section", { class: "card" }, h("h2", null, "Builds in progress"), builds),
    h("section", { class: "card" },
      h("div", { class: "table-wrap" },
        h("table", { id: "engines-table", class: "data engines stack" },
          h("thead", null, h("tr", null,
            ["engine", "state", "version", "precision", "serving", "backend", "requests/s", "p99 latency"]
              .map((name, index) => h("th", { scope: "col", class: index >= 4 && index < 6 ? "opt" : index >= 6 ? "num" : null }, name)))),
          engines))));

  function row(engine) {
    const precision = engine.precision.chosen || engine.precision.requested;
    const traffic = engine.traffic || {};
    return h("tr", { dataset: { engine: engine.name } },
      h("td", { class: "lead" }, h("a", { href: `#/engines/${encodeURIComponent(engine.name)}`, class: "engine-link" }, engine.name),
        h("div", { class: "muted small" }, engine.model_filename || "")),
      h("td", { "data-label": "state" }, stateBadge(engine.state, engine.progress), cluster && replicasText(engine.replicas) ? h("div", { class: "muted small replicas" }, replicasText(engine.replicas)) : null),
      h("td", { "data-label": "version" }, `v${engine.version}`, h("span", { class: "muted small" }, ` of ${engine.versions}`),
        engine.ready_version && engine.ready_version !== engine.version ? h("div", { class: "muted small" }, `v${engine.ready_version} serves`) : null),
      h("td", { "data-label": "precision" }, precision || "–", engine.precision.chosen && engine.precision.requested === "auto" ? h("span", { class: "muted small" }, " (auto)") : null),
      h("td", { class: "opt", "data-label": "serving" }, tierText(engine.serving) || "–"),
      h("td", { class: "opt", "data-label": "backend" }, engine.backend || "–"),
      h("td", { class: "num", "data-label": "requests/s" }, number(traffic.rps, 1)),
      h("td", { class: "num", "data-label": "p99 latency" }, traffic.p99_ms === null || traffic.p99_ms === undefined ? "–" : `${number(traffic.p99_ms, 2)} ms`));
  }

  function buildItem(build) {
    return h("div", { class: "build", dataset: { build: `${build.name}/${build.version}` } },
      h("div", { class: "build-title" },
        h("a", { href: `#/engines/${encodeURIComponent(build.name)}/versions/${build.version}` }, `${build.name} v${build.version}`),
        stateBadge(build.state, build.progress)),
      progressBar(build.progress, build.phase));
  }

  return {
    element,
    clear() { engines.replaceChildren(); builds.replaceChildren(); server.textContent = ""; },
    async refresh() {
      const data = await getJSON("/ui/api/overview");
      pollSeconds = data.poll_s;
      cluster = Boolean(data.server.cluster);
      const health = data.server.draining ? " · shutting down" : data.server.not_ready_reason ? ` · not ready: ${data.server.not_ready_reason}` : "";
      const where = cluster ? ` · replica ${data.server.replica} of a cluster` : "";
      server.textContent = `Backend: ${data.server.backend}${where}${health} · updated every ${data.poll_s} s`;
      replace(engines, data.engines.length ? data.engines.map(row)
        : h("tr", null, h("td", { colspan: "8", class: "empty" }, "No engines yet. Upload an ONNX model to build one.")));
      replace(builds, data.builds.length ? data.builds.map(buildItem) : h("p", { class: "muted" }, "No builds running."));
    },
    destroy() {},
  };
}

// ---- one engine ----------------------------------------------------------------------

const LIVE = [
  { id: "live-rps", title: "Requests per second", unit: "", lines: [{ key: "rps", label: "requests/s" }, { key: "errors", label: "errors/s" }] },
  { id: "live-latency", title: "Latency in server", unit: " ms", lines: [{ key: "p50_ms", label: "p50" }, { key: "p99_ms", label: "p99" }] },
  { id: "live-queue", title: "Queue time (mean)", unit: " ms", lines: [{ key: "queue_ms", label: "queue" }] },
  { id: "live-batch", title: "Batch size (mean rows)", unit: "", lines: [{ key: "batch", label: "rows" }] },
];

function lastValue(values) {
  for (let i = values.length - 1; i >= 0; i -= 1) if (values[i] !== null && values[i] !== undefined) return values[i];
  return null;
}

function engineView(name, selectedVersion) {
  let cluster = false; // one replica of several: each version lists every replica's state
  let replica = null;
  const title = h("h1", { id: "engine-title" }, name);
  const subtitle = h("p", { class: "muted" });
  const versions = h("tbody");
  const reportBox = h("div", { class: "report-box" });
  const reportTitle = h("h2", null, "Build report");
  const liveBoxes = LIVE.map((spec) => {
    const now = h("span", { class: "chart-now", dataset: { series: spec.lines[0].key } }, "–");
    const plot = h("div", { class: "chart" });
    return { spec, now, plot, element: h("figure", { class: "live", id: spec.id }, h("figcaption", null, h("span", null, spec.title), now), plot) };
  });
  const element = h("div", { id: "view-engine" },
    h("p", { class: "crumbs" }, h("a", { href: "#/" }, "← All engines")),
    h("div", { class: "view-head" }, h("div", null, title, subtitle),
      h("button", { id: "delete-engine", class: "danger", type: "button",
        onclick: () => deletePath(`/engines/${encodeURIComponent(name)}`, `engine ${name} and all its versions`, "#/") }, "Delete engine")),
    h("section", { class: "card" }, h("h2", null, "Versions"),
      h("div", { class: "table-wrap" }, h("table", { id: "versions-table", class: "data stack" },
        h("thead", null, h("tr", null, ["version", "state", "precision", "serving", "created", "model", ""].map((c, i) => h("th", { scope: "col", class: i === 5 ? "opt" : null }, c)))),
        versions))),
    h("section", { class: "card" }, h("h2", null, "Live traffic"),
      h("p", { class: "muted small", id: "live-note" }),
      h("div", { class: "live-grid" }, liveBoxes.map((box) => box.element))),
    h("section", { class: "card" }, reportTitle, reportBox));

  let charts = null;
  let report = null;
  let reportKey = null;

  function versionRow(status, shown) {
    const precision = status.report?.precision || status.build_options?.precision;
    return h("tr", { dataset: { version: String(status.version) }, class: status.version === shown ? "selected" : null },
      h("td", { class: "lead" }, h("a", { href: `#/engines/${encodeURIComponent(name)}/versions/${status.version}` }, `v${status.version}`)),
      h("td", { class: "state-cell", "data-label": "state" }, stateBadge(status.state, status.progress),
        status.state === "building" || status.state === "loading" ? progressBar(status.progress, status.phase) : null,
        cluster ? replicaList(status.replica_states, replica) : null),
      h("td", { "data-label": "precision" }, precision || "–"),
      h("td", { "data-label": "serving" }, tierText(status.serving) || "–"),
      h("td", { "data-label": "created", title: new Date(status.created_at * 1000).toISOString() }, ago(status.created_at)),
      h("td", { class: "opt", "data-label": "model" }, status.model_filename || "–"),
      h("td", { class: "actions" }, h("button", { type: "button", class: "ghost small-button",
        onclick: () => deletePath(`/engines/${encodeURIComponent(name)}/versions/${status.version}`, `${name} version ${status.version}`) }, "Delete")));
  }

  function showReport(status) {
    const key = JSON.stringify([status.version, status.state, status.progress, status.phase, status.error, status.report?.cache_key, status.serving]);
    if (key === reportKey) return;
    reportKey = key;
    report?.destroy();
    reportTitle.textContent = `Build report · v${status.version}`;
    report = renderReport(status);
    const building = status.state === "building" || status.state === "loading";
    replace(reportBox, building ? progressBar(status.progress, status.phase) : null, report.element);
    report.mount?.();
  }

  return {
    element,
    engine: name,
    clear() { versions.replaceChildren(); reportBox.replaceChildren(); subtitle.textContent = ""; title.textContent = ""; },
    async refresh() {
      const data = await getJSON(`/ui/api/engines/${encodeURIComponent(name)}`);
      pollSeconds = data.poll_s;
      cluster = Boolean(data.cluster);
      replica = data.replica;
      title.textContent = name;
      const newest = data.versions[0];
      const ready = data.versions.filter((v) => v.state === "ready").length;
      subtitle.textContent = `${data.versions.length} version${data.versions.length === 1 ? "" : "s"}, ${ready} ready · model ${newest.model_filename || newest.model_sha256.slice(0, 12)}`;
      const shown = data.versions.find((v) => v.version === selectedVersion) || data.versions.find((v) => v.state === "ready") || newest;
      replace(versions, data.versions.map((status) => versionRow(status, shown.version)));
      showReport(shown);
      if (!charts) charts = liveBoxes.map((box) => new TimeChart(box.plot, { lines: box.spec.lines, unit: box.spec.unit }));
      charts.forEach((chart, index) => {
        chart.update(data.traffic);
        const box = liveBoxes[index];
        const latest = lastValue(data.traffic[box.spec.lines[0].key] || []);
        box.now.textContent = latest === null ? "–" : `now ${number(latest, 2)}${box.spec.unit}`;
        box.now.dataset.value = latest === null ? "" : String(latest);
      });
      $("#live-note").textContent = `Sampled every ${data.sample_interval_s} s from the server's own counters, all versions together, over the last ${Math.round(data.window_s / 60)} minutes.`;
    },
    destroy() {
      charts?.forEach((chart) => chart.destroy());
      report?.destroy();
    },
  };
}

// ---- upload --------------------------------------------------------------------------

const uploadDialog = $("#upload-dialog");
const uploadForm = $("#upload-form");

$("#open-upload").addEventListener("click", () => {
  $("#upload-status").textContent = "";
  $("#upload-progress").value = 0;
  $("#upload-progress-row").hidden = true;
  $("#upload-submit").disabled = false;
  uploadDialog.showModal();
});

$("#upload-cancel").addEventListener("click", () => uploadDialog.close());

$("#upload-model").addEventListener("change", () => {
  const file = $("#upload-model").files[0];
  const nameInput = $("#upload-name");
  if (file && !nameInput.value) nameInput.value = file.name.replace(/\.onnx$/i, "").replace(/[^A-Za-z0-9_.-]/g, "-").slice(0, 64);
});

uploadForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData();
  // Empty optional fields are left out: the API takes its defaults for them.
  for (const [key, value] of new FormData(uploadForm)) {
    if (value instanceof File ? value.size > 0 || key === "model" : value.trim() !== "") form.append(key, value);
  }
  const status = $("#upload-status");
  const progress = $("#upload-progress");
  $("#upload-progress-row").hidden = false;
  $("#upload-submit").disabled = true;
  status.className = "upload-status";
  status.textContent = "Uploading…";
  try {
    const created = await uploadEngine(form, (loaded, total) => {
      progress.value = Math.round((loaded / total) * 100);
      $("#upload-percent").textContent = `${progress.value}% of ${bytes(total)}`;
    });
    status.textContent = `Accepted: ${created.name} version ${created.version} is ${created.state}.`;
    uploadForm.reset();
    uploadDialog.close();
    const target = `#/engines/${encodeURIComponent(created.name)}/versions/${created.version}`;
    if (location.hash === target) refresh();
    else location.hash = target;
  } catch (error) {
    status.className = "upload-status error";
    status.textContent = `Upload refused (${error.status || "network"}): ${error.message}`;
    $("#upload-submit").disabled = false;
  }
});

route();
