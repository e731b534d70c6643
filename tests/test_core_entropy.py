"""Score fidelity (docs/design.md §4.5) and budget conversions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ep_core import keep_count, keep_count_for_ratio, layer_averaged_budget, matrix_entropy, token_entropy
from tests.oracles import numpy_token_entropy


# (7, 2, 8): two heads is the smallest valid count; (3, 4, 192): a head dim above 128 that 128
# does not divide is scored as it is (no grouping)
@pytest.mark.parametrize("shape", [(7, 4, 8), (3, 5, 32, 16), (576, 32, 128), (7, 2, 8), (3, 4, 192)])
def test_token_entropy_matches_numpy_float64(shape):
    torch.manual_seed(0)
    q = torch.randn(*shape, dtype=torch.float64) * torch.rand(*shape[:-2], 1, 1, dtype=torch.float64) * 3
    ours = token_entropy(q).numpy().reshape(-1)
    theirs = numpy_token_entropy(q.reshape(-1, *shape[-2:]).numpy())
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)
    assert token_entropy(q).shape == shape[:-2]


def test_token_entropy_in_chunks_and_at_an_index_equals_the_reference():
    """A batch of 3 rows × 300 tokens spans several eigen chunks on CPU; scoring a subset by
    flat index (the batch rule's path) gives the same scores as the full batch."""
    from ep_core.entropy import EIGEN_CHUNK

    torch.manual_seed(0)
    q = torch.randn(3, 300, 8, 16, dtype=torch.float64)
    assert q.shape[0] * q.shape[1] > 3 * EIGEN_CHUNK["cpu"]
    scores = token_entropy(q)
    reference = numpy_token_entropy(q.reshape(-1, 8, 16).numpy()).reshape(3, 300)
    np.testing.assert_allclose(scores.numpy(), reference, rtol=1e-12, atol=1e-12)
    index = torch.tensor([0, 299, 300, 511, 512, 899, 5])
    assert torch.equal(token_entropy(q, index=index), scores.flatten()[index])
    assert token_entropy(q, index=index[:0]).shape == (0,)


def test_token_entropy_centres_in_the_input_dtype_like_the_official_code():
    """fp32 queries are centred in fp32 then upcast: equal to the fp64 score up to fp32 rounding."""
    torch.manual_seed(0)
    q = torch.randn(64, 32, 128)
    np.testing.assert_allclose(token_entropy(q).numpy(), numpy_token_entropy(q.numpy()), rtol=1e-5, atol=1e-5)
    assert token_entropy(q).dtype == torch.float64


def test_token_entropy_is_not_trace_normalised():
    """score(cA) = c·score(A) − c·ln c·tr(A)/ln H (docs/design.md §1): scaling Q by √c."""
    torch.manual_seed(1)
    q = torch.randn(10, 8, 16, dtype=torch.float64)
    c = 4.0
    z = q - q.mean(-2, keepdim=True)
    trace = (z * z).sum((-1, -2)) / 8
    expected = c * token_entropy(q) - c * math.log(c) * trace / math.log(8)
    torch.testing.assert_close(token_entropy(q * math.sqrt(c)), expected, rtol=1e-7, atol=1e-9)


def test_dual_and_primal_spectra_agree():
    """The H×H dual Gram and the d×d primal covariance share their non-zero eigenvalues."""
    torch.manual_seed(2)
    q = torch.randn(32, 128, dtype=torch.float64)
    z = q - q.mean(0, keepdim=True)
    dual = torch.linalg.eigvalsh(z @ z.T / 32)
    primal = torch.linalg.eigvalsh(z.T @ z / 32)
    top = 31  # rank <= H - 1 after centring
    torch.testing.assert_close(dual[-top:], primal[-top:], rtol=1e-9, atol=1e-9)
    assert primal[:-top].abs().max() < 1e-9
    # and the score computed from the primal spectrum is the same
    eig = primal.clamp_min(1e-10)
    primal_score = -(eig * eig.log()).sum() / math.log(32)
    dual_eig = dual.clamp_min(1e-10)
    extra_zeros = (128 - 32) * (-1e-10 * math.log(1e-10)) / math.log(32)  # clamped zeros of the larger form
    torch.testing.assert_close(token_entropy(q[None])[0], primal_score - extra_zeros, rtol=1e-9, atol=1e-9)
    assert torch.isclose(token_entropy(q[None])[0], -(dual_eig * dual_eig.log()).sum() / math.log(32))


def test_token_entropy_head_grouping_for_wide_heads():
    """head_dim 256 is reduced to 128 dims by averaging consecutive pairs (official dim_scale)."""
    torch.manual_seed(3)
    q = torch.randn(5, 4, 256)
    grouped = q.view(5, 4, 128, 2).mean(-1)
    torch.testing.assert_close(token_entropy(q), token_entropy(grouped))


def test_token_entropy_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[\.\.\., N, H, d\]"):
        token_entropy(torch.randn(4, 8))
    with pytest.raises(ValueError, match="at least 2 attention heads"):
        token_entropy(torch.randn(4, 1, 8))


def _numpy_matrix_entropy(x: np.ndarray) -> float:
    z = x - x.mean(0, keepdims=True)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    eig = np.linalg.eigvalsh(z @ z.T / len(z))
    eig = eig[eig > 1e-12]
    return float(-(eig * np.log(eig)).sum())


@pytest.mark.parametrize("shape", [(20, 64), (64, 20)])  # N < D (N×N Gram) and N > D (D×D)
def test_matrix_entropy_matches_numpy_and_is_bounded(shape):
    torch.manual_seed(4)
    x = torch.randn(*shape)
    ours = float(matrix_entropy(x))
    assert ours == pytest.approx(_numpy_matrix_entropy(x.double().numpy()), rel=1e-9)
    assert 0 < ours <= math.log(min(shape)) + 1e-9


def test_matrix_entropy_collapses_for_aligned_tokens():
    torch.manual_seed(5)
    direction = torch.randn(1, 32)
    collapsed = direction * torch.randn(50, 1) + 1e-3 * torch.randn(50, 32)
    spread = torch.randn(50, 32)
    assert matrix_entropy(collapsed) < 0.5 * matrix_entropy(spread)


@pytest.mark.parametrize("budget,kept", [(192, 166), (128, 98), (64, 29)])
def test_paper_budgets_for_llava_1_5_7b(budget, kept):
    assert keep_count(budget, 576, 32, 2) == kept


def test_budget_clamps_and_round_trips():
    assert keep_count(10, 576, 32, 2) == 0  # (320 - 1152) / 30 < 0
    assert keep_count(10_000, 576, 32, 2) == 576
    assert keep_count_for_ratio(0.25, 576) == 144
    assert keep_count_for_ratio(1.0, 576) == 576
    assert keep_count_for_ratio(0.0, 576) == 0
    for b in (64, 128, 192):
        k = keep_count(b, 576, 32, 2)
        assert layer_averaged_budget(k, 576, 32, 2) <= b < layer_averaged_budget(k + 1, 576, 32, 2)


def test_budget_edges_are_valid_not_errors():
    """B = 0 and a fractional B < 1 are valid budgets (k = 0 after the clamp), and so is an
    image with no visual tokens (N = 0: nothing to keep). By hand, L = 32, K = 2:
    B = 0 → ⌊(0 − 1152) / 30⌋ < 0 → 0; B = 0.5 → ⌊(16 − 1152) / 30⌋ < 0 → 0;
    N = 0, B = 128 → ⌊4096 / 30⌋ = 136, clamped to N = 0."""
    assert keep_count(0, 576, 32, 2) == 0
    assert keep_count(0.5, 576, 32, 2) == 0
    assert keep_count(128, 0, 32, 2) == 0
    assert keep_count_for_ratio(0.5, 0) == 0
    # and the layer-averaged budget of keeping nothing of nothing is 0
    assert layer_averaged_budget(0, 0, 32, 2) == 0


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: keep_count(-1, 576, 32, 2), "budget must be >= 0"),
        (lambda: keep_count(128, 576, 32, 0), "prune_layer must be between 1 and 31"),
        (lambda: keep_count(128, 576, 32, 32), "prune_layer must be between 1 and 31"),
        (lambda: keep_count_for_ratio(1.5, 576), r"keep_ratio must be in \[0, 1\]"),
        (lambda: keep_count(128, -1, 32, 2), "num_visual must be >= 0"),
        # the round-trip formula checks K against L as well: K = L would divide by zero below
        (lambda: layer_averaged_budget(98, 576, 32, 0), "prune_layer must be between 1 and 31"),
        (lambda: layer_averaged_budget(98, 576, 32, 32), "prune_layer must be between 1 and 31"),
    ],
)
def test_budget_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("ratio, n, kept", [(0.33, 144, 48), (0.3, 16, 5), (0.25, 576, 144), (0.5, 3, 2), (0.11, 144, 16)])
def test_keep_ratio_rounds_half_up_not_down(ratio, n, kept):
    """k = ⌊r·N + ½⌋: 0.33·144 = 47.52 → 48 (the README's example), 0.3·16 = 4.8 → 5."""
    assert keep_count_for_ratio(ratio, n) == kept


