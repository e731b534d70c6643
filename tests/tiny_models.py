"""Tiny random LLaVA models built offline from configs.

GQA (4 query heads, 2 KV heads), 4 decoder layers so that K=2 leaves layers on both sides,
a word-level tokenizer and a real ``LlavaProcessor``; no hub access.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from demo.model import CHAT_TEMPLATE, llava_processor, word_level_tokenizer
from ep_core.prompts import chat_prompt

WORDS = (
    "a an the of is what in this image describe picture color shape red green blue circle square "
    "triangle left right top bottom how many there are one two three yes no and with small large"
).split()


def build_tokenizer():
    return word_level_tokenizer(WORDS + ["USER", ":", "ASSISTANT", "?", ".", ","])


def build_tiny_llava(
    image_size: int = 8,
    patch_size: int = 2,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    hidden: int = 32,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    context: int = 512,
    head_dim: int | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random tiny LLaVA-1.5-shaped model and its processor, in eval mode, float32
    (``head_dim``: the text model's, when it is not hidden / heads)."""
    tok = build_tokenizer()
    n_vis = (image_size // patch_size) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=image_size,
            patch_size=patch_size,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_dim,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            max_position_embeddings=context,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=n_vis,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = None  # random weights: never stop early, compare full lengths
    model.generation_config.suppress_tokens = [config.image_token_id]  # a generated <image> would be a new "visual" slot
    return model, llava_processor(tok, image_size, patch_size)


def random_images(n: int, size: int = 16, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def make_inputs(processor: LlavaProcessor, prompts: list[str], images: list[Image.Image]) -> dict:
    texts = [chat_prompt(processor, 1, p) for p in prompts]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def build_tiny_llava_next(seed: int = 0, attn_implementation: str = "sdpa"):
    """A random tiny LLaVA-NeXT (anyres, image_newline tokens) and its processor."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil, LlavaNextProcessor

    tok = build_tokenizer()
    pinpoints = [[8, 16], [16, 8], [16, 16]]
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            image_size=8, patch_size=2, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4
        ),
        text_config=LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=tok.pad_token_id, max_position_embeddings=512,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = None
    model.generation_config.suppress_tokens = [config.image_token_id]
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}, image_grid_pinpoints=pinpoints
        ),
        tokenizer=tok,
        patch_size=2,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor


# ---------------------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL
QWEN_SPECIALS = ["<|vision_start|>", "<|image_pad|>", "<|video_pad|>", "<|vision_end|>"]
QWEN_PATCH, QWEN_MERGE, QWEN_TEMPORAL = 4, 2, 2


def build_qwen_tokenizer():
    """The word-level tokenizer with Qwen-VL's vision tokens as special tokens."""
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS})
    return tok


QWEN_VISION_START, QWEN_IMAGE, QWEN_VIDEO, QWEN_VISION_END = build_qwen_tokenizer().convert_tokens_to_ids(QWEN_SPECIALS)
QWEN_VOCAB = QWEN_VISION_END + 1  # the specials are the tokenizer's last ids
QWEN_PAD = 0


def build_tiny_qwen_vl(model_type: str = "qwen2_5_vl", seed: int = 0, attn_implementation: str = "sdpa"):
    """A random-weight Qwen2-VL / Qwen2.5-VL with a 4-layer GQA decoder (M-RoPE sections 2/3/3)
    and a 2-block vision tower (patch 4, 2×2 merge, temporal patch 2), its token ids those of
    :func:`build_qwen_tokenizer`. Build inputs by hand with :func:`qwen_inputs` (the Qwen video
    processor needs torchvision, absent with the CPU torch here, and ``Qwen2VLProcessor`` will
    not build without it)."""
    import transformers

    torch.manual_seed(seed)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=QWEN_VOCAB, max_position_embeddings=512, bos_token_id=2, eos_token_id=3,
                pad_token_id=QWEN_PAD, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    vision = dict(depth=2, hidden_size=32, num_heads=2, patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE,
                  temporal_patch_size=QWEN_TEMPORAL)
    if model_type == "qwen2_5_vl":
        vision.update(intermediate_size=64, out_hidden_size=64, window_size=16, fullatt_block_indexes=[1])
        config_class, model_class = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    else:
        vision.update(embed_dim=32, mlp_ratio=2, hidden_size=64)
        config_class, model_class = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    config = config_class(text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO,
                          vision_start_token_id=QWEN_VISION_START, vision_end_token_id=QWEN_VISION_END)
    model = model_class(config).eval()
    model.set_attn_implementation({"text_config": attn_implementation, "vision_config": "sdpa"})
    return model


