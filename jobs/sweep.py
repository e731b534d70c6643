"""``ep sweep``: quality, cost and speed per pruning method and keep ratio, on the same inputs.

    ep sweep --model demo --dataset shapes --n 100 --seed 1 \\
             --methods none,entropyprune,random,fastv,dart --keep-ratios 1.0,0.33,0.11 \\
             --output outputs/sweep

``--dataset shapes`` draws a fresh test set of the shapes world from ``--seed`` (``--n``
images, each with its caption prompt and one question, plus ``--videos`` clips with one
question each) under ``OUTPUT/data``; any other value is a manifest (``.jsonl``/``.csv``/
``.parquet`` with ``path``, ``prompt``, ``reference``) or a directory. Every configuration
runs through the captioning pipeline (``pipelines.run.run_caption``) on one shared local Ray
instance, writes its Parquet rows under ``OUTPUT/runs/<method>_<keep ratio>`` and is scored by
``pipelines.quality``. ``OUTPUT/summary.json`` holds one object per configuration (method,
keep_ratio, budget, quality and its parts, items_per_s, flops_reduction,
visual_tokens_kept_mean, errors, prefill_ms_per_item; ``items_per_s`` is end to end, model
actor start-up included, ``generate_items_per_s`` counts model time only); the table is
printed, ``OUTPUT/quality_vs_flops.png`` plotted, and each configuration is logged to MLflow
as a child run of one sweep run (``pipelines.tracking``: ``MLFLOW_TRACKING_URI``, else
SQLite in OUTPUT).

``none`` runs once (everything kept) whatever the keep ratios; the other methods run at
every keep ratio. Exit status 0 when every configuration finished, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="demo", help="model path or hub id; 'demo' = the shipped demo model (default)")
    parser.add_argument("--dataset", default="shapes", help="'shapes' (drawn from --seed) or a manifest / directory")
    parser.add_argument("--n", type=int, default=60, help="shapes: images to draw (each: caption + one question; default 60)")
    parser.add_argument("--videos", type=int, default=None, help="shapes: clips to draw (default n/2)")
    parser.add_argument("--seed", type=int, default=1, help="shapes: seed of the test split (default 1; training never sees the test split)")
    parser.add_argument("--methods", default="none,entropyprune,random,fastv,dart", help="comma-separated methods")
    parser.add_argument("--keep-ratios", default="1.0,0.33,0.11", help="comma-separated keep ratios after the prune layer")
    parser.add_argument("--prune-layer", type=int, default=2, help="decoder layer K where pruning happens (default 2)")
    parser.add_argument("--output", required=True, help="output directory (data, runs/, summary.json, mlflow.db)")
    parser.add_argument("--frames", type=int, default=4, help="frames decoded per video (default 4, as the demo model was trained)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per input (default 64: a full dense caption)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per model batch (default 8)")
    parser.add_argument("--workers", type=int, default=1, help="model actors (default 1)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: start Ray locally)")
    parser.add_argument("--random-seed", type=int, default=0, help="seed of the random method (default 0)")
    parser.add_argument("--coverage", action="store_true", help="shapes: also measure which tokens each method keeps against where the objects are (coverage.json)")


def parse_list(text: str, kind=str) -> list:
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    if not items:
        raise ValueError(f"empty list: {text!r}")
    try:
        return [kind(x) for x in items]
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a list of {kind.__name__}") from None


def configurations(methods: list[str], keep_ratios: list[float]) -> list[tuple[str, float | None]]:
    """``(method, keep_ratio)`` pairs to run: ``none`` once (ratio ``None``), others at every ratio."""
    from ep_core.config import METHODS

    out = []
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        for r in keep_ratios:
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"keep ratios must lie in [0, 1], got {r}")
        if m == "none":
            out.append(("none", None))
        else:
            out.extend((m, r) for r in keep_ratios)
    return list(dict.fromkeys(out))


def prepare_dataset(args, data_dir: str) -> str:
    if args.dataset == "shapes":
        from pipelines.datasets.shapes import build_set

        if args.n < 1:
            raise ValueError(f"--n must be >= 1, got {args.n}")
        videos = args.n // 2 if args.videos is None else args.videos
        return build_set(data_dir, n_images=args.n, n_videos=videos, seed=args.seed, split="test")
    if not os.path.exists(args.dataset):
        raise FileNotFoundError(f"dataset not found: {args.dataset} (use 'shapes' or a manifest / directory)")
    return args.dataset


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _generate_items_per_s(rows: list[dict]) -> float | None:
    """Rows per second of model time: rows with an output over the summed latency of the
    distinct ``generate`` calls (rows of one batch share its latency value)."""
    done = [r for r in rows if r.get("output") is not None and r.get("latency_ms")]
    calls = {(r.get("run_id"), r["latency_ms"]) for r in done}
    total_s = sum(lat for _, lat in calls) / 1000.0
    return len(done) / total_s if total_s > 0 else None


def summarize(method: str, keep_ratio: float | None, rows: list[dict], seconds: float, num_layers: int, prune_layer: int) -> dict:
    """One summary object for a configuration's output rows."""
    from ep_core.budget import layer_averaged_budget
    from pipelines.quality import score_rows

    scores = score_rows(rows)
    ok = [r for r in rows if r.get("output") is not None]
    budgets = [
        layer_averaged_budget(r["visual_tokens_kept"], r["visual_tokens"], num_layers, prune_layer)
        for r in ok
        if r.get("visual_tokens") and r.get("visual_tokens_kept") is not None
    ]
    kept = _mean([r.get("visual_tokens_kept") for r in ok])
    total = _mean([r.get("visual_tokens") for r in ok])
    out = {
        "method": method,
        "keep_ratio": 1.0 if keep_ratio is None else keep_ratio,
        "budget": _mean(budgets),
        "prune_layer": prune_layer if method != "none" else None,
        "quality": scores.get("quality"),
        "items": len(rows),
        "items_per_s": len(rows) / seconds if seconds > 0 else None,
        "generate_items_per_s": _generate_items_per_s(rows),
        "flops_reduction": _mean([r.get("flops_reduction") for r in ok]) if method != "none" else 0.0,
        "visual_tokens_mean": total,
        "visual_tokens_kept_mean": kept,
        "errors": scores.get("errors", 0),
    }
    for key in ("vqa_accuracy", "caption_object_f1", "video_accuracy", "accuracy", "caption_token_f1"):
        if key in scores:
            out[key] = scores[key]
            out[f"n_{key}"] = scores[f"n_{key}"]
    if "vqa_accuracy_by_type" in scores:
        out["vqa_accuracy_by_type"] = scores["vqa_accuracy_by_type"]
    return out


