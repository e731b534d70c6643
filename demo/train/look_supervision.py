"""Training-only attention supervision of chosen decoder heads (:class:`LookSupervision`).

Forward pre-hooks keep each supervised layer's attention inputs; the heads' attention is
recomputed from them (q/k projections, RoPE, the batch's mask), so the model is untouched and
any attention backend works. At a position that predicts a word about some objects, the loss
is ``-log`` of the attention mass on those objects' image tokens (an even split over the
targets for a count), plus linear probes that must read the objects' attributes from what
the heads read; probes on the content heads' keys make image tokens' keys carry colour and
kind. The probes are never saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from demo.train.targets import AUX_TARGETS, CONTENT_KEYS, LOOK_MODES, aux_classes


def _head(proj, hidden, index: int, d: int):
    """Head ``index``'s slice of a q/k/v projection: ``hidden · W[index·d:(index+1)·d]ᵀ (+ b)``."""
    rows = slice(index * d, (index + 1) * d)
    return F.linear(hidden, proj.weight[rows], None if proj.bias is None else proj.bias[rows])


class LookSupervision:
    """Training-only attention supervision: ``heads`` of each layer in ``layers`` are taught
    where to look (pick heads of different KV groups: they carry different values). At a
    position that predicts an answer word about some objects (a caption's ``r2 c3 small red
    circle``, the colour of the shape at a cell, the moving shape), the loss is ``-log`` of
    the attention mass each head puts on those objects' image tokens — in the first picture
    for the 1st, 3rd, ... supervised layer, in the last picture for the others (a video's
    start and end: the direction is their difference). The scores are recomputed from the
    layer's own inputs (the head's q/k projections, RoPE, the batch's mask), so the model is
    untouched and any attention backend works. The layers sit at and after the prune layer:
    the look-ups the model learns happen on the visual tokens that pruning keeps or drops."""

    # ``content_heads`` (optional) are taught the content look-ups instead: see :meth:`loss`
    # and :meth:`key_loss`. With no ``heads`` and ``probes=False`` (``layers=[1]``) the same
    # class supervises the query-forming heads (targets: the question's naming words).
    def __init__(self, model, layers: list[int], heads: list[int] = (0,), content_heads: list[int] = (),
                 probes: bool = True):
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
