"""Batch input validation: every failure names its line, code and param; valid files pass whole."""

from __future__ import annotations

import json

import pytest

from tasks.batch_input import check_lines

CHAT = "/v1/chat/completions"


def line(custom_id="a", url=CHAT, method="POST", **body):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **body}
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def test_a_valid_file_passes_with_every_line():
    result = check_lines([line("a"), "", line("b", max_tokens=5)], CHAT)
    assert result.valid and [(x.line, x.custom_id) for x in result.lines] == [(1, "a"), (3, "b")]
    assert result.lines[1].body["max_tokens"] == 5


@pytest.mark.parametrize("lines,expected", [
    ([line("a"), line("a")], [(2, "duplicate_custom_id", "custom_id")]),
    ([line("a", url="/v1/embeddings")], [(1, "mismatched_url", "url")]),
    ([line("a", method="GET")], [(1, "invalid_method", "method")]),
    ([line("a", temperature=7)], [(1, "invalid_value", "body.temperature")]),
    ([line("a", stream=True)], [(1, "invalid_request", "body.stream")]),
    (["{not json", line("b")], [(1, "invalid_json_line", None)]),
    (["[1, 2]"], [(1, "invalid_json_line", None)]),
    ([json.dumps({"method": "POST", "url": CHAT, "body": {}})], [(1, "missing_custom_id", "custom_id")]),
    ([line("a"), line("b", messages=[])], [(2, "invalid_value", "body.messages")]),
    ([], [(None, "empty_file", None)]),
    (["", "  "], [(None, "empty_file", None)]),
])
def test_each_failure_names_its_line(lines, expected):
    result = check_lines(lines, CHAT)
    assert not result.valid
    assert [(e["line"], e["code"], e["param"]) for e in result.errors] == expected
    assert all(set(e) == {"line", "code", "message", "param"} and e["message"] for e in result.errors)


def test_line_limit():
    result = check_lines([line(str(i)) for i in range(4)], CHAT, max_lines=3)
    assert result.errors[-1]["code"] == "too_many_lines" and result.errors[-1]["line"] == 4


def test_model_problems_are_reported_per_line():
    def problem(model, body):
        return ("model_not_found", f"The model '{model}' does not exist") if model != "gpt-4o-mini" else None

    result = check_lines([line("a"), line("b", model="nope")], CHAT, model_problem=problem)
    assert [(e["line"], e["code"], e["param"]) for e in result.errors] == [(2, "model_not_found", "body.model")]


def test_embeddings_endpoint_uses_its_own_schema():
    ok = json.dumps({"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
                     "body": {"model": "text-embedding-3-small", "input": "hello"}})
    bad = json.dumps({"custom_id": "f", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m"}})
    result = check_lines([ok, bad], "/v1/embeddings")
    assert [(e["line"], e["param"]) for e in result.errors] == [(2, "body.input")]
