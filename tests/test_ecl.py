"""The Entropy Collapse Layer: the drop criterion on planted curves, the streaming per-layer
entropy against the naive all-hidden-states computation, ``ep calibrate`` and
``--prune-layer auto``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from ep_core import matrix_entropy
from ep_core.ecl import find_collapse_layer, layer_entropies
from tests.tiny_models import build_tiny_llava, make_inputs, random_images

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------ the criterion on planted curves
@pytest.mark.parametrize(
    "curve, expected",
    [
        ([5.0, 4.9, 4.8, 2.0, 1.9, 1.8, 1.7], 3),  # one sharp drop into layer 3
        ([5.0, 2.0, 1.9, 1.8, 1.7], 1),  # the drop at layer 1
        ([5.0, 4.9, 4.8, 4.7, 4.6, 1.0, 0.9], 5),  # a late drop (into the last layer)
        ([3.0, 3.5, 2.0, 2.5, 1.0, 1.2], 2),  # two equal drops: the earliest
        ([1.0, 1.2, 1.4, 1.6], 1),  # no drop at all: the smallest rise, earliest
    ],
)
def test_sharpest_drop_is_the_collapse_layer(curve, expected):
    assert find_collapse_layer(curve) == expected


def test_a_drop_after_the_last_layer_is_not_a_prune_layer():
    # the fall from E_{L-1} to E_L would prune after every layer: it is not a candidate
    assert find_collapse_layer([5.0, 4.8, 4.7, 4.6, 1.0]) == 1


def test_noise_on_a_slow_decline_does_not_move_the_sharp_drop():
    rng = np.random.default_rng(0)
    for trial in range(20):
        curve = list(6.0 - 0.05 * np.arange(12) + rng.normal(0, 0.02, 12))
        curve[7:] = [v - 1.0 for v in curve[7:]]
        assert find_collapse_layer(curve) == 7, (trial, curve)


def test_drops_within_the_noise_count_as_ties_and_go_to_the_earliest():
    curve = [5.0, 4.0, 3.95, 2.9, 2.85]  # drops 1.0 (layer 1) and 1.05 (layer 3)
    assert find_collapse_layer(curve) == 3  # no spread given: the larger drop
    std = [0.5] * 5
    assert find_collapse_layer(curve, std, n=32) == 1  # se ≈ 0.125: indistinguishable → earliest
    assert find_collapse_layer(curve, std, n=100_000) == 3  # many samples: the larger drop again


def test_matrix_entropy_ignores_token_order_and_ranks_full_above_low_rank():
    g = torch.Generator().manual_seed(0)
    full = torch.randn(40, 16, generator=g, dtype=torch.float64)
    assert float(matrix_entropy(full[torch.randperm(40, generator=g)])) == pytest.approx(float(matrix_entropy(full)), rel=1e-12)
    low = torch.randn(40, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 16, generator=g, dtype=torch.float64)
    assert matrix_entropy(low) < matrix_entropy(full)
    assert float(matrix_entropy(low)) <= np.log(2) + 1e-9  # rank 2 (centred: at most 2)


# ------------------------------------------------------------------ streaming = naive
@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny_llava(num_layers=4)
    prompts = ["describe this image", "what color is the shape", "how many", "is there a red circle"]
    return model, processor, make_inputs(processor, prompts, random_images(4, seed=3))


def _naive(model, inputs, representation):
    """Every hidden state of every layer at once (transformers' output_hidden_states)."""
    with torch.inference_mode():
        out = model(**inputs, output_hidden_states=True, use_cache=False)
    visual = inputs["input_ids"] == model.config.image_token_id
    layers = model.model.language_model.layers
    states = list(out.hidden_states)
    if representation == "query":
        with torch.inference_mode():
            states = [layer.self_attn.q_proj(layer.input_layernorm(states[i])) for i, layer in enumerate(layers)]
    return np.array([[float(matrix_entropy(h[b][visual[b]].float())) for h in states] for b in range(visual.shape[0])])


@pytest.mark.parametrize("representation", ["hidden", "query"])
def test_streaming_reduction_equals_the_naive_computation(tiny, representation):
    model, _, inputs = tiny
    naive = _naive(model, inputs, representation)
    halves = [{k: v[:2] for k, v in inputs.items()}, {k: v[2:] for k, v in inputs.items()}]  # two batches
    measured = layer_entropies(model, halves, representation=representation)
    expected_layers = 5 if representation == "hidden" else 4  # L + 1 hidden states; L query projections
    assert measured["n"] == 4 and len(measured["mean"]) == expected_layers == naive.shape[1]
    np.testing.assert_allclose(measured["mean"], naive.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(measured["std"], naive.std(0), rtol=1e-4, atol=1e-6)
    assert all(not layer._forward_pre_hooks for layer in model.model.language_model.layers)  # hooks removed


# ------------------------------------------------------------------ ep calibrate and --prune-layer auto
@pytest.fixture
def profiles(tmp_path, monkeypatch):
    monkeypatch.setenv("EP_PROFILE_DIR", str(tmp_path / "profiles"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "profiles"


def test_ep_calibrate_writes_json_a_profile_and_a_plot(tmp_path, profiles, capsys):
    from jobs.cli import main

    model_dir = str(tmp_path / "tiny")
    model, processor = build_tiny_llava(image_size=16, patch_size=4)
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    out = tmp_path / "cal"
    assert main(["calibrate", "--model", model_dir, "--n", "6", "--batch-size", "4", "--output", str(out), "--json"]) == 0
    printed = capsys.readouterr()
    result = json.loads(printed.out)  # stdout is only the JSON object
    assert "[calibrate] 6/6 inputs" in printed.err  # progress went to stderr
    assert result["representation"] == "hidden" and result["n"] == 6
    assert len(result["entropies"]) == len(result["std"]) == 4 + 1
    assert 1 <= result["collapse_layer"] <= 3 and result["paper_layer"] == 2
    assert result["collapse_layer"] == find_collapse_layer(result["entropies"], result["std"], 6)
    profile = json.loads((out / "profile.json").read_text())
    assert profile["collapse_layer"] == result["collapse_layer"] and profile["model_type"] == "llava"
    assert list(profiles.glob("*.json")) and (out / "entropy_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "_mlflow.db").exists()


def _write_profile(path, k, model_type="llava"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"collapse_layer": k, "model_type": model_type}))
    return str(path)


def test_prune_layer_auto_takes_k_from_the_profile_or_the_family_default(tmp_path, profiles, caplog):
    import argparse

    from ep_core.ecl import profile_path
    from jobs.caption import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--model", "demo", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--method", "dart",
            "--keep-ratio", "0.5"]
    with caplog.at_level("INFO", logger="ep_core.ecl"):
        cfg = config_from_args(parser.parse_args(base + ["--prune-layer", "auto"]))
    assert cfg.prune.prune_layer == 2  # no profile: the llava default
    assert "no calibration profile for demo" in caplog.text and "ep calibrate --model demo" in caplog.text
    _write_profile(profiles / os.path.basename(profile_path("demo")), 3)
    assert config_from_args(parser.parse_args(base + ["--prune-layer", "auto"])).prune.prune_layer == 3  # found
    explicit = _write_profile(tmp_path / "mine.json", 1)
    assert config_from_args(parser.parse_args(base + ["--prune-layer", "auto", "--profile", explicit])).prune.prune_layer == 1
    assert config_from_args(parser.parse_args(base + ["--prune-layer", "4"])).prune.prune_layer == 4
    other = _write_profile(tmp_path / "qwen.json", 1, model_type="qwen2_5_vl")
    with pytest.raises(ValueError, match="is for a 'qwen2_5_vl' model"):
        config_from_args(parser.parse_args(base + ["--prune-layer", "auto", "--profile", other]))


def test_streaming_reduction_on_llava_next_anyres():
    from tests.tiny_models import build_tiny_llava_next

    model, processor = build_tiny_llava_next()
    inputs = make_inputs(processor, ["describe this image", "what color"], random_images(2, size=16, seed=1))
    measured = layer_entropies(model, [inputs])
    np.testing.assert_allclose(measured["mean"], _naive(model, inputs, "hidden").mean(0), rtol=1e-5, atol=1e-6)
