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
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random tiny LLaVA-1.5-shaped model and its processor, in eval mode, float32."""
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
