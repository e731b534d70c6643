"""Model names → configs, models and processors: the one model-name resolution of every command.

A model name is, in this order:

1. ``demo``: the shipped demo model (``demo/shipped_model/``);
2. a preset (``llava-1.5-7b``, … see :mod:`ep_core.presets`) or its hub id: the built-in
   config, offline (:func:`load_model_config`); its weights load from that hub id;
3. a local model directory (with a ``config.json``);
4. a hub id (``owner/name``): needs the network or the local HF cache.

``load_model(name, dtype=..., device=..., attn_implementation=...)`` → ``(model, processor)``
in eval mode on ``device``, the weights read straight onto it (``device_map``, where the
``accelerate`` package is installed; else read into CPU memory and moved). Weights load with ``use_safetensors=True``; remote code runs only
with ``trust_remote_code=True``. Families outside :data:`ep_core.families.FAMILIES` are
refused with a one-line error before any weight is read.
"""

from __future__ import annotations

import os

from ep_core.families import family_for
from ep_core.presets import PRESET_CHECKPOINTS, PRESETS, preset_config, resolve_preset

DTYPES = ("auto", "float32", "float16", "bfloat16")
ATTENTION_BACKENDS = ("sdpa", "eager", "flash_attention_2")


def resolve_model_name(name_or_path: str | os.PathLike) -> str:
    """Where a model's files are: ``demo`` → the shipped demo model's directory; a preset
    name → the hub id of the checkpoint it mirrors; anything else unchanged."""
    from demo import MODEL_NAME, shipped_model_path

    name = os.fspath(name_or_path)
    if name == MODEL_NAME:
        return shipped_model_path()
    preset = resolve_preset(name)
    if preset is not None and not os.path.isdir(name):
        return PRESET_CHECKPOINTS[preset]
    return name


def load_model_config(name_or_path: str | os.PathLike, *, trust_remote_code: bool = False):
    """The transformers config of a model name (see the module docstring), without weights.

    Raises a one-line ValueError when the name is none of those, naming the presets.
    """
    name = os.fspath(name_or_path)
    presets = "presets: " + ", ".join(PRESETS)
    if not name:
        raise ValueError(f"no model given; use 'demo', a preset ({presets}) or a directory with a config.json")
    if resolve_preset(name) is not None and not os.path.isdir(name):
        return preset_config(name)

    from transformers import AutoConfig

    path = resolve_model_name(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"cannot load model {path!r}: the directory has no config.json; use a model directory or a preset ({presets})")
        try:
            return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - a malformed or unknown config
            raise ValueError(f"cannot load model {path!r}: its config.json is unreadable ({_first_line(exc)})") from None
    if os.path.exists(path):
        raise ValueError(f"cannot load model {path!r}: it is a file; give a model directory with a config.json or a preset ({presets})")
    parts = path.split("/")
    if len(parts) == 2 and all(parts):
        try:
            return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - offline, unknown repo, gated repo …
            raise ValueError(
                f"cannot load model {path!r}: not a preset ({presets}), not a local directory, and the hub "
                f"lookup failed ({type(exc).__name__}: {_first_line(exc)}; HF_HUB_OFFLINE set?)"
            ) from None
    raise ValueError(f"cannot load model {path!r}: not 'demo', a preset ({presets}), a model directory or a hub id (owner/name)")


def model_type_of(name_or_path: str, *, trust_remote_code: bool = False) -> str:
    """``config.model_type`` of a model name (reads the config only)."""
    return load_model_config(name_or_path, trust_remote_code=trust_remote_code).model_type


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

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def flash_attention_available() -> bool:
    """The ``flash-attn`` package is importable here."""
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def _accelerate_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def resolve_attention(attn_implementation: str | None, device: str) -> str:
    """The attention backend to load: the one asked for, else flash_attention_2 on a GPU where
    ``flash-attn`` is installed, else sdpa."""
    if attn_implementation is not None:
        return attn_implementation
    return "flash_attention_2" if resolve_device(device).startswith("cuda") and flash_attention_available() else "sdpa"


def load_model(
    name_or_path: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
):
    """``(model, processor)`` for a supported image-text model, in eval mode on ``device``."""
    from transformers import AutoModelForImageTextToText

    family_for(load_model_config(name_or_path, trust_remote_code=trust_remote_code))  # refuse before any weight
    path = resolve_model_name(name_or_path)
    device = resolve_device(device)
    kwargs = {"dtype": resolve_dtype(dtype, device), "use_safetensors": True, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if _accelerate_available():
        kwargs["device_map"] = device  # each tensor is read onto the device: no CPU copy of the weights
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    model.to(device)  # a no-op after device_map
    model.eval()
    return model, load_processor(name_or_path, trust_remote_code=trust_remote_code)


def load_processor(name_or_path: str, *, trust_remote_code: bool = False):
    """The processor (image processor, tokenizer, chat template) of a model name, no weights."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(resolve_model_name(name_or_path), trust_remote_code=trust_remote_code)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
