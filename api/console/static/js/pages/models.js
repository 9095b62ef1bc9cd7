// Models: every model this key may use (`GET /v1/models`), one row per config with the ids a
// client may send (its name and aliases), what it can do, its backend and device.

import { models } from "../api.js";
import { empty, errorBox, fill, h } from "../ui.js";

const LABELS = {
  chat: "chat", completion: "completions", embedding: "embeddings", tokenize: "tokenize", detokenize: "detokenize",
  image: "images", image_edit: "image edits", speech: "speech", transcription: "transcription", translation: "translation",
};

export function render(main) {
  const body = h("div", { class: "panel table-wrap", id: "models" }, h("p", { class: "muted" }, "Loading…"));
  fill(main, h("h1", {}, "Models"), body);
  models(true).then((all) => {
    if (!all.length) return fill(body, empty("No model is configured for this key."));
    fill(body, h("table", { class: "stacked" },
      h("thead", {}, h("tr", {}, ["Model", "Aliases", "Can do", "Backend", "Device"].map((name) => h("th", {}, name)))),
      h("tbody", {}, all.map((model) => h("tr", { "data-model": model.name },
        h("td", {}, h("strong", { class: "mono" }, model.name), model.description ? h("div", { class: "small muted" }, model.description) : null),
        h("td", {}, h("div", { class: "chips" }, model.aliases.map((alias) => h("span", { class: "chip mono" }, alias)))),
        h("td", {}, h("div", { class: "chips" }, model.capabilities.map((kind) => h("span", { class: "chip" }, LABELS[kind] || kind)))),
        h("td", { class: "mono small" }, model.backend || "—"),
        h("td", {}, model.device || "—"))))));
  }).catch((err) => fill(body, errorBox(err)));
}
