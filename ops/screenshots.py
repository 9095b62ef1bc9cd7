"""Screenshots of the web console: every page at laptop and phone width, light and dark.

    python -m ops.screenshots --out docs/screenshots            # a fresh service of its own
    python -m ops.screenshots --url http://127.0.0.1:8080 --key sk-...   # a running localq

Against its own service it first runs a chat, an image and a small batch from the pages, so the
jobs, batches and workers pages show something. Chromium is Debian's (`ops/ensure_chromium.sh`),
driven by Playwright.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from ops.redis_server import RedisServer
from ops.stack import ServiceProcesses

PAGES = ("chat", "images", "audio", "embeddings", "jobs", "batches", "workers", "models")
SIZES = {"laptop": (1280, 800), "phone": (390, 844)}


def own_service(stack: ExitStack) -> str:
    """Redis, one CPU worker with the default models, and the API, on free ports; its base URL."""
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="localq-screens-")))
    redis_server = stack.enter_context(RedisServer(folder / "redis"))
    env = {**os.environ, "LOCALQ_REDIS_URL": redis_server.url, "PYTHONUNBUFFERED": "1"}
    service = ServiceProcesses(env=env, log_dir=folder / "logs")
    stack.callback(service.stop)
    service.start_worker("cpu", "cpu")
    service.start_api()
    return service.base_url


def fill_pages(page, base_url: str, folder: Path) -> None:
    """Give the pages content: a chat answer, a generated image, a finished batch."""
    page.goto(base_url + "/#/chat")
    page.wait_for_selector("#chat-model option", state="attached")
    page.fill("#chat-input", "In two sentences: why run AI models on your own machine?")
    page.keyboard.press("Enter")
    page.wait_for_selector(".msg.assistant .stats:has-text('tokens/s')", timeout=120_000)
    page.goto(base_url + "/#/images")
    page.wait_for_selector("#image-model option[value]", state="attached")
    page.fill("#image-seed", "3")
    page.click("#image-generate")
    page.wait_for_selector("#image-status:has-text('Done')", timeout=180_000)
    lines = folder / "questions.jsonl"
    lines.write_text("".join(json.dumps({
        "custom_id": f"q{n}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"Name a colour, number {n}."}],
                 "max_tokens": 12}}) + "\n" for n in range(6)))
    page.goto(base_url + "/#/batches")
    page.set_input_files("#batch-file", str(lines))
    page.click("#batch-create")
    page.wait_for_selector("article.batch[data-status='completed']", timeout=180_000)


def shoot(browser, base_url: str, key: str | None, out: Path, fill_first: bool, settle: float) -> list[Path]:
    written = []
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.goto(base_url + "/")
    if key:
        page.evaluate("key => sessionStorage.setItem('localq.apiKey', key)", key)
    page.goto(base_url + "/#/workers")  # its charts sample from the first visit on
    if fill_first:
        with tempfile.TemporaryDirectory() as folder:
            fill_pages(page, base_url, Path(folder))
    page.goto(base_url + "/#/workers")
    page.wait_for_timeout(settle * 5000)  # a few samples for the charts
    newest = page.evaluate("""key => fetch('/v1/jobs?limit=1', {headers: key ? {Authorization: `Bearer ${key}`} : {}})
        .then(r => r.json()).then(page => page.data.length ? page.data[0].id : null)""", key)
    routes = [*PAGES, *([f"jobs/{newest}"] if newest else [])]
    for theme in ("light", "dark"):
        page.evaluate("theme => localStorage.setItem('localq.theme', theme)", theme)
        for size, (width, height) in SIZES.items():
            page.set_viewport_size({"width": width, "height": height})
            for route in routes:
                page.goto(f"{base_url}/#/{route}")
                page.reload()  # the theme is read when the console loads
                page.wait_for_timeout(settle * 1000)
                name = "job" if route.startswith("jobs/") else route
                target = out / f"{name}-{size}-{theme}.png"
                page.screenshot(path=str(target), full_page=size == "laptop")
                written.append(target)
    context.close()
    return written


def picture(out: Path, target: Path) -> None:
    """The README's picture: the chat page at laptop width beside the workers page on a phone."""
    from PIL import Image

    laptop = Image.open(out / "chat-laptop-light.png").convert("RGB")
    phone = Image.open(out / "workers-phone-dark.png").convert("RGB")
    height = 800
    laptop, phone = laptop.crop((0, 0, laptop.width, height)), phone.crop((0, 0, phone.width, height))
    gap = 24
    both = Image.new("RGB", (laptop.width + gap + phone.width, height), (200, 204, 212))
    both.paste(laptop, (0, 0))
    both.paste(phone, (laptop.width + gap, 0))
    both.resize((both.width * 3 // 4, both.height * 3 // 4), Image.LANCZOS).save(target, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"), help="folder for the PNG files")
    parser.add_argument("--url", help="a running localq (default: start one of its own)")
    parser.add_argument("--key", default=os.environ.get("LOCALQ_CONSOLE_KEY"), help="API key, if the server needs one")
    parser.add_argument("--settle", type=float, default=1.2, help="seconds each page gets to load its data")
    parser.add_argument("--picture", type=Path, help="also write the README's picture (two pages side by side) here")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        print("Chromium is missing: run ops/ensure_chromium.sh", file=sys.stderr)
        return 1
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        base_url = args.url.rstrip("/") if args.url else own_service(stack)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            written = shoot(browser, base_url, args.key, args.out, fill_first=not args.url, settle=args.settle)
            browser.close()
    if args.picture:
        picture(args.out, args.picture)
        written.append(args.picture)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
