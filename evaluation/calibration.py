"""``ep calibrate``: measure a model's layer-wise visual-token entropy and its collapse layer.

:func:`calibrate` loads the model (unpruned), feeds it ``n`` calibration inputs (by default
shapes scenes of the validation split, drawn on the spot, so it runs on any checkpoint with no
data at hand; or the images of a manifest / directory), reduces every layer's visual tokens to
their matrix entropy (``ep_core.ecl.layer_entropies``), finds K
(``ep_core.ecl.find_collapse_layer``) and writes, under ``output``:

* ``profile.json``: ``{"model", "model_type", "representation", "entropies", "std", "n",
  "num_layers", "collapse_layer", "paper_layer"}``, also copied to the per-model location
  (``ep_core.ecl.profile_path``) that ``--prune-layer auto`` reads;
* ``entropy_curve.png``: the curve with its spread, K and the family's paper layer marked;
* an MLflow run (experiment ``calibrate``): the curve as a stepped metric, K, the plot and the
  profile.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class CalibrationSettings:
    """The settings of ``ep calibrate``, one field per flag."""

    model: str
    output: str
    n: int = 32
    dataset: str = "shapes"
    representation: str = "hidden"
    batch_size: int = 8
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"


def calibration_rows(dataset: str, data_dir: str, n: int, seed: int) -> list[dict]:
    """The first ``n`` decodable image rows of ``dataset``: ``shapes`` draws ``n`` validation
    scenes with their caption prompt into ``data_dir``; anything else is a manifest or a
    directory (videos give their frames, as the caption job does)."""
    from pipelines.media import decode_row
    from pipelines.sources import scan

    if dataset == "shapes":
        from demo.world import build_set

        dataset = build_set(data_dir, n_images=n, seed=seed, split="validation", questions_per_image=0)
    elif not os.path.exists(dataset):
        raise FileNotFoundError(f"dataset not found: {dataset} (use 'shapes' or a manifest / directory)")
    rows = []
    for row in scan(dataset, frames=4).rows:
        decoded = decode_row(row)
        if decoded.get("error") is None:
            rows.append(decoded)
        if len(rows) == n:
            break
    if len(rows) < 2:
        raise ValueError(f"{dataset} holds {len(rows)} readable images; calibration needs at least 2")
    return rows


def calibrate(s: CalibrationSettings) -> dict:
    """Measure, write and record the profile (see the module docstring); returns it."""
    import torch

    from ep_core.ecl import find_collapse_layer, layer_entropies, profile_path
    from ep_core.families import family_for
    from ep_core.loading import load_model, load_model_config
    from ep_core.prompts import chat_prompt
    from pipelines.media import frames_of
    from pipelines.tracking import Tracker

    if s.n < 2:
        raise ValueError(f"--n must be >= 2 calibration inputs, got {s.n}")
    family = family_for(load_model_config(s.model))  # an unsupported model fails before any weight
    os.makedirs(s.output, exist_ok=True)
    rows = calibration_rows(s.dataset, os.path.join(s.output, "data"), s.n, s.seed)
    model, processor = load_model(s.model, dtype=s.dtype, device=s.device)
    device = next(model.parameters()).device
    start = time.monotonic()

    def batches():
        for i in range(0, len(rows), s.batch_size):
            chunk = rows[i : i + s.batch_size]
            images = [frames_of(r) for r in chunk]
            texts = [chat_prompt(processor, len(im), r["prompt"]) for im, r in zip(images, chunk)]
            inputs = processor(images=[f for im in images for f in im], text=texts, return_tensors="pt", padding=True)
            inputs = {k: v.to(device) for k, v in inputs.items()}
            if inputs.get("pixel_values") is not None and inputs["pixel_values"].is_floating_point():
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            yield inputs
            log.info(f"[calibrate] {min(i + s.batch_size, len(rows))}/{len(rows)} inputs, {time.monotonic() - start:.0f}s")

    torch.manual_seed(s.seed)
    measured = layer_entropies(model, batches(), representation=s.representation)
    k = find_collapse_layer(measured["mean"], measured["std"], measured["n"])
    profile = {
        "model": s.model,
        "model_type": family.model_type,
        "representation": s.representation,
        "entropies": measured["mean"],
        "std": measured["std"],
        "n": measured["n"],
        "num_layers": model.config.get_text_config().num_hidden_layers,
        "collapse_layer": k,
        "paper_layer": family.default_prune_layer,
        "dataset": s.dataset,
    }
    path = os.path.join(s.output, "profile.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(profile, fh, indent=2)
    shared = profile_path(s.model)
    os.makedirs(os.path.dirname(shared), exist_ok=True)
    shutil.copyfile(path, shared)
    plot = entropy_plot(profile, os.path.join(s.output, "entropy_curve.png"))
    tracker = Tracker(s.output, "calibrate")
    with tracker.run(f"calibrate-{family.model_type}", {k_: profile[k_] for k_ in ("model", "representation", "n", "dataset")}):
        for layer, value in enumerate(profile["entropies"]):
            tracker.metrics({"matrix_entropy": value}, step=layer)
        tracker.metrics({"collapse_layer": k})
        for artifact in (path, plot):
            tracker.artifact(artifact)
    profile["profile_path"], profile["shared_profile_path"], profile["plot_path"] = path, shared, plot
    return profile


def entropy_plot(profile: dict, path: str) -> str:
    """The entropy per layer input with ±1 std, K (solid) and the paper's layer (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, std = profile["entropies"], profile["std"]
    layers = list(range(len(mean)))
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot(layers, mean, marker="o", label=f"visual tokens ({profile['representation']})")
    ax.fill_between(layers, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    ax.axvline(profile["collapse_layer"], color="red", label=f"collapse layer K = {profile['collapse_layer']}")
    if profile.get("paper_layer") is not None:
        ax.axvline(profile["paper_layer"], color="gray", linestyle="--", label=f"paper's K = {profile['paper_layer']}")
    ax.set_xlabel("layer l (entropy of the input of decoder layer l)")
    ax.set_ylabel("matrix entropy (nats)")
    ax.set_title(f"{profile['model']}: n = {profile['n']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
