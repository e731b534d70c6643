"""``ep flops``: prefill FLOPs, their reduction and KV-cache bytes for a model and a budget.

    ep flops --model llava-1.5-7b --budget 128 --text-tokens 57
    ep flops --model /path/to/model_dir --keep-ratio 0.25 --text-tokens 40 --prune-layer 1 --json
    ep flops --model llava-next-video-7b --frames 8 --keep-ratio 0.125 --text-tokens 40

``--model`` is ``demo``, a preset (see ``ep_core.presets``), a local directory with a
config.json, or a hub id (needs network): the one resolution of ``ep_core.loading``. Three conventions are printed (see ``ep_core.flops``): the
paper's formula, an exact LM count, and the exact count with the vision tower, projector
and LM head (the calflops convention behind the paper's 68.2 %).
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ep_core.presets import PRESETS

    parser.add_argument("--model", required=True,
                        help=f"'demo', a preset ({', '.join(PRESETS)}), "
                             "a model directory with config.json, or a hub id")
    parser.add_argument("--budget", type=float, default=None,
                        help="layer-averaged visual tokens B (the papers' 192/128/64); "
                             "kept k = floor((L*B - K*N) / (L - K))")
    parser.add_argument("--keep-ratio", type=float, default=None,
                        help="share of visual tokens kept from the prune layer on, in [0, 1]")
    parser.add_argument("--keep-tokens", type=int, default=None,
                        help="visual tokens kept from the prune layer on, k = min(T, N) (the official LLaVA-1.6 path, e.g. 320)")
    parser.add_argument("--text-tokens", type=int, default=None,
                        help="non-visual prompt tokens (system prompt, template, question), e.g. 57")
    parser.add_argument("--prune-layer", type=int, default=None,
                        help="K: first decoder layer that sees the pruned sequence (default: the family's, 2 for LLaVA, 1 for Qwen-VL)")
    parser.add_argument("--visual-tokens", type=int, default=None,
                        help="visual tokens N in the prompt (default: the model's per-image default, "
                             "or with --frames the video's)")
    parser.add_argument("--frames", type=int, default=None,
                        help="count one video of F frames through a video-native family's video path "
                             "(NeXT-Video, OneVision, Qwen-VL): N from the family's pooling, one vision pass per frame")
    parser.add_argument("--dtype-bytes", type=int, default=2, help="bytes per KV-cache element (default 2: fp16/bf16)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def compute(args: argparse.Namespace) -> dict:
    """The result dict of ``ep flops`` (also usable from Python with a Namespace)."""
    from ep_core.budget import keep_count, keep_count_for_ratio, layer_averaged_budget
    from ep_core.config import check_prune_layer
    from ep_core.families import default_visual_tokens, family_for, video_visual_tokens
    from ep_core.flops import flops_report
    from ep_core.loading import load_model_config

    keep_tokens = getattr(args, "keep_tokens", None)
    given = [f for f, v in (("--budget", args.budget), ("--keep-ratio", args.keep_ratio), ("--keep-tokens", keep_tokens))
             if v is not None]
    if len(given) > 1:
        raise ValueError(f"give one of --budget (layer-averaged visual tokens), --keep-ratio or --keep-tokens, not {' and '.join(given)}")
    if not given:
        raise ValueError("give --budget B (e.g. 128), --keep-ratio R (e.g. 0.25) or --keep-tokens T (e.g. 320)")
    if keep_tokens is not None and keep_tokens < 0:
        raise ValueError(f"--keep-tokens must be >= 0, got {keep_tokens}")
    if args.text_tokens is None:
        raise ValueError("--text-tokens is required: the non-visual prompt tokens (e.g. 57 for an MME-style prompt)")
    if args.text_tokens < 0:
        raise ValueError(f"--text-tokens must be >= 0, got {args.text_tokens}")
    if args.dtype_bytes < 1:
        raise ValueError(f"--dtype-bytes must be >= 1, got {args.dtype_bytes}")

    config = load_model_config(args.model)
    num_layers = int(config.get_text_config().num_hidden_layers)
    if args.prune_layer is None:
        args.prune_layer = family_for(config).default_prune_layer
    check_prune_layer(args.prune_layer, num_layers)
    frames = getattr(args, "frames", None)
    if frames is not None and frames < 1:
        raise ValueError(f"--frames must be >= 1, got {frames}")
    frames = frames or 0
    if frames and not family_for(config).video_native:
        raise ValueError(f"--frames: {config.model_type} has no video path (a video reaches it as N images); "
                         "give --visual-tokens N x the image count instead")
    if args.visual_tokens is None:
        visual = video_visual_tokens(config, frames) if frames else default_visual_tokens(config)
    else:
        visual = args.visual_tokens
    if visual < 1:
        raise ValueError(f"--visual-tokens must be >= 1, got {visual}")

    if args.budget is not None:
        if not args.budget >= 0:
            raise ValueError(f"--budget must be >= 0 visual tokens per layer, got {args.budget}")
        kept = keep_count(args.budget, visual, num_layers, args.prune_layer)
    elif keep_tokens is not None:
        kept = min(keep_tokens, visual)
    else:
        kept = keep_count_for_ratio(args.keep_ratio, visual)

    report = flops_report(config, visual, kept, args.text_tokens, args.prune_layer, dtype_bytes=args.dtype_bytes,
                          video_frames=frames)
    result = {
        "model": str(args.model),
        "budget": args.budget,
        "keep_ratio": kept / visual,
        "layer_averaged_budget": layer_averaged_budget(kept, visual, num_layers, args.prune_layer),
    }
    result.update(report.to_dict())
    return result


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: int | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def format_table(r: dict) -> str:
    k, lay = r["prune_layer"], r["num_layers"]
    budget = f"budget {r['budget']:g}; " if r["budget"] is not None else ""
    video = f" (one video, {r['video_frames']} frames)" if r.get("video_frames") else ""
    lines = [
        f"model           {r['model']}  ({lay} decoder layers, prune at layer {k})",
        f"visual tokens   {r['visual_tokens']}{video} -> {r['visual_tokens_kept']} kept "
        f"({budget}keep ratio {100 * r['keep_ratio']:.1f}%, layer-averaged {r['layer_averaged_budget']:.1f})",
        f"prompt tokens   {r['text_tokens']} text + {r['visual_tokens']} visual = {r['tokens']} "
        f"-> {r['tokens_pruned']} from layer {k} on",
        "",
        f"{'prefill':<36}{'full':>12}{'pruned':>12}{'reduction':>11}",
        f"{'paper F(n), n = text+visual (MACs)':<36}{_num(r['paper_flops_full']):>12}{_num(r['paper_flops']):>12}"
        f"{_pct(r['flops_reduction_paper']):>11}",
        f"{'paper F(n), n = visual only':<36}{'':>12}{'':>12}{_pct(r['flops_reduction_paper_image_only']):>11}",
        f"{'exact LM, causal GQA SwiGLU (FLOPs)':<36}{_num(r['prefill_flops_full']):>12}{_num(r['prefill_flops']):>12}"
        f"{_pct(r['flops_reduction']):>11}",
        f"{'+ vision, projector, LM head (FLOPs)':<36}{_num(r['prefill_flops_with_vision_full']):>12}"
        f"{_num(r['prefill_flops_with_vision']):>12}{_pct(r['flops_reduction_with_vision']):>11}",
        f"{'KV cache after prefill (bytes)':<36}{_num(r['kv_cache_bytes_full']):>12}{_num(r['kv_cache_bytes']):>12}"
        f"{_pct(r['kv_cache_reduction']):>11}",
        f"{'decode, 1st new token (FLOPs)':<36}{_num(r['decode_flops_per_token_full']):>12}"
        f"{_num(r['decode_flops_per_token']):>12}"
        f"{_pct(1 - r['decode_flops_per_token'] / r['decode_flops_per_token_full']):>11}",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    result = compute(args)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(format_table(result))
    return 0
