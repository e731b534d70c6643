"""DART: keep the visual tokens least duplicated with a few pivot tokens.

1. Pivots: the ``min(4, k)`` visual tokens and the (up to) 4 text tokens after the last
   visual token with the largest L1 norm ‖k_j‖₁ of their post-RoPE layer K−1 keys.
2. The remaining k − #image-pivots slots are shared out over the pivots in order
   (⌊r/P⌋ each, the first r mod P pivots one more). For each pivot in turn, take its share of
   the remaining visual candidates with the *lowest* cosine similarity to the pivot, in the
   layer K−1 output passed through the model's final norm, and remove them from the pool.
3. Kept = image pivots ∪ picks: exactly k tokens (the original keeps ≈ 4 + 8·⌊k/8⌋).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ep_core.methods.base import apply_rope

NEEDS = frozenset({"keys", "hidden"})
NUM_PIVOTS = 4


def select(row, k: int) -> torch.Tensor:
    num_visual = len(row.visual_pos)
    if k == 0:
        return row.visual_pos.new_empty(0)
    key_norm = apply_rope(row.keys.float(), row.cos.float(), row.sin.float()).abs().sum(dim=(1, 2))  # [T]

    image_pivots = torch.topk(key_norm[row.visual_pos], min(NUM_PIVOTS, k)).indices  # indices into visual_pos
    after_image = torch.arange(len(row.valid), device=row.valid.device) > row.visual_pos[-1]
    text_pos = (after_image & row.valid).nonzero()[:, 0]
    text_pivots = text_pos[torch.topk(key_norm[text_pos], min(NUM_PIVOTS, len(text_pos))).indices]

    hidden = F.normalize(row.hidden.float(), dim=-1)
    visual_hidden = hidden[row.visual_pos]  # [N, D]
    pivot_vectors = torch.cat([visual_hidden[image_pivots], hidden[text_pivots]])  # [P, D]
    similarity = pivot_vectors @ visual_hidden.T  # [P, N]

    available = torch.ones(num_visual, dtype=torch.bool, device=similarity.device)
    available[image_pivots] = False
    remaining = k - len(image_pivots)
    share, extra = divmod(remaining, len(pivot_vectors))
    picked = [image_pivots]
    for i in range(len(pivot_vectors)):
        take = share + (1 if i < extra else 0)
        if take == 0:
            continue
        scores = similarity[i].masked_fill(~available, float("inf"))
        chosen = torch.topk(scores, take, largest=False).indices
        available[chosen] = False
        picked.append(chosen)
    return torch.cat(picked)
