"""Validation during training, on held-out scenes and clips (the ``validation`` split).

Two kinds of figures: teacher-forced token accuracy on fixed batches of captions, questions
and clips (also with a random ninth of the visual tokens kept at the prune layer, which must
cost accuracy), and greedy answers scored as ``ep sweep`` scores them.
"""

from __future__ import annotations

import torch
from PIL import Image

from demo import world
from demo.scoring import object_f1, parse_caption
from demo.train.batches import encode
from demo.train.sampler import Sampler
from ep_core import apply_pruning
from ep_core.config import PruneConfig
from ep_core.prompts import chat_prompt
from pipelines.metrics import exact_match


def token_accuracy(model, batch, prune=None) -> float:
    """Teacher-forced accuracy on the answer tokens of a left-padded batch; with ``prune`` (a
    ``PruneConfig``) the visual tokens are pruned on the way (the answer sits at the end of
    every row, so the last logits stay aligned with it)."""
    handle = None
    if prune is not None and prune.method != "none":
        handle = apply_pruning(model, prune)
    try:
        with torch.inference_mode():
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"],
                use_cache=False,
            )
    finally:
        if handle is not None:
            handle.remove()
    labels = batch["labels"]
    has = (labels != -100).any(0).nonzero()
    A = labels.shape[1] - int(has[0])  # the answers live in the last A positions of every row
    logits = out.logits[:, -A - 1 : -1]
    target = labels[:, -A:]
    valid = target != -100
    pred = logits.argmax(-1)
    return float(((pred == target) & valid).sum() / valid.sum())


def generation_quality(model, processor, frames: int, n: int = 48, seed: int = 0) -> dict[str, float]:
    """Greedy answers on held-out (validation split) data, scored as ``ep sweep`` scores them:
    caption object-F1 and VQA exact match over ``n`` scenes (one caption and one question
    each), video exact match over ``n // 4`` clips."""
    if n <= 0:
        return {}
    s = Sampler(seed, frames, split="validation")
    caps, qas, vids = [], [], []
    for i in range(n):
        rng = world.rng_for("validation", seed, i)
        scene = world.make_scene(rng)
        img = [Image.fromarray(world.render_scene(scene))]
        caps.append((img, world.CAPTION_PROMPT, [list(o.key) for o in scene.objects]))
        q = world.image_questions(scene, rng)
        q = q[i % len(q)]
        qas.append((img, q.question, q.answer))
    for i in range(max(1, n // 4)):
        frames_, prompt, answer = s.video_example()
        vids.append((frames_, prompt, answer))

    def answer(items, max_new_tokens):
        outs = []
        for k in range(0, len(items), 16):
            chunk = items[k : k + 16]
            texts = [chat_prompt(processor, len(im), p) for im, p, _ in chunk]
            enc = processor(images=[x for im, _, _ in chunk for x in im], text=texts, return_tensors="pt", padding=True)
            with torch.inference_mode():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
            outs += processor.tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return outs

    model.eval()
    cap_out = answer(caps, 56)
    f1 = sum(object_f1(parse_caption(o), [tuple(x) for x in ref]) for o, (_, _, ref) in zip(cap_out, caps)) / len(caps)
    vqa = sum(exact_match(o, a) for o, (_, _, a) in zip(answer(qas, 4), qas)) / len(qas)
    vid = sum(exact_match(o, a) for o, (_, _, a) in zip(answer(vids, 8), vids)) / len(vids)
    return {"val_caption_object_f1": f1, "val_vqa_acc": vqa, "val_video_acc": vid}


def validation_batches(processor, frames: int, seed: int = 0, n: int = 32) -> dict[str, dict]:
    """Fixed left-padded validation batches: ``n`` captions, ``n`` questions (one per scene)
    and ``max(4, n // 4)`` clips, each with its caption or one of its questions."""
    s = Sampler(seed, frames, split="validation")
    cap = encode(processor, [s.image_example("caption") for _ in range(n)], left_pad=True)
    qa = encode(processor, [s.image_example("qa") for _ in range(n)], left_pad=True)
    vid = encode(processor, [s.video_example() for _ in range(max(4, n // 4))], left_pad=True)
    return {"caption": cap, "qa": qa, "video": vid}


def validation_metrics(model, processor, batches: dict[str, dict], frames: int, n_generate: int) -> dict[str, float]:
    """Token accuracy on each of ``batches`` (:func:`validation_batches`), on the captions again
    with a random ninth of the visual tokens kept at layer 2, and :func:`generation_quality` on
    ``n_generate`` scenes."""
    metrics = {f"val_{k}_token_acc": token_accuracy(model, b) for k, b in batches.items()}
    metrics["val_caption_token_acc_random_1_9"] = token_accuracy(
        model, batches["caption"], PruneConfig("random", keep_ratio=1 / 9, prune_layer=2)
    )
    metrics.update(generation_quality(model, processor, frames, n=n_generate))
    return metrics
