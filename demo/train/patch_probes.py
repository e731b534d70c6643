"""Training-only linear probes on the projected image features (:class:`AuxHeads`).

A forward hook on the projector keeps its output (the decoder's input at the image tokens);
one linear probe per :data:`~demo.train.targets.AUX_TARGETS` must read from each token what
covers its patch and where the patch lies. The loss teaches the vision tower and projector to
put that into every image token; the probes are never saved.
"""

from __future__ import annotations

import torch

from demo.train.targets import AUX_TARGETS, OWNER, aux_classes


class AuxHeads:
    """Training-only linear probes on the projected image features (the decoder's input at the
    image tokens), one per :data:`AUX_TARGETS`: they make every image token say what covers its
    patch and where it is, so the decoder has something to look up from the first steps. They
    are never saved: the shipped model stays a stock LLaVA."""

    def __init__(self, model, hidden: int):
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(hidden, n) for k, n in aux_classes().items()})
        self.features = None
        self._hook = model.model.multi_modal_projector.register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        self.features = output

    def parameters(self):
        return self.heads.parameters()

    def loss(self, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the heads on the last projector output ``[n_images, n_patches, hidden]``:
        ``(1/K) Σ_k CE(head_k(features), targets[..., k])`` over the K :data:`AUX_TARGETS`."""
        feats = self.features.reshape(-1, self.features.shape[-1])
        t = targets[..., :OWNER].reshape(-1, OWNER)
        losses = [torch.nn.functional.cross_entropy(self.heads[k](feats).float(), t[:, i]) for i, k in enumerate(AUX_TARGETS)]
        return sum(losses) / len(losses)

    def remove(self):
        self._hook.remove()
