"""``ep bench all [--quick] [--output DIR] [--readme README.md]``: every bench, one JSON, one table.

Runs overhead, prefill, decode, e2e and pipeline in turn (each with its defaults, or the
``--quick`` settings below), writes ``DIR/bench_all.json`` (every bench's full result, the
machine, the date, the settings) and ``DIR/bench_all.md`` (the tables the README shows), and
with ``--readme`` replaces the block between ``<!-- bench-all:start -->`` and
``<!-- bench-all:end -->`` in that file by the new tables. A bench that fails is recorded
with its error and the others still run (exit status 1 then). ``--only NAMES`` reruns those
benches and keeps the others' results from ``DIR/bench_all.json`` (same mode), so one bench
can be measured again without the whole run; each bench's result keeps its own machine and date.

``--quick`` (under 10 minutes on 2 cores): prefill and decode at batch 1 only, fewer rounds
and steps, 64 demo items for e2e and 1024 for the pipeline. The full run takes about 27
minutes on 2 cores (prefill at batch 8 dominates: 17 minutes).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import time

log = logging.getLogger(__name__)

BENCH_ORDER = ("overhead", "prefill", "decode", "e2e", "pipeline", "batching")
QUICK = {
    "overhead": ["--repeats", "2", "--batch-rows", "8"],
    "batching": ["--images", "1024"],
    "prefill": ["--batches", "1", "--pairs", "3"],
    "decode": ["--budgets", "128", "--pairs", "2", "--new-tokens", "4"],
    "e2e": ["--items", "64", "--repeats", "2"],
    "pipeline": ["--items", "1024"],
}
START, END = "<!-- bench-all:start -->", "<!-- bench-all:end -->"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="smaller settings: under 10 minutes on 2 cores")
    parser.add_argument("--output", default="bench_results", help="folder for bench_all.json and bench_all.md")
    parser.add_argument("--readme", default=None, help="replace the bench-all block of this markdown file")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(BENCH_ORDER)}")


def bench_args(name: str, argv: list[str]) -> argparse.Namespace:
    """The namespace ``ep bench NAME ARGV`` would get (the bench's own defaults)."""
    from jobs.bench import BENCHES

    module = importlib.import_module(BENCHES[name][0])
    parser = argparse.ArgumentParser(prog=f"ep bench {name}")
    parser.add_argument("--json", action="store_true")
    if hasattr(module, "add_arguments"):
        module.add_arguments(parser)
    return parser.parse_args(argv)


def run_benches(names: list[str], quick: bool) -> dict:
    """``{name: result}`` of each bench (``{"error": ...}`` for one that raised)."""
    from bench import machine
    from jobs.bench import BENCHES

    results = {}
    for name in names:
        argv = QUICK.get(name, []) if quick else []
        log.info("ep bench %s %s", name, " ".join(argv))
        start = time.perf_counter()
        try:
            result = importlib.import_module(BENCHES[name][0]).run(bench_args(name, argv))
        except Exception as exc:  # noqa: BLE001 - one failed bench must not lose the others
            log.warning("ep bench %s failed: %s", name, exc)
            result = {"error": f"{type(exc).__name__}: {exc}"}
        result["argv"] = argv
        result["seconds"] = round(time.perf_counter() - start, 1)
        result.setdefault("machine", machine.describe())
        results[name] = result
        log.info("ep bench %s: %.0f s", name, result["seconds"])
    return results


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _x(x: float) -> str:
    return f"{x:.2f}×"


def markdown(results: dict, machine: dict, quick: bool) -> str:
    """The README's performance tables from ``run_benches`` output (pure: testable on fakes)."""
    from bench.machine import one_line

    command = "ep bench all" + (" --quick" if quick else "")
    lines = [f"Measured by `{command}` on {one_line(machine)}.", ""]
    failed = [f"`{name}`: {r['error']}" for name, r in results.items() if "error" in r]

    prefill = results.get("prefill", {})
    if "results" in prefill:
        lines += [f"**Prefill** ({prefill['shape']} shape, {prefill['layers']} layers, K = {prefill['prune_layer']}, "
                  f"{prefill['visual_tokens']} visual + {prefill['text_tokens']} text tokens, {prefill['dtype']}, "
                  f"{prefill['device']}; goal: efficiency ≥ {prefill['goal_efficiency']})", "",
                  "| budget | kept | batch | unpruned ms | pruned ms | ideal speedup | measured speedup | efficiency |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in prefill["results"]:
            lines.append(f"| {r['budget']} | {r['kept']} | {r['batch']} | {r['unpruned_ms']:.0f} | {r['pruned_ms']:.0f} | "
                         f"{_x(r['ideal_speedup'])} | {_x(r['measured_speedup'])} | **{r['efficiency']:.2f}** |")
        lines.append("")
    decode = results.get("decode", {})
    if "results" in decode:
        lines += [f"**Decode** (same shape, batch {decode['results'][0]['batch']}, {decode['new_tokens']} steps per block; "
                  f"goal: hook cost ≤ {_pct(decode['goal_hook_cost_share'])} of a step)", "",
                  "| budget | kept | unpruned step ms | pruned step ms | decode speedup | ideal (FLOPs) | ideal (bytes) | hook cost |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in decode["results"]:
            lines.append(f"| {r['budget']} | {r['kept']} | {r['unpruned_step_ms']:.1f} | {r['pruned_step_ms']:.1f} | "
                         f"{_x(r['decode_speedup'])} | {_x(r['ideal_decode_speedup'])} | "
                         f"{_x(r['ideal_decode_speedup_bytes'])} | **{_pct(r['hook_cost_share'])}** |")
        lines += ["", f"Hooks installed with nothing to prune vs no hooks: {_pct(decode['hook_cost_share_ab'])} of a step.", ""]
    e2e = results.get("e2e", {})
    if "results" in e2e:
        lines += [f"**End to end, demo model** ({e2e['items']} scenes through the pipeline, batch {e2e['batch_size']}, "
                  f"up to {e2e['max_new_tokens']} new tokens)", "",
                  "| configuration | items/s | prefill ms / item | decode ms / step | KV cache / item | visual tokens kept |",
                  "|---|---|---|---|---|---|"]
        for r in e2e["results"]:
            lines.append(f"| {r['config']} | {r['items_per_s']:.2f} | {r['prefill_ms_per_item']:.2f} | "
                         f"{r['decode_ms_per_step']:.2f} | {r['kv_cache_bytes_per_item'] / 1024:.0f} KiB | {r['visual_tokens_kept']} |")
        lines.append("")
        if "model_7b" in e2e:
            lengths = [k.removeprefix("speedup_e2e_") for k in e2e["model_7b"][0] if k.startswith("speedup_e2e_")]
            lines += ["**LLaVA-1.5-7B, modelled from one real-width layer timed on this machine** (estimate, batch 1, "
                      f"{e2e['model_7b_flop_rate_gflops']:.0f} GFLOP/s; G = caption tokens)", "",
                      "| configuration | vision ms | prefill ms | decode ms / token | prefill speedup | "
                      + " | ".join(f"end to end, G = {g}" for g in lengths) + " |",
                      "|---|---|---|---|---|" + "---|" * len(lengths)]
            for r in e2e["model_7b"]:
                lines.append(f"| {r['config']} | {r['vision_ms']:.0f} | {r['prefill_ms']:.0f} | {r['decode_ms_per_token']:.0f} | "
                             f"{_x(r['speedup_prefill'])} | " + " | ".join(_x(r[f'speedup_e2e_{g}']) for g in lengths) + " |")
            lines.append("")
    batching = results.get("batching", {})
    if "results" in batching:
        lines += [f"**Generate calls, LLaVA-NeXT anyres** ({batching['images']} COCO-like image sizes, "
                  f"{batching['distinct_visual_token_counts']} distinct visual-token counts, median "
                  f"{batching['visual_tokens_median']:.0f}; goal: ≥ {_pct(batching['goal']['fill'])} of the rows the "
                  f"budget allows, padding ≤ {_pct(batching['goal']['padding_share'])})", "",
                  "| batch size | batch tokens | rows / call, exact-count groups | rows / call, packed | allowed | fill | "
                  "padding | padding after K (keep " + f"{batching['keep_ratio']:g}) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in batching["results"]:
            budget = f"{r['batch_tokens']}" + (" (GPU default)" if r["batch_tokens"] == batching["gpu_default_batch_tokens"] else "")
            lines.append(f"| {r['batch_size']} | {budget} | {r['exact_count_rows_per_generate']:.2f} | "
                         f"**{r['rows_per_generate']:.2f}** | {r['rows_allowed_per_generate']:.2f} | {_pct(r['fill'])} | "
                         f"{_pct(r['padding_share'])} | {_pct(r['padding_share_after_prune'])} |")
        lines.append("")
    pipeline = results.get("pipeline", {})
    overhead = results.get("overhead", {})
    if "ratio" in pipeline or "scoring_ms" in overhead:
        lines += ["| benchmark | figure |", "|---|---|"]
        if "ratio" in pipeline:
            lines.append(f"| `ep bench pipeline` ({pipeline['items']} items) | bare loop {pipeline['bare_items_per_s']:.1f} items/s, "
                         f"pipeline {pipeline['pipeline_items_per_s']:.1f} items/s: **ratio {pipeline['ratio']:.2f}** "
                         f"(goal ≥ 0.8), steady ratio {pipeline['steady_ratio']:.2f}"
                         + (f", model actor busy {_pct(pipeline['actor_busy_share'])} (goal ≥ 90%)"
                            if pipeline.get("actor_busy_share") is not None else "") + " |")
        if "scoring_ms" in overhead:
            lines.append(f"| `ep bench overhead` | scoring {overhead['scoring_ms']:.0f} ms against an estimated "
                         f"{overhead['prefill_ms_estimated'] / 1000:.1f} s prefill: **{_pct(overhead['scoring_fraction_of_prefill'])}** "
                         f"(goal ≤ {_pct(overhead['goal_fraction'])}) |")
            for b in overhead.get("batch_scoring", []):
                lines.append(f"| `ep bench overhead`, one scoring call per batch | {b['rows']} rows × {b['tokens']} tokens, "
                             f"{b['heads']} heads: {b['one_call_ms']:.0f} ms ({b['one_call_ms_per_row']:.1f} ms per row; "
                             f"row by row {b['per_row_calls_ms']:.0f} ms) |")
        lines.append("")
    if failed:
        lines += ["Failed: " + "; ".join(failed), ""]
    return "\n".join(lines).rstrip() + "\n"


def previous_results(json_path: str, quick: bool) -> dict:
    """The benches of an earlier ``ep bench all`` run in the same folder and mode, so that
    ``--only`` reruns a subset and keeps the rest (an unreadable or other-mode file: nothing)."""
    try:
        with open(json_path, encoding="utf-8") as f:
            earlier = json.load(f)
    except (OSError, ValueError):
        return {}
    if earlier.get("quick") != quick:
        log.warning("%s holds a %s run: --only starts a new table", json_path, "--quick" if earlier.get("quick") else "full")
        return {}
    return dict(earlier.get("benches") or {})


def replace_block(text: str, block: str, path: str) -> str:
    """``text`` with the part between the bench-all markers replaced by ``block``."""
    if START not in text or END not in text or text.index(START) > text.index(END):
        raise ValueError(f"{path} has no {START} … {END} block to replace; add the two markers where the table goes")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}{END}{tail}"


def run(args: argparse.Namespace) -> dict:
    from bench import machine

    names = list(BENCH_ORDER)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCH_ORDER]
        if unknown:
            raise ValueError(f"--only: unknown bench {', '.join(unknown)}; choose from {', '.join(BENCH_ORDER)}")
    if args.readme is not None:
        with open(args.readme, encoding="utf-8") as f:
            replace_block(f.read(), "", args.readme)  # refuse a file without markers before hours of work
    os.makedirs(args.output, exist_ok=True)
    json_path = os.path.join(args.output, "bench_all.json")
    md_path = os.path.join(args.output, "bench_all.md")
    earlier = previous_results(json_path, args.quick) if args.only else {}
    results = {**earlier, **run_benches(names, args.quick)}
    results = {name: results[name] for name in BENCH_ORDER if name in results}
    info = machine.describe()
    table = markdown(results, info, args.quick)
    everything = {"machine": info, "quick": args.quick, "benches": results}
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(everything, f, indent=2, sort_keys=True)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(table)
    if args.readme is not None:
        with open(args.readme, encoding="utf-8") as f:
            text = f.read()
        with open(args.readme, "w", encoding="utf-8") as f:
            f.write(replace_block(text, table, args.readme))
    failed = sorted(n for n, r in results.items() if "error" in r)
    summary = {"json": json_path, "markdown": md_path, "benches": ",".join(names),
               "failed": ",".join(failed) or "none", "seconds": round(sum(results[n].get("seconds", 0.0) for n in names), 1)}
    if args.readme is not None:
        summary["readme"] = args.readme
    if failed:
        summary["exit_status"] = 1
    return summary
