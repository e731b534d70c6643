"""``ep bench e2e``: end-to-end gains of EntropyPrune, measured on the demo model and modelled
for LLaVA-1.5-7B.

**Measured (the shipped demo model through the whole pipeline).** ``--items`` held-out shapes
scenes captioned by ``run_caption`` on a local Ray (2 CPUs, one model actor), unpruned and
EntropyPrune at keep 1/3 and 1/9: end-to-end items/s (decode included, Ray's start not),
prefill ms per item and KV-cache bytes per item (from the output rows), and decode ms per step
(one step = one token for each row of a ``--batch-size`` batch; measured after that batch's
prefill, hooks installed as in the pipeline).

**Modelled (LLaVA-1.5-7B, this machine).** One real-width decoder layer (random weights) is
timed on this machine at the three sequence lengths (n = 576 + 64, and n̂ for each keep) for
the prefill, and at the three cache lengths for a decode step; the scoring of 576 × 32 × 128
queries is timed too. Then per item, for a caption of G tokens:

    t(G) = t_vision + K·t_layer(n) + (L−K)·t_layer(n̂) + t_score + G·(K·t_step(n) + (L−K)·t_step(n̂))

with L = 32, K = 2, and t_vision = the tower's and projector's FLOPs at the prefill's measured
FLOP rate. The LM head and embeddings are left out. ``speedup_e2e_G`` = t_unpruned(G) /
t_pruned(G): prefill gains shrink as G grows because a decode step reads every weight whatever
the cache holds. These are estimates for this CPU, not measurements of a 7B model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

KEEPS = {"1/3": 1 / 3, "1/9": 1 / 9}
CAPTION_LENGTHS = (16, 64, 256)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--items", type=int, default=256, help="demo scenes per configuration (default 256)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per model batch (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=56, help="tokens generated per image at most (default 56)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per modelled point (default 3)")
    parser.add_argument("--no-model", action="store_true", help="skip the LLaVA-1.5-7B time model")


def _configs():
    from ep_core.config import PruneConfig

    yield "none", PruneConfig(method="none")
    for label, ratio in KEEPS.items():
        yield f"entropyprune {label}", PruneConfig(method="entropyprune", keep_ratio=ratio, prune_layer=2)


def measure_demo(items: int, batch_size: int, max_new_tokens: int) -> list[dict]:
    """The demo model through ``run_caption``, then one batch's decode steps on the bare model."""
    import torch

    from bench.decode import _prefill, _steps
    from bench.pipeline import _make_inputs
    from ep_core.loading import resolve_model_name
    from pipelines.caption import CaptionConfig, run_caption
    from pipelines.cluster import ray_session
    from pipelines.infer import CaptionPredictor
    from pipelines.media import decode_row
    from pipelines.sink import read_output
    from pipelines.sources import scan

    model = resolve_model_name("demo")
    results = []
    with tempfile.TemporaryDirectory(prefix="ep-bench-e2e-") as tmp:
        images = _make_inputs(os.path.join(tmp, "images"), items, "demo")
        rows = scan(images).rows[:batch_size]
        with ray_session(num_cpus=2, quiet=True):
            for i, (label, prune) in enumerate(_configs()):
                out = os.path.join(tmp, f"out{i}")
                cfg = CaptionConfig(model=model, input=images, output=out, prune=prune, batch_size=batch_size,
                                    max_new_tokens=max_new_tokens, workers=1, flush_rows=64)
                summary = run_caption(cfg, quiet=True)
                table = read_output(out).to_pylist()
                done = [r for r in table if r["error"] is None]
                results.append({
                    "config": label,
                    "items_per_s": round(summary.items_per_s, 3),
                    "prefill_ms_per_item": round(statistics.mean(r["prefill_ms"] for r in done), 3),
                    "kv_cache_bytes_per_item": int(statistics.mean(r["kv_cache_bytes"] for r in done)),
                    "visual_tokens_kept": int(statistics.mean(r["visual_tokens_kept"] for r in done)),
                })
        torch.set_num_threads(1)
        for result, (label, prune) in zip(results, _configs()):
            predictor = CaptionPredictor(model=model, prune=prune, max_new_tokens=max_new_tokens, device="cpu",
                                         torch_threads=1)
            feed = predictor._collate([predictor._encode(decode_row(r)) for r in rows])
            with torch.no_grad():
                cache, token = _prefill(predictor.model, feed)
                _steps(predictor.model, cache, token, feed["attention_mask"], 2, "cpu")  # warm-up
                cache, token = _prefill(predictor.model, feed)
                step = _steps(predictor.model, cache, token, feed["attention_mask"], 16, "cpu")
            result["decode_ms_per_step"] = round(step * 1000, 3)
            del predictor
    return results


