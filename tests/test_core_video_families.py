"""The oracles of docs/design.md §4 on the video-capable families, each a tiny random model:
Qwen2-VL, Qwen2.5-VL and Qwen3-VL (M-RoPE: kept tokens keep their 3-D positions, decoding
continues from the unpruned numbering; Qwen3-VL's DeepStack additions follow the cut), LLaVA-OneVision and LLaVA-NeXT-Video (anyres images, pooled video
frames). Rows of different visual-token counts, an image row beside a video row, every
method, every attention backend. Inputs are built by hand (the video processors need
torchvision, absent with the CPU torch here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from ep_core import PruneConfig, apply_pruning
from ep_core.families import FAMILIES
from tests.oracles import FLASH_LIKE, install_masked_reference, padded_kept_mask
from tests.tiny_models import (
    LLAVA_VIDEO_IMAGE, LLAVA_VIDEO_VIDEO, QWEN_IMAGE, QWEN_VIDEO, QWEN_VISION_END, QWEN_VISION_START,
    build_tiny_llava_video, build_tiny_qwen3_vl, build_tiny_qwen_vl, llava_video_inputs, qwen3_inputs, qwen_inputs,
)

PRUNING_METHODS = ["entropyprune", "random", "fastv", "dart"]
BACKENDS = ["sdpa", "eager", FLASH_LIKE]
NEW_TOKENS = 4


@dataclass
class Tiny:
    """One tiny model of a family, how to build its inputs and which ids are visual."""

    model: torch.nn.Module
    inputs: Callable[[list[dict], int], dict]
    image_id: int
    video_id: int
    rows: list[dict]  # three images of different visual-token counts
    mixed: list[dict]  # an image, a video, an image
    suppress: list[int]  # ids a random model must not generate (placeholders, read back by use_cache=False)

    @property
    def k(self) -> int:
        return FAMILIES[self.model.config.model_type].default_prune_layer


def _qwen(model_type: str) -> Tiny:
    images = [{"prompt": [11, 12, 13, 14], "image": (4, 4)}, {"prompt": [21, 22], "image": (6, 4)},
              {"prompt": [31, 32, 33, 34, 35, 36], "image": (4, 8)}]  # 4, 6, 8 visual tokens (2×2 merge)
    return Tiny(build_tiny_qwen_vl(model_type), qwen_inputs, QWEN_IMAGE, QWEN_VIDEO, images,
                [images[0], {"prompt": [41, 42, 43], "video": (2, 4, 6)}, images[2]],
                [QWEN_VISION_START, QWEN_IMAGE, QWEN_VIDEO, QWEN_VISION_END])


def _qwen3(model_type: str) -> Tiny:
    """Qwen3-VL: DeepStack additions after decoder layers 0-2 must follow the cut at K = 1
    (more of them: tests/test_core_qwen3_vl.py); a video is one group per temporal patch."""
    qwen = _qwen("qwen2_5_vl")  # the same image rows
    return Tiny(build_tiny_qwen3_vl(), qwen3_inputs, QWEN_IMAGE, QWEN_VIDEO, qwen.rows,
                [qwen.rows[0], {"prompt": [41, 42, 43], "video": (4, 4, 6)}, qwen.rows[2]], qwen.suppress)


def _llava_video(model_type: str) -> Tiny:
    model = build_tiny_llava_video(model_type)
    images = [{"prompt": [11, 12, 13, 14], "image": (16, 16)}, {"prompt": [21, 22], "image": (16, 32)},
              {"prompt": [31, 32, 33, 34, 35, 36], "image": (32, 32)}]  # anyres: 1, 2 and 4 crops
    return Tiny(model, lambda rows, seed=0: llava_video_inputs(model, rows, seed), LLAVA_VIDEO_IMAGE, LLAVA_VIDEO_VIDEO,
                images, [images[0], {"prompt": [41, 42, 43], "video": 3}, images[2]], [LLAVA_VIDEO_IMAGE, LLAVA_VIDEO_VIDEO])


FAMILY_BUILDERS = {"qwen2_5_vl": _qwen, "qwen2_vl": _qwen, "qwen3_vl": _qwen3, "llava_onevision": _llava_video,
                   "llava_next_video": _llava_video}


@pytest.fixture(scope="module", params=list(FAMILY_BUILDERS))
def tiny(request) -> Tiny:
    return FAMILY_BUILDERS[request.param](request.param)


@pytest.fixture(params=BACKENDS)
def model(request, tiny):
    tiny.model.set_attn_implementation({"text_config": request.param, "vision_config": "sdpa"})
    yield tiny
    tiny.model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})


def _generate(tiny: Tiny, inputs: dict, **kwargs):
    return tiny.model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                               output_scores=True, return_dict_in_generate=True, pad_token_id=0,
                               suppress_tokens=tiny.suppress, **kwargs)


def _assert_same_generation(a, b) -> None:
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-5)


def _masked_reference(tiny: Tiny, batch: dict, stats: list[dict]):
    """Unpruned generate, eager attention, layers >= K unable to see the tokens ``stats`` dropped."""
    kept = padded_kept_mask(stats, batch["attention_mask"])
    backend = tiny.model.config.get_text_config()._attn_implementation
    tiny.model.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
    hooks = install_masked_reference(tiny.model, tiny.k, kept, batch["attention_mask"].bool(), float_mask=True)
    try:
        return _generate(tiny, batch)
    finally:
        for hook in hooks:
            hook.remove()
        tiny.model.set_attn_implementation({"text_config": backend, "vision_config": "sdpa"})


@pytest.mark.parametrize("method", ["none", *PRUNING_METHODS])
def test_keep_all_is_bit_identical(model, method):
    batch = model.inputs(model.mixed, 0)
    reference = _generate(model, batch)
    with apply_pruning(model.model, PruneConfig(method, keep_ratio=1.0, prune_layer=model.k)):
        pruned = _generate(model, batch)
    assert torch.equal(pruned.sequences, reference.sequences)
    for x, y in zip(pruned.scores, reference.scores):
        assert torch.equal(x, y)


@pytest.mark.parametrize("method", PRUNING_METHODS)
@pytest.mark.parametrize("which", ["images", "image-video-image"])
def test_masked_reference_and_cache_invariance(model, method, which):
    batch = model.inputs(model.rows if which == "images" else model.mixed, 1)
    with apply_pruning(model.model, PruneConfig(method, keep_ratio=0.5, prune_layer=model.k)) as handle:
        pruned = _generate(model, batch)
        stats = handle.stats
        uncached = _generate(model, batch, use_cache=False)
        assert handle.stats == stats
    ids = batch["input_ids"]
    visual = [int(torch.isin(row, torch.tensor([model.image_id, model.video_id])).sum()) for row in ids]
    assert len(set(visual)) == len(visual), "the rows must differ in visual-token count"
    assert [s["visual_tokens"] for s in stats] == visual
    assert [s["visual_tokens_kept"] for s in stats] == [int(0.5 * n + 0.5) for n in visual]  # ⌊r·N + ½⌋
    video = [int((row == model.video_id).sum()) for row in ids]
    assert [s["video_tokens"] for s in stats] == video  # image and video tokens counted apart
    assert all(s["video_tokens_kept"] == (s["visual_tokens_kept"] if v else 0) for s, v in zip(stats, video))
    _assert_same_generation(pruned, _masked_reference(model, batch, stats))
    _assert_same_generation(pruned, uncached)


@pytest.mark.parametrize("method", PRUNING_METHODS)
def test_batch_invariance_with_different_visual_counts(tiny, method):
    with apply_pruning(tiny.model, PruneConfig(method, keep_ratio=0.5, prune_layer=tiny.k)) as handle:
        together = _generate(tiny, tiny.inputs(tiny.mixed, 2))
        batch_stats = handle.stats
        for i in range(len(tiny.mixed)):
            alone = _generate(tiny, _alone(tiny, i, 2))
            assert handle.stats[0]["kept_positions"] == batch_stats[i]["kept_positions"]
            assert torch.equal(alone.sequences[0, -NEW_TOKENS:], together.sequences[i, -NEW_TOKENS:])
            for a, b in zip(alone.scores, together.scores):
                torch.testing.assert_close(a[0], b[i], atol=2e-5, rtol=1e-5)


def _alone(tiny: Tiny, i: int, seed: int) -> dict:
    """Row ``i`` of ``tiny.inputs(tiny.mixed, seed)`` as its own batch: unpadded, its own pixels."""
    batch = tiny.inputs(tiny.mixed, seed)
    valid = batch["attention_mask"][i].bool()
    out = {k: v[i : i + 1, valid] for k, v in batch.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    is_video = [("video" in row) for row in tiny.mixed]
    j = sum(1 for r in range(i) if is_video[r] == is_video[i])  # its index among the images (or the videos)
    if "image_grid_thw" in batch or "video_grid_thw" in batch:  # Qwen: flat patches, one grid per item
        pixels, grids = ("pixel_values_videos", "video_grid_thw") if is_video[i] else ("pixel_values", "image_grid_thw")
        sizes = [int(g.prod()) for g in batch[grids]]
        out[pixels] = batch[pixels][sum(sizes[:j]) : sum(sizes[: j + 1])]
        out[grids] = batch[grids][j : j + 1]
    elif is_video[i]:
        out["pixel_values_videos"] = batch["pixel_values_videos"][j : j + 1]
    else:
        alone = tiny.inputs([tiny.mixed[i]], 0)  # only for its patch count
        out["pixel_values"] = batch["pixel_values"][j : j + 1, : alone["pixel_values"].shape[1]]
        out["image_sizes"] = batch["image_sizes"][j : j + 1]
    return out


def test_qwen_inputs_carry_three_dimensional_positions():
    """The Qwen oracles mean something only if the model numbers visual tokens in 3-D: rows of
    temporal, height and width positions that differ on the visual tokens (mm_token_type_ids)."""
    tiny = _qwen("qwen2_5_vl")
    batch = tiny.inputs(tiny.mixed, 0)
    grids = {k: batch[k] for k in ("image_grid_thw", "video_grid_thw")}
    positions, _ = tiny.model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], **grids,
                                                   attention_mask=batch["attention_mask"])
    assert positions.shape[0] == 3 and positions.shape[1:] == batch["input_ids"].shape
    visual = batch["mm_token_type_ids"] > 0
    assert not torch.equal(positions[1][visual], positions[2][visual])  # height and width differ
    assert (positions[0][visual] != positions[1][visual]).any()


@pytest.mark.parametrize("method", PRUNING_METHODS)
def test_a_forward_without_cache_on_another_video_is_a_new_prefill(tiny, method):
    """Two forwards without a cache, the second on another video (other pixels) with the same
    prompt and one token more: the second selects for its own video, as a fresh handle does,
    instead of continuing the first's selection (tests/test_core_oracles.py: the same for images)."""
    video = next(row for row in tiny.mixed if "video" in row)
    first = tiny.inputs([video], 1)
    second = tiny.inputs([{**video, "prompt": [*video["prompt"], 44]}], 2)
    assert not torch.equal(first["pixel_values_videos"], second["pixel_values_videos"])
    config = PruneConfig(method, keep_ratio=0.5, prune_layer=tiny.k)
    with apply_pruning(tiny.model, config) as fresh, torch.no_grad():
        tiny.model(**second, use_cache=False)
        expected = fresh.stats[0]["kept_positions"]
    with apply_pruning(tiny.model, config) as handle, torch.no_grad():
        tiny.model(**first, use_cache=False)
        tiny.model(**second, use_cache=False)
        assert handle.stats[0]["kept_positions"] == expected
