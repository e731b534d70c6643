"""The ``ep`` console script: one sub-command per job module in ``jobs/``.

Each job module exposes ``add_arguments(parser)`` and ``run(args) -> int``; heavy imports
happen inside ``run`` so that ``ep --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "flops": ("jobs.flops", "prefill FLOPs and their reduction for a model preset or config"),
    "bench": ("jobs.bench", "benchmarks that print measured ratios"),
    "caption": ("jobs.caption", "caption images and videos to Parquet with a (pruned) model on Ray Data"),
    "sweep": ("jobs.sweep", "quality, FLOPs and speed per pruning method and keep ratio on the same inputs"),
    "demo": ("jobs.demo", "the main job offline on the shipped demo model: Parquet, MLflow, plot, table"),
    "train-demo": ("jobs.train_demo", "train the shipped demo LLaVA on CPU on the shapes world"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ep", description="EntropyPrune: pruned multimodal LLMs at scale")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except (ValueError, FileNotFoundError) as exc:  # user errors: one clear line, no traceback
        print(f"ep {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `ep ... | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0


def module_main(module, name: str, argv: list[str] | None = None) -> int:
    """``python -m jobs.NAME``: the same job as ``ep NAME``, with the same one-line errors."""
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{name}", description=module.__doc__.splitlines()[0])
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
