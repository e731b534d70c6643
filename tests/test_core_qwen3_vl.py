"""DeepStack on Qwen3-VL, a tiny random model (``tests.tiny_models.build_tiny_qwen3_vl``) whose DeepStack adds
visual features to the hidden states after decoder layers 0, 1 and 2 (as the real checkpoints
do with their three DeepStack layers). After the cut at layer K those additions must land on
the kept visual tokens of the shortened sequence, each with its own feature row.

Why the usual masked reference is the right one here: in the unpruned model whose layers ≥ K
cannot see the dropped tokens, the dropped tokens still receive their DeepStack additions, but
no kept token ever reads them again (their keys and values are masked from layer K on), and
every kept token receives exactly its own additions, as in the pruned model. So the kept
tokens' hidden states, hence the logits, must agree. A pruned model that adds the wrong rows,
or adds nothing after the cut, does not.

The family-wide oracles (keep-all, masked reference and cache invariance at K = 1 on every
backend, batch invariance) run on it in tests/test_core_video_families.py; here: later prune
layers, what ``_deepstack_process`` receives, and that the tiny model's numbers mean something."""

from __future__ import annotations

import pytest
import torch

from ep_core import PruneConfig, apply_pruning
from ep_core.families import FAMILIES
from tests.oracles import FLASH_LIKE, install_masked_reference, padded_kept_mask
from tests.tiny_models import (
    QWEN3_DEEPSTACK_LAYERS as DEEPSTACK_LAYERS, QWEN_IMAGE, QWEN_PAD, QWEN_VIDEO, QWEN_VISION_END, QWEN_VISION_START,
    build_tiny_qwen3_vl, qwen3_inputs,
)

BACKENDS = ["sdpa", "eager", FLASH_LIKE]
NEW_TOKENS = 4
SUPPRESS = [QWEN_VISION_START, QWEN_IMAGE, QWEN_VIDEO, QWEN_VISION_END]  # a random model must not generate them

IMAGES = [{"prompt": [11, 12, 13, 14], "image": (4, 4)}, {"prompt": [21, 22], "image": (6, 4)},
          {"prompt": [31, 32, 33, 34, 35, 36], "image": (4, 8)}]  # 4, 6, 8 visual tokens (2×2 merge)
MIXED = [IMAGES[0], {"prompt": [41, 42, 43], "video": (4, 4, 6)}, IMAGES[2]]  # 4, 12 (2 temporal patches × 6), 8


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_qwen3_vl()


@pytest.fixture(params=BACKENDS)
def model(request, tiny):
    tiny.set_attn_implementation({"text_config": request.param, "vision_config": "sdpa"})
    yield tiny
    tiny.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})


def _generate(model, inputs: dict, **kwargs):
    return model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                          output_scores=True, return_dict_in_generate=True, pad_token_id=QWEN_PAD,
                          suppress_tokens=SUPPRESS, **kwargs)


def _assert_same_generation(a, b) -> None:
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-5)


