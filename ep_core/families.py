"""The one table of what differs per model family, and the single answer to "is this model
supported?".

A family is a transformers ``config.model_type``. Each entry says whether the loader takes it
(every entry does), whether the pruning hooks support it, where its decoder lives, which
placeholder tokens are visual, the paper's default prune layer, and the facts the FLOPs
counter needs about its vision side. Adding a family is adding an entry plus a tiny-model test.

Pruning is supported only where the language model follows the transformers 5.x
decoder-layer call convention (hidden states positional; ``attention_mask``,
``position_embeddings``, ``position_ids`` and the cache as keyword arguments) and the whole
sequence goes through one rotary table computed once per forward (Qwen-VL's M-RoPE tables
are merged per token before the layers, so they qualify). Qwen3-VL's DeepStack additions are
made to follow the kept tokens (``Family.deepstack``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ep_core.config import PruneConfig, check_prune_layer

QWEN_DEFAULT_IMAGE_SIDE = 448  # px; the image size behind Qwen's default of 256 tokens


@dataclass(frozen=True)
class Family:
    """What EntropyPrune needs to know about one ``model_type``.

    Attributes:
        model_type: ``config.model_type``.
        example_checkpoint: a public checkpoint of the family (for messages and docs).
        prunable: the pruning hooks support it (every family loads and runs unpruned).
        visual_token_attrs: config attributes holding the visual placeholder token ids.
        default_prune_layer: K used when none is given (the paper: 2 for LLaVA, 1 for Qwen-VL).
        vision: the vision tower's kind for FLOPs: ``clip`` (a CLIP/SigLIP ViT over square
            crops), ``qwen2_vl``, ``qwen2_5_vl`` (windowed), ``qwen3_vl``, or ``None`` (not counted).
        anyres: images are tiled into several crops (LLaVA-NeXT): the default visual-token
            count is 5 crops (base image + 2×2 grid) and crops = round(N / tokens per crop).
        video_native: the processor takes a video as a video (``videos=``: its own placeholder
            token and ``pixel_values_videos``); the others see a video's frames as N images.
        deepstack: the text model adds visual features at the visual positions after its first
            layers (Qwen3-VL's DeepStack, ``_deepstack_process``); the hooks make those
            additions follow the kept tokens after layer K.
    """

    model_type: str
    example_checkpoint: str
    prunable: bool
    visual_token_attrs: tuple[str, ...]
    default_prune_layer: int
    vision: str | None
    anyres: bool = False
    video_native: bool = False
    deepstack: bool = False

    @property
    def encodes_in_groups(self) -> bool:
        """Rows with the same prompt text and image count can share one processor call and be
        split back exactly by leading dimension: each image becomes one fixed-size crop (a CLIP
        tower without anyres tiling, whose stacks would be zero-padded to the call's most crops)."""
        return self.vision == "clip" and not self.anyres and not self.video_native

    def multimodal_model(self, model: Any) -> Any:
        """The module that receives ``input_ids`` and builds ``inputs_embeds`` (``model.model``)."""
        return model.model

    def language_model(self, model: Any) -> Any:
        """The bare decoder (``LlamaModel``-like: ``.layers``, ``.norm``, ``.rotary_emb``)."""
        return model.model.language_model

    def video_token_ids(self, config: Any) -> tuple[int, ...]:
        """The placeholder ids among :meth:`visual_token_ids` that mark video (not image) tokens."""
        attrs = [a for a in self.visual_token_attrs if "video" in a]
        return tuple(sorted({int(v) for v in (getattr(config, a, None) for a in attrs) if v is not None}))

    def visual_token_ids(self, config: Any) -> tuple[int, ...]:
        """The placeholder token ids that mark visual tokens in ``input_ids``."""
        ids = {int(v) for v in (getattr(config, a, None) for a in self.visual_token_attrs) if v is not None}
        if not ids:
            raise ValueError(f"{self.model_type}: config has none of {self.visual_token_attrs}; cannot find visual tokens")
        return tuple(sorted(ids))


_LLAVA_TOKENS = ("image_token_id",)
_VIDEO_TOKENS = ("image_token_id", "video_token_id", "image_token_index", "video_token_index")

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llava", "llava-hf/llava-1.5-7b-hf", True, _LLAVA_TOKENS, 2, "clip"),
        Family("llava_next", "llava-hf/llava-v1.6-vicuna-7b-hf", True, _LLAVA_TOKENS, 2, "clip", anyres=True),
        Family("llava_next_video", "llava-hf/LLaVA-NeXT-Video-7B-hf", True, _VIDEO_TOKENS, 2, "clip", anyres=True, video_native=True),
        Family("llava_onevision", "llava-hf/llava-onevision-qwen2-7b-ov-hf", True, _VIDEO_TOKENS, 2, "clip", anyres=True, video_native=True),
        Family("qwen2_vl", "Qwen/Qwen2-VL-7B-Instruct", True, _VIDEO_TOKENS, 1, "qwen2_vl", video_native=True),
        Family("qwen2_5_vl", "Qwen/Qwen2.5-VL-7B-Instruct", True, _VIDEO_TOKENS, 1, "qwen2_5_vl", video_native=True),
        Family("qwen3_vl", "Qwen/Qwen3-VL-8B-Instruct", True, _VIDEO_TOKENS, 1, "qwen3_vl", video_native=True, deepstack=True),
    )
}


