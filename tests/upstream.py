"""The upstream OpenAI spec for tests: where it is, and what a test does when it is missing.

The spec is not in the repository (`../shared/openai-openapi/openapi.json`, or $LOCALQ_OPENAPI_SPEC,
the rule of `schemas.generate.default_spec_path`). On a developer's machine a missing spec skips
the tests that need it; under CI (`CI` set to true, 1 or yes) it fails them, so a pipeline that
lost the spec cannot pass by skipping every spec-drift check.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pytest

from schemas.generate import default_spec_path

RUN, SKIP, FAIL = "run", "skip", "fail"
TRUTHY = {"true", "1", "yes"}


def under_ci(environ: Mapping[str, str]) -> bool:
    """Whether `CI` asks for strictness (the value CI services set: `true`)."""
    return environ.get("CI", "").strip().lower() in TRUTHY


def decide(environ: Mapping[str, str], spec_exists: bool) -> str:
    """RUN when the spec is there, else FAIL under CI and SKIP elsewhere."""
    if spec_exists:
        return RUN
    return FAIL if under_ci(environ) else SKIP


def missing_message(path: Path) -> str:
    return (f"upstream OpenAI spec not found at {path}; set LOCALQ_OPENAPI_SPEC to the openapi.json of "
            "openai/openai-openapi")


def require_spec() -> Path:
    """The spec's path; skips the calling test when it is missing, or fails it under CI."""
    path = default_spec_path()
    verdict = decide(os.environ, path.is_file())
    if verdict == FAIL:
        pytest.fail(missing_message(path) + " (CI is set: failing instead of skipping)", pytrace=False)
    if verdict == SKIP:
        pytest.skip(missing_message(path))
    return path
