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


def test_overhead_bench_times_the_score_and_the_layers_it_names(capsys, monkeypatch):
    """The bench measures what it says: token_entropy on the [visual tokens, heads, head dim]
    queries (a score made 30 ms slower reads at least 30 ms), and real decoder layers scaled to
    --num-layers (a layer made 10 ms slower adds at least 10 ms per layer of the estimate)."""
    import time

    import ep_core.entropy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    real_score, real_forward = ep_core.entropy.token_entropy, LlamaDecoderLayer.forward
    shapes = []

    def slow_score(q):
        shapes.append(list(q.shape))
        time.sleep(0.03)
        return real_score(q)

    def slow_layer(self, *args, **kwargs):
        time.sleep(0.01)
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(ep_core.entropy, "token_entropy", slow_score)
    monkeypatch.setattr(LlamaDecoderLayer, "forward", slow_layer)
    assert ep_main(["bench", "overhead", "--json", *TINY]) == 0
    r = json.loads(capsys.readouterr().out)
    assert shapes[0] == [16, 4, 16] and 30 <= r["scoring_ms"] < 30 + 1000
    assert r["prefill_ms_per_layer"] >= 10 and r["prefill_ms_estimated"] >= 10 * 6
