"""``ep bench overhead``: EntropyPrune's scoring time against a LLaVA-1.5-7B prefill, on CPU.

What is measured:

* **scoring**: ``ep_core.entropy.token_entropy`` on a ``[N, H, hd]`` fp32 query tensor
  (default 576 × 32 × 128, LLaVA-1.5-7B at layer K−1), median of ``--repeats`` runs after
  warm-up. The query states themselves are part of the prefill (layer K−1's q_proj), so
  this is the whole extra work of the score.
* **prefill**: ``--layers-timed`` real-width Llama decoder layers (default 2; hidden 4096,
  32 heads, intermediate 11008, random fp32 weights, SDPA causal attention) on a
  ``--seq-len``-token sequence (default 633 = 576 visual + 57 text), median of
  ``--repeats`` runs after one warm-up, scaled to ``--num-layers`` (default 32). Embedding,
  final norm, LM head and the vision tower are not included, so the estimate is a lower
  bound of the real prefill and the fraction an upper bound.

* **batched scoring**: EntropyPrune's whole-batch selection (``select_batch``: one
  ``token_entropy`` call over ``--batch-rows`` rows × ``--visual-tokens`` tokens, then a
  per-row top-k) for each of ``--batch-heads`` head counts (head dim 128), against the same
  rows scored one ``token_entropy`` call per row.

Smaller shapes (``--hidden-size 64 …``) make it a seconds-long smoke test.
"""

from __future__ import annotations

import argparse
import statistics
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden-size", type=int, default=4096)
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--intermediate-size", type=int, default=11008)
    parser.add_argument("--num-layers", type=int, default=32, help="decoder layers the prefill is scaled to")
    parser.add_argument("--layers-timed", type=int, default=2, help="decoder layers actually built and timed")
    parser.add_argument("--seq-len", type=int, default=633, help="prefill length (576 visual + 57 text)")
    parser.add_argument("--visual-tokens", type=int, default=576, help="tokens scored by token_entropy")
    parser.add_argument("--repeats", type=int, default=3, help="timed prefill runs (scoring uses 3x as many)")
    parser.add_argument("--batch-rows", type=int, default=32, help="rows of the batched scoring figure (default 32)")
    parser.add_argument("--batch-heads", default="32,40", help="head counts of the batched scoring figure (default 32,40)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: leave torch's setting)")
    parser.add_argument("--seed", type=int, default=0)


def _median_ms(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def _build_layers(args: argparse.Namespace):
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_heads,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers_timed,
        vocab_size=32,
        max_position_embeddings=max(4096, args.seq_len),
    )
    config._attn_implementation = "sdpa"
    # Build on the meta device, then fill: skips the (slow, pointless) kaiming init.
    with torch.device("meta"):
        layers = torch.nn.ModuleList(LlamaDecoderLayer(config, layer_idx=i) for i in range(args.layers_timed))
    layers = layers.to_empty(device="cpu").float().eval()
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for name, param in layers.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    rotary = LlamaRotaryEmbedding(config)
    return config, layers, rotary


def _batch_scoring(args: argparse.Namespace, heads: int, generator) -> dict:
    """Milliseconds to select for a batch at once (``select_batch``) and row by row."""
    import torch

    from ep_core.entropy import token_entropy
    from ep_core.methods import Candidates, entropyprune

    rows, tokens, head_dim = args.batch_rows, args.visual_tokens, 128
    queries = torch.randn(rows, tokens, heads, head_dim, generator=generator)
    candidates = Candidates(
        visual_pos=torch.arange(tokens).expand(rows, -1), visual_valid=torch.ones(rows, tokens, dtype=torch.bool),
        ks=torch.full((rows,), tokens // 4), queries=queries,
    )
    repeats = max(2, args.repeats)
    one_call = _median_ms(lambda: entropyprune.select_batch(candidates), repeats=repeats, warmup=1)
    per_row = _median_ms(lambda: [token_entropy(queries[b]).topk(tokens // 4) for b in range(rows)], repeats=repeats, warmup=1)
    return {"heads": heads, "rows": rows, "tokens": tokens, "one_call_ms": one_call, "per_row_calls_ms": per_row,
            "one_call_ms_per_row": one_call / rows}


def run(args: argparse.Namespace) -> dict:
    import torch

    from ep_core.entropy import token_entropy

    for name in ("hidden_size", "num_heads", "intermediate_size", "num_layers", "layers_timed", "seq_len",
                 "visual_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.hidden_size % args.num_heads:
        raise ValueError(f"--hidden-size ({args.hidden_size}) must be divisible by --num-heads ({args.num_heads})")
    if args.layers_timed > args.num_layers:
        raise ValueError("--layers-timed cannot exceed --num-layers")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    head_dim = args.hidden_size // args.num_heads

    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        q = torch.randn(args.visual_tokens, args.num_heads, head_dim, generator=generator)
        scoring_ms = _median_ms(lambda: token_entropy(q), repeats=3 * args.repeats, warmup=2)

        config, layers, rotary = _build_layers(args)
        hidden = torch.randn(1, args.seq_len, args.hidden_size, generator=generator) * 0.5
        position_ids = torch.arange(args.seq_len).unsqueeze(0)
        position_embeddings = rotary(hidden, position_ids)

        def prefill() -> None:
            h = hidden
            for layer in layers:
                h = layer(h, attention_mask=None, position_ids=position_ids, position_embeddings=position_embeddings)
                if isinstance(h, tuple):
                    h = h[0]

        timed_ms = _median_ms(prefill, repeats=args.repeats, warmup=1)

        batched = [_batch_scoring(args, int(h), generator) for h in str(args.batch_heads).split(",") if h.strip()]

    per_layer_ms = timed_ms / args.layers_timed
    prefill_ms = per_layer_ms * args.num_layers
    return {
        "scoring_ms": scoring_ms,
        "scoring_shape": [args.visual_tokens, args.num_heads, head_dim],
        "prefill_ms_estimated": prefill_ms,
        "prefill_ms_per_layer": per_layer_ms,
        "layers_timed": args.layers_timed,
        "num_layers": args.num_layers,
        "seq_len": args.seq_len,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "scoring_fraction_of_prefill": scoring_ms / prefill_ms,
        "batch_scoring": batched,
        "goal_fraction": 0.01,
        "threads": torch.get_num_threads(),
        "dtype": "float32",
    }