def format_by_type(summary: list[dict]) -> str:
    """VQA accuracy per question type, one row per configuration ("" when there is none)."""
    types = sorted({t for r in summary for t in (r.get("vqa_accuracy_by_type") or {})})
    if not types:
        return ""
    lines = ["method        keep_ratio  " + "  ".join(types)]
    for r in summary:
        acc = r.get("vqa_accuracy_by_type") or {}
        cells = "  ".join(f"{acc[t]:.2f}".ljust(len(t)) if t in acc else "-".ljust(len(t)) for t in types)
        lines.append(f"{r['method']:<13} {r['keep_ratio']:<11.2f} {cells}")
    return "\n".join(lines)


COLUMNS = [
    ("method", "{}"),
    ("keep_ratio", "{:.2f}"),
    ("budget", "{:.1f}"),
    ("quality", "{:.3f}"),
    ("vqa_accuracy", "{:.3f}"),
    ("caption_object_f1", "{:.3f}"),
    ("video_accuracy", "{:.3f}"),
    ("flops_reduction", "{:.1%}"),
    ("agreement_with_full", "{:.3f}"),
    ("first_token_kl", "{:.4f}"),
    ("visual_tokens_kept_mean", "{:.1f}"),
    ("items_per_s", "{:.2f}"),
    ("generate_items_per_s", "{:.2f}"),
    ("prefill_ms_per_item", "{:.1f}"),
    ("errors", "{}"),
]


