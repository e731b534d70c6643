"""The demo model's training: a vision-only stage, then the full model, from random weights.

1. :func:`pretrain_vision`: only the vision tower and the projector learn, from the per-patch
   probes of :class:`~demo.train.patch_probes.AuxHeads` (cheap steps, no decoder).
2. :func:`train`'s main loop: teacher-forced on every answer and caption token of packed
   image and video batches (:mod:`demo.train.batches`), with the per-patch probes and the
   attention supervision (:mod:`demo.train.look_supervision`) added to the LM loss
   (:func:`step_loss`). Validation (:mod:`demo.train.validation`) every ``--eval-every`` steps.

Everything is seeded: the same arguments give the same weights on the same software. Curves
and validation figures go to MLflow (:class:`pipelines.tracking.Tracker`, experiment
``train-demo``); the result is saved with :func:`demo.model.save`.
"""

from __future__ import annotations

import logging
import math
import os
import time

import numpy as np
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from demo import world
from demo.model import build_model, save
from demo.train.batches import encode_packed
from demo.train.look_supervision import LookSupervision
from demo.train.patch_probes import AuxHeads
from demo.train.sampler import Sampler
from demo.train.targets import patch_targets
from demo.train.validation import validation_batches, validation_metrics
from pipelines.tracking import Tracker

log = logging.getLogger(__name__)


def answer_loss(logits, labels, question, question_weight: float = 1.0):
    """Weighted mean cross-entropy over the labelled tokens: ``Σ w·CE / Σ w`` with ``w =
    question_weight`` on the answers to questions and 1 on captions (a scene's caption has
    several times more tokens than all its one-word answers together)."""
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=-100, reduction="none")
    w = torch.where(question.reshape(-1), question_weight, 1.0) * (labels.reshape(-1) != -100)
    return (ce * w).sum() / w.sum().clamp_min(1e-6)


def learning_rate(step: int, peak: float, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5 % of the peak: ``peak·(step+1)/warmup`` while
    ``step < warmup``, then ``peak·(0.05 + 0.95·½·(1 + cos πt))`` with ``t = (step − warmup) /
    max(1, steps − warmup)``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def int_list(text) -> list[int]:
    """``"2,3"`` → ``[2, 3]``; empty entries are dropped (``""`` → ``[]``)."""
    return [int(x) for x in str(text).split(",") if x.strip()]


def pretrain_vision(model, processor, aux: AuxHeads, args, tracker: Tracker) -> None:
    """Stage 1: only the vision tower and the projector learn, from the per-patch targets of
    :class:`AuxHeads` (what covers each patch, and where it is), on single scenes — cheap steps
    without the decoder, so the image tokens already say colour, kind and size when the
    decoder starts learning to look them up. Learning rate: linear warm-up over 100 steps."""
    params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    params += list(aux.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.05)
    start = time.monotonic()
    for step in range(args.vision_steps):
        images, targets = [], []
        for i in range(args.vision_batch_size):
            scene = world.make_scene(world.rng_for("train", args.seed + args.data_offset, step * args.vision_batch_size + i, stream=2))
            images.append(world.render_scene(scene))
            targets.append(patch_targets([(o, *o.center()) for o in scene.objects]))
        pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 100)
        model.model.get_image_features(pixel_values=pixels)  # the projector hook keeps the features
        loss = aux.loss(torch.stack(targets))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step + 1 == args.vision_steps:
            tracker.metrics({"vision_loss": float(loss.detach())}, step)
            log.info("[train-demo] vision step %d loss %.4f %.0fs", step, float(loss.detach()), time.monotonic() - start)


