"""Generic quality metrics of generated text: pure functions, no model, no I/O.

* Against a reference: :func:`exact_match` (one-word answers) and :func:`token_f1` (longer
  texts), both on :func:`normalize`-d text; :func:`f1_of_counts` is the multiset F1 they and
  the shapes world's object-F1 (``demo.scoring``) share.
* Against the unpruned run on the same inputs: :func:`agreement_with_full` (same output) and
  :func:`first_token_kl` (how far the first-token distribution moved), both per configuration
  through :func:`compare_with_full`.
"""

from __future__ import annotations

import math
import re
from collections import Counter

_PUNCT = re.compile(r"[^\w\s]")


def normalize(text: str | None) -> str:
    """Lower case, punctuation dropped, whitespace collapsed (``None`` → ``""``)."""
    if text is None:
        return ""
    return " ".join(_PUNCT.sub(" ", str(text).lower()).split())


def exact_match(output: str | None, answer: str) -> float:
    """1.0 when the normalised output equals the normalised answer, else 0.0."""
    return float(normalize(output) == normalize(answer) and normalize(answer) != "")


def f1_of_counts(pred: Counter, ref: Counter) -> float:
    """F1 of two multisets given as counts.

    matched = |pred ∩ ref| (multiset intersection), P = matched / |pred|, R = matched / |ref|,
    F1 = 2PR / (P + R). Both empty → 1.0; nothing matched (one side empty included) → 0.0.
    """
    if not pred and not ref:
        return 1.0
    matched = sum((pred & ref).values())
    if matched == 0:
        return 0.0
    precision = matched / sum(pred.values())
    recall = matched / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def token_f1(output: str | None, reference: str) -> float:
    """Bag-of-words F1 (:func:`f1_of_counts`) between normalised output and reference."""
    return f1_of_counts(Counter(normalize(output).split()), Counter(normalize(reference).split()))


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
