// Jobs: the recent jobs of this key's project (`GET /v1/jobs`, refreshed every 2 s, filterable),
// and one job's page: its record, its event log replayed and then followed live through the
// resumable `GET /v1/jobs/{id}/events`, and a cancel button (`POST /v1/jobs/{id}/cancel`).

import { followJob, get, post, query } from "../api.js";
import { ago, badge, duration, empty, errorBox, every, field, fill, h, setOptions } from "../ui.js";

const STATUSES = ["", "queued", "running", "succeeded", "failed", "cancelled", "expired"];
const TYPES = ["", "chat.completion", "text_completion", "embedding", "image", "image_edit", "speech",
  "transcription", "translation", "response", "tokenize"];
const filters = { status: "", type: "", model: "" };
const LIVE = new Set(["queued", "running"]);

export function render(main, [jobId]) {
  return jobId ? renderJob(main, jobId) : renderList(main);
}

function renderList(main) {
  const status = setOptions(h("select", { id: "jobs-status" }), STATUSES.map((s) => [s, s || "any status"]), filters.status);
  const type = setOptions(h("select", { id: "jobs-type" }), TYPES.map((t) => [t, t || "any type"]), filters.type);
  const model = h("input", { id: "jobs-model", value: filters.model, placeholder: "any model" });
  const body = h("div", { id: "jobs-list" }, h("p", { class: "muted" }, "Loading…"));
  const updated = h("span", { class: "small muted" });
  fill(main, h("h1", {}, "Jobs"),
    h("div", { class: "panel stack" },
      h("div", { class: "grid" }, field("Status", status), field("Type", type), field("Model", model)),
      h("div", { class: "row end" }, updated)),
    h("div", { class: "panel table-wrap" }, body));

  const load = async () => {
    const page = await get(`/v1/jobs${query({ limit: 50, ...filters })}`);
    updated.textContent = `Updated ${new Date().toLocaleTimeString()} · refreshes every 2 s`;
    if (!page.data.length) {
      fill(body, empty(Object.values(filters).some(Boolean) ? "No job matches these filters."
        : "No jobs yet. Start one from the playground pages, or with any API call."));
      return;
    }
    fill(body, h("table", { class: "stacked" },
      h("thead", {}, h("tr", {}, ["Job", "Type", "Model", "Status", "Queue", "Worker", "Created", "Ran for"]
        .map((name, i) => h("th", { class: i >= 4 && i <= 5 ? "hide-narrow" : null }, name)))),
      h("tbody", {}, page.data.map((job) => h("tr", {},
        h("td", { class: "mono" }, h("a", { href: `#/jobs/${job.id}` }, job.id.slice(0, 16) + "…")),
        h("td", {}, job.type), h("td", {}, job.model), h("td", {}, badge(job.status)),
        h("td", { class: "hide-narrow mono small" }, job.queue), h("td", { class: "hide-narrow small" }, job.worker || "—"),
        h("td", { class: "small" }, ago(job.created_at)),
        h("td", { class: "small" }, job.started_at ? duration((job.finished_at || Date.now() / 1000) - job.started_at) : "—"))))));
  };
  const stop = every(2000, load, (err) => fill(body, errorBox(err)));
  const changed = () => {
    filters.status = status.value;
    filters.type = type.value;
    filters.model = model.value.trim();
    load().catch((err) => fill(body, errorBox(err)));
  };
  status.addEventListener("change", changed);
  type.addEventListener("change", changed);
  model.addEventListener("change", changed);
  return stop;
}

function renderJob(main, jobId) {
  const controller = new AbortController();
  const summary = h("div", { class: "panel", id: "job-summary" }, h("p", { class: "muted" }, "Loading…"));
  const cancel = h("button", { type: "button", class: "danger", id: "job-cancel", hidden: true }, "Cancel job");
  const log = h("div", { class: "panel log mono small", id: "job-events", "aria-live": "polite" });
  const output = h("pre", { id: "job-output", hidden: true });
  const picture = h("div", { class: "image-out", id: "job-picture", hidden: true });
  const outputTitle = h("h2", { hidden: true }, "Output");
  fill(main, h("p", {}, h("a", { href: "#/jobs" }, "← All jobs")), h("h1", { class: "mono" }, jobId),
    summary, h("div", { class: "row end" }, cancel), outputTitle, output, picture, h("h2", {}, "Event log"), log);

  let text = "";
  const show = (job) => {
    fill(summary, h("div", { class: "grid" },
      item("Status", badge(job.status)), item("Type", job.type), item("Model", job.model), item("Queue", job.queue),
      item("Worker", job.worker || "—"), item("Created", ago(job.created_at)),
      item("Waited", job.started_at ? duration(job.started_at - job.created_at) : "—"),
      item("Ran for", job.started_at ? duration((job.finished_at || Date.now() / 1000) - job.started_at) : "—")),
    job.error ? errorBox(job.error) : null);
    cancel.hidden = !LIVE.has(job.status);
  };
  const refresh = () => get(`/v1/jobs/${encodeURIComponent(jobId)}`).then(show);
  refresh().catch((err) => fill(summary, errorBox(err)));

  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      show(await post(`/v1/jobs/${encodeURIComponent(jobId)}/cancel`, {}));
    } catch (err) {
      summary.append(errorBox(err));
    } finally {
      cancel.disabled = false;
    }
  });

  followJob(jobId, ({ type, id, data }) => {
    const piece = deltaText(type, data);
    if (piece) {
      text += piece;
      output.hidden = outputTitle.hidden = false;
      output.textContent = text;
    }
    const image = type === "delta" && data && data.b64_json ? data : null; // a streamed partial or final image
    if (image) {
      fill(picture, h("img", { src: `data:image/${image.output_format || "png"};base64,${image.b64_json}`,
        alt: image.type === "image_generation.partial_image" ? "Partial image" : "Generated image" }));
      picture.hidden = outputTitle.hidden = false;
    }
    const shown = typeof data === "string" ? data : JSON.stringify(data);
    log.append(h("div", {}, h("span", { class: "muted" }, `${id || ""} `), h("strong", {}, type), " ",
      shown.length > 300 ? `${shown.slice(0, 300)}…` : shown));
    log.scrollTop = log.scrollHeight;
    if (type === "result" || type === "error" || type === "cancelled" || type === "status") {
      refresh().catch(() => {});
    }
  }, { signal: controller.signal })
    .then(() => refresh())
    .catch((err) => { if (err.name !== "AbortError") log.append(errorBox(err)); });
  return () => controller.abort();
}

function item(label, value) {
  return h("div", {}, h("div", { class: "small muted" }, label), h("div", {}, value));
}

/** The text a `delta` event adds (a chat or completion chunk), if any. */
function deltaText(type, data) {
  if (type !== "delta" || !data || !Array.isArray(data.choices) || !data.choices.length) return "";
  const choice = data.choices[0];
  return (choice.delta && choice.delta.content) || choice.text || "";
}
