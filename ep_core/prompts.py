"""The chat prompt of one sample: its images (or video frames) followed by its text.

Every place that asks a model something builds the prompt here, so that the pipeline, the
demo model's training and the evaluation harness give a model exactly the same text.
"""

from __future__ import annotations

from typing import Any


def user_turn(n_images: int, text: str) -> list[dict]:
    """One user message: ``n_images`` image slots, then ``text`` (transformers' chat format)."""
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def chat_prompt(processor: Any, n_images: int, text: str) -> str:
    """The processor's chat template applied to :func:`user_turn`, ready for generation."""
    return processor.apply_chat_template(user_turn(n_images, text), add_generation_prompt=True)
