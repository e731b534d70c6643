"""``ep bench batching``: how full the generate calls of a LLaVA-NeXT job are.

LLaVA-NeXT's anyres gives almost every image size its own visual-token count. This bench
draws ``--images`` image sizes from a COCO-like distribution (below; no dataset is
downloaded), counts each image's prompt tokens with the real ``LlavaNextProcessor``
arithmetic at llava-v1.6's settings (336 px crops, patch 14, the five pinpoints), and sends
the rows, in a shuffled order, through the two ways a model actor can form generate calls:

* **exact count** (before token packing): each Ray batch of ``--batch-size`` rows split into
  groups of equal visual-token count, one call per group;
* **packed** (``pipelines.packing.pack``, what ``CaptionPredictor`` runs): each actor call of
  ``batch size × PACK_WINDOW`` rows packed shortest first into calls of at most
  ``--batch-size`` rows and ``--batch-tokens`` token slots (rows × longest prompt).

Reported per (batch size, token budget): ``rows_per_generate`` (rows / calls),
``rows_allowed_per_generate`` (``pipelines.packing.rows_allowed``: min(R, T / mean length)),
their ratio, ``padding_share`` (padding slots / all slots of the calls), the padding after
the prune layer with EntropyPrune at ``--keep-ratio`` (each row keeps its text and
round(r·N) visual tokens, padded to the call's longest kept row), and
``exact_count_rows_per_generate``. The token counts of ``--verify`` sizes are checked against
the processor itself run on blank images of those sizes. No model runs: which rows share a
call depends on token counts only.
"""

from __future__ import annotations

import argparse
import random
import statistics

from pipelines.caption import PACK_WINDOW
from pipelines.packing import CPU_BATCH_TOKENS, default_batch_tokens, pack, rows_allowed

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6
CROP = 336
PATCH = 14
# COCO-like sizes (a synthetic stand-in; no dataset is downloaded): the longer side is 640 px
# for ~90% of images; the shorter side is 480 (4:3) or 427 (3:2) for half of them, a few pixels
# off those for a fifth (426, 424, 428, 425, 478, ...), anything in [240, 640] for the rest;
# about a quarter are portrait.
LONG_SIDES = ((640, 0.90), (500, 0.06), (612, 0.04))
SHORT_SIDES = ((480, 0.30), (427, 0.20), ("near", 0.20), ("any", 0.30))
NEAR = (426, 424, 428, 425, 429, 478, 479, 481, 423, 422)
PORTRAIT_SHARE = 0.25
GPU_FREE_BYTES = 120 << 30  # an H200 with a 7B bf16 model loaded (for the GPU default budget: an estimate)
NEXT_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32}
TEXT_PROMPT = "Describe this image in one sentence."
GOAL_FILL, GOAL_PADDING = 0.9, 0.10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=4096, help="image sizes drawn (default 4096)")
    parser.add_argument("--batch-sizes", default="8,32", help="rows per generate call, at most (default 8,32)")
    parser.add_argument("--batch-tokens", default=None,
                        help=f"token budgets (default: {CPU_BATCH_TOKENS} = the CPU default, 65536, and the GPU default "
                             "for LLaVA-NeXT-7B with 120 GiB free)")
    parser.add_argument("--keep-ratio", type=float, default=0.25, help="EntropyPrune keep ratio for the padding after K")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--verify", type=int, default=16, help="sizes checked against the real processor (default 16)")
    parser.add_argument("--seed", type=int, default=0)


def draw_sizes(n: int, seed: int) -> list[tuple[int, int]]:
    """``n`` (height, width) pairs from the COCO-like distribution above."""
    rng = random.Random(seed)
    sizes = []
    for _ in range(n):
        long = rng.choices([s for s, _ in LONG_SIDES], [w for _, w in LONG_SIDES])[0]
        short = rng.choices([s for s, _ in SHORT_SIDES], [w for _, w in SHORT_SIDES])[0]
        if short == "near":
            short = rng.choice(NEAR)
        elif short == "any":
            short = rng.randint(240, 640)
        short = min(long, round(short * long / 640))  # the same shape at a longer side of 500 or 612
        sizes.append((long, short) if rng.random() < PORTRAIT_SHARE else (short, long))
    return sizes


def processor():
    """A ``LlavaNextProcessor`` at llava-v1.6's image settings, with the demo's tokenizer."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    from demo.model import CHAT_TEMPLATE, word_level_tokenizer

    tokenizer = word_level_tokenizer(TEXT_PROMPT.lower().replace(".", " .").split() + ["USER", ":", "ASSISTANT"])
    return LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP}, image_grid_pinpoints=PINPOINTS
        ),
        tokenizer=tokenizer, patch_size=PATCH, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )


def visual_tokens(proc, height: int, width: int) -> int:
    """Visual tokens of one image, by the processor's own arithmetic (no pixels)."""
    return proc._get_number_of_features(height, width, CROP, CROP) - 1  # "default" strategy drops the CLS


