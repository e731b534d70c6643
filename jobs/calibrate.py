"""``ep calibrate``: the layer-wise matrix entropy of a model's visual tokens and its Entropy
Collapse Layer K, measured on calibration inputs.

    ep calibrate --model MODEL --output DIR [--n 32] [--dataset shapes|MANIFEST|DIR]
                 [--representation hidden|query] [--json]

Prints the curve and K (``--json``: one JSON object on stdout, progress on stderr), writes
``DIR/profile.json``, ``DIR/entropy_curve.png`` and an MLflow run, and copies the profile to the
per-model location that ``ep caption`` / ``ep sweep --prune-layer auto`` read. The library is
``evaluation.calibration`` (``ep_core.ecl`` for the measurement).
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="'demo', a model directory or a hub id of a supported family")
    parser.add_argument("--output", required=True, help="directory for profile.json, entropy_curve.png, _mlflow.db")
    parser.add_argument("--n", type=int, default=32, help="calibration inputs (default 32)")
    parser.add_argument("--dataset", default="shapes", help="'shapes' (validation scenes drawn on the spot; default) or a manifest / directory of images")
    parser.add_argument("--representation", choices=("hidden", "query"), default="hidden",
                        help="hidden: each layer's input hidden states (default); query: each layer's query projections")
    parser.add_argument("--batch-size", type=int, default=8, help="inputs per forward pass (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn shapes scenes (default 0)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16 (default auto)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (and nothing else) on stdout")


def run(args: argparse.Namespace) -> int:
    from evaluation.calibration import CalibrationSettings, calibrate
    from jobs.cli import setup_logging

    setup_logging(info_to_stderr=args.json)
    profile = calibrate(CalibrationSettings(
        model=args.model, output=args.output, n=args.n, dataset=args.dataset, representation=args.representation,
        batch_size=args.batch_size, seed=args.seed, dtype=args.dtype, device=args.device,
    ))
    if args.json:
        keys = ("model", "representation", "entropies", "std", "n", "collapse_layer", "paper_layer", "profile_path")
        print(json.dumps({k: profile[k] for k in keys}), flush=True)
        return 0
    print("layer  matrix_entropy  std", flush=True)
    for layer, (mean, std) in enumerate(zip(profile["entropies"], profile["std"])):
        mark = "  <- K" if layer == profile["collapse_layer"] else ""
        print(f"{layer:<6} {mean:<15.4f} {std:.4f}{mark}", flush=True)
    print(f"[calibrate] collapse layer K = {profile['collapse_layer']} (paper's K for this family: "
          f"{profile['paper_layer']}); profile {profile['profile_path']} and {profile['shared_profile_path']}, "
          f"plot {profile['plot_path']}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import module_main

    return module_main(sys.modules[__name__], "calibrate", argv)


if __name__ == "__main__":
    sys.exit(main())
