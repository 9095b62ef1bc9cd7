"""`LOCALQ_REDIS_URL=rediss://...`: API, worker, Celery's broker and the event relay all speak TLS.

The Redis is the wheel's `redis-server` (built without TLS) behind `tests.tls_proxy`, a real TLS
endpoint with a certificate from a test CA (`trustme`); the URL names the CA file, and the server's
certificate is checked (`ssl_cert_reqs=required`).
"""

from __future__ import annotations

import json
import os
import ssl
from urllib.parse import quote

import httpx
import pytest
import redis
import trustme

from ops.redis_server import RedisServer
from tasks.redis_url import broker_settings, redis_client
from tests.service import Service, only_models
from tests.tls_proxy import TLSProxy

CHAT = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tls")
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate.configure_cert(context)
    ca_file = tmp / "ca.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    with RedisServer(tmp / "redis") as server, TLSProxy(server.port, context) as proxy:
        url = (f"rediss://:{server.password}@127.0.0.1:{proxy.port}/0"
               f"?ssl_cert_reqs=required&ssl_ca_certs={quote(str(ca_file))}")
        yield tmp, server, proxy, url


def test_clients_check_the_servers_certificate(tls_redis):
    _, server, proxy, url = tls_redis
    client = redis_client(url, socket_timeout=5)
    assert client.ping()
    untrusted = redis_client(url.split("&ssl_ca_certs=")[0], socket_timeout=5, socket_connect_timeout=5)
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        untrusted.ping()
    with pytest.raises(redis.RedisError):  # plain text to the TLS port
        redis.Redis(port=proxy.port, password=server.password, socket_timeout=2, socket_connect_timeout=2).ping()
    _, _, use_ssl = broker_settings(url)
    assert use_ssl["ssl_cert_reqs"] == ssl.CERT_REQUIRED and use_ssl["ssl_ca_certs"].endswith("ca.pem")


def test_the_service_runs_over_tls(tls_redis):
    tmp, server, proxy, url = tls_redis
    env = {**os.environ, "LOCALQ_REDIS_URL": url, "PYTHONUNBUFFERED": "1", **only_models(tmp / "models", CHAT)}
    service = Service(env=env, log_dir=tmp / "logs")
    before = proxy.handshakes
    try:
        service.start_worker("cpu", "cpu")
        service.start_api()
        body = {"model": "gpt-4o-mini", "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": "Say hello."}]}
        with httpx.stream("POST", service.base_url + "/v1/chat/completions", json={**body, "stream": True},
                          timeout=120) as response:
            assert response.status_code == 200
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and len(lines) > 2
        streamed = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                           for line in lines[:-1] if json.loads(line[6:])["choices"])
        answer = httpx.post(service.base_url + "/v1/chat/completions", json=body, timeout=120).json()
        assert answer["choices"][0]["message"]["content"] == streamed
        assert httpx.get(service.base_url + "/readyz", timeout=10).json()["status"] == "ready"
    finally:
        service.stop()
    assert proxy.handshakes - before >= 3, "the API, the worker's task code and its broker connection each opened TLS"
    logs = "".join(path.read_text() for path in (tmp / "logs").iterdir())
    assert server.password not in logs
    assert "no ssl options" not in logs, "kombu fell back to not checking the certificate"
