"""Matrix entropies of visual tokens, computed through the small dual Gram matrix.

Two different quantities live here:

* :func:`token_entropy` is EntropyPrune's per-token score, exactly as the official code
  computes it (docs/design.md §1). Each token's query vector is viewed as an H×d matrix Q_t
  (one row per attention head). It is *not* trace-normalised and not L2-normalised.
* :func:`matrix_entropy` is the set-level von Neumann entropy of a set of N token vectors,
  used to find the Entropy Collapse Layer. It *is* normalised (rows L2-normalised, Gram
  scaled to trace 1), so it is a proper entropy in [0, ln(rank)].

Both use the fact that Z Zᵀ and Zᵀ Z share their non-zero eigenvalues, so the spectrum is
taken from whichever Gram matrix is smaller.
"""

from __future__ import annotations

import math

import torch

EIGEN_FLOOR = 1e-10  # the official code clamps eigenvalues at this value before λ·ln λ
# matrices per eigvalsh call: on CPU a chunk's Gram matrices stay cache-sized (256 × 32×32
# float64 = 2 MiB: a batch of 32 rows × 576 tokens scores ~25% faster than in one call); on an
# accelerator, few large calls
EIGEN_CHUNK = {"cpu": 256, "accelerator": 16_384}


def token_entropy(q: torch.Tensor, head_group: int = 128, index: torch.Tensor | None = None) -> torch.Tensor:
    """EntropyPrune score of every token from its per-head query vectors.

    For a token t with query matrix Q_t ∈ ℝ^{H×d} (rows = heads):

        Z_t     = Q_t − 1_H · mean_h(Q_t)            (centre each column over the H heads,
                                                     in the input dtype, as the official code)
        A_t     = Z_t Z_tᵀ / H                       (H×H dual Gram, float64)
        λ_t     = clamp(eigvalsh(A_t), min=1e-10)
        score_t = −Σ_k λ_{t,k} ln λ_{t,k} / ln H

    If d > ``head_group`` and divisible by it, each head vector is first reduced to
    ``head_group`` dims by averaging consecutive groups of d/head_group dims (the official
    ``dim_scale=128`` step; a no-op for head_dim 128 or smaller).

    The tokens are scored in chunks of ``EIGEN_CHUNK`` matrices (each token's score is its
    own: chunking changes nothing but memory traffic).

    Args:
        q: ``[..., N, H, d]`` query vectors (pre- or post-RoPE: RoPE does not change the
           score: every head of a token is rotated by the same matrix R, and
           (ZR)(ZR)ᵀ = ZZᵀ). Any leading batch dims.
        index: optional ``[M]`` indices into the flattened tokens ``q.reshape(-1, H, d)``:
           score only those (a batch's visual tokens, without copying the batch).
    Returns:
        ``[..., N]`` float64 scores (``[M]`` with ``index``). Higher = kept first.
    """
    if q.dim() < 3:
        raise ValueError(f"token_entropy expects a [..., N, H, d] tensor, got shape {tuple(q.shape)}")
    num_heads = q.shape[-2]
    if num_heads < 2:
        raise ValueError("token_entropy needs at least 2 attention heads (ln H would be 0)")
    flat = q.reshape(-1, *q.shape[-2:])
    total = flat.shape[0] if index is None else index.numel()
    chunk = EIGEN_CHUNK.get(flat.device.type, EIGEN_CHUNK["accelerator"])
    scores = []
    for start in range(0, total, chunk):
        part = flat[start : start + chunk] if index is None else flat.index_select(0, index[start : start + chunk])
        scores.append(_scores(part, head_group))
    out = torch.cat(scores) if scores else flat.new_empty(0, dtype=torch.float64)
    return out if index is not None else out.reshape(q.shape[:-2])


def _scores(q: torch.Tensor, head_group: int) -> torch.Tensor:
    """The :func:`token_entropy` formula on ``[M, H, d]`` query matrices."""
    num_heads, dim = q.shape[-2], q.shape[-1]
    if dim > head_group and dim % head_group == 0:
        q = q.unflatten(-1, (head_group, dim // head_group)).mean(-1)
    z = (q - q.mean(dim=-2, keepdim=True)).double()
    gram = z @ z.transpose(-1, -2) / num_heads
    eig = torch.linalg.eigvalsh(gram).clamp_min(EIGEN_FLOOR)
    return -(eig * eig.log()).sum(-1) / math.log(num_heads)


def matrix_entropy(x: torch.Tensor) -> torch.Tensor:
    """Von Neumann entropy of a set of N token vectors ``x`` of shape ``[N, D]``.

    Normalisation (documented choice for the collapse-layer analysis):

        Z   = x − mean_rows(x)                      (centre over the N tokens)
        Z_i ← Z_i / ‖Z_i‖₂                          (L2-normalise each token)
        K   = Z Zᵀ / N                              (N×N Gram; trace(K) = 1)
        S   = −Σ λ ln λ,   λ = eig(K), λ ≤ 1e-12 dropped

    The spectrum is taken from the D×D matrix Zᵀ Z / N instead when D < N: same non-zero
    eigenvalues, cheaper. Computed in float64. Returns a 0-dim tensor in nats; its maximum
    is ln(min(N, D)).
    """
    if x.dim() != 2:
        raise ValueError(f"matrix_entropy expects an [N, D] tensor, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if n < 2:
        raise ValueError("matrix_entropy needs at least 2 tokens")
    z = x.double()
    z = z - z.mean(dim=0, keepdim=True)
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    gram = (z @ z.T) if n <= z.shape[1] else (z.T @ z)
    eig = torch.linalg.eigvalsh(gram / n)
    eig = eig[eig > 1e-12]
    return -(eig * eig.log()).sum()
