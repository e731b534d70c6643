"""``ep train-demo``: train the shipped demo LLaVA from scratch on CPU on the shapes world.

    ep train-demo [--output ep_core/demo_model] [--steps N] [--batch-size B] [--seed S]
                  [--log-dir outputs/train_demo]

The model is a stock ``LlavaForConditionalGeneration``: a CLIP vision tower (48×48 input,
patch 4 → 144 visual tokens per image), the LLaVA two-layer projector, and a Llama decoder
with 6 layers, 16 query heads and 4 KV heads (GQA). The tokenizer is word-level (built with
``tokenizers``) over the world's vocabulary; the processor is a real ``LlavaProcessor`` with
a chat template. A video is given as its frames, one image each, in one prompt — how the
pipeline feeds any image-only LLaVA a video.

Training is teacher-forced on every answer and caption token (the prompt is masked out),
on scenes drawn on the fly from the ``train`` split, plus an auxiliary loss on the image
tokens of scenes: the logits at the image token of patch j must name the colour of the
object covering patch j (or ``nothing``), read from the pixels. Without it the image
features collapsed into one large constant vector (4 % variation across patches) and the
decoder learnt the text prior only; the logits at image positions are never used when
generating, so the model stays a plain LLaVA. A warm-up curriculum comes first
(scenes of 1–2 objects, images only: without it the decoder sat on the text prior for
hundreds of steps without looking at the image); then steps alternate between image batches
(dense captions and questions) and video batches (frames decoded from real mp4 files with
decord, as the pipeline does). Everything is seeded: the same command gives the same
weights on the same software. The loss curve and validation accuracy go to MLflow
(``MLFLOW_TRACKING_URI``, else SQLite under ``--log-dir``); a logging failure never stops
training. The result is written with ``save_pretrained`` (weights, config, tokenizer,
processor, chat template) and loads with ``from_pretrained`` / ``ep_core.loading.load_model``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
    "{% if c['type']=='image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# architecture (see module docstring)
IMAGE_SIZE = 48
PATCH = 4
VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4)
TEXT = dict(hidden_size=192, intermediate_size=384, num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=4)
VIDEO_TRAIN_FRAMES = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default=None, help="where to save the model (default: ep_core/demo_model in the repo)")
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps (default 3000)")
    parser.add_argument("--batch-size", type=int, default=8, help="scenes per image batch (default 8)")
    parser.add_argument("--questions", type=int, default=10, help="questions packed with each scene's caption (default 10)")
    parser.add_argument("--video-every", type=int, default=3, help="every N-th step is a video batch (default 3)")
    parser.add_argument("--video-batch-size", type=int, default=4, help="clips per video batch (default 4)")
    parser.add_argument("--frames", type=int, default=VIDEO_TRAIN_FRAMES, help="frames per training video (default 4)")
    parser.add_argument("--aux-weight", type=float, default=0.2, help="weight of the patch-colour loss on image tokens (default 0.2)")
    parser.add_argument("--aux-mode", default="colour", help="image-token labels: colour or colour+position (default colour)")
    parser.add_argument("--stop-at", type=int, default=None, help="stop (and save) after this many steps of the --steps schedule")
    parser.add_argument("--data-offset", type=int, default=0, help="added to --seed for the training data stream (a second stage sees new scenes)")
    parser.add_argument("--warm-fraction", type=float, default=0.2, help="share of steps on small image-only scenes first (default 0.2)")
    parser.add_argument("--warm-objects", type=int, default=2, help="objects per scene during the warm-up (1..N, default 2)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared 2-core machine two threads spin-wait; measured 12 s/step vs 1.9 s/step)")
    parser.add_argument("--eval-every", type=int, default=250, help="validate every N steps (default 250)")
    parser.add_argument("--log-dir", default="outputs/train_demo", help="MLflow SQLite and log files (default outputs/train_demo)")
    parser.add_argument("--init", default=None, help="start from this saved model instead of random weights")


# ------------------------------------------------------------------------------ model


def build_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from pipelines.datasets.shapes import vocabulary

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    words = sorted(set(vocabulary()) | {"user", "assistant", ":"})
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def build_model(seed: int = 0):
    """A randomly initialised demo LLaVA and its processor."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = build_tokenizer()
    n_vis = (IMAGE_SIZE // PATCH) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, **VISION),
        text_config=LlamaConfig(
            vocab_size=len(tok),
            max_position_embeddings=4096,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            **TEXT,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=n_vis,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    gen = model.generation_config
    gen.pad_token_id = tok.pad_token_id
    gen.eos_token_id = tok.eos_token_id
    gen.bos_token_id = tok.bos_token_id
    gen.suppress_tokens = [config.image_token_id]
    gen.max_new_tokens = 64
    gen.do_sample = False
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        ),
        tokenizer=tok,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor


# ------------------------------------------------------------------------------ data


def decode_video(path: str, n: int):
    """``n`` frames of ``path`` as PIL images, sampled the way the pipeline's decoder samples."""
    from decord import VideoReader, cpu
    from PIL import Image

    from pipelines.datasets.shapes import frame_indices

    vr = VideoReader(path, ctx=cpu(0), num_threads=1)
    return [Image.fromarray(f) for f in vr.get_batch(frame_indices(len(vr), n)).asnumpy()]


def patch_labels(img, mode: str = "colour", patch: int = PATCH) -> list[str]:
    """Auxiliary labels of the image tokens, one word per patch (row-major).

    ``colour``: :func:`patch_colours`. ``colour+position``: on a checkerboard, the dark squares
    name where the patch is (its grid cell's row word ``rR`` on even patch rows, column word
    ``cC`` on odd ones) and the light squares keep the colour label — so the image tokens carry
    both what and where, which the caption's ``rR cC`` look-ups need."""
    from pipelines.datasets.shapes import CELL, COLS, ROWS

    colours = patch_colours(img, patch)
    if mode == "colour":
        return colours
    if mode != "colour+position":
        raise ValueError(f"unknown aux mode {mode!r}")
    grid = int(len(colours) ** 0.5)
    out = []
    for j, word in enumerate(colours):
        pr, pc = divmod(j, grid)
        if (pr + pc) % 2 == 0:
            out.append(ROWS[pr * patch // CELL] if pr % 2 == 0 else COLS[pc * patch // CELL])
        else:
            out.append(word)
    return out


def patch_colours(img, patch: int = PATCH) -> list[str]:
    """Per patch (row-major), the colour word of the object covering most of it, else
    ``nothing``: read from the pixels (a pixel counts for a colour when it is within 60 of
    it on every channel; a patch needs 4 such pixels)."""
    import numpy as np

    from pipelines.datasets.shapes import COLORS

    arr = np.asarray(img, dtype=np.int16)
    h, w = arr.shape[:2]
    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names], dtype=np.int16)  # [C, 3]
    close = (np.abs(arr[:, :, None, :] - palette[None, None]) < 60).all(-1)  # [h, w, C]
    counts = close.reshape(h // patch, patch, w // patch, patch, len(names)).sum((1, 3))  # [gh, gw, C]
    best = counts.argmax(-1)
    ok = counts.max(-1) >= 4
    return [names[b] if k else "nothing" for b, k in zip(best.ravel(), ok.ravel())]


class Sampler:
    """Training examples ``(images, prompt, answer)`` drawn from the train split."""

    def __init__(self, seed: int, frames: int, split: str = "train", workdir: str | None = None, aux_mode: str = "colour"):
        self.seed, self.frames, self.split, self.aux_mode = seed, frames, split, aux_mode
        self.i_img = self.i_vid = 0
        self._tmp = tempfile.TemporaryDirectory(dir=workdir)

    def image_example(self, kind: str):
        from PIL import Image

        from pipelines.datasets import shapes as S

        rng = S.rng_for(self.split, self.seed, self.i_img)
        self.i_img += 1
        scene = S.make_scene(rng)
        img = Image.fromarray(S.render_scene(scene))
        if kind == "caption":
            return [img], S.CAPTION_PROMPT, S.caption(scene)
        qas = S.image_questions(scene, rng)
        qa = qas[int(rng.integers(len(qas)))]
        return [img], qa.question, qa.answer

    def image_packed(self, n_questions: int, max_objects: int | None = None):
        """One scene with its caption and up to ``n_questions`` questions (shared image prefix);
        ``max_objects`` draws easier scenes of 1..max_objects objects (the warm-up curriculum)."""
        from PIL import Image

        from pipelines.datasets import shapes as S

        rng = S.rng_for(self.split, self.seed, self.i_img)
        self.i_img += 1
        n = None if max_objects is None else int(rng.integers(1, max_objects + 1))
        scene = S.make_scene(rng, n_objects=n)
        qas = S.image_questions(scene, rng)
        order = rng.permutation(len(qas))[:n_questions]
        branches = [(S.CAPTION_PROMPT, S.caption(scene))] + [(qas[i].question, qas[i].answer) for i in order]
        pixels = S.render_scene(scene)
        return [Image.fromarray(pixels)], branches, patch_labels(pixels, self.aux_mode)

    def video_packed(self):
        """One clip with its caption and all its questions (shared frames prefix)."""
        from pipelines.datasets import shapes as S

        rng = S.rng_for(self.split, self.seed, self.i_vid, stream=1)
        self.i_vid += 1
        clip = S.make_clip(rng)
        path = S.write_video(os.path.join(self._tmp.name, "clip.mp4"), S.render_clip(clip))
        frames = decode_video(path, self.frames)
        branches = [(S.VIDEO_CAPTION_PROMPT, S.clip_caption(clip))] + [(q.question, q.answer) for q in S.video_questions(clip)]
        return frames, branches

    def video_example(self):
        from pipelines.datasets import shapes as S

        rng = S.rng_for(self.split, self.seed, self.i_vid, stream=1)
        self.i_vid += 1
        clip = S.make_clip(rng)
        path = S.write_video(os.path.join(self._tmp.name, "clip.mp4"), S.render_clip(clip))
        frames = decode_video(path, self.frames)
        qas = S.video_questions(clip)
        pick = int(rng.integers(len(qas) + 1))
        if pick == len(qas):
            return frames, S.VIDEO_CAPTION_PROMPT, S.clip_caption(clip)
        return frames, qas[pick].question, qas[pick].answer


def encode(processor, examples, *, left_pad: bool = False):
    """A training batch: input ids (prompt + answer + ``</s>``), labels on the answer only."""
    import torch

    tok = processor.tokenizer
    ids, labels, pixels = [], [], []
    for images, prompt, answer in examples:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
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


def encode_packed(processor, items):
    """A packed training batch: per row, one image prefix shared by several (prompt, answer)
    branches. Each branch attends to the prefix and to itself (a 4-D mask), and its position
    ids continue from the prefix, so every branch sees exactly what a single-prompt
    sequence would; labels cover the answers and their ``</s>``. Rows are right-padded."""
    import torch

    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    rows, pixels, auxes = [], [], []
    for item in items:
        images, branches = item[0], item[1]
        auxes.append(item[2] if len(item) > 2 else None)
        ids_all, prefix_len = [], None
        for prompt, answer in branches:
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
            text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
            if prefix_len is None:
                enc = processor(images=images, text=[text], return_tensors="pt")
                pixels.append(enc["pixel_values"])
                full = enc["input_ids"][0].tolist()
            else:
                full = tok(text.replace("<image>", "<image>" * n_img), add_special_tokens=True)["input_ids"]
            if prefix_len is None:
                last_image = max(i for i, t in enumerate(full) if t == image_id)
                prefix_len = last_image + 1
                prefix = full[:prefix_len]
                n_img = sum(t == image_id for t in full) // len(images)
            assert full[:prefix_len] == prefix
            ids_all.append((full[prefix_len:], tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]))
        rows.append((prefix, ids_all))
    lengths = [len(p) + sum(len(q) + len(a) for q, a in br) for p, br in rows]
    T = max(lengths)
    B = len(rows)
    input_ids = torch.full((B, T), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    aux_labels = torch.full((B, T), -100, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, 1, T, T), dtype=torch.bool)
    for b, (prefix, branches) in enumerate(rows):
        P = len(prefix)
        input_ids[b, :P] = torch.tensor(prefix)
        position_ids[b, :P] = torch.arange(P)
        mask[b, 0, :P, :P] = torch.ones(P, P, dtype=torch.bool).tril()
        at = P
        for q, a in branches:
            seq = q + a
            n = len(seq)
            input_ids[b, at : at + n] = torch.tensor(seq)
            labels[b, at + len(q) : at + n] = torch.tensor(a)
            position_ids[b, at : at + n] = torch.arange(P, P + n)
            mask[b, 0, at : at + n, :P] = True
            mask[b, 0, at : at + n, at : at + n] = torch.ones(n, n, dtype=torch.bool).tril()
            at += n
        for j in range(at, T):  # padding attends to itself only (no empty softmax rows)
            mask[b, 0, j, j] = True
        if auxes[b] is not None:  # the image token of patch j predicts that patch's colour word
            first = prefix.index(image_id)
            words = tok.convert_tokens_to_ids(auxes[b])
            aux_labels[b, first + 1 : first + 1 + len(words)] = torch.tensor(words)
    # HF shifts labels by one inside the loss: label at position t is predicted from t-1, so
    # the first answer token is predicted from the last prompt token of its own branch.
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "labels": labels,
            "pixel_values": torch.cat(pixels), "aux_labels": aux_labels}


