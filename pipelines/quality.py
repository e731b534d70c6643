"""Quality of generated outputs against references: pure functions, no model, no I/O.

Shapes-world references (``pipelines.datasets.shapes.build_set``) are JSON objects:

* ``{"task": "vqa", "answer": "red"}``: scored by :func:`exact_match`;
* ``{"task": "caption", "objects": [[size, colour, kind, row, col], ...]}``: the output is
  parsed back into objects (:func:`parse_caption`) and scored by :func:`object_f1`;
* ``{"task": "video", "answer": "left"}``: :func:`exact_match` as well.

The headline shapes score (:func:`score_rows` → ``quality``) is the mean of VQA exact-match
accuracy and caption object-F1; video accuracy is reported on its own. Any other reference
(a plain string from a user's manifest) is scored by exact match when it is one word and by
caption token-F1 (:func:`token_f1`) otherwise; ``quality`` is then the mean of those two
where present. A row without an output (an error row) scores 0 and is counted in ``errors``.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter

_PUNCT = re.compile(r"[^\w\s]")

SIZES = ("small", "large")
COLORS = ("red", "green", "blue", "yellow", "purple", "white")
KINDS = ("circle", "square", "triangle", "cross")


def normalize(text: str | None) -> str:
    """Lower case, punctuation dropped, whitespace collapsed (``None`` → ``""``)."""
    if text is None:
        return ""
    return " ".join(_PUNCT.sub(" ", str(text).lower()).split())


def exact_match(output: str | None, answer: str) -> float:
    """1.0 when the normalised output equals the normalised answer, else 0.0."""
    return float(normalize(output) == normalize(answer) and normalize(answer) != "")


def parse_caption(text: str | None) -> list[tuple[str, str, str, int, int]]:
    """The objects a shapes caption names, as ``(size, colour, kind, row, col)`` with 0-based
    row and column, in the order written.

    An object is five consecutive words ``rR cC SIZE COLOUR KIND`` (the world's caption
    order; ``SIZE COLOUR KIND rR cC`` is read too); everything else (separators, stray or
    malformed words) is skipped, so a caption cut short still yields the objects it completed.
    """
    words = normalize(text).split()
    out = []
    i = 0

    def pos(r: str, c: str) -> bool:
        return bool(re.fullmatch(r"r[1-9]", r) and re.fullmatch(r"c[1-9]", c))

    def attrs(s: str, c: str, k: str) -> bool:
        return s in SIZES and c in COLORS and k in KINDS

    while i + 5 <= len(words):
        a = words[i : i + 5]
        if pos(a[0], a[1]) and attrs(a[2], a[3], a[4]):
            out.append((a[2], a[3], a[4], int(a[0][1:]) - 1, int(a[1][1:]) - 1))
            i += 5
        elif attrs(a[0], a[1], a[2]) and pos(a[3], a[4]):
            out.append((a[0], a[1], a[2], int(a[3][1:]) - 1, int(a[4][1:]) - 1))
            i += 5
        else:
            i += 1
    return out


def object_f1(predicted, reference) -> float:
    """F1 of two multisets of objects, matched exactly on every field.

    Both empty → 1.0; one empty → 0.0.
    """
    pred = Counter(tuple(p) for p in predicted)
    ref = Counter(tuple(r) for r in reference)
    if not pred and not ref:
        return 1.0
    matched = sum((pred & ref).values())
    if matched == 0:
        return 0.0
    precision = matched / sum(pred.values())
    recall = matched / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def token_f1(output: str | None, reference: str) -> float:
    """Bag-of-words F1 between normalised output and reference (both empty → 1.0)."""
    pred = Counter(normalize(output).split())
    ref = Counter(normalize(reference).split())
    if not pred and not ref:
        return 1.0
    matched = sum((pred & ref).values())
    if matched == 0:
        return 0.0
    precision, recall = matched / sum(pred.values()), matched / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


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


# ---------------------------------------------------------------------------- against the unpruned model
def agreement_with_full(full: dict[str, str | None], pruned: dict[str, str | None]) -> float | None:
    """Share of samples whose pruned output equals the unpruned one.

    agreement = |{i : normalize(pruned_i) = normalize(full_i)}| / |I|, over the sample ids I
    that have an output in both runs (error rows are left out). None when I is empty.
    """
    common = [i for i, text in full.items() if text is not None and pruned.get(i) is not None]
    if not common:
        return None
    return sum(normalize(full[i]) == normalize(pruned[i]) for i in common) / len(common)


def first_token_kl(
    full: tuple[list[int], list[float]], pruned: tuple[list[int], list[float]]
) -> float:
    """KL(p_full ‖ p_pruned) of the first generated token, from stored top-k log-probabilities.

    KL ≈ Σ_{t ∈ top-k(full)} p_f(t) · (log p_f(t) − log p_p(t)), where log p_p(t) is the
    pruned run's stored log-probability of t, or — for a token outside the pruned top-k — its
    smallest stored one (an upper bound on p_p(t), so the term is not overstated). The mass
    outside the full model's top-k is left out. Identical distributions give 0.
    """
    full_ids, full_logprobs = full
    pruned_logprob = dict(zip(*pruned))
    floor = min(pruned[1]) if pruned[1] else float("-inf")
    total = 0.0
    for token, logprob in zip(full_ids, full_logprobs):
        p = math.exp(logprob)
        if p == 0.0:
            continue
        total += p * (logprob - pruned_logprob.get(token, floor))
    return max(total, 0.0)


def mean_first_token_kl(full_rows: dict[str, tuple], pruned_rows: dict[str, tuple]) -> float | None:
    """Mean :func:`first_token_kl` over the sample ids with top-k log-probs in both runs."""
    values = [first_token_kl(full_rows[i], pruned_rows[i]) for i in full_rows if i in pruned_rows]
    return sum(values) / len(values) if values else None


def compare_with_full(full_rows: list[dict], rows: list[dict]) -> dict:
    """``agreement_with_full`` and ``first_token_kl`` of a configuration's output rows against
    the unpruned configuration's rows on the same inputs (matched by ``sample_id``)."""

    def outputs(rs):
        return {r["sample_id"]: r.get("output") for r in rs}

    def first_tokens(rs):
        return {
            r["sample_id"]: (r["first_token_ids"], r["first_token_logprobs"])
            for r in rs
            if r.get("output") is not None and r.get("first_token_ids")
        }

    return {
        "agreement_with_full": agreement_with_full(outputs(full_rows), outputs(rows)),
        "first_token_kl": mean_first_token_kl(first_tokens(full_rows), first_tokens(rows)),
    }
