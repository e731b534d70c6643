"""Random-weight LLaVA models at a real checkpoint's decoder shape, for the speed benches.

``build(shape, num_layers)`` gives a stock ``LlavaForConditionalGeneration`` whose decoder has
the width of the named checkpoint (hidden size, FFN, heads, KV heads) and ``num_layers`` of
its layers, a trimmed vocabulary, and a tiny CLIP tower that yields exactly the checkpoint's
visual-token count (patch 2 on a √N·2-pixel square image). The tower and projector run once
per input shape and are then served from a memo (:func:`memoize_image_features`), so a timed
forward is the decoder's prefill, what the FLOPs functions count. Only torch and
transformers are needed (the GPU machine has nothing else).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shape:
    """A checkpoint's decoder shape and its pruning setting (what the benches need of it)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    full_layers: int  # the checkpoint's decoder depth (budgets are converted on it)
    prune_layer: int
    visual_tokens: int


SHAPES = {
    "llava-1.5-7b": Shape("llava-1.5-7b", 4096, 11008, 32, 32, 32, 2, 576),
    # seconds-long smoke run of the benches themselves (and their tests): figures mean nothing
    "smoke": Shape("smoke", 64, 128, 4, 2, 32, 2, 576),
}

VOCAB_SIZE = 512  # trimmed: the LM head is not what these benches measure
IMAGE_TOKEN_ID = VOCAB_SIZE - 1


def build(shape: Shape, num_layers: int, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
          seed: int = 0, attn_implementation: str = "sdpa"):
    """A stock LLaVA with ``shape``'s decoder width and ``num_layers`` layers, random N(0, 0.02²)
    weights (norms 1), in eval mode on ``device``. Built on the meta device, then filled: no
    slow default init."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    side = math.isqrt(shape.visual_tokens)
    if side * side != shape.visual_tokens:
        raise ValueError(f"visual_tokens must be a square number, got {shape.visual_tokens}")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=2 * side, patch_size=2, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2),
        text_config=LlamaConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=shape.hidden_size,
            intermediate_size=shape.intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=shape.num_heads,
            num_key_value_heads=shape.num_kv_heads,
            max_position_embeddings=4096,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model = model.to_empty(device=device).to(dtype).eval()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.copy_((torch.randn(param.shape, generator=generator) * 0.02).to(dtype))
        for name, buffer in model.named_buffers():  # rotary inv_freq, position ids: recompute
            if name.endswith("inv_freq"):
                dim = buffer.numel() * 2
                base = getattr(config.text_config, "rope_theta", None) or 10000.0
                buffer.copy_(1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)))
            elif name.endswith("position_ids"):
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # generate exactly the requested number of tokens
    return model


def inputs(model, batch: int, text_tokens: int, *, seed: int = 0) -> dict:
    """``batch`` prompts of ``text_tokens`` random text tokens with the image block after the
    first 4 (no padding: every row has the same length), and random pixels."""
    vision = model.config.vision_config
    visual = (vision.image_size // vision.patch_size) ** 2
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(3, IMAGE_TOKEN_ID, (batch, text_tokens), generator=generator)
    head = min(4, text_tokens - 1)
    image = torch.full((batch, visual), IMAGE_TOKEN_ID)
    input_ids = torch.cat([text[:, :head], image, text[:, head:]], dim=1)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pixel_values = torch.randn(batch, 3, vision.image_size, vision.image_size, generator=generator)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": pixel_values.to(device=device, dtype=dtype),
    }


def memoize_image_features(model) -> None:
    """Serve the vision tower + projector output from a memo keyed by the pixel tensor's
    shape and data pointer: after the first forward on an input, timed forwards run the
    decoder only. An instance attribute shadows the method; nothing in transformers changes."""
    multimodal = model.model
    original = multimodal.get_image_features
    memo: dict = {}

    def cached(*args, **kwargs):
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        key = (tuple(pixels.shape), pixels.data_ptr()) if isinstance(pixels, torch.Tensor) else None
        if key not in memo:
            memo[key] = original(*args, **kwargs)
        return memo[key]

    multimodal.get_image_features = cached


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    """Seconds one call of ``fn`` takes, the device synchronised on both sides."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def dtype_for(device: str, name: str | None) -> torch.dtype:
    """``--dtype`` (float32, bfloat16, float16), default float32 on CPU and bfloat16 on GPU."""
    if name is None:
        name = "bfloat16" if device.startswith("cuda") else "float32"
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in choices:
        raise ValueError(f"--dtype must be one of {', '.join(choices)}, got {name!r}")
    return choices[name]


def from_args(args):
    """``(shape, device, model)`` for a bench's ``--shape --layers --device --dtype --threads``:
    torch threads set, the model built with its image features memoised."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    device = args.device or default_device()
    model = build(shape, args.layers, dtype=dtype_for(device, args.dtype), device=device)
    memoize_image_features(model)
    return shape, device, model


def settings(args, shape: Shape, device: str, model) -> dict:
    """The settings a shaped-model bench reports beside its figures."""
    return {
        "shape": shape.name,
        "layers": args.layers,
        "prune_layer": shape.prune_layer,
        "visual_tokens": shape.visual_tokens,
        "text_tokens": args.text_tokens,
        "pairs": args.pairs,
        "device": device,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
