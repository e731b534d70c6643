"""Where the shipped demo model lives: ``demo_model_path()``; ``--model demo`` resolves to it.

The demo model (``ep_core/demo_model/``, package data) is a tiny LLaVA trained on CPU by
``ep train-demo`` on the procedural shapes world (``pipelines.datasets.shapes``); it loads
through the same ``from_pretrained`` path as any LLaVA checkpoint.
"""

from __future__ import annotations

import os

DEMO_NAME = "demo"


def demo_model_path() -> str:
    """The directory of the shipped demo model (it holds ``config.json`` once trained)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_model")


def resolve_model_name(name_or_path: str) -> str:
    """``"demo"`` → :func:`demo_model_path`; anything else unchanged."""
    return demo_model_path() if name_or_path == DEMO_NAME else name_or_path