def token_accuracy(model, batch, prune=None) -> float:
    """Teacher-forced accuracy on the answer tokens of a left-padded batch; with ``prune`` (a
    ``PruneConfig``) the visual tokens are pruned on the way (the answer sits at the end of
    every row, so the last logits stay aligned with it)."""
    import torch

    handle = None
    if prune is not None and prune.method != "none":
        from ep_core import apply_pruning

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


# ------------------------------------------------------------------------------ training


class _Tracker:
    """MLflow logging that can fail without stopping training."""

    def __init__(self, log_dir: str, params: dict):
        self.ok = False
        try:
            import mlflow

            user_uri = os.environ.get("MLFLOW_TRACKING_URI")
            mlflow.set_tracking_uri(user_uri or f"sqlite:///{os.path.abspath(os.path.join(log_dir, 'mlflow.db'))}")
            if user_uri is None:  # set_tracking_uri exports the variable: keep it from leaking into later jobs
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            mlflow.set_experiment("train-demo")
            self.run = mlflow.start_run(run_name=f"train-demo-seed{params.get('seed')}")
            mlflow.log_params(params)
            self.mlflow = mlflow
            self.ok = True
        except Exception as exc:  # noqa: BLE001
            print(f"[train-demo] MLflow logging disabled ({type(exc).__name__}: {exc})", flush=True)

    def log(self, metrics: dict, step: int) -> None:
        if not self.ok:
            return
        try:
            self.mlflow.log_metrics(metrics, step=step)
        except Exception as exc:  # noqa: BLE001
            print(f"[train-demo] MLflow log failed ({type(exc).__name__}: {exc}); continuing", flush=True)

    def close(self) -> None:
        if self.ok:
            try:
                self.mlflow.end_run()
            except Exception:  # noqa: BLE001
                pass


