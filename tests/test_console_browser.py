"""The web console in a real browser: Debian's Chromium, driven by Playwright, against a real
localq (Redis, the API under gunicorn, a CPU worker with the default small models).

`make test` and `.ci/run` install Chromium (`ops/ensure_chromium.sh`); without it these tests
fail, saying so, rather than skip.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading

import httpx
import pytest
from PIL import Image

from ops.stack import REPO
from tests.service import running_service, wait_until

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
KEY = "sk-console-test-key"


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM, "Chromium is missing: run ops/ensure_chromium.sh (make test does), or apt-get install chromium"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with running_service(tmp_path_factory.mktemp("console")) as running:
        yield running


@pytest.fixture
def page(browser, service):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    opened = context.new_page()
    problems: list[str] = []
    opened.on("pageerror", lambda err: problems.append(f"page error: {err}"))
    # an error status the page shows is logged by Chromium too ("Failed to load resource"): not a script error
    opened.on("console", lambda message: message.type == "error" and not message.text.startswith("Failed to load resource")
              and problems.append(f"console error: {message.text}"))
    asked: list[str] = []
    opened.on("request", lambda request: asked.append(request.url))
    opened.goto(service.base_url + "/")
    yield opened
    outside = [url for url in asked if not url.startswith((service.base_url, "data:", "blob:"))]
    assert not outside, f"the console fetched from elsewhere: {outside}"
    context.close()
    assert not problems, problems  # no script error on any page a test visited


def until(page, expression: str, timeout: float = 30) -> None:
    """Wait for a JavaScript expression to be true. (Playwright's wait_for_function polls with
    eval, which the console's Content-Security-Policy refuses, as it should.)"""
    wait_until(lambda: page.evaluate(expression), timeout, expression, interval=0.1)


def watch(page, selector: str) -> None:
    """Record every text `selector` shows from now on (in window.__seen), to see a stream grow."""
    page.evaluate("""selector => {
        window.__seen = [];
        const target = document.querySelector(selector);
        new MutationObserver(() => window.__seen.push(target.textContent))
            .observe(target, {subtree: true, childList: true, characterData: true});
    }""", selector)


def test_an_api_client_asking_for_the_root_still_gets_json(service):
    for accept in ("application/json", "*/*"):
        answer = httpx.get(service.base_url + "/", headers={"Accept": accept}, timeout=10)
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "unknown_url"
    page = httpx.get(service.base_url + "/", headers={"Accept": "text/html,*/*;q=0.8"}, timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "set-cookie" not in page.headers


def test_a_chat_message_streams_its_answer_into_the_page(page):
    page.wait_for_selector("#chat-model option[value='smollm2-135m-instruct']", state="attached")
    page.fill("#chat-system", "You are a storyteller.")
    watch(page, "#chat-messages")
    page.fill("#chat-input", "Tell me a long story about a lighthouse keeper.")
    page.keyboard.press("Enter")
    stats = page.wait_for_selector(".msg.assistant .stats:has-text('tokens/s')", timeout=90_000)
    answer = page.inner_text(".msg.assistant .text")
    assert answer.strip()
    seen = page.evaluate("window.__seen")
    lengths = sorted({len(text) for text in seen})
    assert len(lengths) >= 4, "the answer appeared at once instead of streaming"
    assert "first token" in stats.inner_text() and page.is_hidden("#chat-stop")
    # the answer's job is on the jobs page, and its page replays the event log
    page.click(".msg.assistant .stats a")
    page.wait_for_selector("#job-events div:has-text('result')", timeout=30_000)
    assert page.inner_text("#job-output").strip() == answer.strip()
    assert "succeeded" in page.inner_text("#job-summary")


def test_an_api_error_shows_its_message(page):
    page.wait_for_selector("#chat-model option[value='smollm2-135m-instruct']", state="attached")
    page.fill("#chat-system", "")
    page.locator("label:has-text('Temperature') input").fill("7")  # OpenAI's range is 0 to 2
    page.fill("#chat-input", "Hello")
    page.keyboard.press("Enter")
    shown = page.wait_for_selector(".msg.assistant .error", timeout=30_000).inner_text()
    assert "temperature" in shown and "7" in shown  # the API's own message, naming the parameter


def test_speech_plays_in_the_page_and_an_uploaded_file_is_transcribed(page, service, tmp_path):
    page.goto(page.url.split("#")[0] + "#/audio")
    page.wait_for_selector("#speech-voice option[value='alloy']", state="attached")
    page.fill("#speech-text", "The quick brown fox jumps over the lazy dog.")
    page.click("#speech-go")
    audio = page.wait_for_selector("#speech-audio", timeout=60_000)
    until(page, "document.getElementById('speech-audio').duration > 1", 30)
    assert audio.get_attribute("src").startswith("blob:")
    spoken = tmp_path / "fox.wav"
    spoken.write_bytes(httpx.post(service.base_url + "/v1/audio/speech", timeout=120, json={
        "model": "tts-1", "voice": "alloy", "input": "The quick brown fox jumps over the lazy dog.",
        "response_format": "wav"}).content)
    page.set_input_files("#transcribe-file", str(spoken))
    page.click("#transcribe-go")
    text = page.wait_for_selector("#transcribe-text", timeout=120_000).inner_text().lower()
    assert "fox" in text and "dog" in text


def test_embeddings_and_tokens_at_a_glance(page):
    page.goto(page.url.split("#")[0] + "#/embeddings")
    page.wait_for_selector("#embed-model option[value='all-minilm-l6-v2']", state="attached")
    page.click("#embed-go")
    shown = page.wait_for_selector("#embed-output table", timeout=60_000)
    assert "384 dimensions" in page.inner_text("#embed-output")
    cells = [float(cell) for cell in shown.eval_on_selector_all("td", "cells => cells.map(c => c.textContent)")]
    assert len(cells) == 9 and cells[0] == cells[4] == cells[8] == 1.0
    assert cells[1] > cells[2]  # the cat and the kitten are closer than the cat and the stock market
    page.select_option("#tokenize-model", "smollm2-135m-instruct")
    page.click("#tokenize-go")
    assert page.wait_for_selector("#tokenize-count", timeout=60_000).inner_text().endswith("tokens")
    assert page.locator("#tokenize-output .chip").count() >= 3


def test_a_running_job_is_followed_live_and_cancelled_from_its_page(page, service):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Write a very long essay."}],
            "max_tokens": 1500, "stream": True, "x-localai-extensions": {"ignore_eos": True}}
    ids: list[str] = []

    def stream():
        with httpx.stream("POST", service.base_url + "/v1/chat/completions", json=body, timeout=120) as response:
            ids.append(response.headers["x-localq-job-id"])
            for _ in response.iter_lines():
                pass

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    wait_until(lambda: ids, 30, "the job's id")
    page.goto(page.url.split("#")[0] + f"#/jobs/{ids[0]}")
    until(page, "document.getElementById('job-output').textContent.length > 20", 60)
    page.click("#job-cancel")
    page.wait_for_selector("#job-summary .badge.cancelled", timeout=30_000)
    page.wait_for_selector("#job-events div:has-text('cancelled')", timeout=30_000)
    reader.join(30)
    page.goto(page.url.split("#")[0] + "#/jobs")
    page.wait_for_selector(f"#jobs-list a[href='#/jobs/{ids[0]}']", timeout=10_000)
    page.select_option("#jobs-status", "cancelled")
    until(page, "[...document.querySelectorAll('#jobs-list tbody tr')].every("
                "row => row.querySelector('.badge').textContent === 'cancelled')", 10)
    assert page.locator(f"#jobs-list a[href='#/jobs/{ids[0]}']").count() == 1


def test_pages_fit_a_phone_screen(browser, service):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    opened = context.new_page()
    for name in ("chat", "images", "audio", "embeddings", "jobs", "batches", "workers", "models"):
        opened.goto(f"{service.base_url}/#/{name}")
        opened.wait_for_timeout(500)
        width = opened.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"{name} is {width}px wide at phone width"
    context.close()


def test_an_image_job_shows_progress_then_the_picture(page):
    page.goto(page.url.split("#")[0] + "#/images")
    page.wait_for_selector("#image-model option[value='tiny-diffusion']", state="attached")
    page.fill("#image-steps", "12")
    page.fill("#image-seed", "7")
    watch(page, "#image-status")
    page.click("#image-generate")
    image = page.wait_for_selector("#image-result", timeout=120_000)
    page.wait_for_selector("#image-status:has-text('Done')", timeout=30_000)
    steps = [text for text in page.evaluate("window.__seen") if text.startswith("Step")]
    assert "Step 12 of 12" in " ".join(steps) and any(text.startswith("Step 1 of 12") for text in steps)
    assert page.evaluate("document.getElementById('image-progress').value") == 1
    assert image.evaluate("img => img.naturalWidth") == 256
    with page.expect_download() as download:
        page.click("#image-download")
    assert download.value.suggested_filename.endswith(".png")


def test_a_batch_uploaded_from_the_page_completes_and_its_output_downloads(page, tmp_path):
    lines = [{"custom_id": f"line-{n}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"Count to {n}."}],
                       "max_tokens": 8}} for n in range(3)]
    source = tmp_path / "lines.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    page.goto(page.url.split("#")[0] + "#/batches")
    page.set_input_files("#batch-file", str(source))
    page.click("#batch-create")
    card = page.wait_for_selector("article.batch[data-status='completed']", timeout=120_000)
    assert card.evaluate("article => article.querySelector('progress').value") == 1
    assert "3 completed · 0 failed · 3 total" in card.inner_text()
    with page.expect_download() as download:
        card.query_selector("button[data-file='output']").click()
    outcomes = [json.loads(line) for line in open(download.value.path()).read().splitlines()]
    assert sorted(outcome["custom_id"] for outcome in outcomes) == ["line-0", "line-1", "line-2"]
    assert all(outcome["response"]["status_code"] == 200 for outcome in outcomes)


