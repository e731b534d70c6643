"""FLOPs formulas, presets and ``ep flops``.

Oracles: hand arithmetic of the formulas on small numbers, torch's FlopCounterMode on tiny
real transformers modules (eager attention, so it counts the full n×n products), the
FastV-formula table, and the paper's 68.2 % (docs/design.md §1).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ep_core.flops import (
    TextDims,
    decode_flops_per_token,
    flops_report,
    kv_cache_bytes,
    layer_flops,
    lm_head_flops,
    paper_layer_flops,
    paper_prefill_flops,
    prefill_flops,
    projector_flops,
    text_dims,
    vision_flops,
)
from ep_core.families import default_visual_tokens
from ep_core.loading import load_model_config
from ep_core.presets import PRESETS
from jobs.cli import main as ep_main


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_TEXT = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=50,
)
TINY_CLIP = dict(
    model_type="clip_vision_model",
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=28,
    patch_size=7,
)


def tiny_llava():
    from transformers import LlavaConfig

    return LlavaConfig(text_config=dict(TINY_TEXT), vision_config=dict(TINY_CLIP), vision_feature_layer=-2)


def tiny_text():
    from transformers import LlamaConfig

    cfg = dict(TINY_TEXT)
    cfg.pop("model_type")
    return LlamaConfig(**cfg)


# ------------------------------------------------------------------ formulas by hand


def test_paper_layer_formula_by_hand():
    # n=3, d=2, m=5: 4·3·2² + 2·3²·2 + 2·3·2·5 = 48 + 36 + 60
    assert paper_layer_flops(3, 2, 5) == 144
    # prefill with K=1 of L=3, n̂=1: F(1) = 4·1·4 + 2·1·2 + 2·1·2·5 = 16 + 4 + 20 = 40
    assert paper_prefill_flops(3, 1, 2, 5, num_layers=3, prune_layer=1) == 144 + 2 * 40


def test_exact_layer_by_hand_gqa_causal_swiglu():
    dims = TextDims(hidden_size=8, intermediate_size=12, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=2,
                    vocab_size=10)
    n = 5
    macs_proj = n * 8 * (4 * 2) + n * 8 * (2 * 2) * 2 + n * (4 * 2) * 8  # q, k+v, o
    pairs = sum(i + 1 for i in range(n))  # query i sees keys 0..i
    macs_attn = 2 * pairs * 4 * 2  # QKᵀ and AV, 4 heads of dim 2
    macs_mlp = 3 * n * 8 * 12
    assert layer_flops(n, dims) == 2 * (macs_proj + macs_attn + macs_mlp)
    # prefill: 1 layer of n tokens, 2 layers of 2 tokens
    assert prefill_flops(dims, n, 2, prune_layer=1) == layer_flops(5, dims) + 2 * layer_flops(2, dims)
    assert prefill_flops(dims, n) == 3 * layer_flops(5, dims)
    assert lm_head_flops(dims, 7) == 2 * 7 * 8 * 10


def test_exact_layer_matches_flop_counter_on_a_real_llama_layer():
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = tiny_text()
    cfg._attn_implementation = "eager"
    layer = LlamaDecoderLayer(cfg, layer_idx=0).eval()
    n = 11
    x = torch.randn(1, n, cfg.hidden_size)
    pos = torch.arange(n)[None]
    mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        layer(x, attention_mask=mask, position_ids=pos, position_embeddings=LlamaRotaryEmbedding(cfg)(x, pos))
    dims = text_dims(cfg)
    width = dims.num_heads * dims.head_dim
    # eager attention multiplies full n×n matrices; ours counts the n(n+1)/2 causal pairs
    counted_full = layer_flops(n, dims) - 2 * width * n * (n + 1) + 4 * width * n * n
    assert counter.get_total_flops() == counted_full


def test_clip_tower_and_projector_match_flop_counter():
    from transformers import CLIPVisionModel
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    cfg = tiny_llava()
    cfg.vision_config._attn_implementation = "eager"
    tower = CLIPVisionModel(cfg.vision_config).eval()
    projector = LlavaMultiModalProjector(cfg).eval()
    visual = (28 // 7) ** 2
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = tower(torch.randn(1, 3, 28, 28), output_hidden_states=True)
        projector(out.hidden_states[-2][:, 1:])
    assert counter.get_total_flops() == vision_flops(cfg, visual) + projector_flops(cfg, visual)


def test_qwen2_vit_matches_flop_counter():
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    cfg = Qwen2VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=200000),
        vision_config=dict(depth=3, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
    )
    cfg.vision_config._attn_implementation = "eager"
    vit = Qwen2VisionTransformerPretrainedModel._from_config(cfg.vision_config).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vit(torch.randn(6 * 4, 3 * 2 * 14 * 14), grid_thw=torch.tensor([[1, 6, 4]]))
    assert vision_flops(cfg, 6 * 4 // 4) == counter.get_total_flops()
    assert projector_flops(cfg, 6) == 0  # the merger is inside vision_flops


@pytest.mark.parametrize("model_type", ["llava_onevision", "llava_next_video"])
def test_a_video_through_the_video_path_matches_flop_counter(model_type):
    """One tower pass per frame, the projector before (OneVision) or after (NeXT-Video) the
    frames are pooled: the count of ``vision_flops + projector_flops`` with ``video_frames``
    is what torch counts in the model's own ``get_video_features``."""
    from tests.tiny_models import _feature_count, build_tiny_llava_video

    model = build_tiny_llava_video(model_type)
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "eager"})
    cfg, frames = model.config, 3
    side = cfg.vision_config.image_size
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model.model.get_video_features(torch.randn(1, frames, 3, side, side), vision_feature_layer=-1,
                                             vision_feature_select_strategy=None)
    visual = _feature_count(out)
    counted = vision_flops(cfg, visual, video_frames=frames) + projector_flops(cfg, visual, video_frames=frames)
    assert counted == counter.get_total_flops()
    # the image rule would see round(N / P) crops, not one per frame
    assert vision_flops(cfg, visual) != vision_flops(cfg, visual, video_frames=frames)


