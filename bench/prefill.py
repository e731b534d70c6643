"""``ep bench prefill``: measured prefill speedup of EntropyPrune against the FLOPs bound.

A LLaVA-1.5-7B-shaped decoder (hidden 4096, FFN 11008, 32 heads; random weights; trimmed
vocabulary) truncated to ``--layers`` N decoder layers (default 6, prune layer 2), a prompt of
576 visual + ``--text-tokens`` (64) text tokens, batch 1 and 8. Kept counts are those the
budgets 192 / 128 / 64 give on the full 32-layer model (166 / 98 / 29 via
``ep_core.budget.keep_count``); the paper's budget conversion means nothing on a truncated
stack, so the counts are carried over, not re-derived for N layers.

For each (budget, batch):

* ``ideal_speedup`` = P(n) / P(n, n̂): the exact decoder prefill FLOPs of the N layers
  (``ep_core.flops.prefill_flops``) unpruned over pruned, n = 576 + text, n̂ = n − 576 + kept;
* ``measured_speedup``: the median over ``--pairs`` rounds of t_unpruned / t_pruned, after one
  warm-up each. A round runs the unpruned prefill, then each budget's pruned prefill, and the
  next round's unpruned run closes it: each pruned run is compared with the mean of the
  unpruned runs on either side (A B₁ B₂ B₃ A …), so the machine's drift cancels.
  A run is one ``model(...)`` prefill forward as ``generate`` does it (``use_cache=True``,
  logits of the last position); the pruned run includes registering the hooks, the entropy
  scoring and every gather. The vision tower and projector run once before timing and are
  then served from a memo (``bench.shaped_model.memoize_image_features``): they are not part
  of the N-layer prefill the FLOPs count;
* ``efficiency`` = measured / ideal. Goal: ≥ 0.9 at every budget on CPU.
"""

from __future__ import annotations

import argparse
import statistics

GOAL_EFFICIENCY = 0.9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=6, help="decoder layers built and timed (default 6)")
    parser.add_argument("--shape", default="llava-1.5-7b", help="decoder shape (default llava-1.5-7b)")
    parser.add_argument("--budgets", default="192,128,64", help="layer-averaged budgets on the full model (default 192,128,64)")
    parser.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    parser.add_argument("--text-tokens", type=int, default=64, help="text tokens per prompt (default 64)")
    parser.add_argument("--pairs", type=int, default=5, help="timed rounds (unpruned, then every budget) per batch (default 5)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (GPU default), float16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's setting)")


def int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise ValueError(f"{flag} takes comma-separated integers >= 0, got {text!r}")
    return values


def ideal_speedup(dims, visual: int, text: int, kept: int, prune_layer: int) -> float:
    """P(n) / P(n, n̂) with n = visual + text, n̂ = n − visual + kept (exact decoder FLOPs)."""
    from ep_core.flops import prefill_flops

    n = visual + text
    return prefill_flops(dims, n) / prefill_flops(dims, n, n - visual + kept, prune_layer)


def kept_counts(shape, budgets: list[int]) -> list[int]:
    """The tokens each budget keeps on the shape's full-depth model (166 / 98 / 29 for LLaVA-1.5-7B)."""
    from ep_core.budget import keep_count

    return [keep_count(b, shape.visual_tokens, shape.full_layers, shape.prune_layer) for b in budgets]


def bracketed_speedups(run_base, runs: list, rounds: int, device: str) -> tuple[list[float], float, list[float]]:
    """Median speedups t_base / t_run of each of ``runs`` against ``run_base``.

    One warm-up of each, then ``rounds`` rounds of ``base, run_1, …, run_m`` and a closing
    ``base``: each run is compared with the mean of the base runs on either side of it, so a
    linear drift of the machine cancels. Returns (median speedup per run, median base
    seconds, median seconds per run).
    """
    from bench.shaped_model import timed

    run_base()
    for run in runs:
        run()
    bases = [timed(run_base, device)]
    seconds = [[] for _ in runs]
    for _ in range(rounds):
        for j, run in enumerate(runs):
            seconds[j].append(timed(run, device))
        bases.append(timed(run_base, device))
    brackets = [(a + b) / 2 for a, b in zip(bases, bases[1:])]
    speedups = [statistics.median(base / t for base, t in zip(brackets, times)) for times in seconds]
    return speedups, statistics.median(bases), [statistics.median(times) for times in seconds]


def check_args(args: argparse.Namespace) -> None:
    from bench.shaped_model import SHAPES

    if args.shape not in SHAPES:
        raise ValueError(f"--shape must be one of {', '.join(SHAPES)}, got {args.shape!r}")
    shape = SHAPES[args.shape]
    if not shape.prune_layer < args.layers:
        raise ValueError(f"--layers must exceed the prune layer {shape.prune_layer}, got {args.layers}")
    for name in ("text_tokens", "pairs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")


def run(args: argparse.Namespace) -> dict:
    import torch

    from bench import machine, shaped_model
    from ep_core.config import PruneConfig
    from ep_core.flops import TextDims
    from ep_core.hooks import apply_pruning

    check_args(args)
    budgets = int_list(args.budgets, "--budgets")
    batches = int_list(args.batches, "--batches")
    shape, device, model = shaped_model.from_args(args)
    dims = TextDims.from_config(model.config)
    visual, text, k = shape.visual_tokens, args.text_tokens, shape.prune_layer

    results = []
    with torch.no_grad():
        for batch in batches:
            feed = shaped_model.inputs(model, batch, text)

            def unpruned():
                model(**feed, use_cache=True, logits_to_keep=1)

            runs, seen = [], []
            for kept in kept_counts(shape, budgets):
                config = PruneConfig(method="entropyprune", keep_ratio=kept / visual, prune_layer=k)
                seen.append(set())

                def pruned(config=config, seen=seen[-1]):
                    with apply_pruning(model, config) as handle:
                        model(**feed, use_cache=True, logits_to_keep=1)
                        seen.update(s["visual_tokens_kept"] for s in handle.stats)

                runs.append(pruned)
            speedups, t_full, t_pruned = bracketed_speedups(unpruned, runs, args.pairs, device)
            for budget, kept, measured, seconds, kept_seen in zip(budgets, kept_counts(shape, budgets), speedups,
                                                                  t_pruned, seen):
                if kept_seen != {kept}:
                    raise RuntimeError(f"the hooks kept {sorted(kept_seen)} tokens, expected {kept}")
                ideal = ideal_speedup(dims, visual, text, kept, k)
                results.append({
                    "budget": budget, "kept": kept, "batch": batch,
                    "ideal_speedup": round(ideal, 4),
                    "measured_speedup": round(measured, 4),
                    "efficiency": round(measured / ideal, 4),
                    "unpruned_ms": round(t_full * 1000, 2),
                    "pruned_ms": round(seconds * 1000, 2),
                })
    return {
        "bench": "prefill",
        **shaped_model.settings(args, shape, device, model),
        "goal_efficiency": GOAL_EFFICIENCY,
        "min_efficiency": min(r["efficiency"] for r in results),
        "results": results,
        "machine": machine.describe(),
    }