def step_loss(model, batch: dict, aux: AuxHeads | None, look: LookSupervision | None,
              gather: LookSupervision | None, args) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one packed batch (:func:`encode_packed`) and its parts:
    ``lm + aux_weight·aux + look_weight·look + content_weight·(content + keys + gather)``,
    each term present where its supervision is on and the batch has rows for it."""
    labels, targets = batch.pop("labels"), batch.pop("aux_targets")
    look_at, look_keys, look_attrs, look_mode, look_words = (
        batch.pop(k) for k in ("look_at", "look_keys", "look_attrs", "look_mode", "look_words"))
    question = batch.pop("question")
    logits = model(**batch, use_cache=False).logits[:, :-1].float()
    loss = answer_loss(logits, labels[:, 1:], question[:, 1:], args.question_weight)
    parts = {"lm": float(loss.detach())}
    if aux is not None:
        aux_loss = aux.loss(targets)
        parts["aux"] = float(aux_loss.detach())
        loss = loss + args.aux_weight * aux_loss
    if look is not None:
        place_loss, content_loss = look.loss(batch["attention_mask"], look_at, look_keys, look_attrs, look_mode)
        terms = [("look", place_loss, args.look_weight), ("content", content_loss, args.content_weight)]
        if look.content_heads:
            image_pos = batch["input_ids"] == model.config.image_token_id
            terms.append(("keys", look.key_loss(image_pos, targets), args.content_weight))
        if gather is not None:
            no_attrs = torch.full_like(look_attrs, -100)
            terms.append(("gather", gather.loss(batch["attention_mask"], look_at, look_words, no_attrs, look_mode)[1],
                          args.content_weight))
        for name, part, weight in terms:
            if part is not None:
                parts[name] = float(part.detach())
                loss = loss + weight * part
    return loss, parts


def train(args) -> str:
    """Train (or, with ``args.init``, fine-tune) the demo model as the ``ep train-demo``
    arguments say and save it to ``args.output``; returns that directory. A checkpoint is
    saved under ``args.log_dir`` at every validation."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    os.makedirs(args.log_dir, exist_ok=True)

    if args.init:
        model = LlavaForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(args.init)
    else:
        model, processor = build_model(args.seed)
    model.set_attn_implementation("sdpa")
    n_params = sum(p.numel() for p in model.parameters())
    log.info("[train-demo] %.2f M parameters; %d steps", n_params / 1e6, args.steps)
    params = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    params["parameters"] = n_params
    tracker = Tracker(args.log_dir, "train-demo")
    with tracker.run(f"train-demo-seed{args.seed}", params):
        val = validation_batches(processor, args.frames)
        sampler = Sampler(args.seed + args.data_offset, args.frames, workdir=args.log_dir)
        aux = AuxHeads(model, model.config.text_config.hidden_size) if args.aux_weight > 0 else None
        if aux is not None and args.vision_steps > 0 and not args.init:
            model.train()
            pretrain_vision(model, processor, aux, args, tracker)
        look_layers, look_heads = int_list(args.look_layers), int_list(args.look_heads)
        content_heads = int_list(args.content_heads) if args.content_weight > 0 else []
        look = LookSupervision(model, look_layers, look_heads, content_heads) if look_layers and look_heads and args.look_weight > 0 else None
        gather_layers = int_list(args.gather_layers)
        gather = LookSupervision(model, gather_layers, [], content_heads, probes=False) if gather_layers and content_heads and look else None
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
        for extra in (aux, look, gather):
            if extra is not None:
                decay += list(extra.parameters())
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
            lr=args.lr,
            betas=(0.9, 0.98),
        )
        warmup = min(200, args.steps // 10)
        warm_steps = int(args.warm_fraction * args.steps)

        start = time.monotonic()
        ema = None
        for step in range(args.steps if args.stop_at is None else min(args.steps, args.stop_at)):
            model.train()
            warm = step < warm_steps  # curriculum: small scenes first, videos after the warm-up
            if not warm and args.video_every and step % args.video_every == args.video_every - 1:
                batch = encode_packed(processor, [sampler.video_packed() for _ in range(args.video_batch_size)])
            else:
                cap = args.warm_objects if warm else None
                batch = encode_packed(processor, [sampler.image_packed(args.questions, cap) for _ in range(args.batch_size)])
            lr = learning_rate(step, args.lr, args.steps, warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            loss, parts = step_loss(model, batch, aux, look, gather, args)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            value = float(loss.detach())
            ema = value if ema is None else 0.98 * ema + 0.02 * value
            if step % 25 == 0:
                tracker.metrics({"loss": value, "loss_ema": ema, "lr": lr, **{f"loss_{k}": v for k, v in parts.items()}}, step)
            if step % 50 == 0:
                detail = " ".join(f"{k} {v:.3f}" for k, v in parts.items())
                log.info("[train-demo] step %d loss %.4f ema %.4f (%s) %.0fs", step, value, ema, detail, time.monotonic() - start)
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                model.eval()
                metrics = validation_metrics(model, processor, val, args.frames, args.eval_generate)
                metrics["elapsed_s"] = time.monotonic() - start
                tracker.metrics(metrics, step + 1)
                log.info("[train-demo] step %d %s", step + 1, " ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
                save(model, processor, os.path.join(args.log_dir, "checkpoint"))  # a usable model if stopped early
        model.eval()
        save(model, processor, args.output)
    log.info("[train-demo] saved to %s after %.0fs", args.output, time.monotonic() - start)
    return args.output
