// Audio: text to speech (`POST /v1/audio/speech`, played in the page) and speech to text
// (`POST /v1/audio/transcriptions`, a file uploaded from this computer).

import { call, models } from "../api.js";
import { errorBox, field, fill, h, modelOptions, setOptions } from "../ui.js";

const OPENAI_VOICES = ["alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse"];
const state = { text: "Hello from localq. This voice runs on your own machine.", voice: "alloy", format: "wav" };
let lastAudio = null; // the object URL of the last speech, revoked when replaced

export function render(main) {
  const controller = new AbortController();
  const speechModel = h("select", { id: "speech-model" }, h("option", {}, "Loading models…"));
  const voice = h("select", { id: "speech-voice" });
  const text = h("textarea", { id: "speech-text", rows: 4, value: state.text });
  const format = h("select", {});
  setOptions(format, ["wav", "mp3", "opus", "flac"], state.format);
  const speak = h("button", { type: "submit", id: "speech-go" }, "Speak");
  const player = h("div", { id: "speech-output", "aria-live": "polite" });
  text.addEventListener("input", () => { state.text = text.value; });
  voice.addEventListener("change", () => { state.voice = voice.value; });
  format.addEventListener("change", () => { state.format = format.value; });

  const speechForm = h("form", { class: "panel stack" }, h("h2", {}, "Text to speech"),
    field("Model", speechModel), field("Text", text),
    h("div", { class: "grid" }, field("Voice", voice), field("Format", format)),
    h("div", { class: "row end" }, speak), player);

  const transcribeModel = h("select", { id: "transcribe-model" }, h("option", {}, "Loading models…"));
  const file = h("input", { id: "transcribe-file", type: "file", accept: "audio/*,video/*,.wav,.mp3,.m4a,.ogg,.flac,.webm" });
  const language = h("input", { placeholder: "auto", maxlength: 8 });
  const transcribe = h("button", { type: "submit", id: "transcribe-go" }, "Transcribe");
  const transcript = h("div", { id: "transcribe-output", "aria-live": "polite" });
  const transcribeForm = h("form", { class: "panel stack" }, h("h2", {}, "Speech to text"),
    field("Model", transcribeModel), field("Audio file", file), field("Language", language),
    h("div", { class: "row end" }, transcribe), transcript);

  fill(main, h("h1", {}, "Audio"), h("div", { class: "two" }, speechForm, transcribeForm));

  speechForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!speechModel.value || !text.value.trim()) return;
    speak.disabled = true;
    fill(player, h("span", { class: "muted small" }, "Speaking…"));
    try {
      const response = await call("POST", "/v1/audio/speech", {
        json: { model: speechModel.value, input: text.value, voice: voice.value, response_format: format.value },
        raw: true, signal: controller.signal,
      });
      const blob = await response.blob();
      if (lastAudio) URL.revokeObjectURL(lastAudio);
      lastAudio = URL.createObjectURL(blob);
      const audio = h("audio", { controls: true, src: lastAudio, id: "speech-audio" });
      fill(player, audio, h("a", { class: "small", href: lastAudio, download: `speech.${format.value}` }, "Download"));
      audio.play().catch(() => { /* autoplay refused: the controls are there */ });
    } catch (err) {
      if (err.name !== "AbortError") fill(player, errorBox(err));
    } finally {
      speak.disabled = false;
    }
  });

  transcribeForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!transcribeModel.value) return;
    if (!file.files.length) return fill(transcript, errorBox(new Error("Choose an audio file first.")));
    transcribe.disabled = true;
    fill(transcript, h("span", { class: "muted small" }, "Transcribing…"));
    const form = new FormData();
    form.append("file", file.files[0]);
    form.append("model", transcribeModel.value);
    form.append("response_format", "json");
    if (language.value.trim()) form.append("language", language.value.trim());
    try {
      const body = await call("POST", "/v1/audio/transcriptions", { form, signal: controller.signal });
      fill(transcript, h("pre", { id: "transcribe-text" }, body.text || "(no speech found)"));
    } catch (err) {
      if (err.name !== "AbortError") fill(transcript, errorBox(err));
    } finally {
      transcribe.disabled = false;
    }
  });

  models().then((all) => {
    const speakers = all.filter((model) => model.capabilities.includes("speech"));
    const showVoices = () => {
      const model = speakers.find((m) => m.name === speechModel.value);
      const voices = model && model.voices && model.voices.length ? model.voices : OPENAI_VOICES;
      setOptions(voice, voices, voices.includes(state.voice) ? state.voice : voices[0]);
      state.voice = voice.value;
    };
    const speech = modelOptions(all, "speech");
    if (speech.length) setOptions(speechModel, speech);
    else fill(speechModel, h("option", { value: "" }, "No speech model configured"));
    speechModel.addEventListener("change", showVoices);
    showVoices();
    const listeners = modelOptions(all, "transcription");
    if (listeners.length) setOptions(transcribeModel, listeners);
    else fill(transcribeModel, h("option", { value: "" }, "No transcription model configured"));
  }).catch((err) => fill(player, errorBox(err)));

  return () => controller.abort();
}
