"""FastV: keep the visual tokens that the last prompt token attends to most at layer K−1.

a_j = mean_h softmax_j( q_{h,last} · k_{h,j} / √hd )  over the non-padded keys j ≤ last,

with post-RoPE queries and keys (GQA: query head h reads key head ⌊h / G⌋, G = H / Hkv).
Computed from the captured ``q_proj``/``k_proj`` outputs of layer K−1: no attention weights
are needed, so it works under sdpa and flash attention, and no layer is run twice. All rows of
a batch at once; "last" is each row's last non-padded position.
"""

from __future__ import annotations

import math

import torch

from ep_core.methods.base import Candidates, apply_rope, top_per_row

NEEDS = frozenset({"queries", "keys"})


def select_batch(candidates: Candidates) -> torch.Tensor:
    """``[B, W]`` bool: the ``ks[b]`` visual tokens of each row with the most attention."""
    queries, keys, valid = candidates.queries, candidates.keys, candidates.valid  # [B,T,H,hd] [B,T,Hkv,hd] [B,T]
    batch, length, heads, head_dim = queries.shape
    kv_heads = keys.shape[2]
    cos = candidates.cos.expand(batch, -1, -1).float()  # [B, T, hd]
    sin = candidates.sin.expand(batch, -1, -1).float()
    rows = torch.arange(batch, device=queries.device)
    last = (valid.long() * torch.arange(length, device=valid.device)).argmax(dim=1)  # last valid position
    q = apply_rope(queries[rows, last].float(), cos[rows, last], sin[rows, last])  # [B, H, hd]
    k = apply_rope(keys.float().flatten(0, 1), cos.flatten(0, 1), sin.flatten(0, 1)).view(batch, length, kv_heads, head_dim)
    q = q.view(batch, kv_heads, heads // kv_heads, head_dim)
    logits = torch.einsum("bkgd,btkd->bkgt", q, k) / math.sqrt(head_dim)
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    attention = logits.softmax(dim=-1).mean(dim=(1, 2))  # [B, T]
    return top_per_row(attention.gather(1, candidates.visual_pos), candidates.visual_valid, candidates.ks)
