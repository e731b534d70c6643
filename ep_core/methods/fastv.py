"""FastV: keep the visual tokens that the last prompt token attends to most at layer K−1.

a_j = mean_h softmax_j( q_{h,last} · k_{h,j} / √hd )  over the non-padded keys j ≤ last,

with post-RoPE queries and keys (GQA keys repeated to the query heads). Computed from the
captured ``q_proj``/``k_proj`` outputs of layer K−1: no attention weights are needed, so it
works under sdpa and flash attention, and no layer is run twice.
"""

from __future__ import annotations

import math

import torch

from ep_core.methods.base import apply_rope

NEEDS = frozenset({"queries", "keys"})


def select(row, k: int) -> torch.Tensor:
    last = row.valid.nonzero()[-1, 0]
    q = apply_rope(row.queries[last : last + 1].float(), row.cos[last : last + 1].float(), row.sin[last : last + 1].float())[0]
    keys = apply_rope(row.keys.float(), row.cos.float(), row.sin.float())  # [T, Hkv, hd]
    keys = keys.repeat_interleave(q.shape[0] // keys.shape[1], dim=1)  # [T, H, hd]
    logits = torch.einsum("hd,thd->ht", q, keys) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~row.valid[None, :], float("-inf"))
    attention = logits.softmax(dim=-1).mean(dim=0)  # [T]
    return torch.topk(attention[row.visual_pos], k, largest=True, sorted=True).indices
