"""Offline model configs for the FLOPs calculator (``ep flops --model llava-1.5-7b``).

The presets are the public ``config.json`` files of the checkpoints below, written out as
plain dicts (every shape that matters for FLOPs is spelled out, not left to class defaults),
so ``ep flops`` works with no network and no weights:

============================  =====================================  ==================
preset                        checkpoint it mirrors                  class
============================  =====================================  ==================
``llava-1.5-7b``              ``llava-hf/llava-1.5-7b-hf``           LlavaConfig
``llava-1.5-13b``             ``llava-hf/llava-1.5-13b-hf``          LlavaConfig
``llava-v1.6-vicuna-7b``      ``llava-hf/llava-v1.6-vicuna-7b-hf``   LlavaNextConfig
``qwen2-vl-7b``               ``Qwen/Qwen2-VL-7B-Instruct``          Qwen2VLConfig
``qwen2.5-vl-7b``             ``Qwen/Qwen2.5-VL-7B-Instruct``        Qwen2_5_VLConfig
``llava-onevision-qwen2-7b``  ``llava-hf/llava-onevision-qwen2-7b-ov-hf``  LlavaOnevisionConfig
``llava-next-video-7b``       ``llava-hf/LLaVA-NeXT-Video-7B-hf``    LlavaNextVideoConfig
============================  =====================================  ==================

The hub ids in the middle column are accepted as aliases of the presets (still offline).

Default visual tokens per image (:func:`ep_core.families.default_visual_tokens`):

* LLaVA-1.5: CLIP ViT-L/14 at 336 px → (336/14)² = 576 patch tokens (the CLS token is
  dropped by the ``default`` feature-select strategy).
* LLaVA-1.6 (NeXT, anyres): **2880** = 5 CLIP crops × 576, i.e. the full 2×2 grid plus the
  base image, which is the N that the EntropyPrune code uses for LLaVA-NeXT (k = ⌊(32·320 − 2·2880)/30⌋ = 149).
  The real count depends on the image's aspect ratio (unpadding plus one ``image_newline``
  token per row: a square 672×672 image gives 576 + 48·48 + 48 = 2928); pass the per-sample
  count when it matters.
* LLaVA-NeXT-Video: images as LLaVA-NeXT (2880); a video of F frames F·144 (CLIP's 24×24
  patches average-pooled by 2).
* LLaVA-OneVision: SigLIP-384 (27×27 = 729 patches, no CLS token) with anyres_max_9 tiling;
  the default image is a 768-px square, base + 2×2 grid + 54 newlines = **3699**; a video of
  F frames F·196 + 1 (each frame pooled to 14×14, one newline).
* Qwen2-VL and Qwen2.5-VL: dynamic resolution, 14-px patches merged 2×2, so a 448×448 image gives
  (448/14)² / 4 = **256** tokens. Any other size: ⌈H/28⌉·⌈W/28⌉ roughly (after the processor's
  rounding to multiples of 28).
"""

from __future__ import annotations

import copy
from typing import Any

_CLIP_L_336: dict[str, Any] = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "num_channels": 3,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "vocab_size": 32000,
}

_VICUNA_7B: dict[str, Any] = {
    "model_type": "llama",
    "_name_or_path": "lmsys/vicuna-7b-v1.5",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "vocab_size": 32064,
}

# The Qwen2-7B decoder and the vision token ids that Qwen2-VL-7B and Qwen2.5-VL-7B share
# (their config.json files differ only in max_position_embeddings and the vision tower).
_QWEN2_7B_DECODER: dict[str, Any] = {  # Qwen2-7B's shapes, also LLaVA-OneVision-7B's decoder
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
}
_QWEN2_7B_TEXT: dict[str, Any] = {
    **_QWEN2_7B_DECODER,
    "max_window_layers": 28,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "sliding_window": 32768,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "vocab_size": 152064,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
}

