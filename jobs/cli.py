"""The ``ep`` console script: one sub-command per job module in ``jobs/``.

Each job module exposes ``add_arguments(parser)`` and ``run(args) -> int``; heavy imports
happen inside ``run`` so that ``ep --help`` stays fast. This is the edge where user-facing
lines are set up: the library logs through ``logging``; :func:`setup_logging` sends its INFO
lines to stdout and warnings and errors to stderr, as plain messages.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

PACKAGES = ("ep_core", "pipelines", "evaluation", "demo", "jobs", "bench")


class _ConsoleHandler(logging.Handler):
    """INFO and below to stdout (to stderr when ``info_to_stderr``: a job whose stdout is JSON),
    WARNING and above to stderr; the streams are looked up at each line, so a caller that swaps
    ``sys.stdout`` (a test, a notebook) still sees them."""

    info_to_stderr = False

    def emit(self, record: logging.LogRecord) -> None:
        quiet_stdout = self.info_to_stderr or record.levelno >= logging.WARNING
        stream = sys.stderr if quiet_stdout else sys.stdout
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not stop the job
            self.handleError(record)


def setup_logging(level: int = logging.INFO, *, info_to_stderr: bool = False) -> None:
    """Route the project's loggers to the console (once per process); ``info_to_stderr`` keeps
    stdout for a job's machine-readable output (``--json``)."""
    _ConsoleHandler.info_to_stderr = info_to_stderr
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
            logger.addHandler(_ConsoleHandler())

# sub-command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "flops": ("jobs.flops", "prefill FLOPs and their reduction for a model preset or config"),
    "bench": ("jobs.bench", "benchmarks that print measured ratios"),
    "caption": ("jobs.caption", "caption images and videos to Parquet with a (pruned) model on Ray Data"),
    "sweep": ("jobs.sweep", "quality, FLOPs and speed per pruning method and keep ratio on the same inputs"),
    "calibrate": ("jobs.calibrate", "measure the layer-wise matrix entropy of visual tokens and the collapse layer K"),
    "demo": ("jobs.demo", "the main job offline on the shipped demo model: Parquet, MLflow, plot, table"),
    "train-demo": ("jobs.train_demo", "train the shipped demo LLaVA on CPU on the shapes world"),
}


def prune_layer_arg(text: str) -> int | str:
    """argparse type of ``--prune-layer``: an integer K or ``auto`` (``ep_core.ecl``)."""
    from ep_core.ecl import parse_prune_layer

    try:
        return parse_prune_layer(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ep", description="EntropyPrune: pruned multimodal LLMs at scale")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like SIGINT's KeyboardInterrupt, so that every
    ``finally`` runs: output parts committed, the MLflow run marked KILLED, the lock released."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _run_command(name: str, run, args) -> int:
    """``run(args)`` with the edge's rules: usage errors one line and exit 2; SIGINT / SIGTERM
    one line and exit 130 / 143."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(run(args) or 0)
    except (ValueError, FileNotFoundError, PermissionError) as exc:  # user errors: one clear line, no traceback
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        which = "SIGTERM" if isinstance(exc, Terminated) else "SIGINT"
        print(f"{name}: stopped by {which}; what was written is kept: run the same command again to resume", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        return _run_command(f"ep {args.command}", args._module.run, args)
    except BrokenPipeError:  # `ep ... | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0


def module_main(module, name: str, argv: list[str] | None = None) -> int:
    """``python -m jobs.NAME``: the same job as ``ep NAME``, with the same one-line errors."""
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{name}", description=module.__doc__.splitlines()[0])
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    return _run_command(name, module.run, args)


if __name__ == "__main__":
    sys.exit(main())
