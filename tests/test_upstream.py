"""`tests.upstream`: a missing upstream spec skips a test on a developer's machine and fails it under CI."""

from __future__ import annotations

import pytest

from tests.upstream import FAIL, RUN, SKIP, decide, require_spec, under_ci


@pytest.mark.parametrize("value", ["true", "TRUE", "True", "1", "yes", "Yes", " true "])
def test_ci_values_that_ask_for_strictness(value):
    assert under_ci({"CI": value})
    assert decide({"CI": value}, spec_exists=False) == FAIL


@pytest.mark.parametrize("environ", [{}, {"CI": ""}, {"CI": "false"}, {"CI": "0"}, {"CI": "no"}, {"ci": "true"}])
def test_a_missing_spec_skips_outside_ci(environ):
    assert not under_ci(environ)
    assert decide(environ, spec_exists=False) == SKIP


@pytest.mark.parametrize("environ", [{}, {"CI": "true"}])
def test_a_present_spec_runs_everywhere(environ):
    assert decide(environ, spec_exists=True) == RUN


def test_require_spec_fails_under_ci_saying_where_it_looked(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere" / "openapi.json"
    monkeypatch.setenv("LOCALQ_OPENAPI_SPEC", str(missing))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception) as failed:
        require_spec()
    assert str(missing) in str(failed.value) and "LOCALQ_OPENAPI_SPEC" in str(failed.value)


def test_require_spec_skips_outside_ci(monkeypatch, tmp_path):
    missing = tmp_path / "openapi.json"
    monkeypatch.setenv("LOCALQ_OPENAPI_SPEC", str(missing))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        require_spec()
    assert str(missing) in str(skipped.value) and "LOCALQ_OPENAPI_SPEC" in str(skipped.value)


def test_require_spec_returns_the_path_of_a_present_spec(monkeypatch, tmp_path):
    present = tmp_path / "openapi.json"
    present.write_text("{}")
    monkeypatch.setenv("LOCALQ_OPENAPI_SPEC", str(present))
    monkeypatch.setenv("CI", "true")
    assert require_spec() == present