def qwen_inputs(rows: list[dict], seed: int = 0) -> dict:
    """Left-padded inputs for a tiny Qwen-VL: each row ``{"prompt": [ids], "image": (h, w)}`` or
    ``{"prompt": [ids], "video": (t, h, w)}`` in patches (h, w even), with random pixels. Gives
    ``input_ids, attention_mask, mm_token_type_ids`` and the pixel tensors with their grids."""
    gen = torch.Generator().manual_seed(seed)
    patch_dim = 3 * QWEN_TEMPORAL * QWEN_PATCH * QWEN_PATCH
    sequences, types, images, image_grids, videos, video_grids = [], [], [], [], [], []
    for row in rows:
        kind = "video" if "video" in row else "image"
        t, h, w = row["video"] if kind == "video" else (1, *row["image"])
        tokens = t * h * w // (QWEN_MERGE * QWEN_MERGE)
        token_id, type_id = (QWEN_VIDEO, 2) if kind == "video" else (QWEN_IMAGE, 1)
        ids = [QWEN_VISION_START] + [token_id] * tokens + [QWEN_VISION_END] + list(row["prompt"])
        sequences.append(ids)
        types.append([0] + [type_id] * tokens + [0] * (1 + len(row["prompt"])))
        pixels = torch.randn(t * h * w, patch_dim, generator=gen)
        (videos if kind == "video" else images).append(pixels)
        (video_grids if kind == "video" else image_grids).append([t, h, w])
    return _qwen_batch(sequences, types, images, image_grids, videos, video_grids)


def _qwen_batch(sequences, types, images, image_grids, videos, video_grids) -> dict:
    """Rows of ids and token types, left-padded; flat patches with one grid per image / video."""
    length = max(len(s) for s in sequences)
    pad = [length - len(s) for s in sequences]
    out = {
        "input_ids": torch.tensor([[QWEN_PAD] * p + s for p, s in zip(pad, sequences)]),
        "attention_mask": torch.tensor([[0] * p + [1] * len(s) for p, s in zip(pad, sequences)]),
        "mm_token_type_ids": torch.tensor([[0] * p + ty for p, ty in zip(pad, types)]),
    }
    if images:
        out["pixel_values"], out["image_grid_thw"] = torch.cat(images), torch.tensor(image_grids)
    if videos:
        out["pixel_values_videos"], out["video_grid_thw"] = torch.cat(videos), torch.tensor(video_grids)
    return out


QWEN3_DEEPSTACK_LAYERS = 3  # the tiny Qwen3-VL adds DeepStack features after decoder layers 0, 1, 2 of 4
QWEN3_TIMESTAMP = 5  # a text token standing for the processor's "<t seconds>" before each video frame group


def build_tiny_qwen3_vl(seed: int = 0, attn_implementation: str = "sdpa"):
    """A random-weight Qwen3-VL: 4 GQA decoder layers (head_dim 16, interleaved M-RoPE sections
    4/2/2), a 3-block vision tower (patch 4, 2×2 merge, temporal patch 2) whose blocks 0, 1, 2
    feed DeepStack, token ids those of :func:`build_qwen_tokenizer`. Inputs: :func:`qwen3_inputs`."""
    import transformers

    torch.manual_seed(seed)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, vocab_size=QWEN_VOCAB, max_position_embeddings=512, bos_token_id=2, eos_token_id=3,
                pad_token_id=QWEN_PAD,
                rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 10000.0,
                                 "mrope_interleaved": True})
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=QWEN_PATCH,
                  spatial_merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL, out_hidden_size=64,
                  num_position_embeddings=16, deepstack_visual_indexes=list(range(QWEN3_DEEPSTACK_LAYERS)))
    config = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE,
                                        video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_VISION_START,
                                        vision_end_token_id=QWEN_VISION_END)
    model = transformers.Qwen3VLForConditionalGeneration(config).eval()
    model.set_attn_implementation({"text_config": attn_implementation, "vision_config": "sdpa"})
    model.generation_config.eos_token_id = None  # random weights: never stop early, compare full lengths
    return model


def qwen3_inputs(rows: list[dict], seed: int = 0) -> dict:
    """Left-padded inputs for :func:`build_tiny_qwen3_vl`: each row ``{"prompt": [ids], "image":
    (h, w)}`` or ``{"prompt": [ids], "video": (frames, h, w)}`` in patches (h, w even, frames a
    multiple of 2), random pixels. A video is one vision group per temporal patch, each after a
    timestamp token, as Qwen3-VL's processor writes it (its ``get_rope_index`` numbers each
    group as one frame)."""
    gen = torch.Generator().manual_seed(seed)
    patch_dim = 3 * QWEN_TEMPORAL * QWEN_PATCH * QWEN_PATCH
    sequences, types, images, image_grids, videos, video_grids = [], [], [], [], [], []
    for row in rows:
        is_video = "video" in row
        frames, h, w = row["video"] if is_video else (QWEN_TEMPORAL, *row["image"])
        t = frames // QWEN_TEMPORAL  # temporal patches
        per_group = h * w // (QWEN_MERGE * QWEN_MERGE)
        token_id, type_id = (QWEN_VIDEO, 2) if is_video else (QWEN_IMAGE, 1)
        ids, ty = [], []
        for _ in range(t):
            if is_video:
                ids, ty = ids + [QWEN3_TIMESTAMP], ty + [0]
            ids += [QWEN_VISION_START] + [token_id] * per_group + [QWEN_VISION_END]
            ty += [0] + [type_id] * per_group + [0]
        sequences.append(ids + list(row["prompt"]))
        types.append(ty + [0] * len(row["prompt"]))
        (videos if is_video else images).append(torch.randn(t * h * w, patch_dim, generator=gen))
        (video_grids if is_video else image_grids).append([t, h, w])
    return _qwen_batch(sequences, types, images, image_grids, videos, video_grids)


