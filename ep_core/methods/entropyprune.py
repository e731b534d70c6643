"""EntropyPrune: keep the visual tokens whose per-head query matrix has the highest entropy.

score_t = −Σ λ ln λ / ln H over the eigenvalues of Z_t Z_tᵀ / H, Z_t the head-centred H×hd
query matrix of token t at layer K−1 (``ep_core.entropy.token_entropy``; docs/design.md §1).
Pre-RoPE queries give the same score as post-RoPE ones: RoPE rotates every head of a token
by the same orthogonal matrix.
"""

from __future__ import annotations

import torch

from ep_core.entropy import token_entropy

NEEDS = frozenset({"queries"})


def select(row, k: int) -> torch.Tensor:
    scores = token_entropy(row.queries[row.visual_pos])
    return torch.topk(scores, k, largest=True, sorted=True).indices
