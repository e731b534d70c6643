"""The Entropy Collapse Layer: where to prune, measured from data.

The paper prunes at the layer where "the information content of visual representations
exhibits a sharp and consistent drop", measured by their matrix entropy. Here:

* :func:`layer_entropies` runs a model over calibration inputs and reduces, as the forward
  runs, each sample's visual tokens at every layer to one number, their
  :func:`~ep_core.entropy.matrix_entropy`. ``entropies[l]`` belongs to ``hidden_states[l]``
  (transformers' convention: l = 0 the input of decoder layer 0, i.e. the merged text and image
  embeddings; l = 1..L−1 the output of layer l−1, the input of layer l; l = L the last layer's
  output after the final norm), or, with ``representation="query"``, to layer l's query
  projection (l = 0..L−1: what EntropyPrune's score reads at layer l).
* :func:`find_collapse_layer` turns the curve into K (see its docstring for the criterion).
* A *profile* (JSON) stores the curve and K for a model; ``--prune-layer auto`` reads it
  (:func:`auto_prune_layer`). Profiles live where ``ep calibrate`` writes them: ``--output``,
  and the per-model location :func:`profile_path` (``$EP_PROFILE_DIR``, else
  ``~/.cache/entropyprune/profiles``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Any, Iterable

import torch

from ep_core.entropy import matrix_entropy
from ep_core.families import family_for

log = logging.getLogger(__name__)

REPRESENTATIONS = ("hidden", "query")
PROFILE_DIR_ENV = "EP_PROFILE_DIR"


def layer_entropies(model: Any, batches: Iterable[dict], representation: str = "hidden") -> dict:
    """Per-layer matrix entropy of the visual tokens over calibration ``batches``.

    ``batches`` yields the model's keyword inputs (``input_ids``, ``attention_mask``,
    ``pixel_values``, ...). Forward hooks reduce each sample's visual tokens to their entropy
    the moment a layer sees them, so memory holds one layer's activations, never every layer's.

    Returns ``{"mean": [E_0, ...], "std": [...], "n": samples}``: per layer, the mean and the
    standard deviation over samples of S(visual tokens of the sample), in nats.
    """
    if representation not in REPRESENTATIONS:
        raise ValueError(f"representation must be one of {', '.join(REPRESENTATIONS)}, got {representation!r}")
    family = family_for(model)
    language_model = family.language_model(model)
    layers = language_model.layers
    visual_ids = torch.tensor(family.visual_token_ids(model.config))
    per_layer: dict[int, list[float]] = {}
    visual: list[torch.Tensor] = []  # per sample of the current batch: its visual positions

    def reduce(index: int, states: torch.Tensor) -> None:
        for b, positions in enumerate(visual):
            per_layer.setdefault(index, []).append(float(matrix_entropy(states[b, positions].float())))

    hooks = []
    if representation == "hidden":
        for i, layer in enumerate(layers):
            hooks.append(layer.register_forward_pre_hook(
                lambda module, args, kwargs, i=i: reduce(i, args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True))
        hooks.append(language_model.norm.register_forward_hook(lambda module, args, out: reduce(len(layers), out)))
    else:
        for i, layer in enumerate(layers):
            hooks.append(layer.self_attn.q_proj.register_forward_hook(lambda module, args, out, i=i: reduce(i, out)))
    try:
        with torch.inference_mode():
            for batch in batches:
                ids = batch["input_ids"]
                mask = torch.isin(ids, visual_ids.to(ids.device))
                visual[:] = [row.nonzero()[:, 0] for row in mask]
                if any(len(p) < 2 for p in visual):
                    raise ValueError("every calibration sample needs at least 2 visual tokens (an image in its prompt)")
                model(**batch, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    if not per_layer:
        raise ValueError("no calibration samples")
    values = [per_layer[i] for i in sorted(per_layer)]
    return {
        "mean": [sum(v) / len(v) for v in values],
        "std": [_std(v) for v in values],
        "n": len(values[0]),
    }


def find_collapse_layer(entropies: list[float], std: list[float] | None = None, n: int | None = None) -> int:
    """K, the decoder layer whose input shows the sharpest entropy drop.

    ``entropies[l]`` belongs to the input of layer l (:func:`layer_entropies`). The drop into
    layer l is d_l = E_{l−1} − E_l for l in 1..L−1 (K = 0 would prune before the decoder, and a
    drop after the last layer leaves no layer to prune). K = the earliest l whose drop is within
    the noise of the largest: d_l ≥ d_max − 2·se, where se = √((σ²_{l*−1} + σ²_{l*}) / n) is the
    standard error of the largest drop d_max = d_{l*} (0 without ``std`` and ``n``). Drops that
    the calibration set cannot tell apart count as ties, and ties go to the earliest layer: the
    paper's "sharp and consistent drop", taken as early as the evidence allows (earlier pruning
    saves more).
    """
    if len(entropies) < 3:
        raise ValueError(f"need the entropy of at least 3 layer inputs, got {len(entropies)}")
    drops = {layer: entropies[layer - 1] - entropies[layer] for layer in range(1, len(entropies) - 1)}
    best = max(drops, key=lambda layer: (drops[layer], -layer))
    tolerance = 0.0
    if std is not None and n:
        tolerance = 2.0 * math.sqrt((std[best - 1] ** 2 + std[best] ** 2) / n)
    return min(layer for layer, drop in drops.items() if drop >= drops[best] - tolerance)


# ---------------------------------------------------------------------------- profiles


def profile_path(model_name: str) -> str:
    """The per-model location of a profile: ``$EP_PROFILE_DIR`` (else
    ``~/.cache/entropyprune/profiles``) / the model name with every character outside
    ``[A-Za-z0-9._-]`` replaced by ``_``, plus ``.json``."""
    root = os.environ.get(PROFILE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "entropyprune", "profiles")
    return os.path.join(root, re.sub(r"[^A-Za-z0-9._-]", "_", str(model_name).strip("/")) + ".json")


def read_profile(path: str) -> dict:
    """A profile written by ``ep calibrate``; a one-line ValueError naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as fh:
            profile = json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"profile not found: {path} (write one with: ep calibrate --model MODEL)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"profile {path} is not readable JSON ({exc})") from None
    if not isinstance(profile, dict) or not isinstance(profile.get("collapse_layer"), int):
        raise ValueError(f"profile {path} has no integer 'collapse_layer'; rewrite it with ep calibrate")
    return profile


