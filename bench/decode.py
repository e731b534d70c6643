"""``ep bench decode``: per-token decode time after a pruned and an unpruned prefill, and the
hooks' own cost per decode step.

Same LLaVA-1.5-7B-shaped decoder and prompt as ``ep bench prefill`` (``--layers`` N, 576
visual + 64 text tokens, kept counts of budgets 192 / 128 / 64 on the full model). After a
prefill (not timed), ``--new-tokens`` one-token steps are timed exactly as ``generate`` runs
them (``model(next_token, cache=cache, attention_mask=…)``). Layers ≥ K of a pruned
prefill hold n̂ instead of n tokens in their cache, so each step attends to fewer keys.

* ``decode_speedup``: median over ``--pairs`` of (unpruned step time / pruned step time), an
  unpruned block of steps and a pruned block back to back in each pair;
* ``ideal_decode_speedup``: the same ratio of exact decode FLOPs
  (``ep_core.flops.decode_flops_per_token``): attention over the cache is the only term that
  shrinks, so the ideal is 1 + attention's share of the step saved;
* ``ideal_decode_speedup_bytes``: the ratio of bytes a step reads (weights + KV cache), the
  bound when a step is memory-bound, as decode usually is;
* ``hook_cost_share``: the time spent inside the pruning hooks during the pruned steps
  (each hook wrapped in a timer) over the pruned step time. Goal: ≤ 2 %;
* ``hook_cost_share_ab``: (hooks installed with nothing to prune − no hooks) / no hooks, from
  back-to-back steps on the same unpruned cache: the dispatch cost alone (can be noise-negative).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

GOAL_HOOK_SHARE = 0.02


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=6, help="decoder layers built and timed (default 6)")
    parser.add_argument("--shape", default="llava-1.5-7b", help="decoder shape (default llava-1.5-7b)")
    parser.add_argument("--budgets", default="192,128,64", help="layer-averaged budgets on the full model")
    parser.add_argument("--batch", type=int, default=1, help="rows per step (default 1)")
    parser.add_argument("--text-tokens", type=int, default=64, help="text tokens per prompt (default 64)")
    parser.add_argument("--new-tokens", type=int, default=8, help="decode steps timed per block (default 8)")
    parser.add_argument("--pairs", type=int, default=3, help="unpruned/pruned block pairs (default 3)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (GPU default), float16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's setting)")


class HookTimer:
    """Wraps every hook of a :class:`~ep_core.hooks.PruningHandle` in a timer (seconds summed
    in ``total``). Instrumentation for this bench: the handle itself is unchanged."""

    def __init__(self, handle, device: str):
        from bench.shaped_model import synchronize

        self.total = 0.0
        for removable in handle._hooks:
            hooks = removable.hooks_dict_ref()
            if hooks is None or removable.id not in hooks:
                continue
            hooks[removable.id] = self._wrap(hooks[removable.id], device, synchronize)

    def _wrap(self, fn, device, synchronize):
        def timed_hook(*args, **kwargs):
            synchronize(device)
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            synchronize(device)
            self.total += time.perf_counter() - start
            return result

        return timed_hook


def _cache_argument(model) -> str:
    """``cache`` (transformers ≥ 5.2x) or ``past_key_values`` (earlier 5.x): the forward's name for it."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _prefill(model, feed):
    """One prefill as ``generate`` runs it; returns the cache and the first generated token."""
    out = model(**feed, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = out.past_key_values
    return cache, out.logits[:, -1].argmax(-1, keepdim=True)


def _steps(model, cache, token, mask, steps: int, device: str) -> float:
    """Seconds per step of ``steps`` greedy one-token decode steps from ``cache``."""
    from bench.shaped_model import synchronize

    name = _cache_argument(model)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        mask = torch_cat_one(mask)
        out = model(input_ids=token, attention_mask=mask, use_cache=True, logits_to_keep=1, **{name: cache})
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    synchronize(device)
    return (time.perf_counter() - start) / steps


def torch_cat_one(mask):
    import torch

    return torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)


