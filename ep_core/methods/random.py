"""Random: a uniform random subset of k visual tokens, seeded per sample.

The generator is seeded with ``row.seed`` (the config seed mixed with the sample's tokens and
image), so a sample is pruned the same way alone or in any batch.
"""

from __future__ import annotations

import torch

NEEDS = frozenset()


def select(row, k: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(row.seed)
    return torch.randperm(len(row.visual_pos), generator=generator)[:k].to(row.visual_pos.device)