def format_table(summary: list[dict]) -> str:
    """A fixed-width text table of the summary (missing values shown as ``-``)."""
    header = [name for name, _ in COLUMNS]
    body = []
    for row in summary:
        cells = []
        for name, fmt in COLUMNS:
            value = row.get(name)
            cells.append("-" if value is None else fmt.format(value))
        body.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def format_markdown(summary: list[dict]) -> str:
    header = [name for name, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary:
        cells = ["-" if row.get(n) is None else fmt.format(row.get(n)) for n, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def log_mlflow(output: str, params: dict, summary: list[dict], artifacts: list[str], experiment: str = "sweep") -> str | None:
    """One parent run for the sweep, one child run per configuration (``pipelines.tracking``,
    which never raises: a tracking failure is one printed line). The tracking URI, or None."""
    from pipelines.tracking import Tracker, run_metrics, run_params

    tracker = Tracker(output, experiment)
    with tracker.run(f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}", run_params(params) | {
        k: v for k, v in params.items() if k not in run_params(params) and v is not None
    }):
        for row in summary:
            name = f"{row['method']}@{row['keep_ratio']:.2f}"
            child = run_params(row | {k: params.get(k) for k in ("model", "batch_size", "dataset", "n", "seed", "max_new_tokens")})
            with tracker.run(name, child, nested=True):
                tracker.metrics(run_metrics(row) | {k: row[k] for k in ("generate_items_per_s", "n_vqa_accuracy", "n_caption_object_f1", "n_video_accuracy") if row.get(k) is not None})
                sample = _outputs_sample(row.get("output"), os.path.join(output, "samples", f"{name}.parquet"))
                if sample:
                    tracker.artifact(sample)
        parent_sample = _outputs_sample(
            [row.get("output") for row in summary], os.path.join(output, "samples", "outputs_sample.parquet")
        )
        if parent_sample:
            tracker.artifact(parent_sample)
        for path in artifacts:
            if path and os.path.exists(path):
                tracker.artifact(path)
    return tracker.uri if tracker.active else None