def validation_batches(processor, frames: int, seed: int = 0, n: int = 32):
    s = Sampler(seed, frames, split="validation")
    cap = encode(processor, [s.image_example("caption") for _ in range(n)], left_pad=True)
    qa = encode(processor, [s.image_example("qa") for _ in range(n)], left_pad=True)
    vid = encode(processor, [s.video_example() for _ in range(max(4, n // 4))], left_pad=True)
    return {"caption": cap, "qa": qa, "video": vid}


def train(args) -> str:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    os.makedirs(args.log_dir, exist_ok=True)
    out_dir = args.output or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ep_core", "demo_model")

    if args.init:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(args.init)
    else:
        model, processor = build_model(args.seed)
    model.set_attn_implementation("sdpa")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[train-demo] {n_params / 1e6:.2f} M parameters; {args.steps} steps", flush=True)
    params = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    params["parameters"] = n_params
    tracker = _Tracker(args.log_dir, params)

    from ep_core.config import PruneConfig

    val = validation_batches(processor, args.frames)
    sampler = Sampler(args.seed + args.data_offset, args.frames, workdir=args.log_dir, aux_mode=args.aux_mode)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    warmup = min(200, args.steps // 10)
    warm_steps = int(args.warm_fraction * args.steps)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

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
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        labels, aux_labels = batch.pop("labels"), batch.pop("aux_labels")
        logits = model(**batch, use_cache=False).logits[:, :-1].float()
        ce = torch.nn.functional.cross_entropy
        loss = ce(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        if args.aux_weight > 0 and (aux_labels != -100).any():
            aux = ce(logits.reshape(-1, logits.shape[-1]), aux_labels[:, 1:].reshape(-1), ignore_index=-100)
            loss = loss + args.aux_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = float(loss.detach())
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        if step % 25 == 0:
            tracker.log({"loss": value, "loss_ema": ema, "lr": lr_at(step)}, step)
        if step % 50 == 0:
            print(f"[train-demo] step {step} loss {value:.4f} ema {ema:.4f} {time.monotonic() - start:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            metrics = {f"val_{k}_token_acc": token_accuracy(model, b) for k, b in val.items()}
            metrics["val_caption_token_acc_random_1_9"] = token_accuracy(
                model, val["caption"], PruneConfig("random", keep_ratio=1 / 9, prune_layer=2)
            )
            metrics["elapsed_s"] = time.monotonic() - start
            tracker.log(metrics, step + 1)
            print(f"[train-demo] step {step + 1} " + " ".join(f"{k}={v:.3f}" for k, v in metrics.items()), flush=True)
            save(model, processor, os.path.join(args.log_dir, "checkpoint"))  # a usable model if stopped early
    model.eval()
    save(model, processor, out_dir)
    tracker.close()
    print(f"[train-demo] saved to {out_dir} after {time.monotonic() - start:.0f}s", flush=True)
    return out_dir


def save(model, processor, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.train_demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
