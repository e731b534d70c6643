"""``ep bench overhead`` with tiny shapes: the keys are there and the numbers are sane."""

from __future__ import annotations

import json

import pytest
import torch

from jobs.cli import main as ep_main

TINY = ["--hidden-size", "64", "--num-heads", "4", "--intermediate-size", "96", "--seq-len", "24",
        "--visual-tokens", "16", "--num-layers", "6", "--layers-timed", "2", "--repeats", "2",
        "--batch-rows", "3", "--batch-heads", "4,6", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_overhead_bench_tiny(capsys):
    assert ep_main(["bench", "overhead", "--json", *TINY]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("scoring_ms", "prefill_ms_estimated", "layers_timed", "scoring_fraction_of_prefill", "threads"):
        assert key in r
    assert r["threads"] == 1
    assert r["layers_timed"] == 2 and r["num_layers"] == 6
    assert r["scoring_shape"] == [16, 4, 16]
    assert r["scoring_ms"] > 0 and r["prefill_ms_estimated"] > 0
    assert r["prefill_ms_estimated"] == pytest.approx(r["prefill_ms_per_layer"] * 6)
    assert r["scoring_fraction_of_prefill"] == pytest.approx(r["scoring_ms"] / r["prefill_ms_estimated"])
    assert [(b["heads"], b["rows"], b["tokens"]) for b in r["batch_scoring"]] == [(4, 3, 16), (6, 3, 16)]
    assert all(b["one_call_ms"] > 0 and b["one_call_ms_per_row"] == pytest.approx(b["one_call_ms"] / 3) for b in r["batch_scoring"])


def test_overhead_bench_table_and_bad_input(capsys):
    assert ep_main(["bench", "overhead", *TINY]) == 0
    out = capsys.readouterr().out
    assert "scoring_fraction_of_prefill" in out
    assert ep_main(["bench", "overhead", *TINY[:-2], "--num-heads", "5"]) == 2
    assert "divisible" in capsys.readouterr().err
