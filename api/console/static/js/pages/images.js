// Images: `POST /v1/images/generations` with `stream: true` (partial images as they are decoded),
// while the job's own event log (`GET /v1/jobs/{id}/events`) gives the denoising steps for the
// progress bar. The finished picture is shown and can be downloaded.

import { call, chunks, followJob, models } from "../api.js";
import { errorBox, field, fill, h, modelOptions, setOptions } from "../ui.js";

const state = { model: "", prompt: "a lighthouse on a cliff at dawn, watercolor", size: "256x256", steps: "", seed: "", partials: "2" };
const LAST = "localq.lastImage";
let last = restoreLast(); // {source, name, jobId, prompt} of the last picture, shown again on return

function restoreLast() {
  try {
    return JSON.parse(sessionStorage.getItem(LAST) || "null");
  } catch {
    return null;
  }
}

function keepLast(picture) {
  last = picture;
  try {
    sessionStorage.setItem(LAST, JSON.stringify(picture));
  } catch { /* too large for session storage: kept in this page only */ }
}

function result(picture) {
  return [h("img", { src: picture.source, alt: picture.prompt, id: "image-result" }),
    h("div", { class: "row" }, h("a", { class: "button ghost", href: picture.source, download: picture.name, id: "image-download" }, "Download"),
      picture.jobId ? h("a", { class: "small", href: `#/jobs/${picture.jobId}` }, "job") : null)];
}

export function render(main) {
  const controller = new AbortController();
  const modelSelect = h("select", { id: "image-model" }, h("option", {}, "Loading models…"));
  const prompt = h("textarea", { id: "image-prompt", rows: 3, value: state.prompt });
  const size = h("select", { id: "image-size" });
  setOptions(size, ["256x256", "512x512", "768x768", "1024x1024"], state.size);
  const steps = h("input", { id: "image-steps", type: "number", min: 1, max: 200, value: state.steps, placeholder: "model's default" });
  const seed = h("input", { id: "image-seed", type: "number", step: 1, value: state.seed, placeholder: "random" });
  const partials = h("input", { type: "number", min: 0, max: 3, value: state.partials });
  const generate = h("button", { type: "submit", id: "image-generate" }, "Generate");
  const progress = h("progress", { id: "image-progress", max: 1, value: 0 });
  const status = h("div", { class: "small muted", id: "image-status", "aria-live": "polite" }, "No image yet.");
  const previews = h("div", { class: "thumbs", id: "image-partials" });
  const output = h("div", { class: "image-out", id: "image-output" });
  const bind = (name, element) => element.addEventListener("input", () => { state[name] = element.value; });
  bind("prompt", prompt); bind("size", size); bind("steps", steps); bind("seed", seed); bind("partials", partials);
  modelSelect.addEventListener("change", () => { state.model = modelSelect.value; });

  const form = h("form", { class: "panel stack" },
    field("Model", modelSelect),
    field("Prompt", prompt),
    h("div", { class: "grid" }, field("Size", size), field("Steps", steps), field("Seed", seed),
      field("Partial images", partials)),
    h("div", { class: "row end" }, generate));
  fill(main, h("h1", {}, "Images"), h("div", { class: "two" }, form,
    h("section", { class: "panel stack" }, progress, status, previews, output)));
  if (last) {
    progress.value = 1;
    fill(status, "Last picture");
    fill(output, result(last));
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!state.model || !prompt.value.trim()) return;
    generate.disabled = true;
    progress.value = 0;
    progress.removeAttribute("value"); // indeterminate until the first step
    fill(status, "Queued…");
    fill(previews);
    fill(output);
    const extensions = {};
    if (steps.value) extensions.steps = Number(steps.value);
    if (seed.value !== "") extensions.seed = Number(seed.value);
    const body = { model: state.model, prompt: prompt.value, size: size.value, n: 1, stream: true,
      partial_images: Number(partials.value || 0), response_format: "b64_json" };
    if (Object.keys(extensions).length) body["x-localai-extensions"] = extensions;
    try {
      const response = await call("POST", "/v1/images/generations", { json: body, raw: true, signal: controller.signal });
      const jobId = response.headers.get("x-localq-job-id");
      const following = jobId ? followJob(jobId, ({ type, data }) => {
        if (type === "progress" && data && data.total_steps) {
          progress.value = data.step / data.total_steps;
          fill(status, `Step ${data.step} of ${data.total_steps}`, " · ", h("a", { href: `#/jobs/${jobId}` }, "job"));
        }
      }, { signal: controller.signal }).catch(() => {}) : Promise.resolve();
      for await (const { payload } of chunks(response)) {
        const source = payload.b64_json ? `data:image/${payload.output_format || "png"};base64,${payload.b64_json}` : null;
        if (!source) continue;
        if (payload.type === "image_generation.partial_image") {
          previews.append(h("img", { src: source, alt: `Partial image ${payload.partial_image_index + 1}` }));
        } else if (payload.type === "image_generation.completed") {
          const picture = { source, name: `localq-${jobId || "image"}.${payload.output_format || "png"}`, jobId, prompt: prompt.value };
          keepLast(picture);
          fill(output, result(picture));
        }
      }
      await following;
      progress.value = 1;
      fill(status, "Done", jobId ? [" · ", h("a", { href: `#/jobs/${jobId}` }, "job")] : []);
    } catch (err) {
      if (err.name !== "AbortError") {
        progress.value = 0;
        fill(status, errorBox(err));
      }
    } finally {
      generate.disabled = false;
    }
  });

  models().then((all) => {
    const options = modelOptions(all, "image");
    if (!options.length) return fill(modelSelect, h("option", { value: "" }, "No image model configured"));
    if (!options.some(([name]) => name === state.model)) state.model = options[0][0];
    setOptions(modelSelect, options, state.model);
  }).catch((err) => fill(status, errorBox(err)));

  return () => controller.abort();
}