def _prunable() -> str:
    return ", ".join(f"{f.model_type} (e.g. {f.example_checkpoint})" for f in FAMILIES.values() if f.prunable)


def family_for(config: Any) -> Family:
    """The :class:`Family` of a model config (or of a model, through ``.config``); a one-line
    ValueError naming the supported families for anything else."""
    what = type(config).__name__
    config = getattr(config, "config", config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"model family {model_type!r} ({what}) is not supported yet; supported: {', '.join(FAMILIES)} "
            f"(pruning: {_prunable()})"
        )
    return FAMILIES[model_type]


def check_supported(config: Any, prune: PruneConfig) -> Family:
    """Refuse, from the config alone, what cannot run: an unknown family, pruning a family the
    hooks do not support, a prune layer outside this decoder (checked for ``none`` too: the
    FLOPs accounting reads it). Returns the family."""
    family = family_for(config)
    config = getattr(config, "config", config)  # a model → its config
    if prune.method != "none" and not family.prunable:
        raise ValueError(
            f"model family {family.model_type!r} is not supported yet for pruning (method {prune.method!r}); "
            f"it runs with --method none; pruning supports: {_prunable()}"
        )
    k = family.default_prune_layer if prune.prune_layer is None else prune.prune_layer
    check_prune_layer(k, int(config.get_text_config().num_hidden_layers))  # FLOPs need it too
    return family


