"""Scoring in the shapes world: a caption read back into objects, and object-F1.

A shapes caption (``demo.world.caption``) lists objects as ``rR cC SIZE COLOUR KIND``;
:func:`parse_caption` reads a generated caption back into ``(size, colour, kind, row, col)``
tuples and :func:`object_f1` scores them against the scene's objects (every field must match).
The words of an object are the world's own (:data:`demo.world.SIZES`, ``COLORS``, ``KINDS``).
"""

from __future__ import annotations

import re
from collections import Counter

from demo.world import COLORS, KINDS, SIZES
from pipelines.metrics import f1_of_counts, normalize


def _is_position(row: str, col: str) -> bool:
    return bool(re.fullmatch(r"r[1-9]", row) and re.fullmatch(r"c[1-9]", col))


def _is_object(size: str, colour: str, kind: str) -> bool:
    return size in SIZES and colour in COLORS and kind in KINDS


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
    while i + 5 <= len(words):
        a = words[i : i + 5]
        if _is_position(a[0], a[1]) and _is_object(a[2], a[3], a[4]):
            out.append((a[2], a[3], a[4], int(a[0][1:]) - 1, int(a[1][1:]) - 1))
            i += 5
        elif _is_object(a[0], a[1], a[2]) and _is_position(a[3], a[4]):
            out.append((a[0], a[1], a[2], int(a[3][1:]) - 1, int(a[4][1:]) - 1))
            i += 5
        else:
            i += 1
    return out


def object_f1(predicted, reference) -> float:
    """F1 of two multisets of objects, matched exactly on every field
    (:func:`pipelines.metrics.f1_of_counts`). Both empty → 1.0; one empty → 0.0."""
    return f1_of_counts(Counter(tuple(p) for p in predicted), Counter(tuple(r) for r in reference))
