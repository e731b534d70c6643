"""Analytic prefill / decode FLOPs and KV-cache bytes, from a transformers config.

Three conventions, all reported side by side by :func:`flops_report`:

1. **Paper formula** (FastV, copied by DART, PDrop, EntropyPrune …), in *MACs*:
   F(n) = 4·n·d² + 2·n²·d + 2·n·d·m per decoder layer; prefill = K·F(n) + (L−K)·F(n̂).
   Here n counts *every* prompt token (text + visual); FastV's own table uses the image
   tokens only, which :func:`paper_prefill_flops` also gives when called with n = N.
2. **Exact LM count**, in FLOPs (2 per MAC): GQA projections, causal attention (query i
   sees i+1 keys) and a SwiGLU FFN, layers < K on n tokens and layers ≥ K on n̂ tokens.
   Norms, RoPE, softmax, residual adds and biases are not counted (< 0.5 %).
3. **With vision** (the calflops convention the paper's 68.2 % most likely used,
   docs/design.md §1): the exact LM count + the vision tower + the multimodal projector + the
   LM head over every position that reaches it (n before pruning, n̂ after).

Symbols: d = hidden size, m = intermediate size, L = decoder layers, H = query heads,
Hkv = KV heads, hd = head dim, V = vocabulary, N = visual tokens, k = visual tokens kept,
n = text + N, n̂ = n − (N − k), K = prune layer (layers 0..K−1 see all n tokens).

Everything is integer / float arithmetic on config fields: cheap enough to call per sample.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ep_core.config import check_prune_layer
from ep_core.families import FAMILIES, tokens_per_crop

__all__ = [
    "FlopsReport",
    "TextDims",
    "text_dims",
    "paper_layer_flops",
    "paper_prefill_flops",
    "layer_flops",
    "prefill_flops",
    "lm_head_flops",
    "vision_flops",
    "projector_flops",
    "kv_cache_bytes",
    "decode_flops_per_token",
    "flops_report",
]


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class TextDims:
    """The decoder shapes every formula here needs."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_config(cls, config: Any) -> "TextDims":
        """Read the shapes from a text config or a multimodal config (``get_text_config()``)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        d = int(text.hidden_size)
        heads = int(text.num_attention_heads)
        kv = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or d // heads
        return cls(
            hidden_size=d,
            intermediate_size=int(text.intermediate_size),
            num_layers=int(text.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=int(kv),
            head_dim=int(head_dim),
            vocab_size=int(getattr(text, "vocab_size", 0) or 0),
        )


def text_dims(config: Any) -> TextDims:
    """Shorthand for :meth:`TextDims.from_config`; passes a ``TextDims`` through."""
    return config if isinstance(config, TextDims) else TextDims.from_config(config)


# --------------------------------------------------------------------------- paper formula


def paper_layer_flops(n: int, d: int, m: int) -> int:
    """The paper's per-layer cost, F(n) = 4·n·d² + 2·n²·d + 2·n·d·m (MACs, FastV convention).

    Terms: Q/K/V/O projections, QKᵀ plus AV (full n×n, no causal halving), a two-matrix FFN.
    """
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def paper_prefill_flops(n: int, n_pruned: int, d: int, m: int, num_layers: int, prune_layer: int) -> int:
    """Prefill with pruning at K in the paper's convention: K·F(n) + (L−K)·F(n̂) (MACs).

    FastV's reduction is 1 − that / (L·F(n)); FastV uses n = image tokens only.
    """
    check_prune_layer(prune_layer, num_layers, analytic=True)
    return prune_layer * paper_layer_flops(n, d, m) + (num_layers - prune_layer) * paper_layer_flops(n_pruned, d, m)


# --------------------------------------------------------------------------- exact LM count


def layer_flops(n: int, dims: TextDims) -> int:
    """Exact FLOPs (2 per MAC) of one decoder layer over a causal prefill of n tokens.

    = 2·n·d·(2·H·hd + 2·Hkv·hd)          Q and O at full width, K and V at GQA width
    + 2·2·H·hd·n(n+1)/2                  QKᵀ and AV over the n(n+1)/2 causal pairs per head
    + 2·3·n·d·m                          SwiGLU: gate, up, down
    """
    d, hd = dims.hidden_size, dims.head_dim
    proj = 2 * n * d * (2 * dims.num_heads * hd + 2 * dims.num_kv_heads * hd)
    attn = 2 * dims.num_heads * hd * n * (n + 1)  # = 2 FLOPs · 2 matmuls · H·hd · n(n+1)/2
    mlp = 6 * n * d * dims.intermediate_size
    return proj + attn + mlp


def prefill_flops(dims: TextDims, n: int, n_pruned: int | None = None, prune_layer: int = 0) -> int:
    """Exact decoder FLOPs of a prefill: K·layer(n) + (L−K)·layer(n̂).

    Layers < K see all n tokens; layers ≥ K see n̂ tokens (the kept visual tokens plus all
    text) attending causally among themselves. ``n_pruned=None`` means no pruning.
    """
    dims = text_dims(dims)
    if n_pruned is None:
        n_pruned = n
    check_prune_layer(prune_layer, dims.num_layers, analytic=True)
    return prune_layer * layer_flops(n, dims) + (dims.num_layers - prune_layer) * layer_flops(n_pruned, dims)


def lm_head_flops(dims: TextDims, positions: int) -> int:
    """LM head over ``positions`` positions: 2·positions·d·V FLOPs."""
    dims = text_dims(dims)
    return 2 * positions * dims.hidden_size * dims.vocab_size


def decoder_parameters(dims: TextDims) -> int:
    """Weights of the language model from its shapes (vision tower and norms left out):

    L·(d·(2·H·hd + 2·Hkv·hd) + 3·d·m) + 2·V·d        attention, SwiGLU MLP; embedding and LM head
    """
    dims = text_dims(dims)
    d, hd = dims.hidden_size, dims.head_dim
    per_layer = d * (2 * dims.num_heads * hd + 2 * dims.num_kv_heads * hd) + 3 * d * dims.intermediate_size
    return dims.num_layers * per_layer + 2 * dims.vocab_size * d


def kv_cache_bytes(
    dims: TextDims, n: int, n_pruned: int | None = None, prune_layer: int = 0, dtype_bytes: int = 2
) -> int:
    """KV-cache size after prefill: Σ_layers 2·n_l·Hkv·hd·bytes, n_l = n (l < K) or n̂ (l ≥ K)."""
    dims = text_dims(dims)
    if n_pruned is None:
        n_pruned = n
    check_prune_layer(prune_layer, dims.num_layers, analytic=True)
    tokens = prune_layer * n + (dims.num_layers - prune_layer) * n_pruned
    return 2 * tokens * dims.num_kv_heads * dims.head_dim * dtype_bytes


def decode_flops_per_token(
    dims: TextDims, cache_len: int, cache_len_pruned: int | None = None, prune_layer: int = 0
) -> int:
    """Decoder FLOPs to process one new token whose cache holds ``cache_len`` earlier tokens.

    Per layer (the new token attends to c_l + 1 keys, its own included):
        2·d·(2·H·hd + 2·Hkv·hd) + 2·2·H·hd·(c_l + 1) + 2·3·d·m
    with c_l = ``cache_len`` for l < K and ``cache_len_pruned`` for l ≥ K. The LM head
    (2·d·V) is not included. For the first generated token, cache_len = n (resp. n̂).
    """
    dims = text_dims(dims)
    if cache_len_pruned is None:
        cache_len_pruned = cache_len
    check_prune_layer(prune_layer, dims.num_layers, analytic=True)
    d, hd = dims.hidden_size, dims.head_dim
    fixed = 2 * d * (2 * dims.num_heads * hd + 2 * dims.num_kv_heads * hd) + 6 * d * dims.intermediate_size

    def attn(c: int) -> int:
        return 4 * dims.num_heads * hd * (c + 1)

    return dims.num_layers * fixed + prune_layer * attn(cache_len) + (dims.num_layers - prune_layer) * attn(
        cache_len_pruned
    )


# --------------------------------------------------------------------------- vision side


def _clip_like_flops(vision: Any, crops: int) -> int:
    """A CLIP/SigLIP-style ViT over ``crops`` images (FLOPs).

    Per crop: t = P (+1 CLS for CLIP) tokens, P = (image_size/patch)²;
      patch embedding 2·P·(C·p²)·D;
      per layer 2·t·4D² (Q, K, V, O) + 2·2·t²·D (QKᵀ, AV, non-causal) + 2·2·t·D·M (fc1, fc2);
    all ``num_hidden_layers`` layers are counted (LLaVA runs the whole tower and reads
    layer −2, so the last layer is computed too).
    """
    d = int(vision.hidden_size)
    m = int(vision.intermediate_size)
    p = int(vision.patch_size)
    patches = (int(vision.image_size) // p) ** 2
    cls_token = 1 if "clip" in str(getattr(vision, "model_type", "clip")) else 0
    t = patches + cls_token
    channels = int(getattr(vision, "num_channels", 3))
    embed = 2 * patches * channels * p * p * d
    per_layer = 2 * t * 4 * d * d + 4 * t * t * d + 4 * t * d * m
    return crops * (embed + int(vision.num_hidden_layers) * per_layer)


def _qwen_vit_flops(vision: Any, visual_tokens: int, windowed: bool, slices: int = 1) -> int:
    """Qwen2-VL / Qwen2.5-VL ViT for ``visual_tokens`` merged tokens (FLOPs, approximate).

    P = visual_tokens·s² patches (s = spatial_merge_size, 2), each patch a
    C·T·p² = 3·2·14² = 1176-dim voxel (a still image is repeated over T = 2 frames).
      patch embedding 2·P·(C·T·p²)·D
      per block 2·P·4D² (QKV, proj; full multi-head) + MLP
        Qwen2.5-VL: SwiGLU, 2·3·P·D·M;  Qwen2-VL: two matrices of width D·mlp_ratio, 2·2·P·D·M
      attention 2·2·D·pairs, pairs = P² in full-attention blocks, and P·min(w, P) in the
        window blocks of Qwen2.5-VL (w = (window_size/patch)² = 64 patches per window).
    The window count is an upper bound: windows cut by the image border are smaller in
    reality. A video's ``slices`` temporal patches attend within themselves (full pairs
    P²/slices). 2-D RoPE, norms and the window reordering are not counted.
    """
    if windowed:
        d = int(vision.hidden_size)
        m = int(vision.intermediate_size)
        depth = int(vision.depth)
        mlp_per_token = 6 * d * m
        full_blocks = len(getattr(vision, "fullatt_block_indexes", None) or [])
        window = (int(vision.window_size) // int(vision.patch_size)) ** 2
        out = int(vision.out_hidden_size)
    else:  # Qwen2-VL: embed_dim, mlp_ratio, GELU MLP, full attention everywhere
        d = int(getattr(vision, "embed_dim", vision.hidden_size))
        m = int(d * float(getattr(vision, "mlp_ratio", 4)))
        depth = int(vision.depth)
        mlp_per_token = 4 * d * m
        full_blocks = depth
        window = 0
        out = int(vision.hidden_size) if hasattr(vision, "embed_dim") else d
    s = int(vision.spatial_merge_size)
    p = int(vision.patch_size)
    temporal = int(getattr(vision, "temporal_patch_size", 2))
    channels = int(getattr(vision, "in_channels", getattr(vision, "in_chans", 3)))
    patches = visual_tokens * s * s
    embed = 2 * patches * channels * temporal * p * p * d
    dense = depth * (2 * patches * 4 * d * d + patches * mlp_per_token)
    full_pairs = patches * patches // max(1, slices)
    window_pairs = patches * min(window, patches) if window else full_pairs
    attn = 4 * d * (full_blocks * full_pairs + (depth - full_blocks) * window_pairs)
    merged = d * s * s
    merger = 2 * visual_tokens * (merged * merged + merged * out)
    return embed + dense + attn + merger


def _vision_kind(config: Any) -> str | None:
    """The family table's vision kind; an unknown family with a CLIP-like vision config is
    counted as ``clip``."""
    family = FAMILIES.get(getattr(config, "model_type", ""))
    if family is not None:
        return family.vision
    vision = config.vision_config
    return "clip" if all(hasattr(vision, a) for a in ("image_size", "patch_size", "hidden_size", "intermediate_size")) else None


def _crops(config: Any, visual_tokens: int) -> int:
    """Crops behind ``visual_tokens``: round(N / P) for anyres families (base + grid),
    ⌈N / P⌉ otherwise (several images), P = (image_size / patch)²."""
    vision = config.vision_config
    per_crop = (int(vision.image_size) // int(vision.patch_size)) ** 2
    family = FAMILIES.get(getattr(config, "model_type", ""))
    if family is not None and family.anyres:
        return max(1, round(visual_tokens / per_crop))
    return max(1, math.ceil(visual_tokens / per_crop)) if visual_tokens else 0


def vision_flops(config: Any, visual_tokens: int, video_frames: int = 0) -> int | None:
    """FLOPs of the vision tower that produced ``visual_tokens`` tokens; None if unknown.

    * LLaVA-1.5: one 336-px crop through CLIP (see :func:`_clip_like_flops`); more crops if
      ``visual_tokens`` > 576 (several images).
    * LLaVA-NeXT, NeXT-Video, OneVision images: round(N / P) crops (2880 → 5: base image +
      2×2 grid; OneVision's SigLIP-384: 3699 → 5).
    * A video of F = ``video_frames`` frames (video-native families): F crops, one tower pass
      per frame, pooled afterwards (NeXT-Video, OneVision).
    * Qwen2-VL / Qwen2.5-VL: see :func:`_qwen_vit_flops` (includes its patch merger); a video
      attends within each of its ⌈F/2⌉ temporal patches.
    * A text-only config, or an unknown vision config: None.
    """
    vision = getattr(config, "vision_config", None)
    if vision is None or visual_tokens <= 0:
        return None if vision is None else 0
    kind = _vision_kind(config)
    if kind in ("qwen2_vl", "qwen2_5_vl"):
        temporal = int(getattr(vision, "temporal_patch_size", 2))
        slices = -(-video_frames // temporal) if video_frames else 1
        return _qwen_vit_flops(vision, visual_tokens, windowed=kind == "qwen2_5_vl", slices=slices)
    if kind == "clip":
        return _clip_like_flops(vision, video_frames or _crops(config, visual_tokens))
    return None


def projector_flops(config: Any, visual_tokens: int, video_frames: int = 0) -> int | None:
    """FLOPs of the multimodal projector; None when there is no vision config.

    LLaVA's two-layer MLP runs on every crop's patch features (before LLaVA-NeXT's
    unpadding): 2·P·(D_v·d + d·d), with P = crops·576 and D_v = the vision width times the
    number of feature layers. A video of F frames: P = F·(tokens per crop) where pooling
    follows the projector (OneVision), P = N where it precedes it (NeXT-Video's
    ``spatial_pool_stride`` resampler). Qwen's merger is counted inside :func:`vision_flops`
    (returns 0).
    """
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return None
    if visual_tokens <= 0 or _vision_kind(config) in ("qwen2_vl", "qwen2_5_vl"):
        return 0
    if not all(hasattr(vision, a) for a in ("image_size", "patch_size", "hidden_size")):
        return None
    d = text_dims(config).hidden_size
    layers = getattr(config, "vision_feature_layer", -2)
    d_in = int(vision.hidden_size) * (len(layers) if isinstance(layers, (list, tuple)) else 1)
    family = FAMILIES.get(getattr(config, "model_type", ""))
    if video_frames and getattr(config, "spatial_pool_stride", None) is not None:
        positions = visual_tokens  # pooled before the projector
    elif video_frames:
        positions = video_frames * tokens_per_crop(config)
    elif family is not None and family.anyres:
        positions = _crops(config, visual_tokens) * tokens_per_crop(config)
    else:
        positions = visual_tokens
    return 2 * positions * (d_in * d + d * d)


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class FlopsReport:
    """Per-sample FLOPs figures; ``*_full`` is the unpruned model on the same input.

    Units: ``prefill_flops*`` and ``prefill_flops_with_vision*`` and ``decode_flops*`` in
    FLOPs; ``paper_flops*`` in the paper's MAC-style units (×2 ≈ FLOPs); bytes in bytes.
    Reductions are 1 − pruned / full, as fractions (0.682 = 68.2 %).

    ``flops_reduction_paper`` uses n = text + visual tokens; ``…_paper_image_only`` uses
    n = visual tokens only (FastV's table). ``vision_flops`` is the vision tower plus the
    projector (the same in both runs); ``lm_head_flops`` covers n̂ positions (``_full``: n).
    ``decode_flops_per_token*`` is the decoder cost of the first generated token (no LM head).
    """

    visual_tokens: int
    visual_tokens_kept: int
    text_tokens: int
    prune_layer: int
    num_layers: int
    tokens: int
    tokens_pruned: int
    prefill_flops: int
    prefill_flops_full: int
    flops_reduction: float
    paper_flops: int
    paper_flops_full: int
    flops_reduction_paper: float
    flops_reduction_paper_image_only: float
    prefill_flops_with_vision: int | None
    prefill_flops_with_vision_full: int | None
    flops_reduction_with_vision: float | None
    vision_flops: int | None
    lm_head_flops: int
    lm_head_flops_full: int
    kv_cache_bytes: int
    kv_cache_bytes_full: int
    kv_cache_reduction: float
    decode_flops_per_token: int
    decode_flops_per_token_full: int
    dtype_bytes: int
    video_frames: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def flops_report(
    config: Any,
    visual_tokens: int,
    visual_tokens_kept: int,
    text_tokens: int,
    prune_layer: int,
    dtype_bytes: int = 2,
    video_frames: int = 0,
) -> FlopsReport:
    """All three FLOPs conventions and the KV-cache bytes for one sample.

    Args:
        config: a multimodal config (``text_config`` + ``vision_config``), a text-only
            config, or a :class:`TextDims` (then the with-vision fields are None).
        visual_tokens: N, the visual tokens in the prompt.
        visual_tokens_kept: k ≤ N, kept from layer K on.
        text_tokens: every other prompt token (system prompt, template, question).
        prune_layer: K; layers 0..K−1 see all tokens. K = 0 prunes before the decoder.
        dtype_bytes: bytes per KV-cache element (2 for fp16/bf16).
        video_frames: F > 0 when the visual tokens are one video of F frames through a
            video-native family's video path (the vision tower then runs once per frame).
    """
    dims = text_dims(config)
    for name, value in (("visual_tokens", visual_tokens), ("visual_tokens_kept", visual_tokens_kept),
                        ("text_tokens", text_tokens), ("dtype_bytes", dtype_bytes), ("video_frames", video_frames)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if visual_tokens_kept > visual_tokens:
        raise ValueError(f"visual_tokens_kept ({visual_tokens_kept}) exceeds visual_tokens ({visual_tokens})")
    check_prune_layer(prune_layer, dims.num_layers, analytic=True)
    n = text_tokens + visual_tokens
    n_hat = text_tokens + visual_tokens_kept
    if n == 0:
        raise ValueError("the prompt is empty: text_tokens + visual_tokens must be > 0")
    L, K = dims.num_layers, prune_layer

    exact = prefill_flops(dims, n, n_hat, K)
    exact_full = prefill_flops(dims, n, n, 0)
    paper = paper_prefill_flops(n, n_hat, dims.hidden_size, dims.intermediate_size, L, K)
    paper_full = L * paper_layer_flops(n, dims.hidden_size, dims.intermediate_size)
    if visual_tokens:
        paper_img = paper_prefill_flops(visual_tokens, visual_tokens_kept, dims.hidden_size,
                                        dims.intermediate_size, L, K)
        paper_img_full = L * paper_layer_flops(visual_tokens, dims.hidden_size, dims.intermediate_size)
        reduction_img = 1.0 - paper_img / paper_img_full
    else:
        reduction_img = 0.0
    head = lm_head_flops(dims, n_hat)
    head_full = lm_head_flops(dims, n)

    vis = None if isinstance(config, TextDims) else vision_flops(config, visual_tokens, video_frames)
    proj = None if isinstance(config, TextDims) else projector_flops(config, visual_tokens, video_frames)
    if vis is None or proj is None:
        with_vision = with_vision_full = reduction_vision = None
        vis = None
    else:
        with_vision = exact + vis + proj + head
        with_vision_full = exact_full + vis + proj + head_full
        reduction_vision = 1.0 - with_vision / with_vision_full
        vis = vis + proj

    kv = kv_cache_bytes(dims, n, n_hat, K, dtype_bytes)
    kv_full = kv_cache_bytes(dims, n, n, 0, dtype_bytes)
    return FlopsReport(
        visual_tokens=visual_tokens,
        visual_tokens_kept=visual_tokens_kept,
        text_tokens=text_tokens,
        prune_layer=K,
        num_layers=L,
        tokens=n,
        tokens_pruned=n_hat,
        prefill_flops=exact,
        prefill_flops_full=exact_full,
        flops_reduction=1.0 - exact / exact_full,
        paper_flops=paper,
        paper_flops_full=paper_full,
        flops_reduction_paper=1.0 - paper / paper_full,
        flops_reduction_paper_image_only=reduction_img,
        prefill_flops_with_vision=with_vision,
        prefill_flops_with_vision_full=with_vision_full,
        flops_reduction_with_vision=reduction_vision,
        vision_flops=vis,
        lm_head_flops=head,
        lm_head_flops_full=head_full,
        kv_cache_bytes=kv,
        kv_cache_bytes_full=kv_full,
        kv_cache_reduction=1.0 - kv / kv_full,
        decode_flops_per_token=decode_flops_per_token(dims, n, n_hat, K),
        decode_flops_per_token_full=decode_flops_per_token(dims, n, n, 0),
        dtype_bytes=dtype_bytes,
        video_frames=video_frames,
    )
