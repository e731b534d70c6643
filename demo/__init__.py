"""The demo world and the shipped demo model.

* :mod:`demo.world`: the procedural shapes world (scenes, clips, questions, data sets).
* ``demo/shipped_model/``: the trained demo LLaVA (package data); ``--model demo`` loads it.

Nothing here is imported by ``ep_core`` except :func:`shipped_model_path` (no heavy imports).
"""

from __future__ import annotations

import os

MODEL_NAME = "demo"  # the model name every command resolves to the shipped demo model


def shipped_model_path() -> str:
    """The directory of the shipped demo model (``config.json``, weights, processor)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "shipped_model")
