// The console's shell: hash routes to pages, the API key dialog, the theme switch, and the 401
// banner (the API's own message) when a key is needed or refused.

import { apiKey, forgetModels, get, setApiKey } from "./api.js";
import { errorBox, fill, h } from "./ui.js";
import * as chat from "./pages/chat.js";
import * as images from "./pages/images.js";
import * as audio from "./pages/audio.js";
import * as embeddings from "./pages/embeddings.js";
import * as jobs from "./pages/jobs.js";
import * as batches from "./pages/batches.js";
import * as workers from "./pages/workers.js";
import * as models from "./pages/models.js";

const PAGES = { chat, images, audio, embeddings, jobs, batches, workers, models };
const TITLES = {
  chat: "Chat", images: "Images", audio: "Audio", embeddings: "Embeddings and tokens", jobs: "Jobs",
  batches: "Batches", workers: "Workers and queues", models: "Models",
};

const main = document.getElementById("main");
const banner = document.getElementById("banner");
const dialog = document.getElementById("key-dialog");
const keyInput = document.getElementById("key-input");
let leave = null; // the current page's clean-up (stops its polls and streams)

function route() {
  const [name, ...rest] = (location.hash.replace(/^#\/?/, "") || "chat").split("/");
  const page = PAGES[name] ? name : "chat";
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.getAttribute("href") === `#/${page}`) {
      link.setAttribute("aria-current", "page");
      link.scrollIntoView({ block: "nearest", inline: "nearest" }); // a phone's nav scrolls sideways
    } else {
      link.removeAttribute("aria-current");
    }
  }
  if (leave) leave();
  leave = null;
  document.title = `${TITLES[page]} · localq`;
  fill(main);
  try {
    const cleanup = PAGES[page].render(main, rest.map(decodeURIComponent));
    leave = typeof cleanup === "function" ? cleanup : null;
  } catch (err) {
    fill(main, errorBox(err));
  }
}

function showBanner(err) {
  const key = apiKey();
  fill(banner,
    h("strong", {}, key ? "The API refused this key: " : "This server needs an API key: "),
    err.message, " ",
    h("button", { type: "button", class: "ghost", onclick: openKeyDialog }, key ? "Change key" : "Enter key"));
  banner.hidden = false;
}

function openKeyDialog() {
  keyInput.value = "";
  if (!dialog.open) dialog.showModal();
  keyInput.focus();
}

function updateKeyButton() {
  document.getElementById("key-button").textContent = apiKey() ? "API key ✓" : "API key";
}

window.addEventListener("localq:unauthorized", (event) => showBanner(event.detail));
window.addEventListener("hashchange", route);

document.getElementById("key-button").addEventListener("click", openKeyDialog);
document.getElementById("key-cancel").addEventListener("click", () => dialog.close());
document.getElementById("key-forget").addEventListener("click", () => {
  setApiKey("");
  dialog.close();
  afterKeyChange();
});
document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  setApiKey(keyInput.value.trim());
  dialog.close();
  afterKeyChange();
});

function afterKeyChange() {
  forgetModels();
  banner.hidden = true;
  updateKeyButton();
  route();
  check();
}

/** Ask the API once whether this tab's key (or none) is accepted, so a 401 shows at once. */
async function check() {
  try {
    await get("/v1/models");
    banner.hidden = true;
  } catch (err) {
    if (err.status !== 401) fill(banner, errorBox(err)), (banner.hidden = false);
  }
}

const THEME = "localq.theme";
function applyTheme(theme) {
  if (theme) document.documentElement.dataset.theme = theme;
  else delete document.documentElement.dataset.theme;
}
document.getElementById("theme-button").addEventListener("click", () => {
  const dark = document.documentElement.dataset.theme
    ? document.documentElement.dataset.theme === "dark"
    : matchMedia("(prefers-color-scheme: dark)").matches;
  const theme = dark ? "light" : "dark";
  localStorage.setItem(THEME, theme);
  applyTheme(theme);
});
applyTheme(localStorage.getItem(THEME));

updateKeyButton();
route();
check();
