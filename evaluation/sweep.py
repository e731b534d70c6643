"""The sweep harness: every (method, keep ratio) through the captioning pipeline on the same
inputs, scored, compared with the unpruned run, saved and recorded.

:func:`sweep` is what ``ep sweep`` runs (:class:`SweepSettings` = its flags). The engine,
:func:`run_sweep`, also serves ``ep demo`` (``evaluation.demo_job``):

1. every configuration runs through ``pipelines.caption.run_caption`` on one Ray session
   (``pipelines.cluster.ray_session``) and writes its Parquet rows under
   ``OUTPUT/runs/<method>_<keep ratio>``;
2. :func:`summarize` scores the rows (``evaluation.scoring``) and adds costs: one summary
   object per configuration (method, keep_ratio, budget, quality and its parts, items_per_s,
   flops_reduction, visual_tokens_kept_mean, errors, prefill_ms_per_item; ``items_per_s`` is
   end to end, model actor start-up included, ``generate_items_per_s`` counts model time
   only);
3. :func:`add_comparison_with_full` adds ``agreement_with_full`` and ``first_token_kl``
   against the unpruned configuration;
4. :func:`record_sweep` writes ``OUTPUT/summary.json`` and ``OUTPUT/quality_vs_flops.png``
   and records the MLflow runs (``evaluation.mlflow_runs``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, replace

from evaluation.mlflow_runs import log_sweep
from evaluation.report import plot

log = logging.getLogger(__name__)

Configuration = tuple[str, float | None]  # (method, keep ratio); ratio None = everything kept


def parse_list(text: str, kind=str) -> list:
    """``"a, b,c"`` → ``[kind("a"), kind("b"), kind("c")]``; an empty list is an error."""
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    if not items:
        raise ValueError(f"empty list: {text!r}")
    try:
        return [kind(x) for x in items]
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a list of {kind.__name__}") from None


def configurations(methods: list[str], keep_ratios: list[float]) -> list[Configuration]:
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


def check_configurations(model: str, configs: list[Configuration], prune_layer: int, seed: int) -> list:
    """The ``PruneConfig`` of every configuration, each checked against the model's config
    alone (family, method, prune layer): a usage error in one line, before data or Ray."""
    from ep_core.config import PruneConfig
    from ep_core.families import check_supported
    from ep_core.loading import load_model_config

    model_config = load_model_config(model)
    prunes = [PruneConfig(method=method, keep_ratio=ratio, prune_layer=prune_layer, seed=seed) for method, ratio in configs]
    for prune in prunes:
        check_supported(model_config, prune)
    return prunes


def prepare_dataset(dataset: str, data_dir: str, *, n: int, videos: int | None, seed: int) -> str:
    """The manifest to sweep over: ``shapes`` draws ``n`` test images and ``videos`` clips
    (default ``n // 2``) from ``seed`` into ``data_dir``; anything else is an existing
    manifest or directory, used as is."""
    if dataset == "shapes":
        from demo.world import build_set

        if n < 1:
            raise ValueError(f"--n must be >= 1, got {n}")
        videos = n // 2 if videos is None else videos
        return build_set(data_dir, n_images=n, n_videos=videos, seed=seed, split="test")
    if not os.path.exists(dataset):
        raise FileNotFoundError(f"dataset not found: {dataset} (use 'shapes' or a manifest / directory)")
    return dataset


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
    from evaluation.scoring import score_rows

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


def run_sweep(
    *,
    model: str,
    manifest: str,
    output: str,
    configs: list[Configuration],
    prune_layer: int = 2,
    frames: int = 4,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    workers: int = 1,
    num_cpus: int | None = None,
    address: str | None = None,
    seed: int = 0,
) -> list[dict]:
    """Run every configuration through the pipeline on one Ray session; the summary list
    (with the comparison against the unpruned configuration, when there is one)."""
    from ep_core.loading import load_model_config
    from pipelines.caption import CaptionConfig, run_caption
    from pipelines.cluster import ray_session
    from pipelines.sink import read_output
    from pipelines.tracking import output_metrics

    num_layers = load_model_config(model).get_text_config().num_hidden_layers
    prunes = check_configurations(model, configs, prune_layer, seed)  # every usage error before Ray starts
    summary = []
    tables = []  # per configuration: its output rows (a pyarrow table)
    with ray_session(address, num_cpus, label="sweep"):
        for (method, ratio), prune in zip(configs, prunes):
            tag = f"{method}_{'all' if ratio is None else f'{ratio:g}'}"
            run_dir = os.path.join(output, "runs", tag)
            shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: items/s must measure this run
            cfg = CaptionConfig(
                model=model,
                input=manifest,
                output=run_dir,
                prune=prune,
                max_new_tokens=max_new_tokens,
                frames=frames,
                batch_size=batch_size,
                workers=workers,
                run_id=tag,
            )
            log.info(f"[sweep] {tag}: running")
            result = run_caption(cfg, quiet=True)
            table = read_output(run_dir)
            entry = summarize(method, ratio, table.to_pylist(), result.seconds, num_layers, prune_layer)
            costs = output_metrics(table)
            for key in ("prefill_ms_per_item", "flops_reduction_paper", "kv_cache_bytes_mean"):
                entry[key] = costs.get(key)
            entry["complete"] = result.complete
            entry["output"] = run_dir
            summary.append(entry)
            tables.append(table)
            q = entry.get("quality")
            log.info(
                f"[sweep] {tag}: quality {'-' if q is None else f'{q:.3f}'}, "
                f"{entry['items_per_s'] or 0:.2f} items/s, {entry['errors']} errors"
                + ("" if result.complete else f", INCOMPLETE ({result.failure or 'rows missing'})")
            )
    add_comparison_with_full(summary, tables)
    return summary


def add_comparison_with_full(summary: list[dict], tables: list) -> None:
    """Add ``agreement_with_full`` and ``first_token_kl`` (``pipelines.metrics.compare_with_full``)
    of every configuration against the unpruned one; ``tables[i]`` holds the output rows of
    ``summary[i]``. Nothing is added when no configuration is unpruned."""
    from pipelines.metrics import compare_with_full

    full = next((i for i, entry in enumerate(summary) if entry["method"] == "none"), None)
    if full is None:
        return
    full_rows = tables[full].to_pylist()
    for entry, table in zip(summary, tables):
        entry.update(compare_with_full(full_rows, table.to_pylist()))


def record_sweep(output: str, summary: list[dict], params: dict, *, experiment: str, title: str,
                 artifacts: tuple[str, ...] = ()) -> tuple[str, str | None, str | None]:
    """Write ``OUTPUT/summary.json`` and ``OUTPUT/quality_vs_flops.png`` and record the MLflow
    runs (with ``artifacts`` on the parent run); ``(summary path, plot path or None, tracking
    URI or None)``."""
    path = os.path.join(output, "summary.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    plot_path = plot(summary, os.path.join(output, "quality_vs_flops.png"), title=title)
    uri = log_sweep(output, params, summary, [path, *artifacts] + ([plot_path] if plot_path else []), experiment=experiment)
    return path, plot_path, uri


@dataclass
class SweepSettings:
    """The settings of ``ep sweep``, one field per flag (lists as the comma-separated text)."""

    model: str
    dataset: str
    output: str
    n: int = 60
    videos: int | None = None
    seed: int = 1
    methods: str = "none,entropyprune,random,fastv,dart"
    keep_ratios: str = "1.0,0.33,0.11"
    prune_layer: int | str | None = None  # None: the family's default; or "auto" (ep_core.ecl.resolve_prune_layer)
    frames: int = 4
    max_new_tokens: int = 64
    batch_size: int = 8
    workers: int = 1
    num_cpus: int | None = None
    address: str | None = None
    random_seed: int = 0
    coverage: bool = False
    profile: str | None = None  # with prune_layer "auto": the profile file


@dataclass
class SweepReport:
    """What a finished sweep (or demo) leaves behind."""

    summary: list[dict]
    summary_path: str
    plot_path: str | None
    mlflow_uri: str | None
    seconds: float  # from the first configuration to the end
    coverage: list[dict] | None = None  # ep sweep --coverage on shapes (demo.coverage)
    examples_path: str | None = None  # ep demo: examples.md

    @property
    def complete(self) -> bool:
        """Every configuration wrote a row for every input."""
        return all(r.get("complete") for r in self.summary)


def sweep(s: SweepSettings) -> SweepReport:
    """``ep sweep``: the dataset, every configuration, ``summary.json``, the plot, the MLflow
    runs and, with ``coverage`` on shapes, ``OUTPUT/coverage.json`` (``demo.coverage``)."""
    from ep_core.ecl import resolve_prune_layer

    s = replace(s, prune_layer=resolve_prune_layer(s.prune_layer, s.model, s.profile))
    configs = configurations(parse_list(s.methods), parse_list(s.keep_ratios, float))
    check_configurations(s.model, configs, s.prune_layer, s.random_seed)
    os.makedirs(s.output, exist_ok=True)
    manifest = prepare_dataset(s.dataset, os.path.join(s.output, "data"), n=s.n, videos=s.videos, seed=s.seed)
    start = time.monotonic()
    summary = run_sweep(
        model=s.model,
        manifest=manifest,
        output=s.output,
        configs=configs,
        prune_layer=s.prune_layer,
        frames=s.frames,
        max_new_tokens=s.max_new_tokens,
        batch_size=s.batch_size,
        workers=s.workers,
        num_cpus=s.num_cpus,
        address=s.address,
        seed=s.random_seed,
    )
    params = {"model": s.model, "dataset": s.dataset, "n": s.n, "seed": s.seed, "prune_layer": s.prune_layer,
              "frames": s.frames, "batch_size": s.batch_size, "max_new_tokens": s.max_new_tokens,
              "methods": s.methods, "keep_ratios": s.keep_ratios}
    path, plot_path, uri = record_sweep(s.output, summary, params, experiment="sweep", title="quality vs prefill FLOPs")
    coverage = None
    if s.coverage and s.dataset == "shapes":
        from demo.coverage import object_coverage

        coverage = object_coverage(s.model, configs, n=min(s.n, 60), seed=s.seed, prune_layer=s.prune_layer)
        with open(os.path.join(s.output, "coverage.json"), "w", encoding="utf-8") as fh:
            json.dump(coverage, fh, indent=2)
    return SweepReport(summary, path, plot_path, uri, time.monotonic() - start, coverage=coverage)