def test_the_workers_page_lists_the_running_worker(page, service):
    live = httpx.get(service.base_url + "/v1/workers", timeout=10).json()["data"]
    page.goto(page.url.split("#")[0] + "#/workers")
    card = page.wait_for_selector(f"article.worker[data-worker='{live[0]['id']}']", timeout=30_000)
    assert "smollm2-135m-instruct" in card.inner_text()
    page.wait_for_selector("#queues article[data-queue='cpu']")


def test_the_models_page_shows_capabilities_and_aliases(page):
    page.goto(page.url.split("#")[0] + "#/models")
    row = page.wait_for_selector("tr[data-model='smollm2-135m-instruct']")
    assert "gpt-4o-mini" in row.inner_text() and "chat" in row.inner_text()


def test_api_docs_render_the_served_operations(browser, service):
    """Swagger UI 5 reads the OpenAPI 3.1 document (Swagger UI 3 said "Unable to render this
    definition"); it renders the operations near the view, so a deep link brings one into it."""
    for tag, operation_id in (("Chat", "createChatCompletion"), ("localq", "listWorkers")):
        opened = browser.new_page()
        asked = []
        opened.on("request", lambda request: asked.append(request.url))
        opened.goto(f"{service.base_url}/docs#/{tag}/{operation_id}")
        shown = opened.wait_for_selector(f".opblock-summary-operation-id:text-is('{operation_id}')", timeout=60_000)
        assert shown.is_visible()
        assert not opened.is_visible("text=Unable to render this definition")
        assert all(url.startswith((service.base_url, "data:")) for url in asked), asked  # nothing from elsewhere
        opened.close()


