"""The demo model's architecture: a stock ``LlavaForConditionalGeneration`` sized for the shapes world.

* Vision tower: CLIP, 48×48 input, patch 4 → a 12×12 grid, 144 visual tokens per image
  (:data:`VISION`: width 128, 3 layers, 4 heads).
* Projector: LLaVA's two-layer MLP on the tower's last layer (the CLS token dropped).
* Decoder: Llama, 6 layers, width 192, 16 query heads sharing 4 KV heads (GQA), head dim 12
  (:data:`TEXT`).
* Tokenizer: word-level (``tokenizers``) over the world's vocabulary; the processor is a real
  ``LlavaProcessor`` with :data:`CHAT_TEMPLATE`. A video is given as its frames, one image
  each, in one prompt: how the pipeline feeds any image-only LLaVA a video.

:func:`build_model` gives random weights; :mod:`demo.train` trains them (docs/demo_model.md
says how and why). Heavy imports stay inside the functions: ``ep --help`` reads the constants.
"""

from __future__ import annotations

import os

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
    "{% if c['type']=='image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

IMAGE_SIZE = 48
PATCH = 4
VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4)
TEXT = dict(hidden_size=192, intermediate_size=384, num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=4)
VIDEO_TRAIN_FRAMES = 4  # frames per training video


def build_tokenizer():
    """A word-level fast tokenizer over the world's vocabulary: ``<s>`` prepended, lower-cased,
    split on whitespace and punctuation, decoded with single spaces, ``<image>`` special."""
    from demo.world import vocabulary

    return word_level_tokenizer(sorted(set(vocabulary()) | {"user", "assistant", ":"}), lowercase=True, space_decoder=True)


def word_level_tokenizer(words: list[str], *, lowercase: bool = False, space_decoder: bool = False):
    """A ``PreTrainedTokenizerFast`` with one id per word: ``<pad> <unk> <s> </s>``, then
    ``words`` in order, then the special ``<image>``; ``<s>`` prepended, split on whitespace and
    punctuation, left padding. ``lowercase`` lower-cases the input; ``space_decoder`` decodes
    with single spaces between words."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + list(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    if space_decoder:
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def build_model(seed: int = 0, *, text: dict | None = None, vision: dict | None = None):
    """A randomly initialised demo LLaVA (weights drawn after ``torch.manual_seed(seed)``) and
    its processor. ``text`` / ``vision`` override entries of :data:`TEXT` / :data:`VISION`
    (e.g. ``text={"hidden_size": 256}``); without them this is the shipped architecture."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    tok = build_tokenizer()
    n_vis = (IMAGE_SIZE // PATCH) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, **{**VISION, **(vision or {})}),
        text_config=LlamaConfig(
            vocab_size=len(tok),
            max_position_embeddings=4096,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            **{**TEXT, **(text or {})},
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=n_vis,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    gen = model.generation_config
    gen.pad_token_id = tok.pad_token_id
    gen.eos_token_id = tok.eos_token_id
    gen.bos_token_id = tok.bos_token_id
    gen.suppress_tokens = [config.image_token_id]
    gen.max_new_tokens = 64
    gen.do_sample = False
    return model, llava_processor(tok, IMAGE_SIZE, PATCH)


def llava_processor(tokenizer, image_size: int, patch_size: int):
    """A real ``LlavaProcessor`` for square ``image_size`` pictures cut in ``patch_size`` patches
    (CLIP resize and crop, the CLS token dropped, :data:`CHAT_TEMPLATE`)."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    return LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def save(model, processor, out_dir: str) -> None:
    """Write weights, config, tokenizer, processor and chat template with ``save_pretrained``;
    the folder loads with ``from_pretrained`` / ``ep_core.loading.load_model``."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
