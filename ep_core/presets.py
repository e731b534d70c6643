"""Offline model configs for the FLOPs calculator, and default visual-token counts.

The presets are the public ``config.json`` files of the checkpoints below, written out as
plain dicts (every shape that matters for FLOPs is spelled out, not left to class defaults),
so ``ep flops`` works with no network and no weights:

============================  =====================================  ==================
preset                        checkpoint it mirrors                  class
============================  =====================================  ==================
``llava-1.5-7b``              ``llava-hf/llava-1.5-7b-hf``           LlavaConfig
``llava-1.5-13b``             ``llava-hf/llava-1.5-13b-hf``          LlavaConfig
``llava-v1.6-vicuna-7b``      ``llava-hf/llava-v1.6-vicuna-7b-hf``   LlavaNextConfig
``qwen2.5-vl-7b``             ``Qwen/Qwen2.5-VL-7B-Instruct``        Qwen2_5_VLConfig
============================  =====================================  ==================

The hub ids in the middle column are accepted as aliases of the presets (still offline).

Default visual tokens per image (:func:`default_visual_tokens`):

* LLaVA-1.5: CLIP ViT-L/14 at 336 px → (336/14)² = 576 patch tokens (the CLS token is
  dropped by the ``default`` feature-select strategy).
* LLaVA-1.6 (NeXT, anyres): **2880** = 5 CLIP crops × 576, i.e. the full 2×2 grid plus the
  base image, which is the N that ALGORITHM.md §4.4 uses (k = ⌊(32·320 − 2·2880)/30⌋ = 149).
  The real count depends on the image's aspect ratio (unpadding plus one ``image_newline``
  token per row: a square 672×672 image gives 576 + 48·48 + 48 = 2928); pass the per-sample
  count when it matters.
* Qwen2.5-VL: dynamic resolution, 14-px patches merged 2×2, so a 448×448 image gives
  (448/14)² / 4 = **256** tokens. Any other size: ⌈H/28⌉·⌈W/28⌉ roughly (after the processor's
  rounding to multiples of 28).
"""

from __future__ import annotations

import copy
import os
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
    # Qwen's own config.json keeps the text fields at the top level; Qwen2_5_VLConfig
    # moves them into its text_config.
    "qwen2.5-vl-7b": {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "max_position_embeddings": 128000,
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

PRESET_ALIASES: dict[str, str] = {
    "llava-hf/llava-1.5-7b-hf": "llava-1.5-7b",
    "llava-hf/llava-1.5-13b-hf": "llava-1.5-13b",
    "llava-hf/llava-v1.6-vicuna-7b-hf": "llava-v1.6-vicuna-7b",
    "Qwen/Qwen2.5-VL-7B-Instruct": "qwen2.5-vl-7b",
}

# Default visual tokens per image for each preset (see the module docstring).
PRESET_VISUAL_TOKENS: dict[str, int] = {
    "llava-1.5-7b": 576,
    "llava-1.5-13b": 576,
    "llava-v1.6-vicuna-7b": 2880,
    "qwen2.5-vl-7b": 256,
}

QWEN_DEFAULT_IMAGE_SIDE = 448  # px; the image size behind Qwen's default of 256 tokens


def preset_names() -> list[str]:
    """The preset names, in a stable order."""
    return list(PRESETS)


def _resolve_preset(name: str) -> str | None:
    if name in PRESETS:
        return name
    if name in PRESET_ALIASES:
        return PRESET_ALIASES[name]
    lowered = name.lower()
    for preset in PRESETS:
        if preset == lowered:
            return preset
    return None


def _config_class(model_type: str):
    from transformers import LlavaConfig, LlavaNextConfig, Qwen2_5_VLConfig

    classes = {"llava": LlavaConfig, "llava_next": LlavaNextConfig, "qwen2_5_vl": Qwen2_5_VLConfig}
    return classes[model_type]


def preset_config(name: str):
    """The transformers config object of a preset (a fresh object on every call)."""
    preset = _resolve_preset(name)
    if preset is None:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    data = copy.deepcopy(PRESETS[preset])
    cls = _config_class(data.pop("model_type"))
    config = cls(**data)
    config._name_or_path = preset
    return config


def load_model_config(name_or_path: str | os.PathLike):
    """A transformers config for a preset name, a local model directory or a hub id.

    Resolution order:

    1. a preset name (or its hub id, see ``PRESET_ALIASES``) → the built-in config, offline;
    2. an existing local directory with a ``config.json`` → ``AutoConfig.from_pretrained``;
    3. something shaped like a hub id (``owner/name``) → ``AutoConfig.from_pretrained``,
       which needs network access (or the local HF cache).

    Raises:
        ValueError: when none of these works; the message lists the presets.
    """
    name = os.fspath(name_or_path)
    presets = "presets: " + ", ".join(PRESETS)
    if not name:
        raise ValueError(f"no model given; use a preset ({presets}) or a directory with a config.json")
    if _resolve_preset(name) is not None:
        return preset_config(name)

    from transformers import AutoConfig

    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ValueError(f"directory {name!r} has no config.json; use a model directory or a preset ({presets})")
        try:
            return AutoConfig.from_pretrained(name)
        except Exception as exc:  # a malformed or unknown config
            raise ValueError(f"could not read the config in {name!r}: {exc}") from exc
    if os.path.exists(name):
        raise ValueError(f"{name!r} is a file; give a model directory with a config.json or a preset ({presets})")

    parts = name.split("/")
    if len(parts) == 2 and all(parts):
        try:
            return AutoConfig.from_pretrained(name)
        except Exception as exc:  # offline, unknown repo, gated repo …
            raise ValueError(
                f"unknown model {name!r}: not a preset ({presets}), not a local directory, and the hub "
                f"lookup failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from exc
    raise ValueError(f"unknown model {name!r}: not a preset ({presets}) and not a directory with a config.json")


def default_visual_tokens(config_or_name) -> int:
    """Default number of visual tokens for one image.

    Accepts a preset name / alias, or a transformers config. For a config:

    * ``llava`` → (image_size / patch_size)², +1 with the ``full`` feature strategy;
    * ``llava_next`` → 5 crops × that (base image + 2×2 grid, documented upper figure);
    * ``qwen2_vl`` / ``qwen2_5_vl`` → a 448×448 image: (448 / patch)² / merge².

    Raises:
        ValueError: for a text-only or unknown family (pass the count explicitly).
    """
    if isinstance(config_or_name, (str, os.PathLike)):
        preset = _resolve_preset(os.fspath(config_or_name))
        if preset is not None:
            return PRESET_VISUAL_TOKENS[preset]
        config = load_model_config(config_or_name)
    else:
        config = config_or_name
    model_type = getattr(config, "model_type", None)
    vision = getattr(config, "vision_config", None)
    if vision is None:
        raise ValueError(
            f"config of type {model_type!r} has no vision_config; give the number of visual tokens explicitly"
        )
    if model_type in ("llava", "llava_next"):
        per_crop = (vision.image_size // vision.patch_size) ** 2
        if getattr(config, "vision_feature_select_strategy", "default") == "full":
            per_crop += 1
        return per_crop if model_type == "llava" else 5 * per_crop
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        patch = vision.patch_size
        merge = vision.spatial_merge_size
        return (QWEN_DEFAULT_IMAGE_SIDE // patch) ** 2 // (merge * merge)
    raise ValueError(
        f"no default visual-token count for model type {model_type!r}; give the number of visual tokens explicitly"
    )