def test_entropy_errors_say_what_was_wrong():
    with pytest.raises(ValueError, match=r"^token_entropy needs at least 2 attention heads \(ln H would be 0\)$"):
        token_entropy(torch.randn(4, 1, 8))
    with pytest.raises(ValueError, match=r"^matrix_entropy expects an \[N, D\] tensor, got shape \(6,\)$"):
        matrix_entropy(torch.randn(6))
    with pytest.raises(ValueError, match="^matrix_entropy needs at least 2 tokens$"):
        matrix_entropy(torch.randn(1, 8))


def test_matrix_entropy_of_two_tokens_is_zero_and_any_scale_gives_the_same_entropy():
    """Two tokens centre to ±v: one direction, entropy 0 (and no error). Rows are L2-normalised,
    so scaling the tokens, even to norms far below 1, changes nothing."""
    torch.manual_seed(6)
    assert float(matrix_entropy(torch.randn(2, 16))) == pytest.approx(0.0, abs=1e-9)
    x = torch.randn(12, 40, dtype=torch.float64)
    assert float(matrix_entropy(1e-3 * x)) == pytest.approx(float(matrix_entropy(x)), rel=1e-9)


def test_token_entropy_of_no_tokens_and_of_an_index_longer_than_the_tokens():
    """No tokens: an empty float64 result. An index may repeat tokens (more entries than there
    are tokens, over more than one eigen chunk): every entry is scored."""
    from ep_core.entropy import EIGEN_CHUNK

    empty = token_entropy(torch.randn(0, 4, 8))
    assert empty.shape == (0,) and empty.dtype == torch.float64
    q = torch.randn(3, 4, 8, dtype=torch.float64)
    index = torch.arange(EIGEN_CHUNK["cpu"] + 10) % 3
    assert torch.equal(token_entropy(q, index=index), token_entropy(q)[index])


def test_token_entropy_on_a_device_without_its_own_chunk_size():
    """A device type missing from EIGEN_CHUNK (here "meta", which computes shapes only) takes
    the accelerator chunk size, never None."""
    out = token_entropy(torch.randn(2, 5, 4, 8, device="meta"))
    assert out.shape == (2, 5) and out.dtype == torch.float64
