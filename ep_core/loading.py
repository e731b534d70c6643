"""Load a multimodal model and its processor from a local path or a hub id.

``load_model(name_or_path, dtype=..., device=..., attn_implementation=...)`` → ``(model,
processor)``, the model in eval mode on ``device``. Weights load with
``use_safetensors=True``; remote code runs only with ``trust_remote_code=True``. Families
outside :data:`SUPPORTED_MODEL_TYPES` are refused with a one-line error before any weight is
read.
"""

from __future__ import annotations

import os

# config.model_type of the families this project loads (image-text-to-text models).
SUPPORTED_MODEL_TYPES = (
    "llava",
    "llava_next",
    "llava_next_video",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
)

_DTYPES = ("auto", "float32", "float16", "bfloat16")


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA GPU is visible to this process")
    return device


def resolve_dtype(dtype: str, device: str):
    """``auto`` is bfloat16 on a GPU that supports it (else float16) and float32 on CPU."""
    import torch

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def model_type_of(name_or_path: str, *, trust_remote_code: bool = False) -> str:
    from transformers import AutoConfig

    from ep_core.demo import resolve_model_name

    name_or_path = resolve_model_name(name_or_path)  # "demo" → the shipped demo model

    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        where = "directory has no readable config.json" if os.path.isdir(name_or_path) else (
            "not a local directory, and the hub has no such model or is unreachable (HF_HUB_OFFLINE?)"
        )
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot load model {name_or_path!r}: {where} ({first})") from None
    return config.model_type


def load_model(
    name_or_path: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
):
    """``(model, processor)`` for a supported image-text model, in eval mode on ``device``."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ep_core.demo import resolve_model_name

    name_or_path = resolve_model_name(name_or_path)  # "demo" → the shipped demo model
    model_type = model_type_of(name_or_path, trust_remote_code=trust_remote_code)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model {name_or_path!r} is a {model_type!r} model, which is not supported; "
            f"supported families: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    device = resolve_device(device)
    kwargs = {"dtype": resolve_dtype(dtype, device), "use_safetensors": True, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, **kwargs)
    model.to(device)
    model.eval()
    processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    return model, processor
