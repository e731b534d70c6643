"""Independent references the pruning hooks are checked against (docs/design.md §4).

Nothing here imports ep_core's hooks: the references are built from the unpruned model.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask


def numpy_token_entropy(q: np.ndarray) -> np.ndarray:
    """The official score in float64 NumPy, one token at a time: q is [N, H, d]."""
    scores = []
    for token in q.astype(np.float64):
        heads = token.shape[0]
        z = token - token.mean(axis=0, keepdims=True)
        gram = z @ z.T / heads
        eig = np.clip(np.linalg.eigvalsh(gram), 1e-10, None)
        scores.append(-(eig * np.log(eig)).sum() / math.log(heads))
    return np.array(scores)


def padded_kept_mask(stats: list[dict], attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: True at positions that reach layer K (pads included), from handle.stats."""
    valid = attention_mask.bool()
    kept = ~valid  # padding is always kept
    for b, row in enumerate(stats):
        valid_positions = valid[b].nonzero()[:, 0]
        kept[b, valid_positions[torch.tensor(row["kept_positions"], dtype=torch.long)]] = True
    return kept


def install_masked_reference(model, prune_layer: int, kept: torch.Tensor, valid: torch.Tensor, float_mask: bool):
    """Make layers >= K of the *unpruned* model unable to attend to the dropped tokens.

    Every layer >= K gets a fresh 4-D mask: causal, padding, the dropped prompt keys removed,
    the diagonal allowed (so no query row is empty). Works for prefill and decode steps.
    Returns the hook handles.
    """
    layers = model.model.language_model.layers
    prompt_len = kept.shape[1]

    def hook(module, args, kwargs):
        hidden = args[0]
        q_len = hidden.shape[1]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length(module.self_attn.layer_idx) if cache is not None else 0
        kv_len = past + q_len
        key_ok = torch.ones(kept.shape[0], kv_len, dtype=torch.bool)
        key_ok[:, :prompt_len] = kept & valid
        q_pos = torch.arange(past, kv_len)[:, None]
        k_pos = torch.arange(kv_len)[None, :]
        allowed = (k_pos <= q_pos)[None] & key_ok[:, None, :]
        allowed |= (k_pos == q_pos)[None]
        mask = allowed[:, None]
        if float_mask:
            mask = torch.zeros(mask.shape, dtype=hidden.dtype).masked_fill(~mask, torch.finfo(hidden.dtype).min)
        kwargs["attention_mask"] = mask
        return args, kwargs

    return [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers[prune_layer:]]


def _flash_like_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A CPU stand-in with flash-attention's calling convention: a 2-D ``[B, kv]`` padding mask
    (or None), causal alignment bottom-right, ``position_ids`` in kwargs. It lets CI run the
    hooks' flash-attention code path (2-D mask cutting, position ids dropped) without a GPU."""
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    mask = causal[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and q_len > 1 and (position_ids.diff(dim=-1) != 1).any() and attention_mask is None:
        raise AssertionError("gapped position ids reached a flash-attention layer (would be taken as packed)")
    diagonal = torch.arange(kv_len)[None, :] == torch.arange(q_len)[:, None] + (kv_len - q_len)
    mask = mask | diagonal[None, None]  # no empty rows
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    if attention_mask is not None:  # flash attention never computes padded query rows
        out = out * attention_mask[:, None, -q_len:, None].to(out.dtype)
    return out.transpose(1, 2).contiguous(), None


FLASH_LIKE = "fa_like_cpu"  # a name without "flash": transformers would try to load a kernel
AttentionInterface.register(FLASH_LIKE, _flash_like_attention)
AttentionMaskInterface.register(FLASH_LIKE, flash_attention_mask)