PRESETS: dict[str, dict[str, Any]] = {
    "llava-1.5-7b": {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": 32000,
        "pad_token_id": 32001,
        "projector_hidden_act": "gelu",
        "tie_word_embeddings": False,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "text_config": dict(_VICUNA_7B),
        "vision_config": dict(_CLIP_L_336),
    },
    "llava-1.5-13b": {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": 32000,
        "pad_token_id": 32001,
        "projector_hidden_act": "gelu",
        "tie_word_embeddings": False,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "text_config": {
            "model_type": "llama",
            "_name_or_path": "lmsys/vicuna-13b-v1.5",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 5120,
            "intermediate_size": 13824,
            "num_hidden_layers": 40,
            "num_attention_heads": 40,
            "num_key_value_heads": 40,
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-05,
            "vocab_size": 32064,
        },
        "vision_config": dict(_CLIP_L_336),
    },
    "llava-v1.6-vicuna-7b": {
        "architectures": ["LlavaNextForConditionalGeneration"],
        "model_type": "llava_next",
        "image_token_index": 32000,
        "projector_hidden_act": "gelu",
        "tie_word_embeddings": False,
        "use_image_newline_parameter": True,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        "text_config": {**_VICUNA_7B, "pad_token_id": 0},
        "vision_config": dict(_CLIP_L_336),
    },
    # Qwen's own config.json keeps the text fields at the top level; Qwen2VLConfig and
    # Qwen2_5_VLConfig move them into their text_config. The checkpoint's vision_config lists
    # only in_chans and spatial_patch_size; the rest are the class defaults, spelled out here.
    "qwen2-vl-7b": {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        **_QWEN2_7B_TEXT,
        "max_position_embeddings": 32768,
        "vision_config": {
            "model_type": "qwen2_vl",
            "depth": 32,
            "embed_dim": 1280,
            "hidden_size": 3584,
            "mlp_ratio": 4,
            "num_heads": 16,
            "hidden_act": "quick_gelu",
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
    },
    "qwen2.5-vl-7b": {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        **_QWEN2_7B_TEXT,
        "max_position_embeddings": 128000,
        "vision_config": {
            "model_type": "qwen2_5_vl_vision",
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "hidden_act": "silu",
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "out_hidden_size": 3584,
            "tokens_per_second": 2,
        },
    },
}

# LLaVA-OneVision-7B: the HF conversion of lmms-lab/llava-onevision-qwen2-7b-ov. Its text
# config is Qwen2-7B-Instruct's with the vocabulary grown by <image> and <video> and padded to
# a multiple of 64 (152064 + 2 → 152128); the SigLIP so400m tower keeps 26 of its 27 layers
# and no pooling head; the ids and the anyres_max_9 grid are LlavaOnevisionConfig's defaults,
# spelled out.
_ONEVISION_GRID = [[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)]
PRESETS["llava-onevision-qwen2-7b"] = {
    "architectures": ["LlavaOnevisionForConditionalGeneration"],
    "model_type": "llava_onevision",
    "image_token_index": 151646,
    "video_token_index": 151647,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "full",
    "vision_aspect_ratio": "anyres_max_9",
    "use_image_newline_parameter": True,
    "tie_word_embeddings": False,
    "image_grid_pinpoints": _ONEVISION_GRID,
    "text_config": {
        "model_type": "qwen2",
        "_name_or_path": "Qwen/Qwen2-7B-Instruct",
        "architectures": ["Qwen2ForCausalLM"],
        **_QWEN2_7B_DECODER,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "vocab_size": 152128,
    },
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 26,
        "num_attention_heads": 16,
        "image_size": 384,
        "patch_size": 14,
        "num_channels": 3,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-06,
        "vision_use_head": False,
    },
}
# LLaVA-NeXT-Video-7B: the HF conversion of lmms-lab/LLaVA-NeXT-Video-7B, Vicuna-7B-v1.5 with
# linear RoPE scaling ×2, <video> = 32000 and <image> = 32001 (vocabulary 32000 + 3, padded
# to 32064), CLIP ViT-L/14-336 and LLaVA-1.6's grid; frames pooled by 2 before the projector.
PRESETS["llava-next-video-7b"] = {
    "architectures": ["LlavaNextVideoForConditionalGeneration"],
    "model_type": "llava_next_video",
    "image_token_index": 32001,
    "video_token_index": 32000,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "spatial_pool_mode": "average",
    "spatial_pool_stride": 2,
    "use_image_newline_parameter": True,
    "tie_word_embeddings": False,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "text_config": {**_VICUNA_7B, "pad_token_id": 0, "rope_scaling": {"type": "linear", "factor": 2.0}},
    "vision_config": dict(_CLIP_L_336),
}

PRESET_ALIASES: dict[str, str] = {
    "llava-hf/llava-1.5-7b-hf": "llava-1.5-7b",
    "llava-hf/llava-1.5-13b-hf": "llava-1.5-13b",
    "llava-hf/llava-v1.6-vicuna-7b-hf": "llava-v1.6-vicuna-7b",
    "Qwen/Qwen2-VL-7B-Instruct": "qwen2-vl-7b",
    "Qwen/Qwen2.5-VL-7B-Instruct": "qwen2.5-vl-7b",
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": "llava-onevision-qwen2-7b",
    "llava-hf/LLaVA-NeXT-Video-7B-hf": "llava-next-video-7b",
}

PRESET_CHECKPOINTS: dict[str, str] = {preset: hub_id for hub_id, preset in PRESET_ALIASES.items()}


def resolve_preset(name: str) -> str | None:
    """The preset a name stands for (its own name, case-insensitively, or its hub id), or None."""
    if name in PRESET_ALIASES:
        return PRESET_ALIASES[name]
    lowered = name.lower()
    return lowered if lowered in PRESETS else None


def _config_class(model_type: str):
    from transformers import (LlavaConfig, LlavaNextConfig, LlavaNextVideoConfig, LlavaOnevisionConfig,
                              Qwen2_5_VLConfig, Qwen2VLConfig)

    classes = {"llava": LlavaConfig, "llava_next": LlavaNextConfig, "llava_next_video": LlavaNextVideoConfig,
               "llava_onevision": LlavaOnevisionConfig, "qwen2_vl": Qwen2VLConfig, "qwen2_5_vl": Qwen2_5_VLConfig}
    return classes[model_type]


def preset_config(name: str):
    """The transformers config object of a preset (a fresh object on every call)."""
    preset = resolve_preset(name)
    if preset is None:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    data = copy.deepcopy(PRESETS[preset])
    cls = _config_class(data.pop("model_type"))
    config = cls(**data)
    config._name_or_path = preset
    return config
