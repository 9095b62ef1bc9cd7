"""Raw-socket HTTP for tests of what HTTP clients never send: malformed, huge or stalled requests."""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self):
        return json.loads(self.body)


def connect(base_url: str, timeout: float = 30) -> socket.socket:
    parts = urlsplit(base_url)
    return socket.create_connection((parts.hostname, parts.port), timeout=timeout)


def read_reply(sock: socket.socket, method: str = "POST") -> Reply:
    """Read one response from `sock` (raises socket.timeout if none comes in the socket's timeout)."""
    response = http.client.HTTPResponse(sock, method=method)
    response.begin()
    return Reply(response.status, response.headers, response.read())


def exchange(base_url: str, raw: bytes, timeout: float = 30, method: str = "POST") -> Reply:
    """Send `raw` as is on a new connection and read the answer."""
    with connect(base_url, timeout) as sock:
        sock.sendall(raw)
        return read_reply(sock, method)


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def assert_openai_error(reply: Reply, status: int, code: str | None = None) -> dict:
    """The answer is `status` with OpenAI's error envelope as JSON; returns the `error` object."""
    assert reply.status == status, (reply.status, reply.body[:300])
    assert reply.headers.get_content_type() == "application/json", (reply.headers, reply.body[:300])
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"] and error["type"], error
    if code is not None:
        assert error["code"] == code, error
    return error
