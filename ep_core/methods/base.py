"""What every selection rule shares: the per-sample :class:`Row` and rotary helper."""

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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, heads, hd]`` by the rotary tables ``cos, sin [T, hd]``.

    x' = x·cos + rotate_half(x)·sin, rotate_half([x₁, x₂]) = [−x₂, x₁] (the Llama/Qwen
    convention, the one transformers' ``apply_rotary_pos_emb`` uses).
    """
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
