"""What the training-only supervision is told: per-patch labels of a picture and the look-up
each question type needs.

Every image token gets the labels :data:`AUX_TARGETS` of its patch (:func:`patch_targets`),
read by the probes of :mod:`demo.train.patch_probes` and :mod:`demo.train.look_supervision`.
Every question type gets a look mode (:func:`look_mode`), which says where the supervised
attention heads must look when they answer it.
"""

from __future__ import annotations

import torch

from demo import world
from demo.model import PATCH

AUX_TARGETS = ("colour", "kind", "size", "row", "col", "n_colour", "n_kind", "middle")
OWNER = len(AUX_TARGETS)  # column of patch_targets holding the covering object's index


# How a question finds its objects: by the grid cell it names ("place", as every caption word
# and video answer does), by their content ("content": all the heads look at all the named
# objects), a pair named by content ("pair": half the heads on each), or a count ("count":
# all the heads split their attention evenly between the sequence's first token and the
# middle patch of each named object's cell, so the first token's share, 1/(n+1), says n).
CONTENT_QTYPES = ("exists", "side", "half")
PAIR_QTYPES = ("left_of", "above")
COUNT_QTYPES = ("count_color", "count_kind")
LOOK_MODES = ("place", "content", "pair", "count")
CONTENT_KEYS = ("colour", "kind", "middle")  # what the content heads' keys must carry (LookSupervision.key_loss)


def look_mode(qtype: str) -> str:
    """The look-up a question type needs (see :data:`LOOK_MODES`)."""
    if qtype in COUNT_QTYPES:
        return "count"
    return "pair" if qtype in PAIR_QTYPES else "content" if qtype in CONTENT_QTYPES else "place"


def aux_classes() -> dict[str, int]:
    """Classes of each auxiliary per-patch target (index 0 of colour/kind/size is "nothing")."""
    return {"colour": len(world.COLORS) + 1, "kind": len(world.KINDS) + 1, "size": len(world.SIZES) + 1,
            "row": world.GRID, "col": world.GRID, "n_colour": world.MAX_OBJECTS + 1, "n_kind": world.MAX_OBJECTS + 1,
            "middle": 2}


def is_cell_middle(pr: int, pc: int, patch: int = PATCH) -> bool:
    """Whether patch (row ``pr``, column ``pc``) holds the centre of its grid cell: the cell
    spans ``[c·CELL, (c+1)·CELL)`` pixels, its centre is at ``(c + ½)·CELL``."""
    cell = world.CELL
    return all(int((pos * patch) // cell * cell + cell / 2) // patch == pos for pos in (pr, pc))


def patch_targets(placed, patch: int = PATCH) -> torch.Tensor:
    """Auxiliary labels of the image tokens of one picture: ``[n_patches, 9]`` long, columns
    :data:`AUX_TARGETS` then the owner. colour/kind/size are those of the object covering the
    patch (1-based indices into the world's lists, 0 = no object); row/col are the grid cell
    the patch lies in; n_colour/n_kind count the picture's objects of that object's colour /
    kind (0 = no object); middle is 1 on the middle patch of each grid cell (where a count
    question's heads look: one token per object, objects sit in distinct cells); the owner is
    that object's index in ``placed`` (-1 = none).
    ``placed`` is ``[(obj, cx, cy), ...]`` as drawn."""
    owner = world.patch_objects(placed, patch)
    g = world.IMAGE_SIZE // patch
    colours, kinds, sizes = list(world.COLORS), list(world.KINDS), list(world.SIZES)
    out = torch.zeros(g * g, len(AUX_TARGETS) + 1, dtype=torch.long)
    out[:, OWNER] = torch.as_tensor(owner)
    for j, i in enumerate(owner.tolist()):
        pr, pc = divmod(j, g)
        out[j, 3], out[j, 4] = pr * patch // world.CELL, pc * patch // world.CELL
        out[j, 7] = int(is_cell_middle(pr, pc, patch))
        if i >= 0:
            o = placed[i][0]
            out[j, 0], out[j, 1], out[j, 2] = colours.index(o.color) + 1, kinds.index(o.kind) + 1, sizes.index(o.size) + 1
            out[j, 5] = sum(p.color == o.color for p, _, _ in placed)
            out[j, 6] = sum(p.kind == o.kind for p, _, _ in placed)
    return out