def model_7b(repeats: int) -> dict:
    """The per-item time model of LLaVA-1.5-7B on this machine (see the module docstring)."""
    import torch

    from bench import shaped_model
    from bench.decode import _prefill, _steps
    from ep_core.budget import keep_count_for_ratio
    from ep_core.entropy import token_entropy
    from ep_core.flops import TextDims, layer_flops, projector_flops, vision_flops
    from ep_core.presets import preset_config

    shape = shaped_model.SHAPES["llava-1.5-7b"]
    config = preset_config("llava-1.5-7b")
    L, K, N, text = shape.full_layers, shape.prune_layer, shape.visual_tokens, 64
    layer = shaped_model.build(shape, 1)
    n = N + text
    lengths = {"none": n} | {label: n - N + keep_count_for_ratio(r, N) for label, r in KEEPS.items()}

    def prompt(length):
        ids = torch.randint(3, shaped_model.IMAGE_TOKEN_ID, (1, length))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    prefill_s, step_s = {}, {}
    with torch.no_grad():
        for label, length in lengths.items():
            feed = prompt(length)
            times = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                layer(**feed, use_cache=True, logits_to_keep=1)
                times.append(time.perf_counter() - start)
            prefill_s[label] = statistics.median(times[1:])
            cache, token = _prefill(layer, feed)
            _steps(layer, cache, token, feed["attention_mask"], 2, "cpu")
            step_s[label] = statistics.median(
                _steps(layer, *_prefill(layer, feed), feed["attention_mask"], 4, "cpu") for _ in range(repeats))
        queries = torch.randn(N, shape.num_heads, shape.hidden_size // shape.num_heads)
        token_entropy(queries)
        start = time.perf_counter()
        for _ in range(repeats):
            token_entropy(queries)
        score_s = (time.perf_counter() - start) / repeats
    del layer

    dims = TextDims.from_config(config)
    rate = layer_flops(n, dims) / prefill_s["none"]
    vision_s = ((vision_flops(config, N) or 0) + (projector_flops(config, N) or 0)) / rate
    rows = []
    for label in lengths:
        pruned = label != "none"
        prefill = K * prefill_s["none"] + (L - K) * prefill_s[label] + (score_s if pruned else 0.0)
        step = K * step_s["none"] + (L - K) * step_s[label]
        rows.append({"config": label if label == "none" else f"entropyprune {label}",
                     "vision_ms": vision_s * 1000, "prefill_ms": prefill * 1000, "decode_ms_per_token": step * 1000})
    base = rows[0]
    for row in rows:
        row["speedup_prefill"] = base["prefill_ms"] / row["prefill_ms"]
        for g in CAPTION_LENGTHS:
            def total(r):
                return r["vision_ms"] + r["prefill_ms"] + g * r["decode_ms_per_token"]

            row[f"speedup_e2e_{g}"] = total(base) / total(row)
        for key in list(row):
            if isinstance(row[key], float):
                row[key] = round(row[key], 3 if key.endswith("_ms") or "_ms_" in key else 4)
    return {"flop_rate_gflops": round(rate / 1e9, 2), "rows": rows}


def run(args: argparse.Namespace) -> dict:
    from bench import machine

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in ("items", "batch_size", "max_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    result = {
        "bench": "e2e",
        "items": args.items,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "results": measure_demo(args.items, args.batch_size, args.max_new_tokens),
    }
    if not args.no_model:
        modelled = model_7b(args.repeats)
        result["model_7b_flop_rate_gflops"] = modelled["flop_rate_gflops"]
        result["model_7b"] = modelled["rows"]
    result["machine"] = machine.describe()
    return result
