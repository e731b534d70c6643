"""PruneConfig: what to prune, how much, and where."""

from __future__ import annotations

from dataclasses import asdict, dataclass

METHODS = ("none", "entropyprune", "random", "fastv", "dart")


@dataclass(frozen=True)
class PruneConfig:
    """A pruning request.

    Args:
        method: one of ``none``, ``entropyprune``, ``random``, ``fastv``, ``dart``.
        budget: the papers' layer-averaged visual-token count B (see ``ep_core.budget``).
        keep_ratio: share of visual tokens kept after ``prune_layer``, in [0, 1].
        prune_layer: K, the first decoder layer that sees the pruned sequence (>= 1).
        seed: seed of the ``random`` method (mixed with each sample's content).

    Exactly one of ``budget`` / ``keep_ratio`` is required, except for ``none`` where both
    may be omitted (everything is kept).
    """

    method: str = "entropyprune"
    budget: float | None = None
    keep_ratio: float | None = None
    prune_layer: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown pruning method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.budget is not None and self.keep_ratio is not None:
            raise ValueError("give either budget (layer-averaged visual tokens) or keep_ratio, not both")
        if self.method != "none" and self.budget is None and self.keep_ratio is None:
            raise ValueError(
                f"method {self.method!r} needs a budget (e.g. budget=128) or a keep_ratio (e.g. keep_ratio=0.25)"
            )
        if self.budget is not None and not self.budget >= 0:
            raise ValueError(f"budget must be a number of visual tokens >= 0, got {self.budget}")
        if self.keep_ratio is not None and not 0.0 <= self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be between 0 and 1, got {self.keep_ratio}")
        if isinstance(self.prune_layer, bool) or not isinstance(self.prune_layer, int) or self.prune_layer < 1:
            raise ValueError(
                f"prune_layer must be an integer >= 1 (layers 0..K-1 always see every token), got {self.prune_layer!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)
