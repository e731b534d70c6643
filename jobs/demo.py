"""``ep demo``: the main job, offline, on the shipped demo model — answers, costs and a plot.

    ep demo [--output outputs/demo] [--n 16] [--videos 8] [--keep-ratios 0.33,0.11]

Draws a small fresh shapes set (images with their caption prompt and a question, short mp4
videos with a question), runs the captioning pipeline on it with the demo model unpruned and
with EntropyPrune at two keep ratios, and writes:

* ``OUTPUT/runs/<config>/part-*.parquet``: one row per input and configuration;
* ``OUTPUT/summary.json`` and the printed table: quality (VQA accuracy, caption object-F1,
  video accuracy), FLOPs cut, items/s per configuration;
* ``OUTPUT/quality_vs_flops.png``;
* MLflow runs (``MLFLOW_TRACKING_URI``, else ``sqlite:///OUTPUT/mlflow.db``), experiment ``demo``;
* ``OUTPUT/examples.md``: a few inputs with the answers of each configuration.

Nothing is downloaded; it takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="outputs/demo", help="output directory (default outputs/demo)")
    parser.add_argument("--model", default="demo", help="model (default: the shipped demo model)")
    parser.add_argument("--n", type=int, default=16, help="images to draw (default 16)")
    parser.add_argument("--videos", type=int, default=8, help="videos to draw (default 8)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the drawn test set (default 1)")
    parser.add_argument("--method", default="entropyprune", help="pruning method compared with none (default entropyprune)")
    parser.add_argument("--keep-ratios", default="0.33,0.11", help="two (or more) keep ratios (default 0.33,0.11)")
    parser.add_argument("--prune-layer", type=int, default=2, help="decoder layer K (default 2)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per model batch (default 8)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")


def examples_markdown(summary: list[dict], limit: int = 6) -> str:
    """Inputs with each configuration's answer, side by side (first ``limit`` inputs)."""
    from pipelines.sink import read_output

    tables = {}
    for row in summary:
        name = f"{row['method']}@{row['keep_ratio']:.2f}"
        tables[name] = {r["sample_id"]: r for r in read_output(row["output"]).to_pylist()}
    if not tables:
        return ""
    first = next(iter(tables.values()))
    ids = sorted(first, key=lambda s: (first[s]["media_type"] or "", first[s]["source"] or "", first[s]["prompt"] or ""))
    picks = [i for i in ids if first[i]["media_type"] == "image"][: limit - 2] + [i for i in ids if first[i]["media_type"] == "video"][:2]
    lines = []
    for sid in picks:
        r = first[sid]
        ref = json.loads(r["reference"]) if r.get("reference") else {}
        want = ref.get("answer") or ref.get("caption") or ""
        lines.append(f"**{r['source']}** — _{r['prompt']}_  \nreference: `{want}`")
        for name, rows in tables.items():
            out = rows.get(sid, {}).get("output")
            lines.append(f"- {name}: `{out}`")
        lines.append("")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ep_core.demo import demo_model_path
    from ep_core.loading import model_type_of
    from jobs.sweep import format_table, log_mlflow, parse_list, plot, run_sweep
    from pipelines.datasets.shapes import build_set

    if args.model == "demo" and not os.path.isfile(os.path.join(demo_model_path(), "config.json")):
        raise FileNotFoundError(f"the demo model is missing from {demo_model_path()}; train it with: ep train-demo")
    model_type_of(args.model)
    ratios = parse_list(args.keep_ratios, float)
    start = time.monotonic()
    os.makedirs(args.output, exist_ok=True)
    manifest = build_set(os.path.join(args.output, "data"), n_images=args.n, n_videos=args.videos, seed=args.seed, split="test")
    print(f"[demo] drew {args.n} images and {args.videos} videos (test split, seed {args.seed}) into {args.output}/data", flush=True)
    configs = [("none", None)] + [(args.method, r) for r in ratios]
    summary = run_sweep(
        model=args.model,
        manifest=manifest,
        output=args.output,
        configs=configs,
        prune_layer=args.prune_layer,
        frames=4,
        max_new_tokens=64,
        batch_size=args.batch_size,
        num_cpus=args.num_cpus,
    )
    path = os.path.join(args.output, "summary.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    plot_path = plot(summary, os.path.join(args.output, "quality_vs_flops.png"), title="demo: quality vs prefill FLOPs")
    examples = os.path.join(args.output, "examples.md")
    with open(examples, "w", encoding="utf-8") as fh:
        fh.write(examples_markdown(summary))
    params = {"model": args.model, "dataset": "shapes", "n": args.n, "videos": args.videos, "seed": args.seed,
              "method": args.method, "keep_ratios": args.keep_ratios, "prune_layer": args.prune_layer}
    uri = log_mlflow(args.output, params, summary, [path, examples] + ([plot_path] if plot_path else []), experiment="demo")
    print(format_table(summary), flush=True)
    print(
        f"[demo] done in {time.monotonic() - start:.0f}s: Parquet under {args.output}/runs, summary {path}, "
        f"plot {plot_path}, examples {examples}" + (f", MLflow {uri}" if uri else ""),
        flush=True,
    )
    return 0 if all(r.get("complete") for r in summary) else 1


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import module_main

    return module_main(sys.modules[__name__], "demo", argv)


if __name__ == "__main__":
    sys.exit(main())