@pytest.fixture(scope="module")
def locked_service(tmp_path_factory):
    with running_service(tmp_path_factory.mktemp("console-locked"), {"LOCALQ_API_KEYS": KEY}, workers=()) as running:
        yield running


def test_with_keys_the_console_shows_the_401_then_works_with_a_key(browser, locked_service):
    context = browser.new_context()
    opened = context.new_page()
    opened.goto(locked_service.base_url + "/#/models")
    banner = opened.wait_for_selector("#banner:not([hidden])")
    assert "You didn't provide an API key" in banner.inner_text()
    opened.click("#banner button")
    opened.fill("#key-input", KEY)
    opened.click("#key-form button[type='submit']")
    opened.wait_for_selector("tr[data-model='smollm2-135m-instruct']")
    assert opened.is_hidden("#banner")
    assert opened.evaluate("sessionStorage.getItem('localq.apiKey')") == KEY
    assert context.cookies() == []  # the key never becomes a cookie
    # a new tab of the same browser starts without it (session storage is per tab)
    other = context.new_page()
    other.goto(locked_service.base_url + "/#/models")
    other.wait_for_selector("#banner:not([hidden])")
    context.close()


def test_the_screenshots_command_shoots_every_page_at_both_widths(service, tmp_path):
    made = httpx.post(service.base_url + "/v1/embeddings", json={"model": "text-embedding-3-small", "input": "hi"},
                      timeout=60)  # so that there is a job to show
    assert made.status_code == 200
    subprocess.run([sys.executable, "-m", "ops.screenshots", "--url", service.base_url, "--out", str(tmp_path / "shots"),
                    "--picture", str(tmp_path / "console.png"), "--settle", "0.3"], cwd=REPO, check=True, timeout=300,
                   capture_output=True)
    shots = {path.name: Image.open(path).size for path in (tmp_path / "shots").glob("*.png")}
    pages = ("chat", "images", "audio", "embeddings", "jobs", "job", "batches", "workers", "models")
    assert set(shots) == {f"{page}-{size}-{theme}.png" for page in pages for size in ("laptop", "phone")
                          for theme in ("light", "dark")}
    assert all(width == (1280 if "laptop" in name else 390) for name, (width, _) in shots.items())
    assert Image.open(tmp_path / "console.png").size == (1270, 600)
