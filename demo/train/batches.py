"""Training examples to model inputs.

:func:`encode` makes one sequence per (pictures, prompt, answer) example, labels on the
answer only. :func:`encode_packed` makes one row per :class:`~demo.train.sampler.Packed`
item: the picture prefix once, then every (prompt, answer) branch, each attending to the
prefix and to itself only (a 4-D mask), so a row trains on a caption and many questions for
the price of one picture prefix. It also lays out the targets of the training-only
supervision: the patch labels and, per answer word about objects, where the supervised
heads must look.
"""

from __future__ import annotations

import torch

from demo import world
from demo.train.sampler import Packed
from demo.train.targets import AUX_TARGETS, LOOK_MODES, OWNER
from ep_core.prompts import chat_prompt


def encode(processor, examples, *, left_pad: bool = False):
    """A training batch: input ids (prompt + answer + ``</s>``), labels on the answer only."""
    tok = processor.tokenizer
    ids, labels, pixels = [], [], []
    for images, prompt, answer in examples:
        text = chat_prompt(processor, len(images), prompt)
        enc = processor(images=images, text=[text], return_tensors="pt")
        ans = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        p = enc["input_ids"][0].tolist()
        ids.append(p + ans)
        labels.append([-100] * len(p) + ans)
        pixels.append(enc["pixel_values"])
    length = max(len(x) for x in ids)
    pad = tok.pad_token_id
    input_ids = torch.full((len(ids), length), pad, dtype=torch.long)
    lab = torch.full((len(ids), length), -100, dtype=torch.long)
    mask = torch.zeros((len(ids), length), dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids, labels)):
        sl = slice(length - len(x), length) if left_pad else slice(0, len(x))
        input_ids[i, sl] = torch.tensor(x)
        lab[i, sl] = torch.tensor(y)
        mask[i, sl] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": lab, "pixel_values": torch.cat(pixels)}


def naming_words(q: list[int], at: int, T: int, pair: bool, naming: set[int], relation: set[int]) -> torch.Tensor:
    """``[2, T]``: the positions of the question's words (ids ``q`` from position ``at`` on)
    that name its objects (ids in ``naming``: colours, kinds); for a pair, the first object's
    words in slot 0 and the second's (after the first ``relation`` word) in slot 1."""
    out = torch.zeros(2, T, dtype=torch.bool)
    split = next((j for j, x in enumerate(q) if x in relation), len(q)) if pair else len(q)
    for j, x in enumerate(q):
        if x in naming:
            out[int(pair and j > split), at + j] = True
    if not pair:
        out[1] = out[0]
    return out


def look_target(kind: str, objects: tuple[int, ...], t: int, targets: torch.Tensor, image_pos: torch.Tensor, T: int):
    """Where the supervised heads must look to say answer word ``t`` about ``objects`` (look
    mode ``kind``), in a row of length ``T`` whose pictures have the patch ``targets`` and
    whose image tokens sit at ``image_pos`` ``[n_pictures, n_patches]``: ``(keys, attrs)``,
    ``keys`` ``[2, T]`` bool (the two slots' target positions) and ``attrs`` ``[2, OWNER]``
    (the one looked-at object's patch labels per slot, -100 where a slot has several). None
    where the word gives no target: a word about no object, a count's words after the first,
    an object too small to own a patch."""
    owners = targets[..., OWNER]
    keys = torch.zeros(2, T, dtype=torch.bool)
    attrs = torch.full((2, OWNER), -100, dtype=torch.long)
    if kind == "count":  # the answer word only; "zero" too (all on the first token)
        if t > 0:
            return None
        named = (targets[0, :, AUX_TARGETS.index("middle")] == 1) & torch.isin(owners[0], torch.tensor(objects, dtype=torch.long))
        keys[:, 0] = True
        keys[:, image_pos[0][named]] = True
        return keys, attrs
    if not objects:
        return None
    if kind == "pair":  # slot: (picture, the objects it is about)
        slots = [(0, objects[:1]), (0, objects[1:])]
    elif kind == "content":
        slots = [(0, objects), (0, objects)]
    else:
        slots = [(0, objects), (len(image_pos) - 1, objects)]
    for s, (frame, objs) in enumerate(slots):
        hit = torch.isin(owners[frame], torch.tensor(objs))
        keys[s, image_pos[frame][hit]] = True
        if len(objs) == 1 and hit.any():  # what and where the one looked-at object is
            attrs[s] = targets[frame, int(hit.nonzero()[0]), :OWNER]
    if not keys.any(1).all():  # an object too small to own a patch gives no target
        return None
    return keys, attrs


