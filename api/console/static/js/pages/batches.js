// Batches: upload a JSONL file (`POST /v1/files`, purpose batch), create a batch
// (`POST /v1/batches`), and watch every batch's progress (`GET /v1/batches`, every 2 s): lines
// completed and failed of the total, the rate and the time left, cancel, and the output and error
// files downloaded with this tab's key.

import { call, download, get, post } from "../api.js";
import { ago, badge, duration, empty, errorBox, every, field, fill, h, setOptions } from "../ui.js";

const ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"];
const ACTIVE = new Set(["validating", "in_progress", "finalizing", "cancelling"]);
const seen = new Map(); // batch id -> [{at, done}] samples, for the rate

export function render(main) {
  const file = h("input", { id: "batch-file", type: "file", accept: ".jsonl,application/jsonl,application/x-ndjson,text/plain" });
  const endpoint = setOptions(h("select", { id: "batch-endpoint" }), ENDPOINTS, ENDPOINTS[0]);
  const submit = h("button", { type: "submit", id: "batch-create" }, "Upload and start");
  const formStatus = h("div", { id: "batch-form-status", "aria-live": "polite" });
  const form = h("form", { class: "panel stack" },
    h("p", { class: "small muted" }, "One request per line, as OpenAI's Batch API takes them: ",
      h("code", {}, '{"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}')),
    h("div", { class: "grid" }, field("JSONL file", file), field("Endpoint", endpoint)),
    h("div", { class: "row end" }, submit), formStatus);
  const list = h("div", { id: "batch-list", class: "stack" }, h("p", { class: "muted" }, "Loading…"));
  fill(main, h("h1", {}, "Batches"), form, h("h2", {}, "Recent batches"), list);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!file.files.length) return fill(formStatus, errorBox(new Error("Choose a JSONL file first.")));
    submit.disabled = true;
    fill(formStatus, h("span", { class: "small muted" }, "Uploading…"));
    try {
      const upload = new FormData();
      upload.append("purpose", "batch");
      upload.append("file", file.files[0]);
      const uploaded = await call("POST", "/v1/files", { form: upload });
      const batch = await post("/v1/batches", { input_file_id: uploaded.id, endpoint: endpoint.value,
        completion_window: "24h", metadata: { source: "localq console", file: file.files[0].name.slice(0, 500) } });
      fill(formStatus, h("span", { class: "small muted" }, `Started ${batch.id}.`));
      file.value = "";
      await load();
    } catch (err) {
      fill(formStatus, errorBox(err));
    } finally {
      submit.disabled = false;
    }
  });

  const load = async () => {
    const page = await get("/v1/batches?limit=20");
    if (!page.data.length) return fill(list, empty("No batches yet. Upload a JSONL file above to start one."));
    fill(list, page.data.map(batchCard));
  };
  return every(2000, load, (err) => fill(list, errorBox(err)));
}

function batchCard(batch) {
  const counts = batch.request_counts || { total: 0, completed: 0, failed: 0 };
  const done = counts.completed + counts.failed;
  const fraction = counts.total ? done / counts.total : (batch.status === "completed" ? 1 : 0);
  const samples = seen.get(batch.id) || [];
  samples.push({ at: Date.now() / 1000, done });
  while (samples.length > 30) samples.shift();
  seen.set(batch.id, samples);
  const rate = rateOf(batch, samples);
  const left = rate > 0 && ACTIVE.has(batch.status) ? (counts.total - done) / rate : null;
  const actions = h("div", { class: "row" });
  if (ACTIVE.has(batch.status) && batch.status !== "cancelling") {
    actions.append(h("button", { type: "button", class: "danger", onclick: async (event) => {
      event.target.disabled = true;
      try { await post(`/v1/batches/${batch.id}/cancel`, {}); } catch (err) { actions.append(errorBox(err)); }
    } }, "Cancel"));
  }
  for (const [label, fileId, suffix] of [["Output", batch.output_file_id, "output"], ["Errors", batch.error_file_id, "errors"]]) {
    if (!fileId) continue;
    actions.append(h("button", { type: "button", class: "ghost", "data-file": suffix, onclick: () =>
      download(`/v1/files/${fileId}/content`, `${batch.id}_${suffix}.jsonl`).catch((err) => actions.append(errorBox(err))) },
    `Download ${label.toLowerCase()}`));
  }
  const progress = h("progress", { max: 1, value: fraction, "aria-label": `${Math.round(fraction * 100)}% done` });
  return h("article", { class: "panel stack batch", "data-batch": batch.id, "data-status": batch.status },
    h("div", { class: "row" }, h("strong", { class: "mono" }, batch.id), badge(batch.status),
      h("span", { class: "small muted" }, `${batch.endpoint} · created ${ago(batch.created_at)}`)),
    progress,
    h("div", { class: "row small" },
      h("span", { class: "batch-counts" }, `${counts.completed} completed · ${counts.failed} failed · ${counts.total} total`),
      h("span", { class: "muted" }, rate > 0 ? `${rate.toFixed(2)} lines/s` : ""),
      h("span", { class: "muted" }, left !== null ? `about ${duration(left)} left` : "")),
    batch.errors && batch.errors.data && batch.errors.data.length
      ? errorBox(new Error(batch.errors.data.map((e) => e.message).join("; "))) : null,
    actions);
}

/** Lines per second: over the samples this page took, else since the batch started. */
function rateOf(batch, samples) {
  const first = samples[0];
  const last = samples[samples.length - 1];
  if (samples.length > 2 && last.at > first.at && last.done > first.done) return (last.done - first.done) / (last.at - first.at);
  const started = batch.in_progress_at;
  const ended = batch.completed_at || batch.failed_at || batch.cancelled_at || last.at;
  return started && ended > started ? last.done / (ended - started) : 0;
}
