"""EntropyPrune inside stock HF transformers multimodal models.

Public API (see README): PruneConfig, apply_pruning, load_model, token_entropy,
matrix_entropy, keep_count, keep_count_for_ratio, the family table (FAMILIES,
check_supported) and the FLOPs functions in ``ep_core.flops``.
"""

from ep_core.budget import keep_count, keep_count_for_ratio, layer_averaged_budget
from ep_core.config import METHODS, PruneConfig
from ep_core.entropy import matrix_entropy, token_entropy
from ep_core.flops import (
    FlopsReport,
    decode_flops_per_token,
    flops_report,
    kv_cache_bytes,
    paper_layer_flops,
    paper_prefill_flops,
    prefill_flops,
)
from ep_core.families import FAMILIES, check_supported, default_visual_tokens
from ep_core.loading import load_model, load_model_config
from ep_core.hooks import PruningHandle, apply_pruning

__all__ = [
    "FAMILIES",
    "METHODS",
    "check_supported",
    "load_model",
    "PruneConfig",
    "PruningHandle",
    "apply_pruning",
    "keep_count",
    "keep_count_for_ratio",
    "layer_averaged_budget",
    "matrix_entropy",
    "token_entropy",
    "FlopsReport",
    "decode_flops_per_token",
    "default_visual_tokens",
    "flops_report",
    "kv_cache_bytes",
    "load_model_config",
    "paper_layer_flops",
    "paper_prefill_flops",
    "prefill_flops",
]
