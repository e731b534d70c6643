"""Quality against the unpruned run: output agreement and first-token KL."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.metrics import agreement_with_full, first_token_kl, mean_first_token_kl


def test_agreement_counts_identical_outputs_over_common_ids():
    full = {"a": "A red circle.", "b": "two", "c": "left", "d": None}
    pruned = {"a": "a red circle", "b": "three", "d": "x", "e": "y"}
    assert agreement_with_full(full, pruned) == 0.5  # a agrees (after normalisation), b does not
    assert agreement_with_full({}, pruned) is None


def _topk(logits: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    logprobs = logits - np.log(np.exp(logits).sum())
    order = np.argsort(-logprobs)[:k]
    return order.tolist(), logprobs[order].tolist()


def test_first_token_kl_equals_the_exact_kl_when_k_covers_the_vocabulary():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=12), rng.normal(size=12)
    pa, pb = np.exp(a) / np.exp(a).sum(), np.exp(b) / np.exp(b).sum()
    exact = float((pa * (np.log(pa) - np.log(pb))).sum())
    assert first_token_kl(_topk(a, 12), _topk(b, 12)) == pytest.approx(exact, rel=1e-9)
    assert first_token_kl(_topk(a, 12), _topk(a, 12)) == 0.0


def test_first_token_kl_with_truncation_is_finite_and_grows_with_disagreement():
    rng = np.random.default_rng(1)
    a = rng.normal(size=200) * 3
    near = a + rng.normal(size=200) * 0.1
    far = rng.normal(size=200) * 3
    k_near = first_token_kl(_topk(a, 32), _topk(near, 32))
    k_far = first_token_kl(_topk(a, 32), _topk(far, 32))
    assert 0 <= k_near < k_far < math.inf
    rows = {"x": _topk(a, 32), "y": _topk(far, 32)}
    assert mean_first_token_kl(rows, {"x": _topk(near, 32), "y": _topk(far, 32)}) == pytest.approx(k_near / 2)


def test_compare_with_full_matches_rows_by_sample_id():
    from pipelines.metrics import compare_with_full

    top = _topk(np.arange(5.0), 5)
    other = _topk(-np.arange(5.0), 5)
    full = [{"sample_id": "a", "output": "x", "first_token_ids": top[0], "first_token_logprobs": top[1]},
            {"sample_id": "b", "output": "y", "first_token_ids": top[0], "first_token_logprobs": top[1]}]
    pruned = [{"sample_id": "b", "output": "z", "first_token_ids": other[0], "first_token_logprobs": other[1]},
              {"sample_id": "a", "output": "x", "first_token_ids": top[0], "first_token_logprobs": top[1]}]
    result = compare_with_full(full, pruned)
    assert result["agreement_with_full"] == 0.5
    assert result["first_token_kl"] == pytest.approx(first_token_kl(top, other) / 2)
    assert compare_with_full(full, full) == {"agreement_with_full": 1.0, "first_token_kl": 0.0}


def test_first_token_kl_floors_a_token_missing_from_the_pruned_top_k_at_its_smallest_logprob():
    full = ([1, 2], [math.log(0.6), math.log(0.4)])
    pruned = ([1, 3], [math.log(0.5), math.log(0.3)])  # token 2 is not in the pruned top-k
    expected = 0.6 * (math.log(0.6) - math.log(0.5)) + 0.4 * (math.log(0.4) - math.log(0.3))  # floor: log 0.3
    assert first_token_kl(full, pruned) == pytest.approx(expected, rel=1e-12)


def test_first_token_kl_of_a_certain_token_and_of_an_empty_pruned_top_k():
    # p_full = 1 (log-prob 0): KL = 1 · (0 − (−1)) = 1
    assert first_token_kl(([5], [0.0]), ([5, 6], [-1.0, -2.0])) == pytest.approx(1.0)
    # nothing stored for the pruned run: every full-model token is at the −∞ floor
    assert first_token_kl(([5], [0.0]), ([], [])) == math.inf


def test_mean_first_token_kl_is_none_without_common_samples():
    assert mean_first_token_kl({"a": ([1], [0.0])}, {"b": ([1], [0.0])}) is None


def test_compare_with_full_skips_rows_without_stored_first_tokens():
    """Rows written before the first-token columns existed (output set, ids null) are left out
    of the KL, not read as top-k lists."""
    from pipelines.metrics import compare_with_full

    def row(i, out, ids, lps):
        return {"sample_id": i, "output": out, "first_token_ids": ids, "first_token_logprobs": lps}

    full = [row("a", "x", [1, 2], [-0.1, -2.4]), row("old", "y", None, None)]
    pruned = [row("a", "x", [2, 1], [-0.2, -1.8]), row("old", "y", None, None)]
    result = compare_with_full(full, pruned)
    assert result["agreement_with_full"] == 1.0
    assert result["first_token_kl"] == pytest.approx(first_token_kl(([1, 2], [-0.1, -2.4]), ([2, 1], [-0.2, -1.8])))


def test_first_token_kl_skips_tokens_of_probability_zero_and_counts_the_rest():
    """A full-model token with log-probability −inf adds nothing, wherever it stands in the list;
    the tokens after it still count (hand-computed)."""
    full = ([7, 8], [float("-inf"), -0.1])
    pruned = ([8], [-1.0])
    assert first_token_kl(full, pruned) == pytest.approx(math.exp(-0.1) * (-0.1 + 1.0), rel=1e-12)
