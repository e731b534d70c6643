"""What differs per model family: where the decoder layers live and which tokens are visual.

Adding a family is adding an entry to ``FAMILIES`` plus a tiny-model test. A family is
supported only when its language model follows the transformers 5.x decoder-layer call
convention (hidden states positional; ``attention_mask``, ``position_embeddings``,
``position_ids`` and the cache as keyword arguments) and the whole sequence goes through
one rotary table computed once per forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Family:
    """How to find the pieces EntropyPrune hooks into, for one ``model_type``."""

    model_type: str
    example_checkpoint: str
    visual_token_attrs: tuple[str, ...]  # config attributes holding placeholder token ids

    def multimodal_model(self, model: nn.Module) -> nn.Module:
        """The module that receives ``input_ids`` and builds ``inputs_embeds`` (``model.model``)."""
        return model.model

    def language_model(self, model: nn.Module) -> nn.Module:
        """The bare decoder (``LlamaModel``-like: ``.layers``, ``.norm``, ``.rotary_emb``)."""
        return model.model.language_model

    def visual_token_ids(self, model: nn.Module) -> tuple[int, ...]:
        ids = []
        for attr in self.visual_token_attrs:
            value = getattr(model.config, attr, None)
            if value is not None:
                ids.append(int(value))
        if not ids:
            raise ValueError(f"{self.model_type}: config has none of {self.visual_token_attrs}; cannot find visual tokens")
        return tuple(sorted(set(ids)))


FAMILIES: dict[str, Family] = {
    "llava": Family("llava", "llava-hf/llava-1.5-7b-hf", ("image_token_id",)),
    "llava_next": Family("llava_next", "llava-hf/llava-v1.6-vicuna-7b-hf", ("image_token_id",)),
}


def family_of(model: nn.Module) -> Family:
    """The :class:`Family` of a loaded model, or a ValueError naming the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        supported = ", ".join(f"{f.model_type} (e.g. {f.example_checkpoint})" for f in FAMILIES.values())
        raise ValueError(
            f"model family {model_type!r} ({type(model).__name__}) is not supported yet; supported: {supported}"
        )
    return FAMILIES[model_type]
