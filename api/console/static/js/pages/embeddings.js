// Embeddings and tokens at a glance: one embedding per line of text (size, first values, and the
// cosine similarity of every pair), and a model's token ids for a text (`POST /v1/tokenize`).

import { models, post } from "../api.js";
import { errorBox, field, fill, h, modelOptions, setOptions } from "../ui.js";

const state = { lines: "The cat sat on the mat.\nA kitten rested on the rug.\nStock markets fell sharply today.", text: "Hello, localq!" };

export function render(main) {
  const embedModel = h("select", { id: "embed-model" }, h("option", {}, "Loading models…"));
  const lines = h("textarea", { id: "embed-input", rows: 5, value: state.lines });
  const embed = h("button", { type: "submit", id: "embed-go" }, "Embed");
  const embedOut = h("div", { id: "embed-output", "aria-live": "polite" });
  lines.addEventListener("input", () => { state.lines = lines.value; });
  const embedForm = h("form", { class: "panel stack" }, h("h2", {}, "Embeddings"),
    field("Model", embedModel), field("Texts, one per line", lines), h("div", { class: "row end" }, embed), embedOut);

  const tokenModel = h("select", { id: "tokenize-model" }, h("option", {}, "Loading models…"));
  const text = h("textarea", { id: "tokenize-input", rows: 3, value: state.text });
  const tokenize = h("button", { type: "submit", id: "tokenize-go" }, "Tokenize");
  const tokenOut = h("div", { id: "tokenize-output", "aria-live": "polite" });
  text.addEventListener("input", () => { state.text = text.value; });
  const tokenForm = h("form", { class: "panel stack" }, h("h2", {}, "Tokenize"),
    field("Model", tokenModel), field("Text", text), h("div", { class: "row end" }, tokenize), tokenOut);

  fill(main, h("h1", {}, "Embeddings and tokens"), h("div", { class: "two" }, embedForm, tokenForm));

  embedForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const inputs = lines.value.split("\n").map((line) => line.trim()).filter(Boolean);
    if (!embedModel.value || !inputs.length) return;
    embed.disabled = true;
    try {
      const body = await post("/v1/embeddings", { model: embedModel.value, input: inputs });
      const vectors = body.data.map((item) => item.embedding);
      const table = h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, ""), inputs.map((_, i) => h("th", {}, `#${i + 1}`)))),
        h("tbody", {}, vectors.map((a, i) => h("tr", {}, h("th", {}, `#${i + 1}`),
          vectors.map((b) => h("td", { class: "mono" }, cosine(a, b).toFixed(3)))))));
      fill(embedOut,
        h("p", { class: "small muted" }, `${vectors.length} vectors of ${vectors[0].length} dimensions · `,
          `${body.usage ? body.usage.prompt_tokens : "?"} tokens`),
        inputs.map((input, i) => h("div", { class: "small" }, h("strong", {}, `#${i + 1} `), input,
          h("div", { class: "mono muted" }, `[${vectors[i].slice(0, 6).map((v) => v.toFixed(4)).join(", ")}, …]`))),
        inputs.length > 1 ? [h("h2", {}, "Cosine similarity"), h("div", { class: "table-wrap" }, table)] : null);
    } catch (err) {
      fill(embedOut, errorBox(err));
    } finally {
      embed.disabled = false;
    }
  });

  tokenForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!tokenModel.value) return;
    tokenize.disabled = true;
    try {
      const body = await post("/v1/tokenize", { model: tokenModel.value, content: text.value });
      fill(tokenOut, h("p", { class: "small muted", id: "tokenize-count" }, `${body.tokens.length} tokens`),
        h("div", { class: "chips" }, body.tokens.map((token) => h("span", { class: "chip mono" }, String(token)))));
    } catch (err) {
      fill(tokenOut, errorBox(err));
    } finally {
      tokenize.disabled = false;
    }
  });

  models().then((all) => {
    const embedders = modelOptions(all, "embedding");
    if (embedders.length) setOptions(embedModel, embedders);
    else fill(embedModel, h("option", { value: "" }, "No embedding model configured"));
    const tokenizers = modelOptions(all, "tokenize");
    if (tokenizers.length) setOptions(tokenModel, tokenizers);
    else fill(tokenModel, h("option", { value: "" }, "No model with a tokenizer"));
  }).catch((err) => fill(embedOut, errorBox(err)));
}

function cosine(a, b) {
  let dot = 0;
  let normA = 0;
  let normB = 0;
  for (let i = 0; i < a.length; i += 1) {
    dot += a[i] * b[i];
    normA += a[i] * a[i];
    normB += b[i] * b[i];
  }
  return dot / (Math.sqrt(normA * normB) || 1);
}