def ideal_decode(dims, visual: int, text: int, kept: int, prune_layer: int, dtype_bytes: int) -> tuple[float, float]:
    """(FLOPs ratio, bytes ratio) of the first decode step, unpruned over pruned.

    FLOPs: ``decode_flops_per_token(n)`` / ``decode_flops_per_token(n, n̂)``.
    Bytes: (W + KV(n)) / (W + KV(n, n̂)), W = decoder weight bytes
    (L·(d·(2·H·hd + 2·Hkv·hd) + 3·d·m)·bytes), KV from ``kv_cache_bytes``.
    """
    from ep_core.flops import decode_flops_per_token, kv_cache_bytes

    n = visual + text
    n_pruned = n - visual + kept
    flops = decode_flops_per_token(dims, n) / decode_flops_per_token(dims, n, n_pruned, prune_layer)
    d, hd = dims.hidden_size, dims.head_dim
    weights = dims.num_layers * (d * (2 * dims.num_heads * hd + 2 * dims.num_kv_heads * hd)
                                 + 3 * d * dims.intermediate_size) * dtype_bytes
    full = weights + kv_cache_bytes(dims, n, dtype_bytes=dtype_bytes)
    pruned = weights + kv_cache_bytes(dims, n, n_pruned, prune_layer, dtype_bytes=dtype_bytes)
    return flops, full / pruned


def run(args: argparse.Namespace) -> dict:
    import torch

    from bench import machine, shaped_model
    from bench.prefill import check_args, int_list, kept_counts
    from ep_core.config import PruneConfig
    from ep_core.flops import TextDims
    from ep_core.hooks import apply_pruning

    check_args(args)
    for name in ("batch", "new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    budgets = int_list(args.budgets, "--budgets")
    shape, device, model = shaped_model.from_args(args)
    dims = TextDims.from_config(model.config)
    visual, text, k = shape.visual_tokens, args.text_tokens, shape.prune_layer
    dtype_bytes = next(model.parameters()).element_size()
    feed = shaped_model.inputs(model, args.batch, text)
    mask = feed["attention_mask"]
    steps = args.new_tokens

    results = []
    with torch.no_grad():
        # hooks with nothing to prune against no hooks, on copies of one unpruned cache
        cache, token = _prefill(model, feed)
        _steps(model, copy.deepcopy(cache), token, mask, 1, device)  # warm-up
        bare, idle = [], []
        keep_all = PruneConfig(method="entropyprune", keep_ratio=1.0, prune_layer=k)
        for _ in range(args.pairs):
            # each side runs a prefill right before its steps (a prefill leaves the CPU's caches
            # cold for the next steps: both sides must pay it alike)
            _prefill(model, feed)
            bare.append(_steps(model, copy.deepcopy(cache), token, mask, steps, device))
            with apply_pruning(model, keep_all):
                _prefill(model, feed)  # the handle's prefill state (nothing to prune)
                idle.append(_steps(model, copy.deepcopy(cache), token, mask, steps, device))
        del cache
        dispatch_share = statistics.median((i - b) / b for b, i in zip(bare, idle))

        for budget, kept in zip(budgets, kept_counts(shape, budgets)):
            config = PruneConfig(method="entropyprune", keep_ratio=kept / visual, prune_layer=k)
            full_steps, pruned_steps, hook_shares = [], [], []
            for _ in range(args.pairs):
                cache, token = _prefill(model, feed)
                full_steps.append(_steps(model, cache, token, mask, steps, device))
                del cache
                with apply_pruning(model, config) as handle:
                    cache, token = _prefill(model, feed)
                    if {s["visual_tokens_kept"] for s in handle.stats} != {kept}:
                        raise RuntimeError(f"the hooks did not keep {kept} tokens")
                    timer = HookTimer(handle, device)
                    step = _steps(model, cache, token, mask, steps, device)
                    pruned_steps.append(step)
                    hook_shares.append(timer.total / steps / step)
                    del cache
            ratios = [f / p for f, p in zip(full_steps, pruned_steps)]
            ideal_flops, ideal_bytes = ideal_decode(dims, visual, text, kept, k, dtype_bytes)
            results.append({
                "budget": budget, "kept": kept, "batch": args.batch,
                "unpruned_step_ms": round(statistics.median(full_steps) * 1000, 3),
                "pruned_step_ms": round(statistics.median(pruned_steps) * 1000, 3),
                "decode_speedup": round(statistics.median(ratios), 4),
                "ideal_decode_speedup": round(ideal_flops, 4),
                "ideal_decode_speedup_bytes": round(ideal_bytes, 4),
                "hook_cost_share": round(statistics.median(hook_shares), 5),
            })
    return {
        "bench": "decode",
        **shaped_model.settings(args, shape, device, model),
        "new_tokens": steps,
        "goal_hook_cost_share": GOAL_HOOK_SHARE,
        "hook_cost_share": max(r["hook_cost_share"] for r in results),
        "hook_cost_share_ab": round(dispatch_share, 5),
        "decode_speedup": min(r["decode_speedup"] for r in results),
        "ideal_decode_speedup": min(r["ideal_decode_speedup"] for r in results),
        "results": results,
        "machine": machine.describe(),
    }
