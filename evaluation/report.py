"""What a person reads of a sweep: the printed tables, the cost-vs-quality plot, examples.

* :func:`format_table`: one fixed-width row per configuration (:data:`COLUMNS`);
* :func:`format_by_type`: VQA accuracy per question type (shapes questions);
* :func:`table_columns`: the same columns as plain lists (the MLflow table of a sweep);
* :func:`plot`: quality against FLOPs reduction and items/s (``pipelines.tracking``);
* :func:`examples_markdown`: a few inputs with each configuration's answer side by side.
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)

# (summary key, cell format) of the printed table, in order
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


def configuration_name(row: dict) -> str:
    """``method@keep_ratio`` of a summary row, e.g. ``entropyprune@0.33`` (MLflow run names)."""
    return f"{row['method']}@{row['keep_ratio']:.2f}"


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


def table_columns(summary: list[dict]) -> dict[str, list]:
    """The printed table as columns: ``configuration`` (:func:`configuration_name`) and every
    key of :data:`COLUMNS`, numbers rounded to 4 decimals (None where a configuration has no
    value)."""
    columns = {"configuration": [configuration_name(row) for row in summary]}
    for name, _ in COLUMNS:
        columns[name] = [round(v, 4) if isinstance(v, float) else v for v in (row.get(name) for row in summary)]
    return columns


def plot(summary: list[dict], path: str, title: str = "quality vs prefill FLOPs") -> str | None:
    """Quality against FLOPs reduction and against items/s, one line per method; the path, or
    None (and one logged line) when plotting failed."""
    from pipelines.tracking import cost_quality_plot

    try:
        return str(cost_quality_plot(summary, path, title=title))
    except Exception as exc:  # noqa: BLE001 - a plot is a report, not a reason to fail
        log.warning(f"[sweep] plot failed ({type(exc).__name__}: {exc})")
        return None


def examples_markdown(summary: list[dict], limit: int = 6) -> str:
    """Inputs with each configuration's answer, side by side: the first ``limit - 2`` images
    and the first 2 videos (ordered by media type, source, prompt)."""
    from pipelines.sink import read_output

    tables = {}
    for row in summary:
        tables[configuration_name(row)] = {r["sample_id"]: r for r in read_output(row["output"]).to_pylist()}
    if not tables:
        return ""
    first = next(iter(tables.values()))
    ids = sorted(first, key=lambda s: (first[s]["media_type"] or "", first[s]["source"] or "", first[s]["prompt"] or ""))
    picks = [i for i in ids if first[i]["media_type"] == "image"][: limit - 2] + [i for i in ids if first[i]["media_type"] == "video"][:2]
    lines = []
    for sid in picks:
        r = first[sid]
        ref = json.loads(r["reference"]) if r.get("reference") else {}
        want = ref.get("answer") or ref.get("caption") or ""
        lines.append(f"**{r['source']}** — _{r['prompt']}_  \nreference: `{want}`")
        for name, rows in tables.items():
            out = rows.get(sid, {}).get("output")
            lines.append(f"- {name}: `{out}`")
        lines.append("")
    return "\n".join(lines)