def _verify(proc, sizes: list[tuple[int, int]], text_tokens: int) -> int:
    """Run the real processor on blank images of ``sizes``; every count must match."""
    from PIL import Image

    from ep_core.prompts import chat_prompt

    text = chat_prompt(proc, 1, TEXT_PROMPT)
    image_id = proc.tokenizer.convert_tokens_to_ids(proc.image_token)
    for height, width in sizes:
        ids = proc(images=[Image.new("RGB", (width, height))], text=[text], return_tensors="pt")["input_ids"][0]
        visual = int((ids == image_id).sum())
        if visual != visual_tokens(proc, height, width) or len(ids) - visual != text_tokens:
            raise AssertionError(f"{height}x{width}: the processor gives {visual} visual + {len(ids) - visual} text tokens")
    return len(sizes)


def exact_count_calls(counts: list[int], batch_size: int) -> int:
    """Calls of the old model stage: each batch of ``batch_size`` rows, one call per distinct count."""
    return sum(len(set(counts[i : i + batch_size])) for i in range(0, len(counts), batch_size))


def packed_calls(lengths: list[int], visual: list[int], text: int, batch_size: int, batch_tokens: int, keep_ratio: float):
    """Pack as the model actor does; returns (calls, slots, real tokens, slots after K, real after K)."""
    from ep_core.budget import keep_count_for_ratio

    window = batch_size * PACK_WINDOW
    calls = slots = real = slots_k = real_k = 0
    for start in range(0, len(lengths), window):
        part = lengths[start : start + window]
        for call in pack(part, batch_tokens, batch_size):
            calls += 1
            slots += call.slots
            real += call.tokens
            kept = [text + keep_count_for_ratio(keep_ratio, visual[start + i]) for i in call.rows]
            slots_k += len(kept) * max(kept)
            real_k += sum(kept)
    return calls, slots, real, slots_k, real_k


def run(args: argparse.Namespace) -> dict:
    from transformers import LlamaConfig

    from ep_core.prompts import chat_prompt

    proc = processor()
    text_tokens = len(proc.tokenizer(chat_prompt(proc, 1, TEXT_PROMPT).replace(proc.image_token, ""))["input_ids"])
    sizes = draw_sizes(args.images, args.seed)
    verified = _verify(proc, sizes[: args.verify], text_tokens)
    visual = [visual_tokens(proc, h, w) for h, w in sizes]
    order = list(range(len(sizes)))
    random.Random(args.seed + 1).shuffle(order)  # rows arrive in no particular order
    visual = [visual[i] for i in order]
    lengths = [v + text_tokens for v in visual]

    batch_sizes = [int(x) for x in str(args.batch_sizes).split(",")]
    gpu_default = default_batch_tokens(LlamaConfig(**NEXT_7B), free_bytes=GPU_FREE_BYTES, dtype_bytes=2,
                                       max_rows=max(batch_sizes), max_new_tokens=args.max_new_tokens)
    budgets = [int(x) for x in str(args.batch_tokens).split(",")] if args.batch_tokens else [CPU_BATCH_TOKENS, 65_536, gpu_default]
    results = []
    for batch_size in batch_sizes:
        old = len(lengths) / exact_count_calls(visual, batch_size)
        for budget in budgets:
            calls, slots, real, slots_k, real_k = packed_calls(lengths, visual, text_tokens, batch_size, budget, args.keep_ratio)
            allowed = rows_allowed(lengths, budget, batch_size)
            results.append({
                "batch_size": batch_size,
                "batch_tokens": budget,
                "rows_per_generate": round(len(lengths) / calls, 3),
                "rows_allowed_per_generate": round(allowed, 3),
                "fill": round(len(lengths) / calls / allowed, 3),
                "padding_share": round(1 - real / slots, 4),
                "padding_share_after_prune": round(1 - real_k / slots_k, 4),
                "exact_count_rows_per_generate": round(old, 3),
            })
    return {
        "images": len(sizes),
        "distinct_visual_token_counts": len(set(visual)),
        "visual_tokens_median": statistics.median(visual),
        "visual_tokens_range": [min(visual), max(visual)],
        "text_tokens": text_tokens,
        "keep_ratio": args.keep_ratio,
        "pack_window_rows": f"batch size x {PACK_WINDOW}",
        "gpu_default_batch_tokens": gpu_default,
        "verified_against_processor": verified,
        "size_distribution": {"long_sides": LONG_SIDES, "short_sides_at_640": SHORT_SIDES, "near": NEAR,
                              "any": [240, 640], "portrait_share": PORTRAIT_SHARE},
        "goal": {"fill": GOAL_FILL, "padding_share": GOAL_PADDING},
        "results": results,
    }
