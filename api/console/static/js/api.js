// localq's public HTTP API, as the console calls it: the key from this tab's session storage as a
// bearer token, OpenAI-shaped errors turned into ApiError (its message is the API's own), and
// server-sent events read from fetch (EventSource cannot send an Authorization header).

const KEY = "localq.apiKey";

export function apiKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(message, status, error) {
    super(message);
    this.status = status;
    this.error = error || null; // the API's {message, type, param, code}
  }
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText || "error"}`;
  let error = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      error = body.error;
      if (error.message) message = error.message;
    }
  } catch { /* not JSON: keep the status line */ }
  const err = new ApiError(message, response.status, error);
  if (response.status === 401) window.dispatchEvent(new CustomEvent("localq:unauthorized", { detail: err }));
  return err;
}

/** One API call. `json` or `form` is the body; `raw` returns the Response (streams, files). */
export async function call(method, path, { json, form, signal, raw = false, extraHeaders = {} } = {}) {
  const init = { method, signal, credentials: "omit", cache: "no-store", headers: headers(extraHeaders) };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form;
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(`Could not reach the server (${err.message}).`, 0, null);
  }
  if (!response.ok) throw await errorOf(response);
  if (raw) return response;
  if (response.status === 204) return null;
  return response.json();
}

export const get = (path, options) => call("GET", path, options);
export const post = (path, json, options = {}) => call("POST", path, { ...options, json });
export const del = (path, options) => call("DELETE", path, options);

/** A query string from an object, leaving out empty values. */
export function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") search.set(name, value);
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

/** Server-sent events of a fetch Response: {type, id, data} as each event completes. */
export async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  let type = "message";
  let id = null;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        let line = buffer.slice(0, end);
        buffer = buffer.slice(end + 1);
        if (line.endsWith("\r")) line = line.slice(0, -1);
        if (line === "") {
          if (data.length) yield { type, id, data: data.join("\n") };
          data = [];
          type = "message";
          continue;
        }
        if (line.startsWith(":")) continue; // a keep-alive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "data") data.push(text);
        else if (field === "event") type = text;
        else if (field === "id") id = text;
      }
    }
  } finally {
    reader.releaseLock();
  }
}

/** The JSON payloads of an OpenAI-style stream, up to `[DONE]`; an in-stream error throws. */
export async function* chunks(response) {
  for await (const event of events(response)) {
    if (event.data === "[DONE]") return;
    const payload = JSON.parse(event.data);
    if (payload && payload.error) throw new ApiError(payload.error.message || "The stream ended with an error.", 0, payload.error);
    yield { type: event.type, id: event.id, payload };
  }
}

const FINAL = new Set(["result", "error", "cancelled"]);

/**
 * Follow a job's resumable event log (`GET /v1/jobs/{id}/events`) from `after`, calling
 * `onEvent({type, id, data})` for each; a dropped connection resumes from the last id seen with
 * Last-Event-ID. Resolves when the job has ended (or `signal` aborts).
 */
export async function followJob(jobId, onEvent, { after = "0-0", signal } = {}) {
  let last = after;
  let failures = 0;
  while (!signal || !signal.aborted) {
    let response;
    try {
      response = await call("GET", `/v1/jobs/${encodeURIComponent(jobId)}/events`,
        { raw: true, signal, extraHeaders: { "Last-Event-ID": last } });
    } catch (err) {
      if (err.name === "AbortError" || err.status) throw err;
      if (++failures > 5) throw err;
      await new Promise((resolve) => setTimeout(resolve, 500 * failures));
      continue;
    }
    if (response.status === 204) return; // nothing more: the job had ended
    try {
      for await (const event of events(response)) {
        if (event.id) last = event.id;
        let data = event.data;
        try { data = JSON.parse(event.data); } catch { /* keep the text */ }
        onEvent({ type: event.type, id: event.id, data });
        if (FINAL.has(event.type)) return;
      }
    } catch (err) {
      if (err.name === "AbortError") throw err;
    }
    if (++failures > 5) return;
  }
}

/** Download a file the API serves (it needs the bearer token, so a plain link cannot). */
export async function download(path, filename) {
  const response = await call("GET", path, { raw: true });
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

let modelsCache = null;

/** The models this key may use (`/v1/models`), one entry per config, with its ids. */
export async function models(refresh = false) {
  if (!modelsCache || refresh) {
    modelsCache = get("/v1/models").then((body) => {
      const byName = new Map();
      for (const model of body.data) {
        const details = model.localq || { name: model.id, aliases: [], capabilities: [] };
        if (!byName.has(details.name)) byName.set(details.name, { ...details, ids: [] });
        byName.get(details.name).ids.push(model.id);
      }
      return [...byName.values()];
    }).catch((err) => { modelsCache = null; throw err; });
  }
  return modelsCache;
}

export function forgetModels() {
  modelsCache = null;
}
