"""PruneConfig: what to prune, how much, and where; and the one check of a prune layer."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ep_core.methods import RULES

METHODS = ("none", *RULES)  # "none" observes only; every other name is a selection rule


def check_prune_layer(prune_layer: int, num_layers: int | None = None, *, analytic: bool = False) -> None:
    """Raise ValueError unless ``prune_layer`` K is usable.

    Pruning needs 1 ≤ K ≤ L − 1: layers 0..K−1 see every token and at least one layer sees
    the pruned sequence. ``analytic=True`` (the FLOPs formulas) also allows K = 0 (pruning
    before the decoder) and K = L (no layer pruned). ``num_layers=None`` checks the lower
    bound only (before the model is known).
    """
    lowest = 0 if analytic else 1
    if isinstance(prune_layer, bool) or not isinstance(prune_layer, int) or (num_layers is None and prune_layer < lowest):
        raise ValueError(
            f"prune_layer must be an integer >= {lowest} (layers 0..K-1 always see every token), got {prune_layer!r}"
        )
    if num_layers is not None:
        highest = num_layers if analytic else num_layers - 1
        if not lowest <= prune_layer <= highest:
            raise ValueError(
                f"prune_layer must be between {lowest} and {highest} for this {num_layers}-layer decoder, "
                f"got {prune_layer} (--prune-layer)"
            )


@dataclass(frozen=True)
class PruneConfig:
    """A pruning request.

    Args:
        method: one of ``none``, ``entropyprune``, ``random``, ``fastv``, ``dart``.
        budget: the papers' layer-averaged visual-token count B (see ``ep_core.budget``).
        keep_ratio: share of visual tokens kept after ``prune_layer``, in [0, 1].
        keep_tokens: visual tokens kept after ``prune_layer``, per row, k = min(T, N): the
            official code's LLaVA-1.6 path ("k = B directly", B = 320), with no averaging.
        prune_layer: K, the first decoder layer that sees the pruned sequence (>= 1); None:
            the model family's default (``ep_core.families``: 2 for LLaVA, 1 for Qwen-VL),
            filled in by ``apply_pruning`` (``handle.config`` holds the K used).
        seed: seed of the ``random`` method (mixed with each sample's content).

    Exactly one of ``budget`` / ``keep_ratio`` / ``keep_tokens`` is required, except for
    ``none`` where all may be omitted (everything is kept).
    """

    method: str = "entropyprune"
    budget: float | None = None
    keep_ratio: float | None = None
    prune_layer: int | None = None
    seed: int = 0
    keep_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown pruning method {self.method!r}; choose one of: {', '.join(METHODS)}")
        given = [n for n in ("budget", "keep_ratio", "keep_tokens") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of budget (layer-averaged visual tokens), keep_ratio or keep_tokens, not {' and '.join(given)}")
        if self.method != "none" and not given:
            raise ValueError(
                f"method {self.method!r} needs a budget (e.g. budget=128), a keep_ratio (e.g. keep_ratio=0.25) "
                "or keep_tokens (e.g. keep_tokens=320)"
            )
        if self.keep_tokens is not None and (isinstance(self.keep_tokens, bool) or not isinstance(self.keep_tokens, int)
                                             or self.keep_tokens < 0):
            raise ValueError(f"keep_tokens must be an integer >= 0 visual tokens per row, got {self.keep_tokens!r}")
        if self.budget is not None and not (self.budget >= 0 and math.isfinite(self.budget)):
            raise ValueError(f"budget must be a finite number of visual tokens >= 0, got {self.budget}")
        if self.keep_ratio is not None and not 0.0 <= self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be between 0 and 1, got {self.keep_ratio}")
        if self.prune_layer is not None:
            check_prune_layer(self.prune_layer)

    def to_dict(self) -> dict:
        """Every field: the job identity, the MLflow params. ``keep_tokens`` only when set, so
        that output directories written before it existed keep their identity."""
        fields = asdict(self)
        if fields["keep_tokens"] is None:
            del fields["keep_tokens"]
        return fields

    def row_fields(self) -> dict:
        """The pruning columns of an output row (``prune_layer`` null when nothing is pruned)."""
        return {"method": self.method, "budget": self.budget, "keep_ratio": self.keep_ratio,
                "keep_tokens": self.keep_tokens, "prune_layer": self.prune_layer if self.method != "none" else None}
