"""Budget semantics: how many visual tokens survive the prune layer.

A budget is given one of two ways (never both):

* ``budget`` B: the papers' *layer-averaged* visual-token count ("192 / 128 / 64" for
  LLaVA-1.5). The first K layers see all N tokens, so the count kept after layer K is
  k = ⌊(L·B − K·N) / (L − K)⌋, clamped to [0, N].
* ``keep_ratio`` r: the share of visual tokens kept after layer K, k = ⌊r·N + ½⌋, clamped
  to [0, N].
* ``keep_tokens`` T: the count kept after layer K, k = min(T, N) (the official code's
  LLaVA-1.6 path, "k = B directly").

Every result reports both numbers (see :func:`layer_averaged_budget`).
"""

from __future__ import annotations

import math

from ep_core.config import check_prune_layer


def keep_count(budget: float, num_visual: int, num_layers: int, prune_layer: int) -> int:
    """Tokens kept after layer K for a layer-averaged budget B.

    k = ⌊(L·B − K·N) / (L − K)⌋ clamped to [0, N]   (docs/design.md §1)

    For LLaVA-1.5-7B (L=32, K=2, N=576): B=192 → 166, B=128 → 98, B=64 → 29.
    """
    check_prune_layer(prune_layer, num_layers)
    if budget < 0:
        raise ValueError(f"budget must be >= 0 visual tokens per layer, got {budget}")
    if num_visual < 0:
        raise ValueError(f"num_visual must be >= 0, got {num_visual}")
    k = math.floor((num_layers * budget - prune_layer * num_visual) / (num_layers - prune_layer))
    return max(0, min(num_visual, k))


def keep_count_for_ratio(keep_ratio: float, num_visual: int) -> int:
    """Tokens kept after layer K for a keep ratio r: k = ⌊r·N + ½⌋ clamped to [0, N]."""
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in [0, 1], got {keep_ratio}")
    return max(0, min(num_visual, math.floor(keep_ratio * num_visual + 0.5)))


def layer_averaged_budget(kept: int, num_visual: int, num_layers: int, prune_layer: int) -> float:
    """The layer-averaged budget that a keep count amounts to: B = (K·N + (L−K)·k) / L."""
    check_prune_layer(prune_layer, num_layers)
    return (prune_layer * num_visual + (num_layers - prune_layer) * kept) / num_layers
