"""The `localq` command: model table, the public-bind guard, and a real serve/stop cycle."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from ops.cli import host_port, is_loopback, main

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    """Rich wraps tables to the terminal width; keep rows on one line."""
    monkeypatch.setenv("COLUMNS", "200")


def test_models_prints_table_of_default_configs(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for text in ("smollm2-135m-instruct", "gpt-4o-mini, gpt-3.5-turbo", "llama-cpp", "cpu"):
        assert text in out
    assert "all-minilm-l6-v2" in out
    assert "sentence-transformers" in out


def test_models_reports_bad_config(models_dir, write_model, capsys):
    path = write_model("chat.yaml", {"name": "chat", "device": "tpu"})
    assert main(["--models-dir", str(models_dir), "models"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err
    assert "device" in err


def test_up_refuses_public_bind_without_force(capsys):
    assert main(["up", "--host", "0.0.0.0"]) != 0
    err = capsys.readouterr().err
    assert "refusing to bind 0.0.0.0" in err
    assert "--force-public" in err


def test_bad_environment_setting_is_reported(monkeypatch, capsys):
    monkeypatch.setenv("LOCALQ_UNKNOWN_FIELDS", "sometimes")
    assert main(["models"]) == 2
    assert "LOCALQ_UNKNOWN_FIELDS" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True),
     ("[::1]", True), ("0.0.0.0", False), ("::", False), ("192.168.1.5", False),
     ("example.com", False)],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_up_serves_until_ctrl_c():
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "up", "--port", str(port), "--threads", "2"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout.readline().strip() == f"localq ready on http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            assert json.load(response) == {"status": "ok"}
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


@pytest.mark.parametrize(
    ("host", "expected"),
    [("127.0.0.1", "127.0.0.1:8080"), ("::1", "[::1]:8080"), ("[::1]", "[::1]:8080")],
)
def test_host_port_brackets_ipv6(host, expected):
    assert host_port(host, 8080) == expected
