"""Per-sample cost accounting: what one prefill cost, from the counts the hooks record.

The pruning hooks count, per sample, its visual tokens N, the visual tokens kept k and its
text tokens; :func:`sample_stats` turns those counts into the figures every output row and
``handle.stats`` carry (FLOPs in three conventions, KV-cache bytes, the layer-averaged
budget), through the analytic formulas of :mod:`ep_core.flops` and :mod:`ep_core.budget`.
"""

from __future__ import annotations

from typing import Any

from ep_core.budget import layer_averaged_budget
from ep_core.flops import flops_report


def sample_stats(
    config: Any,
    *,
    method: str,
    visual_tokens: int,
    visual_tokens_kept: int,
    text_tokens: int,
    prune_layer: int,
    dtype_bytes: int,
    kept_positions: list[int] | None = None,
) -> dict:
    """One sample's figures: counts, keep ratio k / N, the layer-averaged budget
    B = (K·N + (L−K)·k) / L, exact and paper FLOPs and their reductions, KV-cache bytes."""
    num_layers = int(config.get_text_config().num_hidden_layers)
    flops = flops_report(config, visual_tokens, visual_tokens_kept, text_tokens, prune_layer, dtype_bytes=dtype_bytes)
    return {
        "method": method,
        "visual_tokens": visual_tokens,
        "visual_tokens_kept": visual_tokens_kept,
        "text_tokens": text_tokens,
        "keep_ratio": visual_tokens_kept / visual_tokens if visual_tokens else 1.0,
        "budget": layer_averaged_budget(visual_tokens_kept, visual_tokens, num_layers, prune_layer),
        "prune_layer": prune_layer,
        "num_layers": num_layers,
        "kept_positions": kept_positions,
        "prefill_flops": flops.prefill_flops,
        "prefill_flops_full": flops.prefill_flops_full,
        "flops_reduction": flops.flops_reduction,
        "flops_reduction_paper": flops.flops_reduction_paper,
        "flops_reduction_with_vision": flops.flops_reduction_with_vision,
        "kv_cache_bytes": flops.kv_cache_bytes,
    }
