"""Selection rules: which visual tokens survive the prune layer.

Every rule is a module with two names:

* ``NEEDS``: what it reads from layer K−1, a subset of ``{"queries", "keys", "hidden"}``
  (the hooks capture only what some rule needs);
* either ``select(row: Row, k: int) -> LongTensor``: ``k`` distinct indices into
  ``row.visual_pos``, one sample at a time (a :class:`Row`);
* or ``select_batch(candidates: Candidates) -> BoolTensor [B, W]``: every row's kept visual
  tokens at once, for rules whose score is per token (no per-row loop, no device sync).

Either way a sample's choice depends on that sample only, so it is pruned the same way whatever
batch it is in. Text tokens are never candidates; the hooks keep them all.
"""

from __future__ import annotations

from types import ModuleType

from ep_core.methods import dart, entropyprune, fastv, random
from ep_core.methods.base import Candidates, Row, apply_rope

RULES: dict[str, ModuleType] = {
    "entropyprune": entropyprune,
    "random": random,
    "fastv": fastv,
    "dart": dart,
}

__all__ = ["RULES", "Candidates", "Row", "apply_rope"]
