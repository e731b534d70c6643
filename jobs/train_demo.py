"""``ep train-demo``: train the shipped demo LLaVA from scratch on CPU on the shapes world.

    ep train-demo [--output ep_core/demo_model] [--steps N] [--batch-size B] [--seed S]
                  [--log-dir outputs/train_demo]

The model is a stock ``LlavaForConditionalGeneration``: a CLIP vision tower (48×48 input,
patch 4 → 144 visual tokens per image), the LLaVA two-layer projector, and a Llama decoder
with 6 layers, 16 query heads and 4 KV heads (GQA). The tokenizer is word-level (built with
``tokenizers``) over the world's vocabulary; the processor is a real ``LlavaProcessor`` with
a chat template. A video is given as its frames, one image each, in one prompt — how the
pipeline feeds any image-only LLaVA a video.

Training has two stages, both from random weights, about 38 minutes on 2 cores with the
defaults:

1. **Vision** (``--vision-steps``, cheap: no decoder): the vision tower and projector learn to
   say, at every image token, what covers its patch (colour, kind, size of the object, or
   nothing) and which grid cell the patch lies in, through training-only linear probes on the
   projected features (:class:`AuxHeads`). Without them the image features collapsed into
   one large constant vector and the decoder learnt the text prior only; without this stage
   the tower had not learnt the kinds of small shapes after 750 full steps.
2. **Full model** (``--steps``): teacher-forced on every answer and caption token (the prompt
   is masked out), on scenes drawn on the fly from the ``train`` split; steps alternate
   between image batches (a dense caption and questions per scene, packed on one image
   prefix) and video batches (frames decoded from real mp4 files with decord, as the pipeline
   does). The per-patch probes stay on, and :class:`LookSupervision` teaches three heads in
   each of decoder layers 2 and 3 where to look: at a position that predicts a word about an
   object (``r2 c3 small red circle``, the colour of the shape at a cell, the moving shape),
   their attention must fall on that object's image tokens, and what they read must tell the
   object's attributes. Questions that name their objects by content instead of by cell
   (``how many red shapes``, ``is there a blue cross``, ``is the red circle left of the
   white square``) go to a second set of heads (``--content-heads``, another KV group): in
   layer 1 they gather the words that name the objects into the answer position, in layers
   2 and 3 they look at the objects those words name (for a pair, half of them at each
   object), and probes on their keys make the image tokens' keys say colour and kind — one
   head set serving both kinds of look-up had learnt places only, and answered every
   content question with its prior. Count questions (``how many crosses``) teach the same
   heads an even split instead: between the sequence's first token and the middle patch of
   each named object's grid cell (one token per object), so the first token's share,
   1/(n+1), says n — zero included. A count learnt as a per-patch property of the image
   tokens ("how many objects share my kind") stayed at a third right. These look-ups sit at
   and after the demo's prune layer (2), so answers depend on which visual tokens pruning
   keeps. A decoder left to itself learnt to find the objects but, after 750 steps, still
   named colours at chance.

Every probe is training-only: the saved model is a stock LLaVA with nothing added.
Everything is seeded: the same command gives the same
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
from dataclasses import dataclass

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
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps of the full model (default 3000)")
    parser.add_argument("--batch-size", type=int, default=8, help="scenes per image batch (default 8)")
    parser.add_argument("--questions", type=int, default=10, help="questions packed with each scene's caption (default 10)")
    parser.add_argument("--video-every", type=int, default=3, help="every N-th step is a video batch (default 3)")
    parser.add_argument("--video-batch-size", type=int, default=4, help="clips per video batch (default 4)")
    parser.add_argument("--frames", type=int, default=VIDEO_TRAIN_FRAMES, help="frames per training video (default 4)")
    parser.add_argument("--aux-weight", type=float, default=0.5, help="weight of the per-patch probes' loss on the image features (default 0.5; 0 turns them off)")
    parser.add_argument("--vision-steps", type=int, default=1500, help="steps of the vision-only first stage (default 1500; 0: none)")
    parser.add_argument("--vision-batch-size", type=int, default=32, help="images per vision-only step (default 32)")
    parser.add_argument("--look-layers", default="2,3", help="decoder layers whose --look-heads are taught where to look (default 2,3; empty: off)")
    parser.add_argument("--look-heads", default="0,4,8", help="the supervised heads of those layers (default 0,4,8: three KV groups)")
    parser.add_argument("--look-weight", type=float, default=1.0, help="weight of the attention supervision (default 1.0)")
    parser.add_argument("--content-heads", default="12,13,14,15", help="heads of the --look-layers taught to find objects named by content (counts, presence, sides, relations); two halves, one per object of a pair (default 12,13,14,15: the fourth KV group; empty: off)")
    parser.add_argument("--question-weight", type=float, default=3.0, help="weight of a question's answer tokens against caption tokens in the LM loss (default 3)")
    parser.add_argument("--gather-layers", default="1", help="layers whose --content-heads are taught to gather the words that name the objects into the answer position, before the look-up (default 1; empty: off)")
    parser.add_argument("--content-weight", type=float, default=2.0, help="weight of the content heads' supervision: look-up, keys, gathering (default 2)")
    parser.add_argument("--stop-at", type=int, default=None, help="stop (and save) after this many steps of the --steps schedule")
    parser.add_argument("--data-offset", type=int, default=0, help="added to --seed for the training data stream (a second stage sees new scenes)")
    parser.add_argument("--warm-fraction", type=float, default=0.0, help="share of steps on small image-only scenes first (default 0: with the look-up supervision it only taught shortcuts)")
    parser.add_argument("--warm-objects", type=int, default=2, help="objects per scene during the warm-up (1..N, default 2)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data (default 0)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2; on a machine shared with other work, 1 avoids spin-waiting)")
    parser.add_argument("--eval-every", type=int, default=500, help="validate every N steps (default 500)")
    parser.add_argument("--eval-generate", type=int, default=48, help="held-out scenes (and a quarter as many clips) answered greedily at each validation (default 48)")
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
    from pipelines.datasets.shapes import COLORS, GRID, KINDS, MAX_OBJECTS, SIZES

    return {"colour": len(COLORS) + 1, "kind": len(KINDS) + 1, "size": len(SIZES) + 1, "row": GRID, "col": GRID,
            "n_colour": MAX_OBJECTS + 1, "n_kind": MAX_OBJECTS + 1, "middle": 2}


def is_cell_middle(pr: int, pc: int, patch: int = PATCH) -> bool:
    """Whether patch (row ``pr``, column ``pc``) holds the centre of its grid cell: the cell
    spans ``[c·CELL, (c+1)·CELL)`` pixels, its centre is at ``(c + ½)·CELL``."""
    from pipelines.datasets.shapes import CELL

    return all(int((pos * patch) // CELL * CELL + CELL / 2) // patch == pos for pos in (pr, pc))


def patch_targets(placed, patch: int = PATCH):
    """Auxiliary labels of the image tokens of one picture: ``[n_patches, 9]`` long, columns
    :data:`AUX_TARGETS` then the owner. colour/kind/size are those of the object covering the
    patch (1-based indices into the world's lists, 0 = no object); row/col are the grid cell
    the patch lies in; n_colour/n_kind count the picture's objects of that object's colour /
    kind (0 = no object); middle is 1 on the middle patch of each grid cell (where a count
    question's heads look: one token per object, objects sit in distinct cells); the owner is
    that object's index in ``placed`` (-1 = none).
    ``placed`` is ``[(obj, cx, cy), ...]`` as drawn."""
    import torch

    from pipelines.datasets import shapes as S

    owner = S.patch_objects(placed, patch)
    g = S.IMAGE_SIZE // patch
    colours, kinds, sizes = list(S.COLORS), list(S.KINDS), list(S.SIZES)
    out = torch.zeros(g * g, len(AUX_TARGETS) + 1, dtype=torch.long)
    out[:, OWNER] = torch.as_tensor(owner)
    for j, i in enumerate(owner.tolist()):
        pr, pc = divmod(j, g)
        out[j, 3], out[j, 4] = pr * patch // S.CELL, pc * patch // S.CELL
        out[j, 7] = int(is_cell_middle(pr, pc, patch))
        if i >= 0:
            o = placed[i][0]
            out[j, 0], out[j, 1], out[j, 2] = colours.index(o.color) + 1, kinds.index(o.kind) + 1, sizes.index(o.size) + 1
            out[j, 5] = sum(p.color == o.color for p, _, _ in placed)
            out[j, 6] = sum(p.kind == o.kind for p, _, _ in placed)
    return out


class AuxHeads:
    """Training-only linear probes on the projected image features (the decoder's input at the
    image tokens), one per :data:`AUX_TARGETS`: they make every image token say what covers its
    patch and where it is, so the decoder has something to look up from the first steps. They
    are never saved: the shipped model stays a stock LLaVA."""

    def __init__(self, model, hidden: int):
        import torch

        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(hidden, n) for k, n in aux_classes().items()})
        self.features = None
        self._hook = model.model.multi_modal_projector.register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        self.features = output

    def parameters(self):
        return self.heads.parameters()

    def loss(self, targets):
        """Mean cross-entropy of the heads on the last projector output ``[n_images, n_patches, hidden]``."""
        import torch

        feats = self.features.reshape(-1, self.features.shape[-1])
        t = targets[..., :OWNER].reshape(-1, OWNER)
        losses = [torch.nn.functional.cross_entropy(self.heads[k](feats).float(), t[:, i]) for i, k in enumerate(AUX_TARGETS)]
        return sum(losses) / len(losses)

    def remove(self):
        self._hook.remove()


def _head(proj, hidden, index: int, d: int):
    """Head ``index``'s slice of a q/k/v projection: ``hidden · W[index·d:(index+1)·d]ᵀ (+ b)``."""
    import torch.nn.functional as F

    rows = slice(index * d, (index + 1) * d)
    return F.linear(hidden, proj.weight[rows], None if proj.bias is None else proj.bias[rows])


class LookSupervision:
    """Training-only attention supervision: ``heads`` of each layer in ``layers`` are taught
    where to look (pick heads of different KV groups: they carry different values). At a position that predicts an answer word about some objects (a caption's
    ``r2 c3 small red circle``, the colour of the shape at a cell, the moving shape), the
    loss is ``-log`` of the attention mass each head puts on those objects' image tokens —
    in the first picture for the 1st, 3rd, ... supervised layer, in the last picture for the
    others (a video's start and end: the direction is their difference). The scores are
    recomputed from the layer's own inputs (the head's q/k projections,
    RoPE, the batch's mask), so the model is untouched and any attention backend works. The
    layers sit at and after the prune layer: the look-ups the model learns happen on the
    visual tokens that pruning keeps or drops."""

    # ``content_heads`` (optional) are taught the content look-ups instead: see :meth:`loss`
    # and :meth:`key_loss`. With no ``heads`` and ``probes=False`` (``layers=[1]``) the same
    # class supervises the query-forming heads (targets: the question's naming words).
    def __init__(self, model, layers: list[int], heads: list[int] = (0,), content_heads: list[int] = (),
                 probes: bool = True):
        import torch

        decoder = model.model.language_model
        self.layers, self.heads, self.content_heads = list(layers), list(heads), list(content_heads)
        if self.content_heads and len(self.content_heads) % 2:
            raise ValueError(f"content heads come in two halves (one per object of a pair), got {self.content_heads}")
        d = decoder.layers[0].self_attn.head_dim
        n = aux_classes()
        shapes = {f"{s}_{k}": (d * len(self.heads), n[k]) for s in range(len(self.layers)) for k in AUX_TARGETS if self.heads}
        if self.content_heads and probes:
            shapes.update({f"c{s}_{h}_{k}": (d * len(self.content_heads) // 2, n[k])
                           for s in range(len(self.layers)) for h in range(2) for k in AUX_TARGETS})
            kv_groups = decoder.layers[0].self_attn.num_key_value_groups
            self.content_kv = sorted({h // kv_groups for h in self.content_heads})
            shapes.update({f"k{s}_{kv}_{k}": (d, n[k]) for s in range(len(self.layers)) for kv in self.content_kv
                           for k in CONTENT_KEYS})
        self.probes = torch.nn.ModuleDict({name: torch.nn.Linear(*shape) for name, shape in shapes.items()})
        self.inputs: dict[int, tuple] = {}
        self._hooks = [
            decoder.layers[i].self_attn.register_forward_pre_hook(self._keeper(i), with_kwargs=True) for i in layers
        ]

    def _keeper(self, i: int):
        def keep(module, args, kwargs):
            self.inputs[i] = (module, kwargs["hidden_states"], kwargs["position_embeddings"])

        return keep

    def read(self, s: int, head: int, probs, look_at):
        """What ``head`` of supervised layer ``s`` reads at the ``look_at`` positions: its
        attention probabilities ``probs`` ``[N, T]`` times its values, ``[N, head_dim]``."""
        attn, hidden, _ = self.inputs[self.layers[s]]
        d = attn.head_dim
        kv = head // attn.num_key_value_groups
        v = _head(attn.v_proj, hidden, kv, d)  # [B, T, d]
        return (probs.unsqueeze(1).to(v.dtype) @ v[look_at[:, 0]]).squeeze(1)

    def attention(self, s: int, head: int, mask, look_at):
        """Attention probabilities of ``head`` in supervised layer ``s`` at the ``look_at`` (row,
        position) pairs of the last forward: ``[N, T]``."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        attn, hidden, (cos, sin) = self.inputs[self.layers[s]]
        d = attn.head_dim
        kv = head // attn.num_key_value_groups
        q = _head(attn.q_proj, hidden, head, d).unsqueeze(1)
        k = _head(attn.k_proj, hidden, kv, d).unsqueeze(1)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        b, t = look_at[:, 0], look_at[:, 1]
        scores = (q[b, 0, t, None, :] * k[b, 0]).sum(-1) * attn.scaling  # [N, T]
        return scores.float().masked_fill(~mask[b, 0, t], float("-inf")).softmax(-1)

    def parameters(self):
        return self.probes.parameters()

    def _group_loss(self, mask, look_at, keys, attrs, groups, spread: bool = False):
        """``-log(attention mass on the targets)`` averaged over heads and positions, plus the
        probes' cross-entropy on what each head group read. ``groups(s)`` lists, for
        supervised layer ``s``, ``(heads, slot, probe name)``: those heads must look at
        ``keys[slot]``, and the probe must tell ``attrs[:, slot]`` from their reads. With
        ``spread`` the heads must instead split their attention evenly over the ``n`` targets:
        ``-Σ_j (1/n) log p_j`` (cross-entropy against the uniform distribution on them)."""
        import torch
        import torch.nn.functional as F

        total = 0.0
        for s in range(len(self.layers)):
            layer_loss = 0.0
            for heads, slot, name in groups(s):
                reads = []
                for head in heads:
                    probs = self.attention(s, head, mask, look_at)
                    if spread:
                        target = keys[slot].float() / keys[slot].sum(-1, keepdim=True)
                        miss = -(target * torch.log(probs + 1e-6)).sum(-1)
                    else:
                        miss = -torch.log((probs * keys[slot]).sum(-1) + 1e-6)
                    layer_loss = layer_loss + miss.mean() / len(heads)
                    reads.append(self.read(s, head, probs, look_at))
                if (attrs[:, slot] != -100).any():
                    x = torch.cat(reads, -1).float()
                    layer_loss = layer_loss + sum(F.cross_entropy(self.probes[f"{name}_{k}"](x), attrs[:, slot, i], ignore_index=-100)
                                                  for i, k in enumerate(AUX_TARGETS)) / len(AUX_TARGETS)
            total = total + layer_loss / len(groups(s))
        return total / len(self.layers)

    def key_loss(self, image_pos, targets):
        """Cross-entropy of linear probes that must tell, from the content heads' keys at every
        image token (``image_pos`` ``[B, T]`` bool, pictures in order), the :data:`CONTENT_KEYS`
        of the patch (``targets``, :func:`patch_targets` rows: the covering object's colour and
        kind, whether it is a cell's middle): a content look-up matches a query against these
        keys, and colour was the part they lacked."""
        import torch.nn.functional as F

        t = targets.reshape(-1, targets.shape[-1])
        total = 0.0
        for s, layer in enumerate(self.layers):
            attn, hidden, _ = self.inputs[layer]
            for kv in self.content_kv:
                keys = _head(attn.k_proj, hidden, kv, attn.head_dim)[image_pos].float()
                total = total + sum(F.cross_entropy(self.probes[f"k{s}_{kv}_{k}"](keys), t[:, AUX_TARGETS.index(k)])
                                    for k in CONTENT_KEYS) / len(CONTENT_KEYS)
        return total / (len(self.layers) * len(self.content_kv))

    def loss(self, mask, look_at, look_keys, look_attrs, look_mode=None):
        """Training losses of the two head sets:

        * place rows (all rows when ``look_mode`` is None): the ``heads`` of supervised layer
          ``s`` look at slot ``s % 2`` (first picture, last picture);
        * content and pair rows: the first half of ``content_heads`` looks at slot 0, the
          second half at slot 1 (both slots hold all the named objects for a content
          question; the first and the second object for a pair), in every supervised layer;
        * count rows: the same heads spread their attention evenly over the slot's targets
          (the first token and the named objects' cell-middle patches).

        Returns ``(place loss, content loss)``, each ``None`` where it has no rows; the content
        loss is the mean over the content-like row kinds present."""
        if look_mode is None:
            look_mode = look_at.new_zeros(look_at.shape[0])
        place = look_mode == LOOK_MODES.index("place")
        count = look_mode == LOOK_MODES.index("count")
        half = len(self.content_heads) // 2

        def content(s):
            return [(self.content_heads[:half], 0, f"c{s}_0"), (self.content_heads[half:], 1, f"c{s}_1")]

        def part(rows, heads, groups, spread=False):
            if not rows.any() or not heads:
                return None
            return self._group_loss(mask, look_at[rows], look_keys[:, rows], look_attrs[rows], groups, spread)

        place_loss = part(place, self.heads, lambda s: [(self.heads, s % 2, str(s))])
        parts = [p for p in (part(~place & ~count, self.content_heads, content),
                             part(count, self.content_heads, content, spread=True)) if p is not None]
        return place_loss, (sum(parts) / len(parts) if parts else None)

    def remove(self):
        for h in self._hooks:
            h.remove()


@dataclass
class Packed:
    """One training item: its pictures (one image, or a video's frames), the (prompt, answer,
    about, mode) branches that share them, and per picture the patch targets of
    :func:`patch_targets`. ``about`` has one entry per answer word: the indices of the objects
    that word is about (what the supervised attention heads must look at to say it), empty
    where none; ``mode`` is the branch's :func:`look_mode`."""

    images: list
    branches: list[tuple[str, str, list[tuple[int, ...]], str]]
    targets: object  # long tensor [n_images, n_patches, len(AUX_TARGETS) + 1]


class Sampler:
    """Training examples ``(images, prompt, answer)`` drawn from the train split."""

    def __init__(self, seed: int, frames: int, split: str = "train", workdir: str | None = None):
        self.seed, self.frames, self.split = seed, frames, split
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

    def image_packed(self, n_questions: int, max_objects: int | None = None) -> "Packed":
        """One scene with its caption and up to ``n_questions`` questions (shared image prefix);
        ``max_objects`` draws easier scenes of 1..max_objects objects."""
        from PIL import Image

        from pipelines.datasets import shapes as S

        rng = S.rng_for(self.split, self.seed, self.i_img)
        self.i_img += 1
        n = None if max_objects is None else int(rng.integers(1, max_objects + 1))
        scene = S.make_scene(rng, n_objects=n)
        qas = S.image_questions(scene, rng)
        order = rng.permutation(len(qas))[:n_questions]
        about = [w for i in range(len(scene.objects)) for w in [(i,)] * 5 + [()]] or [(), ()]
        branches = [(S.CAPTION_PROMPT, S.caption(scene), about, "place")]
        branches += [(qas[i].question, qas[i].answer, [qas[i].objects], look_mode(qas[i].qtype)) for i in order]
        placed = [(o, *o.center()) for o in scene.objects]
        return Packed([Image.fromarray(S.render_scene(scene))], branches, patch_targets(placed)[None])

    def video_packed(self) -> "Packed":
        """One clip with its caption and all its questions (shared frames prefix)."""
        import torch

        from pipelines.datasets import shapes as S

        rng = S.rng_for(self.split, self.seed, self.i_vid, stream=1)
        self.i_vid += 1
        clip = S.make_clip(rng)
        path = S.write_video(os.path.join(self._tmp.name, "clip.mp4"), S.render_clip(clip))
        frames = decode_video(path, self.frames)
        mover = (len(clip.distractors),)
        branches = [(S.VIDEO_CAPTION_PROMPT, S.clip_caption(clip), [mover] * 5 + [()], "place")]
        branches += [(q.question, q.answer, [q.objects], "place") for q in S.video_questions(clip)]
        targets = [patch_targets(S.clip_objects(clip, t)) for t in S.frame_indices(clip.frames, self.frames)]
        return Packed(frames, branches, torch.stack(targets))

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
    cell-middle patch of each named object. ``look_words`` ``[2, N, T]``: the question words that name those objects (see
    ``naming_words``), what the query-forming heads gather before the look-up."""
    import torch

    from pipelines.datasets import shapes as S

    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    rows, pixels = [], []
    for item in items:
        ids_all, prefix_len = [], None
        for prompt, answer, about, mode in item.branches:
            content = [{"type": "image"} for _ in item.images] + [{"type": "text", "text": prompt}]
            text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
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
    naming = {tok.convert_tokens_to_ids(w) for w in (*S.COLORS, *S.KINDS, *S.PLURALS.values())}
    relation = {tok.convert_tokens_to_ids(w) for w in ("left", "above")}

    def naming_words(q: list[int], at: int, T: int, pair: bool):
        """``[2, T]``: the positions of the question's words that name its objects (colours,
        kinds); for a pair, the first object's words in slot 0 and the second's in slot 1."""
        out = torch.zeros(2, T, dtype=torch.bool)
        split = next((j for j, x in enumerate(q) if x in relation), len(q)) if pair else len(q)
        for j, x in enumerate(q):
            if x in naming:
                out[int(pair and j > split), at + j] = True
        if not pair:
            out[1] = out[0]
        return out
    for b, (prefix, branches, image_pos, targets) in enumerate(rows):
        owners = targets[..., OWNER]
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
                keys = torch.zeros(2, T, dtype=torch.bool)
                attrs = torch.full((2, OWNER), -100, dtype=torch.long)
                if kind == "count":  # the answer word only; "zero" too (all on the first token)
                    if t > 0:
                        continue
                    named = (targets[0, :, AUX_TARGETS.index("middle")] == 1) & torch.isin(owners[0], torch.tensor(objects, dtype=torch.long))
                    keys[:, 0] = True
                    keys[:, image_pos[0][named]] = True
                else:
                    if not objects:
                        continue
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
                        continue
                look_at.append((b, at + len(q) - 1 + t))
                look_keys.append(keys)
                look_attrs.append(attrs)
                look_modes.append(mode)
                look_words.append(naming_words(q, at, T, kind == "pair"))
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


def answer_loss(logits, labels, question, question_weight: float = 1.0):
    """Weighted mean cross-entropy over the labelled tokens: ``Σ w·CE / Σ w`` with ``w =
    question_weight`` on the answers to questions and 1 on captions (a scene's caption has
    several times more tokens than all its one-word answers together)."""
    import torch

    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=-100, reduction="none")
    w = torch.where(question.reshape(-1), question_weight, 1.0) * (labels.reshape(-1) != -100)
    return (ce * w).sum() / w.sum().clamp_min(1e-6)


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


def generation_quality(model, processor, frames: int, n: int = 48, seed: int = 0) -> dict[str, float]:
    """Greedy answers on held-out (validation split) data, scored as ``ep sweep`` scores them:
    caption object-F1 and VQA exact match over ``n`` scenes (one caption and one question
    each), video exact match over ``n // 4`` clips."""
    import torch
    from PIL import Image

    from pipelines import quality as Q
    from pipelines.datasets import shapes as S

    if n <= 0:
        return {}
    s = Sampler(seed, frames, split="validation")
    caps, qas, vids = [], [], []
    for i in range(n):
        rng = S.rng_for("validation", seed, i)
        scene = S.make_scene(rng)
        img = [Image.fromarray(S.render_scene(scene))]
        caps.append((img, S.CAPTION_PROMPT, [list(o.key) for o in scene.objects]))
        q = S.image_questions(scene, rng)
        q = q[i % len(q)]
        qas.append((img, q.question, q.answer))
    for i in range(max(1, n // 4)):
        frames_, prompt, answer = s.video_example()
        vids.append((frames_, prompt, answer))

    def answer(items, max_new_tokens):
        outs = []
        for k in range(0, len(items), 16):
            chunk = items[k : k + 16]
            texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}] * len(im) + [{"type": "text", "text": p}]}],
                                                   add_generation_prompt=True) for im, p, _ in chunk]
            enc = processor(images=[x for im, _, _ in chunk for x in im], text=texts, return_tensors="pt", padding=True)
            with torch.inference_mode():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
            outs += processor.tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return outs

    model.eval()
    cap_out = answer(caps, 56)
    f1 = sum(Q.object_f1(Q.parse_caption(o), [tuple(x) for x in ref]) for o, (_, _, ref) in zip(cap_out, caps)) / len(caps)
    vqa = sum(Q.exact_match(o, a) for o, (_, _, a) in zip(answer(qas, 4), qas)) / len(qas)
    vid = sum(Q.exact_match(o, a) for o, (_, _, a) in zip(answer(vids, 8), vids)) / len(vids)
    return {"val_caption_object_f1": f1, "val_vqa_acc": vqa, "val_video_acc": vid}


def pretrain_vision(model, processor, aux: "AuxHeads", args, tracker) -> None:
    """Stage 1: only the vision tower and the projector learn, from the per-patch targets of
    :class:`AuxHeads` (what covers each patch, and where it is), on single scenes — cheap steps
    without the decoder, so the image tokens already say colour, kind and size when the
    decoder starts learning to look them up."""
    import torch

    from pipelines.datasets import shapes as S

    params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    params += list(aux.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.05)
    start = time.monotonic()
    for step in range(args.vision_steps):
        images, targets = [], []
        for i in range(args.vision_batch_size):
            scene = S.make_scene(S.rng_for("train", args.seed + args.data_offset, step * args.vision_batch_size + i, stream=2))
            images.append(S.render_scene(scene))
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
            tracker.log({"vision_loss": float(loss.detach())}, step)
            print(f"[train-demo] vision step {step} loss {float(loss.detach()):.4f} {time.monotonic() - start:.0f}s", flush=True)


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
    sampler = Sampler(args.seed + args.data_offset, args.frames, workdir=args.log_dir)
    aux = AuxHeads(model, model.config.text_config.hidden_size) if args.aux_weight > 0 else None
    if aux is not None and args.vision_steps > 0 and not args.init:
        model.train()
        pretrain_vision(model, processor, aux, args, tracker)
    look_layers = [int(x) for x in str(args.look_layers).split(",") if x.strip()]
    look_heads = [int(x) for x in str(args.look_heads).split(",") if x.strip()]
    content_heads = [int(x) for x in str(args.content_heads).split(",") if x.strip()] if args.content_weight > 0 else []
    look = LookSupervision(model, look_layers, look_heads, content_heads) if look_layers and look_heads and args.look_weight > 0 else None
    gather_layers = [int(x) for x in str(args.gather_layers).split(",") if x.strip()]
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
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = float(loss.detach())
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        if step % 25 == 0:
            tracker.log({"loss": value, "loss_ema": ema, "lr": lr_at(step), **{f"loss_{k}": v for k, v in parts.items()}}, step)
        if step % 50 == 0:
            detail = " ".join(f"{k} {v:.3f}" for k, v in parts.items())
            print(f"[train-demo] step {step} loss {value:.4f} ema {ema:.4f} ({detail}) {time.monotonic() - start:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            metrics = {f"val_{k}_token_acc": token_accuracy(model, b) for k, b in val.items()}
            metrics["val_caption_token_acc_random_1_9"] = token_accuracy(
                model, val["caption"], PruneConfig("random", keep_ratio=1 / 9, prune_layer=2)
            )
            metrics.update(generation_quality(model, processor, args.frames, n=args.eval_generate))
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
