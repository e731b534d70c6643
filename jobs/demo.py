"""``ep demo``: the main job, offline, on the shipped demo model — answers, costs and a plot.

    ep demo [--output outputs/demo] [--n 16] [--videos 8] [--keep-ratios 0.33,0.11]

Draws a small fresh shapes set (images with their caption prompt and a question, short mp4
videos with a question), runs the captioning pipeline on it with the demo model unpruned and
with every pruning method (entropyprune, random, fastv, dart) at the first keep ratio, and with
``--method`` (EntropyPrune) also at the other keep ratios, and writes:

* ``OUTPUT/runs/<config>/part-*.parquet``: one row per input and configuration;
* ``OUTPUT/summary.json`` and the printed table: quality (VQA accuracy, caption object-F1,
  video accuracy), FLOPs cut, items/s per configuration;
* ``OUTPUT/quality_vs_flops.png``;
* MLflow runs (``MLFLOW_TRACKING_URI``, else ``sqlite:///OUTPUT/_mlflow.db``), experiment ``demo``;
* ``OUTPUT/examples.md``: a few inputs with the answers of each configuration.

Nothing is downloaded; it takes a few minutes on 2 CPU cores. The job is ``evaluation.demo_job``.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="outputs/demo", help="output directory (default outputs/demo)")
    parser.add_argument("--model", default="demo", help="model (default: the shipped demo model)")
    parser.add_argument("--n", type=int, default=16, help="images to draw (default 16)")
    parser.add_argument("--videos", type=int, default=8, help="videos to draw (default 8)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the drawn test set (default 1)")
    parser.add_argument("--method", default="entropyprune", help="method also run at the other keep ratios (default entropyprune)")
    parser.add_argument("--keep-ratios", default="0.33,0.11", help="keep ratios: every method at the first, --method also at the others (default 0.33,0.11)")
    parser.add_argument("--prune-layer", type=int, default=2, help="decoder layer K (default 2)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per model batch (default 8)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")


def run(args: argparse.Namespace) -> int:
    from evaluation.demo_job import DemoSettings, run_demo
    from evaluation.report import format_table

    report = run_demo(DemoSettings(
        output=args.output, model=args.model, n=args.n, videos=args.videos, seed=args.seed, method=args.method,
        keep_ratios=args.keep_ratios, prune_layer=args.prune_layer, batch_size=args.batch_size, num_cpus=args.num_cpus,
    ))
    print(format_table(report.summary), flush=True)
    print(
        f"[demo] done in {report.seconds:.0f}s: Parquet under {args.output}/runs, summary {report.summary_path}, "
        f"plot {report.plot_path}, examples {report.examples_path}" + (f", MLflow {report.mlflow_uri}" if report.mlflow_uri else ""),
        flush=True,
    )
    return 0 if report.complete else 1


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import module_main

    return module_main(sys.modules[__name__], "demo", argv)


if __name__ == "__main__":
    sys.exit(main())