def encode_packed(processor, items: list[Packed]):
    """A packed training batch: per row, one image prefix shared by several (prompt, answer)
    branches. Each branch attends to the prefix and to itself (a 4-D mask), and its position
    ids continue from the prefix, so every branch sees exactly what a single-prompt
    sequence would; labels cover the answers and their ``</s>``. Rows are right-padded.

    Also: ``aux_targets`` (the items' patch targets, one row per picture) and the attention
    targets of the answer words that are about objects: ``look_at`` ``[N, 2]`` (row, position
    that predicts the word), ``question`` ``[B, T]`` (the labels that answer a question rather
    than caption), ``look_mode`` ``[N]`` (index into :data:`LOOK_MODES`),
    ``look_keys`` ``[2, N, T]`` and ``look_attrs`` ``[N, 2, len(AUX_TARGETS)]`` (the
    attributes of the one object a slot is about, -100 where it is about several or none). A
    "place" word's two slots are its objects' image tokens in the first picture and in the last
    (the same for an image); a "content" word's are both all its objects; a "pair" word's are
    its first and its second object; a "count" answer's are both the row's first token and the
    cell-middle patch of each named object (see :func:`look_target`). ``look_words`` ``[2, N,
    T]``: the question words that name those objects (see :func:`naming_words`), what the
    query-forming heads gather before the look-up."""
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    rows, pixels = [], []
    for item in items:
        ids_all, prefix_len = [], None
        for prompt, answer, about, mode in item.branches:
            text = chat_prompt(processor, len(item.images), prompt)
            if prefix_len is None:
                enc = processor(images=item.images, text=[text], return_tensors="pt")
                pixels.append(enc["pixel_values"])
                full = enc["input_ids"][0].tolist()
                prefix_len = max(i for i, t in enumerate(full) if t == image_id) + 1
                prefix = full[:prefix_len]
                n_img = sum(t == image_id for t in full) // len(item.images)
            else:
                full = tok(text.replace("<image>", "<image>" * n_img), add_special_tokens=True)["input_ids"]
            assert full[:prefix_len] == prefix
            words = tok(answer, add_special_tokens=False)["input_ids"]
            assert len(about) == len(words), (answer, about)
            ids_all.append((full[prefix_len:], words + [tok.eos_token_id], list(about) + [()], LOOK_MODES.index(mode)))
        image_pos = torch.tensor([i for i, t in enumerate(prefix) if t == image_id]).view(len(item.images), -1)
        rows.append((prefix, ids_all, image_pos, item.targets))
    T = max(len(p) + sum(len(q) + len(a) for q, a, _, _ in br) for p, br, _, _ in rows)
    B = len(rows)
    input_ids = torch.full((B, T), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    question = torch.zeros((B, T), dtype=torch.bool)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, 1, T, T), dtype=torch.bool)
    look_at, look_keys, look_attrs, look_modes, look_words = [], [], [], [], []
    naming = {tok.convert_tokens_to_ids(w) for w in (*world.COLORS, *world.KINDS, *world.PLURALS.values())}
    relation = {tok.convert_tokens_to_ids(w) for w in ("left", "above")}
    for b, (prefix, branches, image_pos, targets) in enumerate(rows):
        P = len(prefix)
        input_ids[b, :P] = torch.tensor(prefix)
        position_ids[b, :P] = torch.arange(P)
        mask[b, 0, :P, :P] = torch.ones(P, P, dtype=torch.bool).tril()
        at = P
        for i, (q, a, about, mode) in enumerate(branches):
            seq = q + a
            n = len(seq)
            input_ids[b, at : at + n] = torch.tensor(seq)
            labels[b, at + len(q) : at + n] = torch.tensor(a)
            question[b, at + len(q) : at + n] = i > 0  # every branch after the caption is a question
            position_ids[b, at : at + n] = torch.arange(P, P + n)
            mask[b, 0, at : at + n, :P] = True
            mask[b, 0, at : at + n, at : at + n] = torch.ones(n, n, dtype=torch.bool).tril()
            for t, objects in enumerate(about):  # word t is predicted at position at + len(q) - 1 + t
                kind = LOOK_MODES[mode]
                target = look_target(kind, objects, t, targets, image_pos, T)
                if target is None:
                    continue
                look_at.append((b, at + len(q) - 1 + t))
                look_keys.append(target[0])
                look_attrs.append(target[1])
                look_modes.append(mode)
                look_words.append(naming_words(q, at, T, kind == "pair", naming, relation))
            at += n
        for j in range(at, T):  # padding attends to itself only (no empty softmax rows)
            mask[b, 0, j, j] = True
    # HF shifts labels by one inside the loss: label at position t is predicted from t-1, so
    # the first answer token is predicted from the last prompt token of its own branch.
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "labels": labels,
            "question": question, "pixel_values": torch.cat(pixels), "aux_targets": torch.cat([it.targets for it in items]),
            "look_at": torch.tensor(look_at, dtype=torch.long).view(-1, 2),
            "look_mode": torch.tensor(look_modes, dtype=torch.long),
            "look_words": torch.stack(look_words, 1) if look_words else torch.zeros(2, 0, T, dtype=torch.bool),
            "look_keys": torch.stack(look_keys, 1) if look_keys else torch.zeros(2, 0, T, dtype=torch.bool),
            "look_attrs": torch.stack(look_attrs) if look_attrs else torch.zeros(0, 2, OWNER, dtype=torch.long)}
