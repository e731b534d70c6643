"""What every selection rule shares: the per-sample :class:`Row`, the whole-batch
:class:`Candidates` and the rotary helper."""

from __future__ import annotations

from dataclasses import dataclass

import torch

@dataclass
class Row:
    """Everything a selection rule may read about one sample at the prune layer.

    Positions index the (possibly left-padded) prompt row of length T.

    Attributes:
        visual_pos: ``[N]`` positions of the candidate visual tokens, ascending.
        valid: ``[T]`` bool, False at padding.
        seed: per-sample seed (``random``): mixes the config seed with the sample's content.
        queries: ``[T, H, hd]`` layer K−1 ``q_proj`` output (pre-RoPE), if a rule needs it.
        keys: ``[T, Hkv, hd]`` layer K−1 ``k_proj`` output (pre-RoPE), if needed.
        cos, sin: ``[T, hd]`` the rotary tables of the row, to rotate queries/keys.
        hidden: ``[T, D]`` output of layer K−1 after the model's final norm, if needed.
    """

    visual_pos: torch.Tensor
    valid: torch.Tensor
    seed: int
    queries: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


@dataclass
class Candidates:
    """The visual tokens of a whole batch, for rules that select for all rows at once.

    Row b has ``N_b`` visual tokens, padded to ``W = max_b N_b`` columns.

    Attributes:
        visual_pos: ``[B, W]`` positions; a row's visual tokens ascending in its last ``N_b``
            columns, other (non-visual) positions before them.
        visual_valid: ``[B, W]`` bool, True at the row's visual tokens.
        ks: ``[B]`` how many visual tokens each row keeps.
        valid: ``[B, T]`` bool, False at padding.
        queries: ``[B, T, H, hd]`` layer K−1 ``q_proj`` output (pre-RoPE), if the rule needs it.
        keys: ``[B, T, Hkv, hd]`` layer K−1 ``k_proj`` output (pre-RoPE), if needed.
        cos, sin: ``[B|1, T, hd]`` the rotary tables, to rotate queries/keys.
    """

    visual_pos: torch.Tensor
    visual_valid: torch.Tensor
    ks: torch.Tensor
    valid: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None


def top_per_row(scores: torch.Tensor, valid: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """``[B, W]`` bool: each row's ``ks[b]`` highest ``scores`` among its ``valid`` columns."""
    scores = scores.masked_fill(~valid, float("-inf"))
    width = int(ks.max()) if ks.numel() else 0
    top = torch.topk(scores, width, dim=1, largest=True, sorted=True).indices
    take = torch.arange(width, device=scores.device)[None, :] < ks[:, None]
    return torch.zeros_like(valid).scatter_(1, top, take)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, heads, hd]`` by the rotary tables ``cos, sin [T, hd]``.

    x' = x·cos + rotate_half(x)·sin, rotate_half([x₁, x₂]) = [−x₂, x₁] (the Llama/Qwen
    convention, the one transformers' ``apply_rotary_pos_emb`` uses).
    """
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
