// Small DOM helpers: elements built with text (never HTML strings, so nothing the API returns can
// inject markup), formatting, empty and error states, and a sparkline chart.

/** h("div", {class: "x", onclick: f}, child, "text", ...) */
export function h(tag, props = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") element.addEventListener(name.slice(2), value);
    else if (name === "class") element.className = value;
    else if (name === "text") element.textContent = value;
    else if (name === "value") element.value = value; // a textarea's value is no attribute
    else if (name in element && typeof value !== "string") element[name] = value;
    else element.setAttribute(name, value === true ? "" : value);
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace an element's content. */
export function fill(element, ...children) {
  element.replaceChildren();
  append(element, children);
  return element;
}

export function errorBox(err) {
  const message = err && err.message ? err.message : String(err);
  const detail = err && err.error && (err.error.code || err.error.param)
    ? ` (${[err.error.code, err.error.param && `param: ${err.error.param}`].filter(Boolean).join(", ")})` : "";
  return h("div", { class: "error", role: "alert" }, message + detail);
}

export function empty(text, ...more) {
  return h("div", { class: "empty" }, text, ...more);
}

export function badge(status) {
  return h("span", { class: `badge ${status}` }, status);
}

export function field(label, input, hint) {
  return h("label", {}, label, input, hint ? h("span", { class: "small muted" }, hint) : null);
}

export function select(options, value, props = {}) {
  return setOptions(h("select", props), options, value);
}

/** Replace a <select>'s options ([value, text] pairs or plain values) and choose `value`. */
export function setOptions(element, options, value) {
  element.replaceChildren();
  for (const option of options) {
    const [optionValue, text] = Array.isArray(option) ? option : [option, option];
    element.append(h("option", { value: optionValue }, text));
  }
  if (value !== undefined && options.some((o) => (Array.isArray(o) ? o[0] : o) === value)) element.value = value;
  return element;
}

export function when(unix) {
  if (!unix) return "—";
  return new Date(unix * 1000).toLocaleString();
}

export function ago(unix) {
  if (!unix) return "—";
  const seconds = Math.max(0, Date.now() / 1000 - unix);
  if (seconds < 60) return `${Math.round(seconds)} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} d ago`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 90) return `${seconds.toFixed(1)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

export function bytes(count) {
  if (count === null || count === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = count;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(value < 10 && unit ? 1 : 0)} ${units[unit]}`;
}

export function bar(fraction, label) {
  const percent = Math.max(0, Math.min(1, fraction || 0)) * 100;
  const filled = h("span", {});
  filled.style.width = `${percent}%`; // set through the CSSOM: the CSP allows no inline style attribute
  return h("div", { class: "bar", role: "img", "aria-label": label || `${percent.toFixed(0)}%` }, filled);
}

const SVG = "http://www.w3.org/2000/svg";

/** A small line chart of `values` (oldest first), scaled to its own maximum. */
export function sparkline(values, label) {
  const width = 240;
  const height = 48;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("class", "spark");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", label);
  if (values.length < 2) return svg;
  const top = Math.max(1, ...values);
  const points = values.map((value, index) => {
    const x = (index / (values.length - 1)) * width;
    const y = height - 2 - (value / top) * (height - 4);
    return `${x.toFixed(1)},${y.toFixed(1)}`;
  });
  const area = document.createElementNS(SVG, "polygon");
  area.setAttribute("class", "area");
  area.setAttribute("points", `0,${height} ${points.join(" ")} ${width},${height}`);
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("points", points.join(" "));
  svg.append(area, line);
  return svg;
}

/** Run `task` now and every `ms` until the returned stop function is called; errors go to `onError`. */
export function every(ms, task, onError) {
  let stopped = false;
  let timer = null;
  const tick = async () => {
    try {
      await task();
    } catch (err) {
      if (onError) onError(err);
    }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

/** Model <select> options ([name, label]) for the models that can do `capability`. */
export function modelOptions(models, capability) {
  return models.filter((model) => model.capabilities.includes(capability))
    .map((model) => [model.name, model.aliases.length ? `${model.name} (${model.aliases.join(", ")})` : model.name]);
}
