"""``ep sweep``: quality, cost and speed per pruning method and keep ratio, on the same inputs.

    ep sweep --model demo --dataset shapes --n 100 --seed 1 \\
             --methods none,entropyprune,random,fastv,dart --keep-ratios 1.0,0.33,0.11 \\
             --output outputs/sweep

``--dataset shapes`` draws a fresh test set of the shapes world from ``--seed`` (``--n``
images, each with its caption prompt and one question, plus ``--videos`` clips with one
question each) under ``OUTPUT/data``; any other value is a manifest (``.jsonl``/``.csv``/
``.parquet`` with ``path``, ``prompt``, ``reference``) or a directory. Every configuration
runs through the captioning pipeline on one Ray session, writes its Parquet rows under
``OUTPUT/runs/<method>_<keep ratio>`` and is scored; ``OUTPUT/summary.json`` holds one object
per configuration, the table is printed, ``OUTPUT/quality_vs_flops.png`` plotted, and each
configuration is logged to MLflow as a child run of one sweep run (``MLFLOW_TRACKING_URI``,
else SQLite in OUTPUT). The harness is ``evaluation.sweep``.

``none`` runs once (everything kept) whatever the keep ratios; the other methods run at
every keep ratio. Exit status 0 when every configuration finished, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys

from jobs.cli import prune_layer_arg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="demo", help="model path or hub id; 'demo' = the shipped demo model (default)")
    parser.add_argument("--dataset", default="shapes", help="'shapes' (drawn from --seed) or a manifest / directory")
    parser.add_argument("--n", type=int, default=60, help="shapes: images to draw (each: caption + one question; default 60)")
    parser.add_argument("--videos", type=int, default=None, help="shapes: clips to draw (default n/2)")
    parser.add_argument("--seed", type=int, default=1, help="shapes: seed of the test split (default 1; training never sees the test split)")
    parser.add_argument("--methods", default="none,entropyprune,random,fastv,dart", help="comma-separated methods")
    parser.add_argument("--keep-ratios", default="1.0,0.33,0.11", help="comma-separated keep ratios after the prune layer")
    parser.add_argument("--prune-layer", type=prune_layer_arg, default=None,
                        help="decoder layer K where pruning happens (default: the family's, 2 for LLaVA, 1 for Qwen-VL), or 'auto': K from the calibration profile (ep calibrate), else the family's default")
    parser.add_argument("--profile", default=None, help="with --prune-layer auto: the profile file to read (default: the model's profile)")
    parser.add_argument("--output", required=True, help="output directory (data, runs/, summary.json, _mlflow.db)")
    parser.add_argument("--frames", type=int, default=4, help="frames decoded per video (default 4, as the demo model was trained)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per input (default 64: a full dense caption)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per model batch (default 8)")
    parser.add_argument("--workers", type=int, default=1, help="model actors (default 1)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: start Ray locally)")
    parser.add_argument("--random-seed", type=int, default=0, help="seed of the random method (default 0)")
    parser.add_argument("--coverage", action="store_true", help="shapes: also measure which tokens each method keeps against where the objects are (coverage.json)")


def run(args: argparse.Namespace) -> int:
    from demo.coverage import format_coverage
    from evaluation.report import format_by_type, format_table
    from evaluation.sweep import SweepSettings, sweep

    report = sweep(SweepSettings(
        model=args.model, dataset=args.dataset, output=args.output, n=args.n, videos=args.videos, seed=args.seed,
        methods=args.methods, keep_ratios=args.keep_ratios, prune_layer=args.prune_layer, frames=args.frames,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, workers=args.workers,
        num_cpus=args.num_cpus, address=args.address, random_seed=args.random_seed, coverage=args.coverage,
        profile=args.profile,
    ))
    print(format_table(report.summary), flush=True)
    by_type = format_by_type(report.summary)
    if by_type:
        print("VQA accuracy by question type:\n" + by_type, flush=True)
    if report.coverage:
        print(format_coverage(report.coverage), flush=True)
    print(f"[sweep] {len(report.summary)} configurations in {report.seconds:.0f}s; summary: {report.summary_path}", flush=True)
    return 0 if report.complete else 1


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import module_main

    return module_main(sys.modules[__name__], "sweep", argv)


if __name__ == "__main__":
    sys.exit(main())
