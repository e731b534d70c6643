"""``ep bench pipeline``: items/s of the Ray Data caption pipeline against a bare Python loop.

Both sides caption the same images with the same model, the same batch size and one torch
thread for the model. By default (``--model demo``) that is the real workload of the shipped
demo LLaVA: dense captions of shapes scenes (144 visual tokens, up to ~50 generated tokens
per image). ``--model random`` swaps in the demo architecture with random weights (decoder
width ``--hidden``) on noise images: per-item work so small that fixed costs dominate. Then:

* bare: ``load model`` then ``for batch: decode each image; CaptionPredictor.predict_rows``
  in one process;
* pipeline: ``run_caption`` on a local Ray with 2 CPUs (decode tasks + one model actor),
  writing Parquet; Ray's own start (``ray.init``) is not counted, the actor's start and
  model load are, as the bare loop's model load is.

Goal on CPU: ``ratio = pipeline_items_per_s / bare_items_per_s >= 0.8``, and
``actor_busy_share`` (steady-state share of the model actor's wall time inside ``generate``,
from the rows' ``latency_ms``) ≥ 0.9. Start-up (actor
start, model load, the first batch through every stage) is a fixed cost that a long job
amortises, so the bench also reports the steady state: ``steady_ratio`` compares the
pipeline's rate after its first results with the bare loop's rate after its model load.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=("demo", "random"), default="demo",
                        help="demo: the shipped demo model captioning shapes scenes (default); random: the demo architecture with random weights, on noise")
    parser.add_argument("--items", type=int, default=2048, help="images to caption (default 2048)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per model batch (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=56, help="tokens generated per image at most (default 56: a full shapes caption)")
    parser.add_argument("--hidden", type=int, default=256, help="decoder width of the random model (default 256)")


def _make_inputs(root: str, n: int, kind: str) -> str:
    """``n`` images under ``root``: held-out shapes scenes (``demo``) or noise (``random``)."""
    import numpy as np
    from PIL import Image

    from demo import world as S

    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        if kind == "demo":
            pixels = S.render_scene(S.make_scene(S.rng_for("test", 7, i)))
        else:
            pixels = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, f"{i:05d}.png"))
    return root


def _save_random_model(path: str, hidden: int) -> str:
    """The demo LLaVA's architecture and processor with random weights, decoder width ``hidden``."""
    from demo.model import build_model

    model, processor = build_model(seed=0, text={"hidden_size": hidden, "intermediate_size": 2 * hidden})
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def run(args: argparse.Namespace) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kind = getattr(args, "model", "demo")
    items = getattr(args, "items", 2048)
    batch_size = getattr(args, "batch_size", 8)
    max_new_tokens = getattr(args, "max_new_tokens", 56)
    hidden = getattr(args, "hidden", 256)

    import torch

    from pipelines.caption import CaptionConfig, run_caption
    from pipelines.cluster import ray_session
    from pipelines.infer import CaptionPredictor
    from pipelines.media import decode_row
    from pipelines.sources import scan

    with tempfile.TemporaryDirectory(prefix="ep-bench-pipeline-") as tmp:
        if kind == "demo":
            from ep_core.loading import resolve_model_name

            model = resolve_model_name("demo")
        else:
            model = _save_random_model(os.path.join(tmp, "model"), hidden)
        inputs = _make_inputs(os.path.join(tmp, "images"), items, kind)

        # bare loop: one process, one torch thread, the same decode and predict code
        torch.set_num_threads(1)
        start = time.perf_counter()
        predictor = CaptionPredictor(model=model, max_new_tokens=max_new_tokens, device="cpu", torch_threads=1)
        bare_load_s = time.perf_counter() - start
        rows = scan(inputs).rows
        outputs = 0
        for i in range(0, len(rows), batch_size):
            decoded = [decode_row(r) for r in rows[i : i + batch_size]]
            outputs += sum(r.get("output") is not None for r in predictor.predict_rows(decoded))
        bare_s = time.perf_counter() - start
        del predictor

        ray_start = time.perf_counter()
        with ray_session(num_cpus=2, quiet=True):
            ray_init_s = time.perf_counter() - ray_start
            cfg = CaptionConfig(model=model, input=inputs, output=os.path.join(tmp, "out"), batch_size=batch_size,
                                max_new_tokens=max_new_tokens, workers=1, flush_rows=64)
            summary = run_caption(cfg, quiet=True)

    bare = outputs / bare_s
    return {
        "model": kind,
        "items": items,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "bare_seconds": round(bare_s, 3),
        "pipeline_seconds": round(summary.seconds, 3),
        "bare_items_per_s": bare,
        "pipeline_items_per_s": summary.items_per_s,
        "ratio": summary.items_per_s / bare if bare else 0.0,
        "pipeline_first_output_s": summary.extra.get("first_output_s"),
        "pipeline_steady_items_per_s": summary.extra.get("steady_items_per_s"),
        "bare_steady_items_per_s": outputs / (bare_s - bare_load_s),
        "steady_ratio": (summary.extra.get("steady_items_per_s") or 0.0) / (outputs / (bare_s - bare_load_s)),
        "actor_busy_share": summary.extra.get("actor_busy_share"),
        "rows_per_generate": summary.extra.get("rows_per_generate"),
        "pipeline_complete": summary.complete,
        "ray_init_s_not_counted": round(ray_init_s, 3),
    }
