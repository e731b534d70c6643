"""EntropyPrune: keep the visual tokens whose per-head query matrix has the highest entropy.

score_t = −Σ λ ln λ / ln H over the eigenvalues of Z_t Z_tᵀ / H, Z_t the head-centred H×hd
query matrix of token t at layer K−1 (``ep_core.entropy.token_entropy``; docs/design.md §1).
Pre-RoPE queries give the same score as post-RoPE ones: RoPE rotates every head of a token
by the same orthogonal matrix.
"""

from __future__ import annotations

import torch

from ep_core.entropy import token_entropy
from ep_core.methods.base import Candidates, top_per_row

NEEDS = frozenset({"queries"})


def select_batch(candidates: Candidates) -> torch.Tensor:
    """``[B, W]`` bool: the ``ks[b]`` highest-scoring visual tokens of every row, scored in one
    call over the whole batch (rows of different lengths padded to W and masked)."""
    queries = candidates.queries  # [B, T, H, hd]
    batch, length = queries.shape[:2]
    rows = torch.arange(batch, device=queries.device)[:, None] * length
    flat_index = (candidates.visual_pos + rows).flatten()  # into queries.reshape(B·T, H, hd)
    scores = token_entropy(queries, index=flat_index).view(batch, -1)  # [B, W]
    return top_per_row(scores, candidates.visual_valid, candidates.ks)