def _outputs_sample(dirs, path: str, rows_per_dir: int = 20) -> str | None:
    """The first ``rows_per_dir`` output rows of each configuration directory, as one Parquet
    file (an MLflow artifact); None when there is nothing to sample."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.sink import read_output

    dirs = [dirs] if isinstance(dirs, str) else [d for d in (dirs or []) if d]
    tables = [read_output(d).slice(0, rows_per_dir) for d in dirs if os.path.isdir(d)]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.concat_tables(tables), path)
    return path


def plot(summary: list[dict], path: str, title: str = "quality vs prefill FLOPs") -> str | None:
    """Quality against FLOPs reduction and against items/s, one line per method."""
    from pipelines.tracking import cost_quality_plot

    try:
        return str(cost_quality_plot(summary, path, title=title))
    except Exception as exc:  # noqa: BLE001 - a plot is a report, not a reason to fail
        print(f"[sweep] plot failed ({type(exc).__name__}: {exc})", flush=True)
        return None


def object_coverage(model: str, configs: list[tuple[str, float | None]], *, n: int = 40, seed: int = 1, prune_layer: int = 2) -> list[dict]:
    """Which visual tokens each method keeps, against where the objects are (shapes images).

    For every configuration, over ``n`` test scenes (a patch is "on" an object when the object
    covers at least 1/8 of it, :func:`pipelines.datasets.shapes.cover_owners`):

    * ``on_object_share``: kept visual tokens that lie on an object;
    * ``objects_touched``: objects with at least one kept patch they cover any part of;
    * ``object_centres_kept``: objects whose centre patch is kept (the one patch every object
      fills most);
    * ``kept_object_cover``: mean share of a kept on-object patch that its object covers
      (1 = the object's interior, small = a sliver of its edge).

    For reference, what keeping uniformly would give: ``object_patch_share`` (all patches on
    an object) and ``object_patch_cover`` (mean cover of all on-object patches).
    Runs in-process (one prefill per image, no Ray)."""
    import numpy as np
    import torch
    from PIL import Image

    from ep_core import PruneConfig, apply_pruning
    from ep_core.loading import load_model
    from pipelines.datasets import shapes as S

    mdl, processor = load_model(model, dtype="float32", device="cpu")
    vc = mdl.config.vision_config
    image_id = mdl.config.image_token_id
    scenes = [S.make_scene(S.rng_for("test", seed, i)) for i in range(n)]
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": S.CAPTION_PROMPT}]}], add_generation_prompt=True
    )
    encs = [processor(images=[Image.fromarray(S.render_scene(sc))], text=[text], return_tensors="pt") for sc in scenes]
    grid = vc.image_size // vc.patch_size
    layouts = []  # per scene: patch cover [n_vis, n_obj], owner per patch, centre patch per object
    for sc in scenes:
        placed = [(o, *o.center()) for o in sc.objects]
        cover = S.patch_cover(placed, vc.patch_size, vc.image_size)
        centres = [int(cy // vc.patch_size) * grid + int(cx // vc.patch_size) for _, cx, cy in placed]
        layouts.append((cover, S.cover_owners(cover), centres))
    owned_cover = [c[j, o] for c, owner, _ in layouts for j, o in enumerate(owner) if o >= 0]
    reference = {
        "object_patch_share": float(np.mean([(owner >= 0).mean() for _, owner, _ in layouts])),
        "object_patch_cover": float(np.mean(owned_cover)) if owned_cover else None,
    }
    out = []
    for method, ratio in configs:
        if method == "none":
            continue
        handle = apply_pruning(mdl, PruneConfig(method=method, keep_ratio=ratio, prune_layer=prune_layer))
        on, kept_total, touched, centred, objects, kept_cover = 0, 0, 0, 0, 0, []
        try:
            for (cover, owner, centres), enc in zip(layouts, encs):
                with torch.inference_mode():
                    mdl(**enc, use_cache=False)
                ids = enc["input_ids"][0]
                start = int((ids == image_id).nonzero()[0])
                n_vis = int((ids == image_id).sum())
                kept = sorted(p - start for p in handle.stats[0]["kept_positions"] if start <= p < start + n_vis)
                on_object = [j for j in kept if owner[j] >= 0]
                on += len(on_object)
                kept_total += len(kept)
                kept_cover += [cover[j, owner[j]] for j in on_object]
                touched += int((cover[kept] > 0).any(0).sum()) if kept else 0
                centred += sum(c in kept for c in centres)
                objects += len(centres)
        finally:
            handle.remove()
        out.append({
            "method": method,
            "keep_ratio": ratio,
            "on_object_share": on / kept_total if kept_total else None,
            "objects_touched": touched / objects if objects else None,
            "object_centres_kept": centred / objects if objects else None,
            "kept_object_cover": float(np.mean(kept_cover)) if kept_cover else None,
            **reference,
        })
    return out


def run_sweep(
    *,
    model: str,
    manifest: str,
    output: str,
    configs: list[tuple[str, float | None]],
    prune_layer: int = 2,
    frames: int = 4,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    workers: int = 1,
    num_cpus: int | None = None,
    address: str | None = None,
    seed: int = 0,
    log=None,
) -> list[dict]:
    """Run every configuration through the pipeline on one Ray instance; the summary list."""
    import ray
    from transformers import AutoConfig

    from ep_core.demo import resolve_model_name
    from pipelines.run import CaptionConfig, run_caption
    from pipelines.sink import read_output
    from pipelines.tracking import output_metrics

    log = log or (lambda msg: print(msg, flush=True))
    cfg_model = AutoConfig.from_pretrained(resolve_model_name(model))
    num_layers = getattr(cfg_model, "text_config", cfg_model).num_hidden_layers
    started = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        kwargs = {"address": address, "logging_level": "WARNING", "include_dashboard": False}
        if address is None:
            kwargs["num_cpus"] = num_cpus
            kwargs["runtime_env"] = {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "OMP_NUM_THREADS": "1"}}
        ray.init(**kwargs)
        started = True
    summary = []
    tables = {}  # configuration tag -> its output rows
    try:
        for method, ratio in configs:
            tag = f"{method}_{'all' if ratio is None else f'{ratio:g}'}"
            run_dir = os.path.join(output, "runs", tag)
            shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: items/s must measure this run
            cfg = CaptionConfig(
                model=model,
                input=manifest,
                output=run_dir,
                method=method,
                keep_ratio=ratio,
                prune_layer=prune_layer,
                seed=seed,
                max_new_tokens=max_new_tokens,
                frames=frames,
                batch_size=batch_size,
                workers=workers,
                run_id=tag,
            )
            log(f"[sweep] {tag}: running")
            result = run_caption(cfg, log=lambda m: None)
            table = read_output(run_dir)
            rows = table.to_pylist()
            entry = summarize(method, ratio, rows, result.seconds, num_layers, prune_layer)
            costs = output_metrics(table)
            for key in ("prefill_ms_per_item", "flops_reduction_paper", "kv_cache_bytes_mean"):
                entry[key] = costs.get(key)
            entry["complete"] = result.complete
            entry["output"] = run_dir
            summary.append(entry)
            tables[tag] = table
            q = entry.get("quality")
            log(
                f"[sweep] {tag}: quality {'-' if q is None else f'{q:.3f}'}, "
                f"{entry['items_per_s'] or 0:.2f} items/s, {entry['errors']} errors"
                + ("" if result.complete else f", INCOMPLETE ({result.failure or 'rows missing'})")
            )
    finally:
        if started:
            ray.shutdown()
    _compare_with_full(summary, tables)
    return summary


def _compare_with_full(summary: list[dict], tables: dict) -> None:
    """Add ``agreement_with_full`` and ``first_token_kl`` against the unpruned configuration."""
    from pipelines.quality import compare_with_full

    full = next((e for e in summary if e["method"] == "none"), None)
    if full is None:
        return
    full_rows = _rows_of(tables, full)
    for entry in summary:
        entry.update(compare_with_full(full_rows, _rows_of(tables, entry)))


def _rows_of(tables: dict, entry: dict) -> list[dict]:
    return tables[os.path.basename(entry["output"])].to_pylist()


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    methods = parse_list(args.methods)
    ratios = parse_list(args.keep_ratios, float)
    configs = configurations(methods, ratios)
    os.makedirs(args.output, exist_ok=True)
    manifest = prepare_dataset(args, os.path.join(args.output, "data"))
    from ep_core.loading import model_type_of

    model_type_of(args.model)  # a wrong model fails here, in one line
    start = time.monotonic()
    summary = run_sweep(
        model=args.model,
        manifest=manifest,
        output=args.output,
        configs=configs,
        prune_layer=args.prune_layer,
        frames=args.frames,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        workers=args.workers,
        num_cpus=args.num_cpus,
        address=args.address,
        seed=args.random_seed,
    )
    path = os.path.join(args.output, "summary.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    plot_path = plot(summary, os.path.join(args.output, "quality_vs_flops.png"))
    params = {"model": args.model, "dataset": args.dataset, "n": args.n, "seed": args.seed, "prune_layer": args.prune_layer,
              "frames": args.frames, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
              "methods": args.methods, "keep_ratios": args.keep_ratios}
    log_mlflow(args.output, params, summary, [path] + ([plot_path] if plot_path else []))
    print(format_table(summary), flush=True)
    by_type = format_by_type(summary)
    if by_type:
        print("VQA accuracy by question type:\n" + by_type, flush=True)
    if args.coverage and args.dataset == "shapes":
        cov = object_coverage(args.model, configs, n=min(args.n, 60), seed=args.seed, prune_layer=args.prune_layer)
        with open(os.path.join(args.output, "coverage.json"), "w", encoding="utf-8") as fh:
            json.dump(cov, fh, indent=2)
        if cov:
            print(f"kept tokens against the objects (coverage.json; uniform keeping: on-object share "
                  f"{cov[0]['object_patch_share']:.3f}, cover {cov[0]['object_patch_cover']:.3f})", flush=True)
            print("method        keep_ratio  on_object_share  objects_touched  centres_kept  kept_cover", flush=True)
        for c in cov:
            print(f"{c['method']:<13} {c['keep_ratio']:<11.2f} {c['on_object_share']:<16.3f} {c['objects_touched']:<16.3f} "
                  f"{c['object_centres_kept']:<13.3f} {c['kept_object_cover']:.3f}", flush=True)
    print(f"[sweep] {len(summary)} configurations in {time.monotonic() - start:.0f}s; summary: {path}", flush=True)
    return 0 if all(r.get("complete") for r in summary) else 1


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import module_main

    return module_main(sys.modules[__name__], "sweep", argv)


if __name__ == "__main__":
    sys.exit(main())
