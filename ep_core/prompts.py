"""The chat prompt of one sample: its images (or its video) followed by its text.

Every place that asks a model something builds the prompt here, so that the pipeline, the
demo model's training and the evaluation harness give a model exactly the same text.
"""

from __future__ import annotations

from typing import Any


def user_turn(n_images: int, text: str, *, video: bool = False) -> list[dict]:
    """One user message: ``n_images`` image slots (or, with ``video``, one video slot), then
    ``text`` (transformers' chat format)."""
    slots = [{"type": "video"}] if video else [{"type": "image"}] * n_images
    return [{"role": "user", "content": slots + [{"type": "text", "text": text}]}]


def chat_prompt(processor: Any, n_images: int, text: str, *, video: bool = False) -> str:
    """The processor's chat template applied to :func:`user_turn`, ready for generation."""
    return processor.apply_chat_template(user_turn(n_images, text, video=video), add_generation_prompt=True)
