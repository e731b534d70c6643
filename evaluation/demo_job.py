"""``ep demo``: the harness on the shipped demo model, offline — answers, costs and a plot.

:func:`run_demo` draws a small fresh shapes set (images with their caption prompt and a
question, short mp4 videos with a question) and sweeps it (``evaluation.sweep.run_sweep``)
over :func:`demo_configurations`: every method (none, entropyprune, random, fastv, dart) at the
first keep ratio and the chosen method also at the others, so that the table and the plot
compare the methods at one cost and show one method's quality falling with the cost. It writes
what ``ep sweep`` writes (``runs/``, ``summary.json``, ``quality_vs_flops.png``, MLflow runs in
experiment ``demo``) and ``examples.md``: a few inputs with every configuration's answer.

It lives here, not in ``demo/``: ``demo/`` is the world and the model the harness uses, and
does not import the harness.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from evaluation.report import examples_markdown
from evaluation.sweep import (
    Configuration,
    SweepReport,
    check_configurations,
    configurations,
    parse_list,
    prepare_dataset,
    record_sweep,
    run_sweep,
)

log = logging.getLogger(__name__)


def demo_configurations(method: str, keep_ratios: list[float]) -> list[Configuration]:
    """Every method at ``keep_ratios[0]`` and ``method`` also at the other ratios, ordered by
    method (``ep_core.config.METHODS``), each method's ratios in the order given."""
    from ep_core.config import METHODS

    configs = configurations(list(METHODS), keep_ratios[:1]) + configurations([method], keep_ratios)
    return sorted(dict.fromkeys(configs), key=lambda c: METHODS.index(c[0]))


@dataclass
class DemoSettings:
    """The settings of ``ep demo``, one field per flag (``keep_ratios`` as comma-separated text)."""

    output: str = "outputs/demo"
    model: str = "demo"
    n: int = 16
    videos: int = 8
    seed: int = 1
    method: str = "entropyprune"
    keep_ratios: str = "0.33,0.11"
    prune_layer: int = 2
    batch_size: int = 8
    num_cpus: int | None = None


def run_demo(s: DemoSettings) -> SweepReport:
    """The demo end to end (see the module docstring); ``seconds`` counts from drawing the set."""
    from demo import MODEL_NAME, shipped_model_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if s.model == MODEL_NAME and not os.path.isfile(os.path.join(shipped_model_path(), "config.json")):
        raise FileNotFoundError(f"the demo model is missing from {shipped_model_path()}; train it with: ep train-demo")
    configs = demo_configurations(s.method, parse_list(s.keep_ratios, float))
    check_configurations(s.model, configs, s.prune_layer, 0)
    start = time.monotonic()
    os.makedirs(s.output, exist_ok=True)
    manifest = prepare_dataset("shapes", os.path.join(s.output, "data"), n=s.n, videos=s.videos, seed=s.seed)
    log.info(f"[demo] drew {s.n} images and {s.videos} videos (test split, seed {s.seed}) into {s.output}/data")
    # frames and tokens as the demo model was trained: 4 frames a video, a full dense caption
    summary = run_sweep(model=s.model, manifest=manifest, output=s.output, configs=configs, prune_layer=s.prune_layer,
                        frames=4, max_new_tokens=64, batch_size=s.batch_size, num_cpus=s.num_cpus)
    examples = os.path.join(s.output, "examples.md")
    with open(examples, "w", encoding="utf-8") as fh:
        fh.write(examples_markdown(summary))
    params = {"model": s.model, "dataset": "shapes", "n": s.n, "videos": s.videos, "seed": s.seed,
              "method": s.method, "keep_ratios": s.keep_ratios, "prune_layer": s.prune_layer}
    path, plot_path, uri = record_sweep(s.output, summary, params, experiment="demo",
                                        title="demo: quality vs prefill FLOPs", artifacts=(examples,))
    return SweepReport(summary, path, plot_path, uri, time.monotonic() - start, examples_path=examples)