# ---------------------------------------------------------------------------- LLaVA-OneVision / LLaVA-NeXT-Video
LLAVA_VIDEO_IMAGE, LLAVA_VIDEO_VIDEO, LLAVA_VIDEO_VOCAB = 100, 101, 120
LLAVA_VIDEO_SIDE = 16  # the vision tower's image size (4-px patches: 16 per crop)
LLAVA_VIDEO_PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32]]


def build_tiny_llava_video(model_type: str = "llava_onevision", seed: int = 0, attn_implementation: str = "sdpa"):
    """A random-weight LLaVA-OneVision (Qwen2 decoder, SigLIP tower) or LLaVA-NeXT-Video (Llama
    decoder, CLIP tower): 4 GQA decoder layers, anyres images on a 16-px base with pinpoints up
    to 32×32, videos pooled 2×2 per frame. Inputs by hand: :func:`llava_video_inputs`."""
    import transformers

    torch.manual_seed(seed)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=LLAVA_VIDEO_VOCAB, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 image_size=LLAVA_VIDEO_SIDE, patch_size=4)
    if model_type == "llava_onevision":
        config = transformers.LlavaOnevisionConfig(
            text_config={"model_type": "qwen2", **text},
            vision_config={"model_type": "siglip_vision_model", "vision_use_head": False, **tower},  # as the checkpoints
            image_token_index=LLAVA_VIDEO_IMAGE, video_token_index=LLAVA_VIDEO_VIDEO,
            image_grid_pinpoints=LLAVA_VIDEO_PINPOINTS, vision_feature_layer=-1)
        model = transformers.LlavaOnevisionForConditionalGeneration(config)
    else:
        config = transformers.LlavaNextVideoConfig(
            text_config={"model_type": "llama", **text}, vision_config={"model_type": "clip_vision_model", **tower},
            image_token_index=LLAVA_VIDEO_IMAGE, video_token_index=LLAVA_VIDEO_VIDEO,
            image_grid_pinpoints=LLAVA_VIDEO_PINPOINTS, vision_feature_layer=-1)
        model = transformers.LlavaNextVideoForConditionalGeneration(config)
    model.eval()
    model.set_attn_implementation({"text_config": attn_implementation, "vision_config": "sdpa"})
    return model


def llava_video_inputs(model, rows: list[dict], seed: int = 0) -> dict:
    """Left-padded inputs for :func:`build_tiny_llava_video`: each row ``{"prompt": [ids],
    "image": (h, w)}`` (pixels) or ``{"prompt": [ids], "video": frames}``, random pixels. The
    number of placeholders of each image or video is what the model's own feature function
    returns for it (no processor: the video processors need torchvision)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    gen = torch.Generator().manual_seed(seed)
    side, pinpoints = LLAVA_VIDEO_SIDE, model.config.image_grid_pinpoints
    sequences, images, sizes, videos = [], [], [], []
    with torch.no_grad():
        for row in rows:
            if "video" in row:
                clip = torch.randn(1, row["video"], 3, side, side, generator=gen)
                tokens = model.model.get_video_features(clip, vision_feature_layer=-1,
                                                        vision_feature_select_strategy=None)
                count = _feature_count(tokens)
                videos.append(clip[0])
                sequences.append([LLAVA_VIDEO_VIDEO] * count + list(row["prompt"]))
            else:
                h, w = row["image"]
                patches = torch.randn(image_size_to_num_patches((h, w), pinpoints, side), 3, side, side, generator=gen)
                tokens = model.model.get_image_features(patches[None], torch.tensor([[h, w]]), vision_feature_layer=-1,
                                                        vision_feature_select_strategy=None)
                count = _feature_count(tokens)
                images.append(patches)
                sizes.append([h, w])
                sequences.append([LLAVA_VIDEO_IMAGE] * count + list(row["prompt"]))
    length = max(len(s) for s in sequences)
    pad = [length - len(s) for s in sequences]
    out = {
        "input_ids": torch.tensor([[0] * p + s for p, s in zip(pad, sequences)]),
        "attention_mask": torch.tensor([[0] * p + [1] * len(s) for p, s in zip(pad, sequences)]),
    }
    if images:
        most = max(p.shape[0] for p in images)  # zero-padded to the most patches, as the processors do
        out["pixel_values"] = torch.stack([torch.cat([p, p.new_zeros(most - p.shape[0], *p.shape[1:])]) for p in images])
        out["image_sizes"] = torch.tensor(sizes)
    if videos:
        out["pixel_values_videos"] = torch.stack(videos)
    return out


def _feature_count(output) -> int:
    features = getattr(output, "pooler_output", output)
    if isinstance(features, (list, tuple)):
        return sum(int(f.shape[0]) for f in features)
    return int(features.shape[0] * features.shape[1]) if features.dim() == 3 else int(features.shape[0])
