"""``ep bench NAME [--json]``: benchmarks that print measured figures (never pass/fail).

Each benchmark is a module in ``bench/`` exposing ``add_arguments(parser)`` (optional) and
``run(args) -> dict``; the dict is printed as a table, or as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import importlib
import json

BENCHES: dict[str, tuple[str, str]] = {
    "overhead": ("bench.overhead", "EntropyPrune scoring time as a fraction of a LLaVA-1.5-7B prefill (CPU)"),
    "pipeline": ("bench.pipeline", "items/s of the Ray pipeline against a bare Python loop"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="NAME", required=True)
    for name, (module_name, help_text) in BENCHES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
        p.set_defaults(_bench_module=module_name)
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, "add_arguments"):
            module.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(args._bench_module)
    result = module.run(args)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        width = max(len(k) for k in result)
        for key, value in result.items():
            shown = f"{value:.6g}" if isinstance(value, float) else value
            print(f"{key:<{width}}  {shown}")
    return 0
