// Chat playground: `POST /v1/chat/completions` with `stream: true`, the answer written as its
// chunks arrive, time to first token and tokens per second per answer. The conversation lives in
// this module, so it is still there after visiting another page (and gone on reload).

import { call, chunks, models } from "../api.js";
import { errorBox, field, fill, h, modelOptions, setOptions } from "../ui.js";

const SAVED = "localq.chat";
const state = {
  model: "",
  system: "You are a helpful assistant.",
  temperature: "0.7",
  top_p: "1",
  max_tokens: "256",
  seed: "",
  messages: [], // {role, content, stats?, error?, jobId?}
};
restore();
let running = null; // the AbortController of the answer being streamed
let redraw = () => {}; // the shown page's; an answer streams on while another page is shown
let counter = 0;

export function render(main) {
  const list = h("div", { class: "messages", "aria-live": "polite", id: "chat-messages" });
  const input = h("textarea", { id: "chat-input", rows: 3, placeholder: "Message (Enter to send, Shift+Enter for a new line)" });
  const send = h("button", { type: "submit", id: "chat-send" }, "Send");
  const stop = h("button", { type: "button", class: "danger", id: "chat-stop", hidden: true }, "Stop");
  const regenerate = h("button", { type: "button", class: "ghost", id: "chat-regenerate" }, "Regenerate");
  const clear = h("button", { type: "button", class: "ghost" }, "Clear");
  const modelSelect = h("select", { id: "chat-model" }, h("option", {}, "Loading models…"));
  const settings = {
    system: h("textarea", { id: "chat-system", rows: 4, value: state.system }),
    temperature: h("input", { type: "number", min: 0, max: 2, step: 0.1, value: state.temperature }),
    top_p: h("input", { type: "number", min: 0, max: 1, step: 0.05, value: state.top_p }),
    max_tokens: h("input", { type: "number", min: 1, step: 1, value: state.max_tokens }),
    seed: h("input", { type: "number", step: 1, value: state.seed, placeholder: "random" }),
  };
  for (const [name, element] of Object.entries(settings)) {
    element.addEventListener("input", () => { state[name] = element.value; save(); });
  }
  modelSelect.addEventListener("change", () => { state.model = modelSelect.value; save(); });

  const side = h("aside", { class: "panel stack" },
    field("Model", modelSelect),
    field("System prompt", settings.system),
    h("div", { class: "grid" },
      field("Temperature", settings.temperature),
      field("Top p", settings.top_p),
      field("Max tokens", settings.max_tokens),
      field("Seed", settings.seed)));
  const form = h("form", { class: "composer" }, input, h("div", { class: "stack" }, send, stop));
  fill(main, h("h1", {}, "Chat"), h("div", { class: "chat" }, side,
    h("section", {}, list, form, h("div", { class: "row end" }, regenerate, clear))));

  const draw = () => {
    fill(list, state.messages.length ? state.messages.map(messageView)
      : h("div", { class: "empty" }, "No messages yet. Pick a model, type below and press Enter."));
    const busy = Boolean(running);
    send.hidden = busy;
    stop.hidden = !busy;
    regenerate.disabled = busy || !state.messages.some((m) => m.role === "assistant");
    if (!busy) save();
  };

  const ask = async () => {
    const controller = new AbortController();
    running = controller;
    const answer = { role: "assistant", content: "", key: `answer-${++counter}` };
    state.messages.push(answer);
    redraw();
    const started = performance.now();
    let first = null;
    try {
      const body = {
        model: state.model,
        messages: [
          ...(state.system.trim() ? [{ role: "system", content: state.system }] : []),
          ...state.messages.filter((m) => m !== answer && !m.error).map(({ role, content }) => ({ role, content })),
        ],
        stream: true,
        stream_options: { include_usage: true },
        temperature: Number(state.temperature),
        top_p: Number(state.top_p),
        max_tokens: Number(state.max_tokens),
      };
      if (state.seed !== "") body.seed = Number(state.seed);
      const response = await call("POST", "/v1/chat/completions", { json: body, raw: true, signal: controller.signal });
      answer.jobId = response.headers.get("x-localq-job-id");
      let usage = null;
      for await (const { payload } of chunks(response)) {
        const piece = payload.choices && payload.choices[0] && payload.choices[0].delta
          ? payload.choices[0].delta.content || "" : "";
        if (piece) {
          if (first === null) first = performance.now();
          answer.content += piece;
          const text = document.querySelector(`#${answer.key} .text`);
          if (text) text.textContent = answer.content;
        }
        if (payload.usage) usage = payload.usage;
      }
      const end = performance.now();
      const tokens = usage ? usage.completion_tokens : null;
      const decodeSeconds = first === null ? null : (end - first) / 1000;
      answer.stats = {
        ttft: first === null ? null : first - started,
        tokensPerSecond: tokens && decodeSeconds > 0 ? (tokens - 1) / decodeSeconds : null,
        tokens,
      };
    } catch (err) {
      if (err.name === "AbortError") answer.stopped = true;
      else answer.error = err;
    } finally {
      running = null;
      redraw();
    }
  };

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (running || !input.value.trim() || !state.model) return;
    state.messages.push({ role: "user", content: input.value });
    input.value = "";
    ask();
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  stop.addEventListener("click", () => running && running.abort());
  regenerate.addEventListener("click", () => {
    while (state.messages.length && state.messages[state.messages.length - 1].role === "assistant") state.messages.pop();
    if (state.messages.length) ask();
  });
  clear.addEventListener("click", () => {
    if (running) running.abort();
    state.messages = [];
    draw();
  });
  redraw = draw;

  models().then((all) => {
    const options = modelOptions(all, "chat");
    if (!options.length) {
      fill(modelSelect, h("option", { value: "" }, "No chat model configured"));
      return;
    }
    if (!options.some(([name]) => name === state.model)) state.model = options[0][0];
    setOptions(modelSelect, options, state.model);
  }).catch((err) => fill(list, errorBox(err)));

  draw();
  input.focus();
  return () => { redraw = () => {}; };
}

function messageView(message) {
  const view = h("div", { class: `msg ${message.role}`, id: message.key },
    h("span", { class: "text" }, message.content));
  if (message.role === "assistant") {
    const parts = [];
    if (message.stats) {
      const { ttft, tokensPerSecond, tokens } = message.stats;
      if (ttft !== null) parts.push(`first token ${Math.round(ttft)} ms`);
      if (tokensPerSecond) parts.push(`${tokensPerSecond.toFixed(1)} tokens/s`);
      if (tokens !== null && tokens !== undefined) parts.push(`${tokens} tokens`);
    }
    if (message.stopped) parts.push("stopped");
    const stats = h("div", { class: "stats" }, parts.join(" · "));
    if (message.jobId) stats.append(parts.length ? " · " : "", h("a", { href: `#/jobs/${message.jobId}` }, "job"));
    view.append(stats);
    if (message.error) view.append(errorBox(message.error));
  }
  return view;
}

/** The conversation and settings, kept in this tab's session storage so a reload keeps them. */
function save() {
  const messages = state.messages.map(({ role, content, stats, stopped, jobId, error }) =>
    ({ role, content, stats, stopped, jobId, error: error ? { message: error.message, error: error.error } : undefined }));
  sessionStorage.setItem(SAVED, JSON.stringify({ ...state, messages }));
}

function restore() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(SAVED) || "null");
    if (saved && Array.isArray(saved.messages)) Object.assign(state, saved);
  } catch { /* a damaged entry: start afresh */ }
}
