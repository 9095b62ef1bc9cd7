"""Admin operations validate their bodies and queries against the spec's schemas before any
handler runs: bad input is a 400 naming the parameter, never a 500."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("path, body, param", [
    ("/v1/organization/projects", {"name": 5}, "name"),
    ("/v1/organization/projects", [], None),
    ("/v1/organization/projects", {}, "name"),
    ("/v1/organization/projects/proj_x", {"name": ["x"]}, "name"),
    ("/v1/organization/projects/proj_x/model_permissions", {"mode": 1, "model_ids": []}, "mode"),
    ("/v1/organization/projects/proj_x/model_permissions", {"mode": "allow_list"}, "model_ids"),
    ("/v1/organization/projects/proj_x/model_permissions", {"mode": "everything", "model_ids": []}, "mode"),
    ("/v1/organization/projects/proj_x/model_permissions", {"mode": "deny_list", "model_ids": [1]}, "model_ids[0]"),
    ("/v1/organization/projects/proj_x/rate_limits/rl-x", {"max_tokens_per_1_minute": "many"},
     "max_tokens_per_1_minute"),
])
def test_a_bad_admin_body_is_a_400(client, path, body, param):
    answer = client.post(path, json=body)
    assert answer.status_code == 400, answer.get_data(as_text=True)
    error = answer.get_json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("query, param", [
    ("", "start_time"),
    ("?start_time=soon", "start_time"),
    ("?start_time=1&bucket_width=1w", "bucket_width"),
])
def test_a_bad_usage_query_is_a_400(client, query, param):
    answer = client.get("/v1/organization/usage/completions" + query)
    assert answer.status_code == 400 and answer.get_json()["error"]["param"] == param


def test_a_bad_list_query_is_a_400(client):
    answer = client.get("/v1/organization/projects?limit=many")
    assert answer.status_code == 400 and answer.get_json()["error"]["param"] == "limit"


def test_a_usage_page_from_long_ago_reads_one_page_of_buckets(redis_server):
    """A start_time decades ago spans millions of minute buckets: only the page's are made (the
    whole range once took gigabytes of memory)."""
    import tracemalloc

    from api.app import create_app
    from api.settings import Settings

    client = create_app(Settings.from_env({"LOCALQ_REDIS_URL": redis_server.url})).test_client()
    tracemalloc.start()
    answer = client.get("/v1/organization/usage/completions?start_time=0&bucket_width=1m&limit=3")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert answer.status_code == 200, answer.get_data(as_text=True)
    page = answer.get_json()
    assert [bucket["start_time"] for bucket in page["data"]] == [0, 60, 120]
    assert page["has_more"] and page["next_page"]
    assert peak < 50 * 1024 * 1024