def _masked_reference(model, batch: dict, stats: list[dict], k: int):
    """Unpruned generate, eager attention, layers >= K unable to see the tokens ``stats`` dropped
    (DeepStack left as the model does it: every visual token, dropped or not, gets its additions)."""
    kept = padded_kept_mask(stats, batch["attention_mask"])
    backend = model.config.get_text_config()._attn_implementation
    model.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
    hooks = install_masked_reference(model, k, kept, batch["attention_mask"].bool(), float_mask=True)
    try:
        return _generate(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
        model.set_attn_implementation({"text_config": backend, "vision_config": "sdpa"})


def _check_stats(batch: dict, stats: list[dict]) -> None:
    ids = batch["input_ids"]
    visual = [int(torch.isin(row, torch.tensor([QWEN_IMAGE, QWEN_VIDEO])).sum()) for row in ids]
    assert len(set(visual)) == len(visual), "the rows must differ in visual-token count"
    assert [s["visual_tokens"] for s in stats] == visual
    assert [s["visual_tokens_kept"] for s in stats] == [int(0.5 * n + 0.5) for n in visual]  # ⌊r·N + ½⌋
    video = [int((row == QWEN_VIDEO).sum()) for row in ids]
    assert [s["video_tokens"] for s in stats] == video
    assert all(s["video_tokens_kept"] == (s["visual_tokens_kept"] if v else 0) for s, v in zip(stats, video))


def test_the_family_is_prunable_with_deepstack_and_the_tiny_model_injects_after_three_layers(tiny):
    family = FAMILIES["qwen3_vl"]
    assert family.prunable and family.deepstack and family.default_prune_layer == 1
    assert not any(f.deepstack for t, f in FAMILIES.items() if t != "qwen3_vl")
    assert len(tiny.config.vision_config.deepstack_visual_indexes) == DEEPSTACK_LAYERS < tiny.config.text_config.num_hidden_layers


def test_deepstack_features_matter_in_the_tiny_model(tiny):
    """The oracles below can catch a DeepStack mistake only if the additions change the logits."""
    batch = qwen3_inputs(MIXED, 1)
    language_model = tiny.model.language_model
    with torch.no_grad():
        full = tiny(**batch).logits[:, -1]
        language_model._deepstack_process = lambda hidden, mask, embeds: hidden  # no additions at all
        try:
            without = tiny(**batch).logits[:, -1]
        finally:
            del language_model._deepstack_process
    assert (full - without).abs().max() > 1e-2


@pytest.mark.parametrize("k", [2, 3])  # 2: the last addition follows the cut; 3: every addition precedes it
@pytest.mark.parametrize("method", ["entropyprune", "random"])
def test_masked_reference_at_later_prune_layers(model, method, k):
    batch = qwen3_inputs(MIXED, 3)
    with apply_pruning(model, PruneConfig(method, keep_ratio=0.5, prune_layer=k)) as handle:
        pruned = _generate(model, batch)
        stats = handle.stats
        uncached = _generate(model, batch, use_cache=False)
    _check_stats(batch, stats)
    _assert_same_generation(pruned, _masked_reference(model, batch, stats, k))
    _assert_same_generation(pruned, uncached)


def test_additions_after_the_cut_land_on_the_kept_tokens_with_their_own_rows(tiny):
    """What ``_deepstack_process`` receives: before the cut the model's own mask and features;
    after it, per row, the kept visual slots of the shortened sequence and exactly the feature
    rows of those tokens, in order. ``remove()`` takes the wrapper away."""
    batch = qwen3_inputs(MIXED, 4)
    language_model = tiny.model.language_model
    original = type(language_model)._deepstack_process
    calls = []

    def spy(self, hidden, mask, embeds):
        calls.append((hidden.shape[1], mask.clone(), embeds.clone()))
        return original(self, hidden, mask, embeds)

    type(language_model)._deepstack_process = spy  # the class method, under the handle's instance-level wrapper
    try:
        with torch.no_grad():
            tiny(**batch)  # unpruned: the full features of every layer
            unpruned, calls[:] = list(calls), []
            with apply_pruning(tiny, PruneConfig("random", keep_ratio=0.5, prune_layer=1)) as handle:
                assert "_deepstack_process" in language_model.__dict__
                tiny(**batch)
                stats = handle.stats
            assert "_deepstack_process" not in language_model.__dict__
    finally:
        type(language_model)._deepstack_process = original
    assert len(unpruned) == len(calls) == DEEPSTACK_LAYERS
    length, visual, _ = unpruned[0]
    assert length == batch["input_ids"].shape[1]
    assert torch.equal(visual, torch.isin(batch["input_ids"], torch.tensor([QWEN_IMAGE, QWEN_VIDEO])))
    assert calls[0][0] == length and torch.equal(calls[0][1], visual) and torch.equal(calls[0][2], unpruned[0][2])
    kept = padded_kept_mask(stats, batch["attention_mask"]) & visual  # [B, T] the kept visual tokens
    rank = visual.flatten().cumsum(0).view_as(visual) - 1  # each visual token's feature row
    rows = torch.cat([rank[b][kept[b]] for b in range(kept.shape[0])])
    for layer in range(1, DEEPSTACK_LAYERS):  # after the cut at K = 1
        cut_length, mask, embeds = calls[layer]
        assert cut_length < length and mask.shape == (kept.shape[0], cut_length)
        assert mask.sum(1).tolist() == kept.sum(1).tolist() == [s["visual_tokens_kept"] for s in stats]
        assert torch.equal(embeds, unpruned[layer][2][rows])


def test_inputs_carry_three_dimensional_positions_per_video_frame(tiny):
    """The oracles mean something only if visual tokens are numbered in 3-D, a video's frames
    as separate groups (Qwen3-VL's timestamps), and the text model receives 4 rows of ids."""
    batch = qwen3_inputs(MIXED, 0)
    grids = {k: batch[k] for k in ("image_grid_thw", "video_grid_thw")}
    positions, _ = tiny.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], **grids,
                                             attention_mask=batch["attention_mask"])
    assert positions.shape[0] == 3 and positions.shape[1:] == batch["input_ids"].shape
    visual = batch["mm_token_type_ids"] > 0
    assert not torch.equal(positions[1][visual], positions[2][visual])  # height and width differ
    assert (positions[0][visual] != positions[1][visual]).any()
    video = batch["mm_token_type_ids"][1] == 2
    assert len(set(positions[0, 1][video].tolist())) == 2  # two temporal patches, two time positions


def test_a_text_model_without_deepstack_process_is_refused_with_the_reason(tiny, monkeypatch):
    """A transformers version whose text model adds DeepStack features some other way: the hooks
    cannot follow the cut, so ``apply_pruning`` refuses with one line naming the class, and leaves
    no hook behind: the model runs unpruned afterwards."""
    batch = qwen3_inputs(MIXED, 4)
    with torch.no_grad():
        before = tiny(**batch).logits
    language_model = tiny.model.language_model
    owner = next(c for c in type(language_model).__mro__ if "_deepstack_process" in vars(c))
    monkeypatch.delattr(owner, "_deepstack_process")
    expected = (f"{FAMILIES['qwen3_vl'].model_type}: {type(language_model).__name__} has no _deepstack_process; this "
                "transformers version adds DeepStack features differently, which the pruning hooks do not support")
    with pytest.raises(ValueError) as error:
        apply_pruning(tiny, PruneConfig("random", keep_ratio=0.5, prune_layer=1))
    assert str(error.value) == expected
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(tiny(**batch).logits, before)


def test_an_instance_level_deepstack_process_is_wrapped_and_given_back(tiny):
    """A ``_deepstack_process`` the user set on the instance (their own wrapper) runs under the
    pruning wrapper and is the one in place again after ``remove()``."""
    batch = qwen3_inputs(MIXED, 4)
    language_model = tiny.model.language_model
    original = language_model._deepstack_process
    calls = []

    def users_own(hidden, mask, embeds):
        calls.append(hidden.shape[1])
        return original(hidden, mask, embeds)

    language_model._deepstack_process = users_own
    try:
        with torch.no_grad(), apply_pruning(tiny, PruneConfig("random", keep_ratio=0.5, prune_layer=1)):
            assert language_model.__dict__["_deepstack_process"] is not users_own
            tiny(**batch)
        assert language_model.__dict__["_deepstack_process"] is users_own
    finally:
        language_model.__dict__.pop("_deepstack_process", None)
    assert len(calls) == DEEPSTACK_LAYERS and calls[-1] < batch["input_ids"].shape[1]
