"""ops/bench/variants.py's arguments and report (the benchmark itself is run by hand)."""

from __future__ import annotations

import argparse

import pytest

from ops.bench.variants import parse_variant, report


def test_a_variant_is_a_name_and_its_extra_environment():
    assert parse_variant(["brief", "GOMP_SPINCOUNT=10000", "LOCALQ_STREAM_INTERVAL=0"]) == (
        "brief", {"GOMP_SPINCOUNT": "10000", "LOCALQ_STREAM_INTERVAL": "0"})
    assert parse_variant(["chosen"]) == ("chosen", {})
    assert parse_variant(["x", "A=b=c"]) == ("x", {"A": "b=c"})
    for bad in ("NOEQUALS", "=value"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_variant(["x", bad])


def test_the_report_gives_each_metric_its_medians_and_every_round():
    text = report({("4 streams tok/s", "a"): [1.0, 3.0, 2.0], ("4 streams tok/s", "llama-server"): [5.0],
                   ("first token ms", "a"): [10.0, 30.0]})
    lines = text.splitlines()
    assert lines[0] == "== 4 streams tok/s (median; every round) =="
    assert lines[1].split()[:2] == ["a", "2.0"] and lines[2].split()[:2] == ["llama-server", "5.0"]
    assert lines[3] == "== first token ms (median; every round) ==" and lines[4].split()[1] == "20.0"
