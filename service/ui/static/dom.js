// Small DOM helpers. Text always goes in as text nodes: nothing from the server is parsed as HTML.

export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

export function $(selector, root = document) {
  return root.querySelector(selector);
}

export function number(value, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (typeof value !== "number") return String(value);
  if (value !== 0 && Math.abs(value) < 10 ** -digits) return value.toExponential(1);
  return value.toLocaleString("en-US", { maximumFractionDigits: digits });
}

export function bytes(value) {
  if (value === null || value === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let size = value;
  let unit = 0;
  while (size >= 1024 && unit < units.length - 1) {
    size /= 1024;
    unit += 1;
  }
  return `${number(size, unit ? 1 : 0)} ${units[unit]}`;
}

export function ago(unixSeconds) {
  if (!unixSeconds) return "–";
  const seconds = Math.max(0, Date.now() / 1000 - unixSeconds);
  if (seconds < 60) return `${Math.round(seconds)} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
  return new Date(unixSeconds * 1000).toISOString().slice(0, 10);
}

export function label(text) {
  return String(text).replaceAll("_", " ");
}

const STATE_MARKS = { ready: "✓", fallback: "!", building: "◔", loading: "◑", failed: "✕", unloading: "…" };

// A state as a word with a mark, so it reads without colour; the colour only repeats it.
export function stateBadge(state, progress) {
  const word = state || "unknown";
  const text = progress !== undefined && (word === "building" || word === "loading")
    ? `${word} ${Math.round(progress * 100)}%`
    : word;
  return h("span", { class: `badge state state-${word}`, dataset: { state: word } },
    h("span", { class: "mark", "aria-hidden": "true" }, STATE_MARKS[word] || "•"), text);
}

export function progressBar(progress, phase) {
  const percent = Math.round((progress || 0) * 100);
  return h("div", { class: "progress" },
    h("progress", { max: "100", value: String(percent), "aria-label": `build progress ${percent}%` }),
    h("span", { class: "progress-text" }, `${phase || "queued"} · ${percent}%`));
}

// The serving tier, when the server reports one (a string or an object with a tier).
export function tierText(serving) {
  if (!serving) return null;
  if (typeof serving === "string") return serving;
  return serving.tier || null;
}

// Per-replica state counts, e.g. {ready: 2, loading: 1}, when the server reports them.
export function replicasText(replicas) {
  if (!replicas || typeof replicas !== "object") return null;
  return Object.entries(replicas).map(([state, count]) => `${count} ${state}`).join(" · ");
}
