"""The app over the default model configs: /v1/models, /healthz and /docs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from api.settings import Settings
from workers.config import ModelConfigError

ERROR_KEYS = {"message", "type", "param", "code"}


def test_list_models_has_names_and_aliases(client):
    response = client.get("/v1/models")
    assert response.status_code == 200
    body = response.get_json()
    assert body["object"] == "list"
    ids = [model["id"] for model in body["data"]]
    for model_id in (
        "smollm2-135m-instruct",
        "gpt-4o-mini",
        "gpt-3.5-turbo",
        "all-minilm-l6-v2",
        "text-embedding-3-small",
        "text-embedding-ada-002",
    ):
        assert model_id in ids
    assert len(ids) == len(set(ids))
    for model in body["data"]:
        assert model.keys() == {"id", "object", "created", "owned_by", "localq"}
        assert model["object"] == "model"
        assert model["owned_by"] == "localq"
        assert isinstance(model["created"], int)


def test_models_say_what_they_can_do(client):
    """The `localq` extension field: the config's name, aliases, capabilities, backend and voices."""
    models = {model["id"]: model["localq"] for model in client.get("/v1/models").get_json()["data"]}
    chat = models["gpt-4o-mini"]
    assert chat["name"] == "smollm2-135m-instruct" and "gpt-4o-mini" in chat["aliases"]
    assert {"chat", "completion", "tokenize"} <= set(chat["capabilities"]) and chat["backend"] == "llama-cpp"
    assert models["text-embedding-3-small"]["capabilities"] == ["detokenize", "embedding", "tokenize"]
    assert models["tts-1"]["capabilities"] == ["speech"] and "alloy" in models["tts-1"]["voices"]
    assert models["whisper-1"]["capabilities"] == ["transcription", "translation"]
    assert set(models["dall-e-2"]["capabilities"]) == {"image", "image_edit"}


def test_retrieve_model_by_alias(client):
    response = client.get("/v1/models/gpt-4o-mini")
    assert response.status_code == 200
    body = response.get_json()
    assert body["id"] == "gpt-4o-mini"
    assert body["object"] == "model"
    assert body["owned_by"] == "localq"


def test_retrieve_model_by_name(client):
    assert client.get("/v1/models/all-minilm-l6-v2").get_json()["id"] == "all-minilm-l6-v2"


def test_unknown_model_is_openai_shaped_404(client):
    response = client.get("/v1/models/gpt-9")
    assert response.status_code == 404
    body = response.get_json()
    assert body.keys() == {"error"}
    assert body["error"].keys() == ERROR_KEYS
    assert body["error"] == {
        "message": "The model 'gpt-9' does not exist",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_docs_page_and_assets_are_served_locally(client):
    page = client.get("/docs")
    assert page.status_code == 200
    assert page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert '"/openapi.json"' in html
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert "/docs/swagger-ui-bundle.js" in assets
    assert all(asset.startswith("/docs/") for asset in assets)  # no CDN
    script = client.get("/docs/swagger-ui-bundle.js")
    assert script.status_code == 200
    assert "javascript" in script.mimetype


def test_missing_docs_asset_is_404(client):
    assert client.get("/docs/nope.js").status_code == 404


def test_settings_reach_the_app(app, settings):
    assert app.config["LOCALQ"] is settings
    assert app.config["MAX_CONTENT_LENGTH"] == settings.max_request_bytes


def test_bad_model_config_stops_start_up(models_dir, write_model):
    from api.app import create_app

    write_model("chat.yaml", {"name": "chat", "threads": "many"})
    with pytest.raises(ModelConfigError, match="chat.yaml: threads: Not a valid integer"):
        create_app(Settings(models_dir=models_dir))


def test_importing_the_api_loads_no_model_libraries():
    """The API process must stay small: model libraries belong to workers."""
    heavy = ["torch", "llama_cpp", "numpy", "sentence_transformers", "diffusers", "transformers"]
    code = (
        "import sys, api.wsgi; "
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == ""