def default_visual_tokens(config: Any) -> int:
    """Default number of visual tokens for one image, from a multimodal config (or a model
    name, whose config is read: see :func:`ep_core.loading.load_model_config`):

    * CLIP-style towers, P = :func:`tokens_per_crop`: LLaVA-1.5 one crop, N = P; LLaVA-NeXT
      and NeXT-Video (anyres) 5 crops, the base image plus a 2×2 grid, N = 5P (the
      EntropyPrune code's 2880; the real count depends on the aspect ratio and adds one
      newline per row); OneVision a 2×2-grid image (768 px square with 384-px crops) counted
      as its processor does, N = P + (2s)² + 2s with s = image_size / patch (3699 for SigLIP-384);
    * Qwen-VL: a 448×448 image, (448 / patch)² / merge².

    Raises ValueError for a text-only config or a family without a default.
    """
    if isinstance(config, (str, os.PathLike)):
        from ep_core.loading import load_model_config

        config = load_model_config(config)
    model_type = getattr(config, "model_type", None)
    vision = getattr(config, "vision_config", None)
    if vision is None:
        raise ValueError(f"config of type {model_type!r} has no vision_config; give the number of visual tokens explicitly")
    family = FAMILIES.get(model_type)
    kind = family.vision if family is not None else None
    if model_type == "llava_onevision":
        side = int(vision.image_size) // int(vision.patch_size)
        return tokens_per_crop(config) + (2 * side) ** 2 + 2 * side
    if kind == "clip" and model_type in ("llava", "llava_next", "llava_next_video"):
        return tokens_per_crop(config) * default_crops(config)
    if kind in ("qwen2_vl", "qwen2_5_vl"):
        merge = int(vision.spatial_merge_size)
        return (QWEN_DEFAULT_IMAGE_SIDE // int(vision.patch_size)) ** 2 // (merge * merge)
    raise ValueError(f"no default visual-token count for model type {model_type!r}; give the number of visual tokens explicitly")


def video_visual_tokens(config: Any, frames: int) -> int:
    """Visual tokens of one video of ``frames`` frames at the family's default frame size,
    as the video-native families' own video paths produce them:

    * LLaVA-NeXT-Video: each frame's s² patch features average-pooled by the stride r
      (``spatial_pool_stride``, 2): F·(s/r)² (8 frames of CLIP-336: 8·144 = 1152);
    * LLaVA-OneVision: each frame bilinearly pooled to ⌈s/2⌉², plus one newline for the whole
      video: F·⌈s/2⌉² + 1 (8 frames of SigLIP-384: 8·196 + 1 = 1569);
    * Qwen-VL: frames paired by the temporal patch (2), each pair of 448-px frames merged
      like one image: ⌈F/2⌉·256.

    Raises ValueError for a family that takes videos as N images (use N × the image count).
    """
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None or not family.video_native:
        raise ValueError(f"model type {getattr(config, 'model_type', None)!r} sees a video as {frames} separate images; "
                         "give the number of visual tokens explicitly")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    vision = config.vision_config
    if family.vision in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        temporal = int(getattr(vision, "temporal_patch_size", 2))
        return -(-frames // temporal) * default_visual_tokens(config)
    side = int(vision.image_size) // int(vision.patch_size)
    if family.model_type == "llava_next_video":
        stride = int(getattr(config, "spatial_pool_stride", 2))
        return frames * (side // stride) ** 2
    return frames * (-(-side // 2)) ** 2 + 1


ANYRES_DEFAULT_CROPS = 5  # the base image plus a 2×2 grid


def default_crops(config: Any) -> int:
    """Crops the vision tower sees per image by default: 5 for anyres families, else 1."""
    family = FAMILIES.get(getattr(config, "model_type", None))
    return ANYRES_DEFAULT_CROPS if family is not None and family.anyres else 1


def tokens_per_crop(config: Any) -> int:
    """Visual tokens of one square crop of a CLIP-style tower: (image_size / patch)², +1 CLS
    with the ``full`` feature-select strategy when the tower has one (CLIP; SigLIP has none)."""
    vision = config.vision_config
    per_crop = (int(vision.image_size) // int(vision.patch_size)) ** 2
    has_cls = "clip" in str(getattr(vision, "model_type", "clip"))
    if has_cls and getattr(config, "vision_feature_select_strategy", "default") == "full":
        per_crop += 1
    return per_crop


MAX_DEFAULT_FRAMES = 8
PROMPT_TEXT_RESERVE = 64  # tokens kept free for the chat template and the prompt text


def default_frames(config: Any, max_new_tokens: int) -> int:
    """Frames per video that fit the model's context when a video reaches it as N images:

        frames = clamp(⌊(C − 64 − G) / V⌋, 1, 8)

    C = the text config's ``max_position_embeddings``, G the new tokens, V
    :func:`default_visual_tokens` of one image (LLaVA-1.5: (4096 − 64 − 32) / 576 → 6;
    LLaVA-NeXT-Vicuna: V = 2880 of 4096 → 1). 8 when the context or V is unknown, and for
    video-native families (a video is one video there, pooled or merged over time: 8 frames
    cost NeXT-Video 8 × 144 tokens, Qwen-VL 4 temporal patches).
    """
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is not None and family.video_native:
        return MAX_DEFAULT_FRAMES
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    try:
        per_frame = default_visual_tokens(config)
    except ValueError:
        return MAX_DEFAULT_FRAMES
    if not context:
        return MAX_DEFAULT_FRAMES
    return max(1, min(MAX_DEFAULT_FRAMES, (int(context) - PROMPT_TEXT_RESERVE - max_new_tokens) // per_frame))
