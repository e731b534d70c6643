"""Scoring a configuration's output rows against their references, by kind of reference.

Shapes-world references (``demo.world.build_set``) are JSON objects:

* ``{"task": "vqa", "answer": "red"}``: scored by exact match;
* ``{"task": "caption", "objects": [[size, colour, kind, row, col], ...]}``: the output is
  parsed back into objects (``demo.scoring.parse_caption``) and scored by object-F1;
* ``{"task": "video", "answer": "left"}``: exact match as well.

The headline shapes score (:func:`score_rows` → ``quality``) is the mean of VQA exact-match
accuracy and caption object-F1; video accuracy is reported on its own. Any other reference
(a plain string from a user's manifest) is scored by exact match when it is one word and by
caption token-F1 otherwise; ``quality`` is then the mean of those two where present. A row
without an output (an error row) scores 0 and is counted in ``errors``. The metrics
themselves live in ``pipelines.metrics`` and ``demo.scoring``.
"""

from __future__ import annotations

import json

from demo.scoring import object_f1, parse_caption
from pipelines.metrics import exact_match, normalize, token_f1


def parse_reference(reference) -> dict | None:
    """A reference as a dict: shapes JSON as is, a plain string as ``{"task": "text", ...}``."""
    if reference is None:
        return None
    if isinstance(reference, dict):
        return reference
    text = str(reference)
    if text.strip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict) and "task" in data:
            return data
    if not normalize(text):
        return None
    return {"task": "text", "answer": text}


def score_row(output: str | None, reference) -> tuple[str, float] | None:
    """``(metric, score)`` for one output, or ``None`` when the row has no usable reference.

    Metrics: ``vqa_accuracy``, ``caption_object_f1``, ``video_accuracy`` (shapes),
    ``accuracy`` (one-word plain references), ``caption_token_f1`` (longer plain references).
    """
    ref = parse_reference(reference)
    if ref is None:
        return None
    task = ref.get("task")
    if task == "vqa":
        return "vqa_accuracy", exact_match(output, ref["answer"])
    if task == "caption":
        return "caption_object_f1", object_f1(parse_caption(output), [tuple(o) for o in ref["objects"]])
    if task == "video":
        return "video_accuracy", exact_match(output, ref["answer"])
    answer = str(ref.get("answer", ""))
    if len(normalize(answer).split()) == 1:
        return "accuracy", exact_match(output, answer)
    return "caption_token_f1", token_f1(output, answer)


def score_rows(rows: list[dict]) -> dict:
    """Mean score per metric over rows with ``output``, ``reference`` and ``error`` keys, their
    counts (``n_<metric>``), ``errors``, the headline ``quality`` and, for shapes questions,
    ``vqa_accuracy_by_type`` (question type → exact-match accuracy).

    ``quality`` is the mean of ``vqa_accuracy`` and ``caption_object_f1`` when the rows hold
    shapes references, else the mean of ``accuracy`` and ``caption_token_f1`` where present,
    else ``None``.
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    by_type: dict[str, list[float]] = {}
    errors = 0
    for row in rows:
        if row.get("error"):
            errors += 1
        scored = score_row(None if row.get("error") else row.get("output"), row.get("reference"))
        if scored is None:
            continue
        metric, value = scored
        sums[metric] = sums.get(metric, 0.0) + value
        counts[metric] = counts.get(metric, 0) + 1
        if metric == "vqa_accuracy":
            qtype = (parse_reference(row.get("reference")) or {}).get("qtype")
            if qtype:
                by_type.setdefault(qtype, []).append(value)
    out: dict = {m: sums[m] / counts[m] for m in sums}
    if by_type:  # shapes questions: accuracy per question type (colour_at, count_kind, ...)
        out["vqa_accuracy_by_type"] = {t: sum(v) / len(v) for t, v in sorted(by_type.items())}
    out.update({f"n_{m}": n for m, n in counts.items()})
    out["errors"] = errors
    shapes = [m for m in ("vqa_accuracy", "caption_object_f1") if m in out]
    plain = [m for m in ("accuracy", "caption_token_f1") if m in out]
    headline = shapes or plain
    out["quality"] = sum(out[m] for m in headline) / len(headline) if headline else None
    return out
