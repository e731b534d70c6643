"""``ep bench NAME [--json]``: benchmarks that print measured figures (never pass/fail).

Each benchmark is a module in ``bench/`` exposing ``add_arguments(parser)`` (optional) and
``run(args) -> dict``; the dict is printed as a table, or as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import importlib
import json

BENCHES: dict[str, tuple[str, str]] = {
    "all": ("bench.all", "run every bench; write one JSON and the README's performance tables"),
    "e2e": ("bench.e2e", "end-to-end items/s of the demo model, pruned vs not, and a LLaVA-1.5-7B time model"),
    "overhead": ("bench.overhead", "EntropyPrune scoring time as a fraction of a LLaVA-1.5-7B prefill (CPU)"),
    "pipeline": ("bench.pipeline", "items/s of the Ray pipeline against a bare Python loop"),
    "batching": ("bench.batching", "rows per generate call and padding for LLaVA-NeXT's anyres token counts, packed vs exact-count groups"),
    "decode": ("bench.decode", "decode step time after a pruned vs an unpruned prefill, and the hooks' cost per step"),
    "scale": ("bench.scale", "the data plane alone (a stand-in for the model) over 10k, 100k and 1M Parquet rows: driver peak RSS, rows/s"),
    "prefill": ("bench.prefill", "measured prefill speedup against the FLOPs bound (LLaVA-1.5-7B shape, N layers)"),
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
    from jobs.cli import setup_logging

    setup_logging(info_to_stderr=args.json)  # progress lines must not mix with the JSON
    module = importlib.import_module(args._bench_module)
    result = module.run(args)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(format_result(result))
    return int(result.get("exit_status", 0))


def _shown(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def format_result(result: dict) -> str:
    """Scalars as ``key  value`` lines, a list of dicts as a table, ``machine`` on one line."""
    from bench.machine import one_line

    scalars = {k: v for k, v in result.items() if not isinstance(v, (list, dict)) or k == "scoring_shape"}
    width = max((len(k) for k in scalars), default=0)
    lines = [f"{key:<{width}}  {_shown(value)}" for key, value in scalars.items()]
    for key, value in result.items():
        if isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
            columns = list(value[0])
            cells = [[_shown(row.get(c, "")) for c in columns] for row in value]
            widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
            lines.append(f"{key}:")
            lines.append("  " + "  ".join(c.rjust(w) for c, w in zip(columns, widths)))
            lines.extend("  " + "  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells)
        elif key == "machine" and isinstance(value, dict):
            lines.append(f"machine: {one_line(value)}")
    return "\n".join(lines)
