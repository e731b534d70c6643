"""The family table is the single answer to "is this model supported", and every command
resolves model names the same way (``demo``, presets, directories, hub ids)."""

from __future__ import annotations

import json
import os

import pytest

from ep_core.config import PruneConfig
from ep_core.families import FAMILIES, check_supported, default_visual_tokens, family_for, video_visual_tokens
from ep_core.loading import load_model_config, resolve_model_name

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_every_family_of_the_table_has_what_the_code_reads():
    for model_type, family in FAMILIES.items():
        assert family.model_type == model_type
        assert family.default_prune_layer >= 1 and family.visual_token_attrs
    prunable = {t for t, f in FAMILIES.items() if f.prunable}
    assert prunable == {"llava", "llava_next", "llava_onevision", "llava_next_video", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"}
    assert FAMILIES["qwen2_5_vl"].default_prune_layer == 1 and FAMILIES["llava"].default_prune_layer == 2


def _unprunable(monkeypatch, model_type: str) -> None:
    """Make ``model_type`` a family that loads and runs only unpruned (every real family prunes now)."""
    from dataclasses import replace

    monkeypatch.setitem(FAMILIES, model_type, replace(FAMILIES[model_type], prunable=False))


def test_check_supported_refuses_from_the_config_alone(monkeypatch):
    from transformers import Qwen3VLConfig

    qwen = load_model_config("qwen2.5-vl-7b")  # a preset: offline, no weights
    assert check_supported(qwen, PruneConfig("entropyprune", keep_ratio=0.5, prune_layer=1)).model_type == "qwen2_5_vl"
    qwen3 = Qwen3VLConfig()
    assert check_supported(qwen3, PruneConfig("entropyprune", keep_ratio=0.5, prune_layer=1)).model_type == "qwen3_vl"
    _unprunable(monkeypatch, "qwen3_vl")
    assert check_supported(qwen3, PruneConfig("none")).model_type == "qwen3_vl"
    with pytest.raises(ValueError, match="'qwen3_vl' is not supported yet for pruning.*pruning supports: llava") as refused:
        check_supported(qwen3, PruneConfig("entropyprune", keep_ratio=0.5, prune_layer=1))
    assert "qwen3_vl (e.g." not in str(refused.value)  # not offered among the families that prune
    llava = load_model_config("llava-1.5-7b")
    with pytest.raises(ValueError, match="between 1 and 31 for this 32-layer decoder, got 32"):
        check_supported(llava, PruneConfig("fastv", keep_ratio=0.5, prune_layer=32))
    assert check_supported(llava, PruneConfig("fastv", keep_ratio=0.5, prune_layer=31)) is FAMILIES["llava"]
    text_only = type("Config", (), {"model_type": "llama"})()
    with pytest.raises(ValueError, match="'llama' .* is not supported yet; supported: llava"):
        family_for(text_only)


def test_one_name_resolution_for_every_command():
    from demo import shipped_model_path

    assert resolve_model_name("demo") == shipped_model_path()
    assert resolve_model_name("llava-1.5-7b") == "llava-hf/llava-1.5-7b-hf"  # a preset's weights
    assert resolve_model_name("some/hub-id") == "some/hub-id"
    demo = load_model_config("demo")
    assert demo.model_type == "llava" and default_visual_tokens(demo) == 144 == default_visual_tokens("demo")


def test_ep_flops_resolves_demo_like_every_other_command(capsys):
    from jobs.cli import main

    assert main(["flops", "--model", "demo", "--keep-ratio", "0.33", "--text-tokens", "20", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["visual_tokens"], r["visual_tokens_kept"], r["num_layers"]) == (144, 48, 6)


def test_caption_preflight_refuses_unsupported_pruning_before_ray(tmp_path, capsys, monkeypatch):
    import ray

    from jobs.cli import main

    from transformers import Qwen3VLConfig

    _unprunable(monkeypatch, "qwen3_vl")  # a family that runs only unpruned
    (tmp_path / "in").mkdir()
    Qwen3VLConfig().save_pretrained(tmp_path / "qwen3")
    args = ["caption", "--model", str(tmp_path / "qwen3"), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")]
    assert main(args + ["--method", "entropyprune", "--keep-ratio", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ep caption: error: model family 'qwen3_vl' is not supported yet for pruning")
    assert err.count("\n") == 1
    assert main(["caption", "--model", "demo", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"),
                 "--method", "dart", "--keep-ratio", "0.5", "--prune-layer", "6"]) == 2
    assert "between 1 and 5 for this 6-layer decoder, got 6" in capsys.readouterr().err
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:  # never installed on the CPU CI machine
        assert main(["caption", "--model", "demo", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"),
                     "--attn-implementation", "flash_attention_2"]) == 2
        err = capsys.readouterr().err
        assert "needs the flash-attn package" in err and "or use sdpa" in err and err.count("\n") == 1
    assert main(["caption", "--model", "demo", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"),
                 "--attn-implementation", "flex"]) == 2
    assert "attn-implementation must be one of sdpa, eager, flash_attention_2" in capsys.readouterr().err
    assert main(["caption", "--model", "demo", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"),
                 "--dtype", "fp8"]) == 2
    assert "dtype must be one of auto, float32, float16, bfloat16, got 'fp8'" in capsys.readouterr().err
    (tmp_path / "file").write_text("")  # an output "directory" under a regular file cannot be created
    assert main(["caption", "--model", "demo", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "file" / "o")]) == 2
    err = capsys.readouterr().err
    assert "cannot be written" in err and err.count("\n") == 1
    assert not ray.is_initialized()
    assert not (tmp_path / "o").exists()  # nothing written, no tracking store opened


def test_sweep_preflight_refuses_before_ray(tmp_path, capsys):
    import ray

    from jobs.cli import main

    assert main(["sweep", "--model", "demo", "--n", "2", "--prune-layer", "6", "--output", str(tmp_path / "s")]) == 2
    assert "between 1 and 5 for this 6-layer decoder" in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "s").exists()  # nothing drawn, nothing started
    assert main(["demo", "--prune-layer", "6", "--output", str(tmp_path / "d")]) == 2
    assert "between 1 and 5" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_default_frames_fit_the_context():
    """A video reaches LLaVA as N images: N·V + text + new tokens must fit the context."""
    from ep_core.families import default_frames

    llava = load_model_config("llava-1.5-7b")  # 576 tokens per image, 4096 positions
    assert default_frames(llava, 32) == 6 and 6 * 576 + 64 + 32 <= 4096 < 7 * 576 + 64 + 32
    assert default_frames(load_model_config("llava-v1.6-vicuna-7b"), 32) == 1  # anyres: up to 2880 per image
    assert default_frames(load_model_config("qwen2.5-vl-7b"), 32) == 8  # 256 per image of 128k positions: the cap


def test_default_frames_of_a_video_native_family_is_one_video_of_8_frames():
    """Where a video is one video (pooled or merged over time), not N images, the default is 8
    frames even when 8 frames as images would not fit (a 2,880-token LLaVA-NeXT image per frame)."""
    from ep_core.families import default_frames

    next_ = load_model_config("llava-v1.6-vicuna-7b")
    video = type(next_)(**{**next_.to_dict(), "model_type": "llava_next_video"})  # the same shapes, video-native
    video.model_type = "llava_next_video"
    assert default_frames(next_, 32) == 1 and default_frames(video, 32) == 8


def test_cpu_stage_memory_counts_frames_only_for_videos():
    from pipelines.caption import CPU_STAGE_BASE_BYTES, CaptionConfig, _cpu_stage_memory

    llava = CaptionConfig(model="llava-1.5-7b", input="i", output="o", frames=8, max_side=1024)  # a preset: 336 px, 1 crop
    per_image = 2 * 1024 * 1024 * 3 + 3 * 336 * 336 * 4
    assert _cpu_stage_memory(llava, 64, any_video=False) == CPU_STAGE_BASE_BYTES + 64 * per_image
    assert _cpu_stage_memory(llava, 64, any_video=True) == CPU_STAGE_BASE_BYTES + 8 * 64 * per_image
    next_ = CaptionConfig(model="llava-v1.6-vicuna-7b", input="i", output="o", frames=8, max_side=1024)  # anyres: 5 crops
    assert _cpu_stage_memory(next_, 64, any_video=False) == CPU_STAGE_BASE_BYTES + 64 * (2 * 1024 * 1024 * 3 + 5 * 3 * 336 * 336 * 4)


def test_dtype_and_attention_backend_are_part_of_the_job_identity(tmp_path):
    """Rows computed in another dtype or attention backend must not be mixed into an output."""
    from pipelines.caption import CaptionConfig
    from pipelines.sink import check_job

    base = dict(model="demo", input="i", output=str(tmp_path))
    check_job(str(tmp_path), CaptionConfig(**base).job_identity())
    (tmp_path / "part-x-0.parquet").write_bytes(b"")  # the directory holds rows now
    for other in (dict(dtype="bfloat16"), dict(attn_implementation="eager")):
        with pytest.raises(ValueError, match="holds rows of a different job"):
            check_job(str(tmp_path), CaptionConfig(**base, **other).job_identity())
    assert {"dtype", "attn_implementation"} <= set(CaptionConfig(**base).run_params())


def test_without_prune_layer_each_command_takes_the_familys_default(capsys):
    """Not given, K is the family's (the papers': 2 for LLaVA, 1 for Qwen-VL); given, it is kept."""
    from jobs.caption import add_arguments, config_from_args
    from jobs.cli import main

    import argparse

    def caption_k(*flags):
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        args = parser.parse_args(["--input", ".", "--output", "o", "--method", "random", "--keep-ratio", "0.5", *flags])
        return config_from_args(args).prune.prune_layer

    assert caption_k("--model", "qwen2.5-vl-7b") == 1 and caption_k("--model", "qwen2-vl-7b") == 1
    assert caption_k("--model", "demo") == 2 and caption_k("--model", "qwen2.5-vl-7b", "--prune-layer", "3") == 3
    assert main(["flops", "--model", "qwen2-vl-7b", "--keep-ratio", "0.25", "--text-tokens", "40", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prune_layer"] == 1


@pytest.mark.parametrize("model_type", ["llava_onevision", "llava_next_video"])
def test_video_and_image_token_counts_are_what_the_models_produce(model_type):
    """The counts behind ``ep flops`` (a video of F frames; OneVision's default 2×2-grid image)
    equal the features the tiny models' own feature functions return."""
    import torch

    from tests.tiny_models import _feature_count, build_tiny_llava_video

    model = build_tiny_llava_video(model_type)
    cfg, side = model.config, model.config.vision_config.image_size
    with torch.no_grad():
        for frames in (1, 3):
            out = model.model.get_video_features(torch.randn(1, frames, 3, side, side), vision_feature_layer=-1,
                                                 vision_feature_select_strategy=None)
            assert video_visual_tokens(cfg, frames) == _feature_count(out)
        if model_type == "llava_onevision":
            out = model.model.get_image_features(torch.randn(1, 5, 3, side, side), torch.tensor([[2 * side, 2 * side]]),
                                                 vision_feature_layer=-1, vision_feature_select_strategy=None)
            assert default_visual_tokens(cfg) == _feature_count(out)
    qwen = load_model_config("qwen2-vl-7b")
    assert video_visual_tokens(qwen, 8) == 4 * 256 and video_visual_tokens(qwen, 7) == 4 * 256  # pairs of frames
    with pytest.raises(ValueError, match="separate images"):
        video_visual_tokens(load_model_config("llava-1.5-7b"), 8)