def auto_prune_layer(model_name: str, config: Any, profile: str | None = None) -> tuple[int, str]:
    """``--prune-layer auto``: K from ``profile`` (a file), else from the per-model profile
    (:func:`profile_path`) when one exists, else the family's default; ``(K, one line saying
    which)``."""
    path = profile or profile_path(model_name)
    if profile is not None or os.path.isfile(path):
        found = read_profile(path)
        if found.get("model_type") not in (None, config.model_type):
            raise ValueError(f"profile {path} is for a {found['model_type']!r} model, not {config.model_type!r}")
        return found["collapse_layer"], f"prune layer {found['collapse_layer']} from the calibration profile {path}"
    family = family_for(config)
    return family.default_prune_layer, (
        f"no calibration profile for {model_name} ({path}): the {family.model_type} default prune layer "
        f"{family.default_prune_layer}; measure it with: ep calibrate --model {model_name}"
    )


def parse_prune_layer(text: str | int) -> int | str:
    """A ``--prune-layer`` value: an integer K, or ``auto`` (resolved by :func:`resolve_prune_layer`)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        return int(str(text))
    except ValueError:
        raise ValueError(f"--prune-layer must be an integer K or 'auto', got {text!r}") from None


def resolve_prune_layer(value: int | str | None, model_name: str, profile: str | None = None) -> int:
    """The prune layer a job runs with: ``value`` itself; for ``None`` (not given) the family's
    default (the papers': 2 for LLaVA, 1 for Qwen-VL); for ``auto`` the result of
    :func:`auto_prune_layer` (the line saying where K came from is logged)."""
    if value is None and profile is None:
        from ep_core.loading import load_model_config

        return family_for(load_model_config(model_name)).default_prune_layer
    value = parse_prune_layer("auto" if value is None else value)
    if value != "auto":
        if profile is not None:
            raise ValueError("--profile is read only with --prune-layer auto")
        return value
    from ep_core.loading import load_model_config

    k, note = auto_prune_layer(model_name, load_model_config(model_name), profile)
    log.info(f"[prune-layer auto] {note}")
    return k


def _std(values: list[float]) -> float:
    """Population standard deviation √(Σ(v − v̄)² / n)."""
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
