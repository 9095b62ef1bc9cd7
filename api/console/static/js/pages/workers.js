// Workers and queues: every live worker from its heartbeat (`GET /v1/workers`): device, GPU,
// queues, model memory used of its budget, loaded models, running jobs and busy slots, its batching
// engines; and the queues (`GET /v1/queues`) with their depth and the job rate over the last
// minutes, sampled every 2 s while the console is open (a worker that restarts resets its count).

import { get } from "../api.js";
import { bar, bytes, duration, empty, errorBox, every, fill, h, sparkline } from "../ui.js";

const WINDOW_SECONDS = 10 * 60;
const SAMPLES = "localq.samples";
// {at, depths: {queue: waiting}, done} oldest first; kept in the tab's session storage so a
// reload keeps the charts
const history = { samples: load() };
let sampler = null;

function load() {
  try {
    const samples = JSON.parse(sessionStorage.getItem(SAMPLES) || "[]");
    return Array.isArray(samples) ? samples : [];
  } catch {
    return [];
  }
}

/** Sample the queues and the workers' job counters in the background from the first visit on, so
 * the charts show the last minutes rather than only the time this page has been open. */
function startSampler() {
  if (sampler) return;
  sampler = every(2000, async () => sample(await get("/v1/queues")), () => {});
}

function sample(queues) {
  const at = Date.now() / 1000;
  const depths = {};
  for (const queue of queues.data) depths[queue.name] = queue.waiting;
  const done = queues.jobs_done || 0; // the live workers' counters added up
  history.samples.push({ at, depths, done });
  while (history.samples.length && history.samples[0].at < at - WINDOW_SECONDS) history.samples.shift();
  sessionStorage.setItem(SAMPLES, JSON.stringify(history.samples));
}

/** Jobs finished per minute between consecutive samples (a restarted worker's counter resets: skipped). */
function jobRates() {
  const rates = [];
  const samples = history.samples;
  for (let i = 1; i < samples.length; i += 1) {
    const delta = samples[i].done - samples[i - 1].done;
    const seconds = samples[i].at - samples[i - 1].at;
    if (seconds > 30) rates.push(0); // the console was closed meanwhile: no rate to show for the gap
    else rates.push(delta >= 0 && seconds > 0 ? (delta / seconds) * 60 : 0);
  }
  return rates;
}

export function render(main) {
  startSampler();
  const queuesBox = h("div", { id: "queues", class: "cards" }, h("p", { class: "muted" }, "Loading…"));
  const rateBox = h("div", { class: "panel", id: "job-rate" });
  const workersBox = h("div", { id: "workers", class: "cards" }, h("p", { class: "muted" }, "Loading…"));
  fill(main, h("h1", {}, "Workers and queues"),
    h("h2", {}, "Job rate"), rateBox,
    h("h2", {}, "Queues"), queuesBox,
    h("h2", {}, "Workers"), workersBox);

  const draw = async () => {
    const [queues, workers] = await Promise.all([get("/v1/queues"), get("/v1/workers")]);
    const rates = jobRates();
    const minutes = history.samples.length > 1
      ? Math.round((history.samples[history.samples.length - 1].at - history.samples[0].at) / 60) : 0;
    const peak = rates.length ? Math.max(...rates) : 0;
    fill(rateBox, h("div", { class: "row" }, h("strong", {}, `${rates.length ? rates[rates.length - 1].toFixed(0) : 0} jobs/min`),
      h("span", { class: "small muted" }, `finished now, all workers · peak ${peak.toFixed(0)} jobs/min · last ${minutes || "<1"} min`)),
    rates.length > 1 ? sparkline(rates, "Jobs finished per minute")
      : h("p", { class: "small muted" }, "Collecting samples: the charts fill in over the next minutes."));
    fill(queuesBox, queues.data.length ? queues.data.map((queue) => h("article", { class: "panel stack", "data-queue": queue.name },
      h("div", { class: "row" }, h("strong", { class: "mono" }, queue.name),
        queue.workers ? null : h("span", { class: "badge failed", title: "No live worker takes this queue's jobs" }, "no worker"),
        h("span", { class: "small muted" }, `${queue.waiting} waiting`,
          queue.waiting ? ` (${queue.waiting_interactive} interactive, ${queue.waiting_batch} batch)` : "")),
      sparkline(history.samples.map((s) => s.depths[queue.name] || 0), `Jobs waiting in ${queue.name}`)))
      : empty("No queues yet."));
    fill(workersBox, workers.data.length ? workers.data.map(workerCard)
      : empty("No worker has reported in. Start one with ", h("code", {}, "localq worker"), " (", h("code", {}, "make run"), " starts one)."));
  };
  return every(2000, draw, (err) => fill(workersBox, errorBox(err)));
}

function workerCard(worker) {
  const budget = worker.memory_budget_bytes || 0;
  const used = worker.memory_used_bytes || 0;
  const engines = Object.entries(worker.engines || {});
  return h("article", { class: "panel stack worker", "data-worker": worker.id },
    h("div", { class: "row" }, h("strong", {}, worker.id),
      h("span", { class: "badge ok" }, worker.device + (worker.gpu_index !== null && worker.gpu_index !== undefined ? ` ${worker.gpu_index}` : "")),
      worker.simulated ? h("span", { class: "badge" }, "simulated") : null),
    h("div", { class: "small muted" }, `${worker.hostname} · pid ${worker.pid} · up ${duration(Date.now() / 1000 - worker.started_at)}`
      + ` · ${worker.jobs_done || 0} jobs done`),
    h("div", { class: "small" }, "Queues: ", h("span", { class: "mono" }, (worker.queues || []).join(", "))),
    h("div", { class: "small" }, `Model memory ${bytes(used)}${budget ? ` of ${bytes(budget)}` : " (no budget)"}`),
    budget ? bar(used / budget, "Model memory used of the budget") : null,
    h("div", { class: "small chips" }, "Loaded:", (worker.loaded_models || []).length
      ? worker.loaded_models.map((name) => h("span", { class: "chip" }, name)) : h("span", { class: "muted" }, "none")),
    h("div", { class: "small" }, `Slots ${worker.slots_busy} busy of ${worker.slots}`),
    bar(worker.slots ? worker.slots_busy / worker.slots : 0, "Busy slots"),
    (worker.running_jobs || []).length
      ? h("div", { class: "small" }, "Running: ", worker.running_jobs.map((job) =>
        h("a", { class: "mono", href: `#/jobs/${job.id}` }, `${job.id.slice(0, 14)}… (${job.model || "?"}) `)))
      : h("div", { class: "small muted" }, "Idle"),
    engines.length ? h("div", { class: "small" }, engines.map(([name, stats]) =>
      h("div", {}, h("strong", {}, name), ` · ${stats.running || 0} running · ${(stats.tokens_per_second || 0).toFixed(1)} tokens/s`))) : null);
}