@pytest.mark.parametrize("grid, window_size, exact", [((8, 8), 56, True), ((8, 8), 112, True), ((10, 14), 56, False)])
def test_qwen25_vit_matches_flop_counter(grid, window_size, exact):
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    cfg = Qwen2_5_VLConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=200000,
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=40, num_heads=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=window_size,
                           fullatt_block_indexes=[1], out_hidden_size=64),
    )
    cfg.vision_config._attn_implementation = "eager"
    vit = Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg.vision_config).eval()
    h, w = grid
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vit(torch.randn(h * w, 3 * 2 * 14 * 14), grid_thw=torch.tensor([[1, h, w]]))
    measured = counter.get_total_flops()
    estimate = vision_flops(cfg, h * w // 4)
    if exact:
        assert estimate == measured
    else:  # windows cut by the border are smaller: the estimate is a close upper bound
        assert measured < estimate < 1.1 * measured
    assert projector_flops(cfg, h * w // 4) == 0  # the merger is inside vision_flops


def test_kv_cache_and_decode_by_hand():
    dims = TextDims(hidden_size=8, intermediate_size=12, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=2,
                    vocab_size=10)
    per_token_per_layer = 2 * 2 * 2 * 2  # K and V · Hkv · hd · 2 bytes
    assert kv_cache_bytes(dims, 10, 4, prune_layer=1) == per_token_per_layer * (10 + 4 + 4)
    assert kv_cache_bytes(dims, 10, dtype_bytes=4) == 2 * per_token_per_layer * 30
    # one more cached token costs 2·2·H·hd FLOPs per layer (QKᵀ and AV for one key)
    assert decode_flops_per_token(dims, 10) - decode_flops_per_token(dims, 9) == 3 * 4 * 4 * 2
    fixed = 2 * (8 * 8 + 2 * 8 * 4 + 8 * 8) + 2 * 3 * 8 * 12
    assert decode_flops_per_token(dims, 0) == 3 * (fixed + 4 * 4 * 2 * 1)
    assert decode_flops_per_token(dims, 10, 4, prune_layer=1) == (
        decode_flops_per_token(dims, 10) - 2 * (4 * 4 * 2 * 6)
    )


# ------------------------------------------------------------------ the report


def test_keep_all_means_no_reduction():
    cfg = load_model_config("llava-1.5-7b")
    r = flops_report(cfg, 576, 576, 57, 2)
    assert r.flops_reduction == 0.0
    assert r.flops_reduction_paper == 0.0
    assert r.flops_reduction_with_vision == 0.0
    assert r.kv_cache_bytes == r.kv_cache_bytes_full
    assert r.prefill_flops == r.prefill_flops_full


def test_reductions_fall_as_more_tokens_are_kept():
    cfg = load_model_config("llava-1.5-7b")
    previous = None
    for kept in range(0, 577, 48):
        r = flops_report(cfg, 576, kept, 57, 2)
        now = (r.flops_reduction, r.flops_reduction_paper, r.flops_reduction_with_vision, r.kv_cache_reduction)
        if previous is not None:
            assert all(a < b for a, b in zip(now, previous))
        previous = now
        # the vision tower is fixed cost, so counting it lowers the reduction
        assert r.flops_reduction_with_vision <= r.flops_reduction


def test_paper_formula_reproduces_hf_integration_table():
    d, m, L, K, N = 4096, 11008, 32, 2, 576
    cases = {(0, 0.5): 0.476, (0, 0.75): 0.708, (64, 0.5): 0.429, (64, 0.75): 0.639}
    for (text, pruned_share), expected in cases.items():
        n = text + N
        n_hat = text + round(N * (1 - pruned_share))
        red = 1 - paper_prefill_flops(n, n_hat, d, m, L, K) / (L * paper_layer_flops(n, d, m))
        assert red == pytest.approx(expected, abs=0.0006)
    cfg = load_model_config("llava-1.5-7b")
    r = flops_report(cfg, N, 288, 64, K)
    assert r.flops_reduction_paper_image_only == pytest.approx(0.476, abs=0.0006)
    assert r.flops_reduction_paper == pytest.approx(0.429, abs=0.0006)


def test_report_on_text_only_config_and_dims():
    r = flops_report(tiny_text(), 16, 4, 5, 1)
    assert r.prefill_flops_with_vision is None and r.flops_reduction_with_vision is None and r.vision_flops is None
    dims = text_dims(tiny_text())
    assert r.prefill_flops == layer_flops(21, dims) + 3 * layer_flops(9, dims)
    assert flops_report(dims, 16, 4, 5, 1).to_dict() == r.to_dict()
    d = flops_report(tiny_llava(), 16, 4, 5, 1).to_dict()
    assert d["prefill_flops_with_vision"] == d["prefill_flops"] + d["vision_flops"] + d["lm_head_flops"]
    json.dumps(d)  # plain types only


def test_report_rejects_bad_input():
    cfg = tiny_text()
    with pytest.raises(ValueError, match="exceeds"):
        flops_report(cfg, 16, 17, 5, 1)
    with pytest.raises(ValueError, match="prune_layer"):
        flops_report(cfg, 16, 4, 5, 9)
    with pytest.raises(ValueError, match="text_tokens"):
        flops_report(cfg, 16, 4, -1, 1)


# ------------------------------------------------------------------ presets


@pytest.mark.parametrize(
    "name, cls, hidden, layers, kv_heads, vocab, visual",
    [
        ("llava-1.5-7b", "LlavaConfig", 4096, 32, 32, 32064, 576),
        ("llava-1.5-13b", "LlavaConfig", 5120, 40, 40, 32064, 576),
        ("llava-v1.6-vicuna-7b", "LlavaNextConfig", 4096, 32, 32, 32064, 2880),
        ("qwen2-vl-7b", "Qwen2VLConfig", 3584, 28, 4, 152064, 256),
        ("qwen2.5-vl-7b", "Qwen2_5_VLConfig", 3584, 28, 4, 152064, 256),
        ("llava-onevision-qwen2-7b", "LlavaOnevisionConfig", 3584, 28, 4, 152128, 729 + 54 * 54 + 54),
        ("llava-next-video-7b", "LlavaNextVideoConfig", 4096, 32, 32, 32064, 2880),
    ],
)
def test_presets_build_real_config_objects(name, cls, hidden, layers, kv_heads, vocab, visual):
    cfg = load_model_config(name)
    assert type(cfg).__name__ == cls
    text = cfg.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads, text.vocab_size) == (
        hidden, layers, kv_heads, vocab)
    assert default_visual_tokens(name) == visual == default_visual_tokens(cfg)
    assert flops_report(cfg, visual, visual // 4, 40, 2).flops_reduction_with_vision > 0


def test_local_directory_and_errors(tmp_path, monkeypatch):
    tiny_llava().save_pretrained(tmp_path / "m")
    cfg = load_model_config(tmp_path / "m")
    assert type(cfg).__name__ == "LlavaConfig" and default_visual_tokens(cfg) == 16
    assert load_model_config("llava-hf/llava-1.5-7b-hf").get_text_config().hidden_size == 4096  # alias, offline
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_model_config(tmp_path / "empty")
    with pytest.raises(ValueError) as err:
        load_model_config("llava-9b")
    assert all(p in str(err.value) for p in PRESETS)
    import transformers

    def no_network(name, *args, **kwargs):
        raise OSError(f"We couldn't connect to the hub to load {name}")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_network)
    with pytest.raises(ValueError, match="hub lookup failed.*couldn't connect"):
        load_model_config("nobody/no-such-model-xyz")
    with pytest.raises(ValueError, match="visual tokens"):
        default_visual_tokens(tiny_text())


# ------------------------------------------------------------------ the CLI


def run_cli(capsys, *argv):
    rc = ep_main(["flops", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_reproduces_the_papers_68_2_percent(capsys):
    rc, out, _ = run_cli(capsys, "--model", "llava-1.5-7b", "--budget", "128", "--text-tokens", "57", "--json")
    assert rc == 0
    r = json.loads(out)
    for key in ("visual_tokens", "visual_tokens_kept", "flops_reduction_paper", "flops_reduction",
                "flops_reduction_with_vision", "prefill_flops", "prefill_flops_full", "paper_flops",
                "paper_flops_full", "prefill_flops_with_vision", "prefill_flops_with_vision_full",
                "kv_cache_bytes", "kv_cache_bytes_full"):
        assert key in r
    assert r["visual_tokens"] == 576
    assert r["visual_tokens_kept"] == (32 * 128 - 2 * 576) // 30  # docs/design.md §1
    assert r["flops_reduction_with_vision"] == pytest.approx(0.682, abs=0.02)
    assert r["flops_reduction_with_vision"] < r["flops_reduction"]
    cfg = load_model_config("llava-1.5-7b")
    assert r["prefill_flops"] == prefill_flops(text_dims(cfg), 633, 57 + r["visual_tokens_kept"], 2)


def test_cli_frames_counts_one_video_through_the_video_path(capsys):
    rc, out, _ = run_cli(capsys, "--model", "llava-next-video-7b", "--frames", "8", "--keep-ratio", "0.125",
                         "--text-tokens", "40", "--json")
    assert rc == 0
    r = json.loads(out)
    assert (r["visual_tokens"], r["visual_tokens_kept"], r["video_frames"], r["prune_layer"]) == (8 * 144, 144, 8, 2)
    cfg = load_model_config("llava-next-video-7b")
    assert r["vision_flops"] == vision_flops(cfg, 1152, video_frames=8) + projector_flops(cfg, 1152, video_frames=8)
    rc, out, _ = run_cli(capsys, "--model", "llava-onevision-qwen2-7b", "--frames", "8", "--keep-ratio", "0.25",
                         "--text-tokens", "40")
    assert rc == 0 and "1569 (one video, 8 frames) -> 392 kept" in out
    rc, _, err = run_cli(capsys, "--model", "llava-1.5-7b", "--frames", "8", "--keep-ratio", "0.25", "--text-tokens", "40")
    assert rc == 2 and "no video path" in err


def test_cli_keep_ratio_and_table(capsys):
    rc, out, _ = run_cli(capsys, "--model", "qwen2.5-vl-7b", "--keep-ratio", "0.25", "--text-tokens", "40",
                         "--prune-layer", "1", "--json")
    assert rc == 0
    r = json.loads(out)
    assert (r["visual_tokens"], r["visual_tokens_kept"], r["prune_layer"]) == (256, 64, 1)
    rc, out, _ = run_cli(capsys, "--model", "llava-1.5-7b", "--budget", "64", "--text-tokens", "57")
    assert rc == 0 and "reduction" in out and "576 -> 29 kept" in out
    rc, out, _ = run_cli(capsys, "--model", "llava-v1.6-vicuna-7b", "--keep-tokens", "320", "--text-tokens", "57",
                         "--json")  # the official LLaVA-1.6 path: k = B directly
    r = json.loads(out)
    assert rc == 0 and (r["visual_tokens"], r["visual_tokens_kept"]) == (2880, 320)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "llava-9b", "--budget", "128", "--text-tokens", "57"], "presets"),
        (["--model", "llava-1.5-7b", "--budget", "128", "--keep-ratio", "0.5", "--text-tokens", "57"], "not --budget and --keep-ratio"),
        (["--model", "llava-1.5-7b", "--text-tokens", "57"], "--budget"),
        (["--model", "llava-1.5-7b", "--budget", "128"], "--text-tokens"),
        (["--model", "llava-1.5-7b", "--keep-ratio", "1.5", "--text-tokens", "5"], "keep_ratio"),
        (["--model", "llava-1.5-7b", "--budget", "128", "--text-tokens", "5", "--prune-layer", "32"], "prune-layer"),
    ],
)
def test_cli_errors_are_one_clear_line(capsys, argv, message):
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.startswith("ep flops: error:") and message in err and err.count("\n") == 1
