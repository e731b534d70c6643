"""The correctness oracles of docs/design.md §4 for every pruning method, on a tiny GQA LLaVA.

1. keep-all identity, 2. masked reference, 3. batch invariance, 4. cache invariance
(5. score fidelity lives in test_core_entropy.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ep_core import PruneConfig, apply_pruning
from tests.oracles import FLASH_LIKE, install_masked_reference, padded_kept_mask
from tests.tiny_models import build_tiny_llava, make_inputs, random_images

PRUNING_METHODS = ["entropyprune", "random", "fastv", "dart"]
BACKENDS = ["sdpa", "eager", FLASH_LIKE]
PROMPTS = ["what color is the circle", "describe this image", "how many red square are there in the picture ?"]
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_tiny_llava()


@pytest.fixture(scope="module")
def batch(tiny):
    _, processor = tiny
    return make_inputs(processor, PROMPTS, random_images(len(PROMPTS), seed=1))


def _generate(model, inputs, **kwargs):
    return model.generate(
        **inputs,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        **kwargs,
    )


def _assert_same_generation(a, b) -> None:
    """The same tokens, and scores equal within float32 noise."""
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-5)


def _masked_reference_generate(model, batch, stats):
    """Unpruned generate, eager attention, layers >= K unable to see the tokens ``stats`` dropped."""
    kept = padded_kept_mask(stats, batch["attention_mask"])
    backend = model.config.get_text_config()._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})
    hooks = install_masked_reference(model, 2, kept, batch["attention_mask"].bool(), float_mask=True)
    try:
        return _generate(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
        model.set_attn_implementation({"text_config": backend})


@pytest.fixture(params=BACKENDS)
def model(request, tiny):
    model, _ = tiny
    model.set_attn_implementation({"text_config": request.param, "vision_config": "sdpa"})
    yield model
    model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("method", ["none", *PRUNING_METHODS])
@pytest.mark.parametrize("keep", [dict(keep_ratio=1.0), dict(budget=10_000)])
def test_keep_all_is_bit_identical(model, batch, method, keep):
    reference = _generate(model, batch)
    config = PruneConfig(method, **keep) if method != "none" else PruneConfig("none")
    with apply_pruning(model, config) as handle:
        pruned = _generate(model, batch)
        assert [s["visual_tokens_kept"] for s in handle.stats] == [s["visual_tokens"] for s in handle.stats]
        assert all(s["flops_reduction"] == 0 and s["prefill_flops"] == s["prefill_flops_full"] for s in handle.stats)
    assert torch.equal(pruned.sequences, reference.sequences)
    for a, b in zip(pruned.scores, reference.scores):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", PRUNING_METHODS)
def test_remove_restores_the_unpruned_model(tiny, batch, method):
    model, _ = tiny
    reference = _generate(model, batch)
    handle = apply_pruning(model, PruneConfig(method, keep_ratio=0.25))
    pruned = _generate(model, batch)
    handle.remove()
    restored = _generate(model, batch)
    assert torch.equal(restored.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(restored.scores, reference.scores))
    # and pruning did change the computation (otherwise this test proves nothing)
    assert any(not torch.allclose(a, b) for a, b in zip(pruned.scores, reference.scores))


def test_the_language_model_called_alone_runs_unpruned(tiny, batch):
    """The hooks start a prefill from the multimodal model's input; the language model called
    on its own (text only, a user's probe) never passes there and runs exactly as without them."""
    model, _ = tiny
    language_model = model.model.language_model
    ids = batch["input_ids"][:, -6:]  # text tokens only
    with torch.no_grad():
        reference = language_model(input_ids=ids).last_hidden_state
        with apply_pruning(model, PruneConfig("entropyprune", keep_ratio=0.25)):
            alone = language_model(input_ids=ids).last_hidden_state
    assert torch.equal(alone, reference)


def _uncached(model, inputs, how: str) -> torch.Tensor:
    """One forward without a cache, its last logits: called directly (``pixel_values`` reach the
    hooks) or through generate, which in transformers 5.2x encodes the images first and passes
    ``mm_encoder_outputs`` with ``pixel_values`` None."""
    if how == "forward":
        return model(**inputs, use_cache=False).logits[:, -1]
    out = model.generate(**inputs, use_cache=False, max_new_tokens=1, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.logits[0]


@pytest.mark.parametrize("method", PRUNING_METHODS)
@pytest.mark.parametrize("extra", ["", " please"])
@pytest.mark.parametrize("first_how,second_how", [("forward", "forward"), ("generate", "generate"),
                                                  ("forward", "generate"), ("generate", "forward")])
def test_a_forward_without_cache_on_another_image_is_a_new_prefill(tiny, method, extra, first_how, second_how):
    """Two forwards without a cache, the second on another image with the same prompt (or the
    same prompt and more text, as generate(use_cache=False) makes), each called directly or
    through generate: the second selects for its own image, as a fresh handle does, instead of
    reusing the first's selection."""
    model, processor = tiny
    first_image, second_image = random_images(2, seed=11)
    prompt = "USER: <image> describe the picture"
    first = processor(images=[first_image], text=[prompt], return_tensors="pt")
    second = processor(images=[second_image], text=[prompt + extra], return_tensors="pt")
    config = PruneConfig(method, keep_ratio=0.25)
    with apply_pruning(model, config) as fresh, torch.no_grad():
        _uncached(model, second, second_how)
        expected = fresh.stats[0]["kept_positions"]
    with apply_pruning(model, config) as handle, torch.no_grad():
        _uncached(model, first, first_how)
        _uncached(model, second, second_how)
        assert handle.stats[0]["kept_positions"] == expected


@pytest.mark.parametrize("method", PRUNING_METHODS)
def test_a_forward_without_cache_on_an_equal_copy_of_the_images_continues(tiny, method):
    """The same prompt plus text with an equal copy of its image (the processor run again: other
    tensors, the same values) is the next step of the same uncached generation: it continues
    the first forward's selection, exactly as when it gets the very same pixel tensor."""
    model, processor = tiny
    (image,) = random_images(1, seed=11)
    prompt = "USER: <image> describe the picture"
    first = processor(images=[image], text=[prompt], return_tensors="pt")
    second = processor(images=[image], text=[prompt + " please"], return_tensors="pt")
    assert second["pixel_values"] is not first["pixel_values"]
    results = []
    for pixels in (first["pixel_values"], second["pixel_values"]):
        with apply_pruning(model, PruneConfig(method, keep_ratio=0.25)) as handle, torch.no_grad():
            model(**first, use_cache=False)
            logits = model(**{**second, "pixel_values": pixels}, use_cache=False).logits
            results.append((handle.stats[0]["kept_positions"], logits))
    assert results[1][0] == results[0][0]
    assert torch.equal(results[1][1], results[0][1])


@pytest.mark.parametrize("method", PRUNING_METHODS)
@pytest.mark.parametrize("keep", [dict(keep_ratio=0.25), dict(budget=6)])
def test_masked_reference(model, batch, method, keep):
    """Pruned generate == unpruned model whose layers >= K cannot see the dropped tokens."""
    config = PruneConfig(method, prune_layer=2, **keep)
    with apply_pruning(model, config) as handle:
        pruned = _generate(model, batch)
        stats = handle.stats
    assert all(s["visual_tokens_kept"] < s["visual_tokens"] for s in stats)
    reference = _masked_reference_generate(model, batch, stats)
    _assert_same_generation(pruned, reference)


@pytest.mark.parametrize("method", PRUNING_METHODS)
def test_batch_invariance_with_left_padding(tiny, method):
    model, processor = tiny
    images = random_images(len(PROMPTS), seed=2)
    batch = make_inputs(processor, PROMPTS, images)
    assert (batch["attention_mask"] == 0).any(), "the batch must contain left padding"
    with apply_pruning(model, PruneConfig(method, keep_ratio=0.3)) as handle:
        _assert_rows_as_alone(model, handle, batch, [make_inputs(processor, [p], [im]) for p, im in zip(PROMPTS, images)])


def _assert_rows_as_alone(model, handle, batch, rows) -> None:
    """Generate ``batch`` and each of ``rows`` alone: same kept tokens, same tokens, same scores."""
    together = _generate(model, batch)
    batch_stats = handle.stats
    for i, row in enumerate(rows):
        alone = _generate(model, row)
        assert handle.stats[0]["kept_positions"] == batch_stats[i]["kept_positions"]
        assert torch.equal(alone.sequences[0, -NEW_TOKENS:], together.sequences[i, -NEW_TOKENS:])
        for a, b in zip(alone.scores, together.scores):
            torch.testing.assert_close(a[0], b[i], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("method", PRUNING_METHODS)
def test_a_row_without_an_image_before_pruned_rows(tiny, method):
    """A text-only first row (nothing to prune) does not stop the rows after it from being
    pruned, and the batch equals the masked reference."""
    from ep_core.prompts import chat_prompt

    model, processor = tiny
    texts = [chat_prompt(processor, 0, "say something"), *(chat_prompt(processor, 1, p) for p in PROMPTS[:2])]
    batch = processor(images=random_images(2, seed=6), text=texts, return_tensors="pt", padding=True)
    with apply_pruning(model, PruneConfig(method, prune_layer=2, keep_ratio=0.25)) as handle:
        pruned = _generate(model, batch)
        stats = handle.stats
    assert [(s["visual_tokens"], s["visual_tokens_kept"]) for s in stats] == [(0, 0), (16, 4), (16, 4)]
    _assert_same_generation(pruned, _masked_reference_generate(model, batch, stats))


@pytest.mark.parametrize("method", PRUNING_METHODS)
def test_cache_invariance(model, batch, method):
    with apply_pruning(model, PruneConfig(method, keep_ratio=0.3)) as handle:
        cached = _generate(model, batch)
        cached_stats = handle.stats
        uncached = _generate(model, batch, use_cache=False)
        assert handle.stats == cached_stats
    _assert_same_generation(cached, uncached)


@pytest.mark.parametrize("method", PRUNING_METHODS)
def test_keep_all_without_a_cache_is_the_unpruned_generation(tiny, batch, method):
    """generate(use_cache=False) re-runs the growing prompt at every step; when no row drops
    a token nothing is cut at any step, and each row's stats name the method."""
    model, _ = tiny
    reference = _generate(model, batch, use_cache=False)
    with apply_pruning(model, PruneConfig(method, keep_ratio=1.0)) as handle:
        uncached = _generate(model, batch, use_cache=False)
        assert [s["method"] for s in handle.stats] == [method] * batch["input_ids"].shape[0]
    assert torch.equal(uncached.sequences, reference.sequences)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_a_decode_step_sees_the_cache_under_either_name(tiny, batch, name):
    """Transformers 5.25 passes the cache to the multimodal model as ``cache``; older 5.x (and
    callers of the deprecated name) as ``past_key_values``. Under either name a one-token step
    after a pruned prefill is a decode step: the prefill's stats stay, and the step's hidden
    states equal those of the same step through ``cache=``."""
    import copy

    model, _ = tiny
    inner = model.model  # the module the input hook sits on; the outer model renames the argument itself
    with apply_pruning(model, PruneConfig("entropyprune", keep_ratio=0.3)) as handle, torch.no_grad():
        prefill = inner(**batch, use_cache=True)
        stats = handle.stats
        next_ids = model.lm_head(prefill.last_hidden_state[:, -1:]).argmax(-1)
        step = dict(input_ids=next_ids, attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(next_ids)], 1))
        expected = inner(**step, cache=copy.deepcopy(prefill.past_key_values), use_cache=True).last_hidden_state
        assert handle.stats == stats
        got = inner(**step, **{name: copy.deepcopy(prefill.past_key_values)}, use_cache=True).last_hidden_state
        assert handle.stats == stats
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("method", PRUNING_METHODS)
def test_hidden_states_passed_by_keyword_are_pruned_the_same(tiny, batch, method):
    """transformers passes a decoder layer its hidden states positionally; a wrapper that passes
    them by keyword (a user's pre-hook, another version) gets the same pruned generation."""
    model, _ = tiny
    config = PruneConfig(method, prune_layer=2, keep_ratio=0.25)
    with apply_pruning(model, config) as handle:
        positional = _generate(model, batch)
        stats = handle.stats

    def by_keyword(module, args, kwargs):
        return (), {**kwargs, "hidden_states": args[0]} if args else kwargs

    moved = [layer.register_forward_pre_hook(by_keyword, with_kwargs=True) for layer in model.model.language_model.layers]
    try:
        with apply_pruning(model, config) as handle:  # its hooks run after the user's: they see keywords only
            keyword = _generate(model, batch)
            assert handle.stats == stats
    finally:
        for hook in moved:
            hook.remove()
    _assert_same_generation(keyword, positional)


@pytest.mark.parametrize("rows", ["padded", "unpadded mixed counts"])
def test_a_decode_step_from_inputs_embeds_equals_the_step_from_input_ids(tiny, batch, rows):
    """After a pruned prefill, a one-token step given as ``inputs_embeds`` (what a caller that
    embeds the tokens itself passes) is a decode step like the same token given as ``input_ids``,
    also where sdpa passes no mask and the hooks build the step's mask from its key length (rows
    of different visual-token counts, no padding); two tokens of embeddings continue a filled
    cache, which pruning refuses."""
    import copy

    model, processor = tiny
    if rows != "padded":
        batch, _ = _equal_length_mixed_batch(processor)
    inner = model.model
    with apply_pruning(model, PruneConfig("entropyprune", keep_ratio=0.3)) as handle, torch.no_grad():
        prefill = inner(**batch, use_cache=True)
        stats = handle.stats
        next_ids = model.lm_head(prefill.last_hidden_state[:, -1:]).argmax(-1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(next_ids)], 1)
        expected = inner(input_ids=next_ids, attention_mask=mask, cache=copy.deepcopy(prefill.past_key_values),
                         use_cache=True).last_hidden_state
        embeds = inner.get_input_embeddings()(next_ids)
        got = inner(inputs_embeds=embeds, attention_mask=mask, cache=copy.deepcopy(prefill.past_key_values),
                    use_cache=True).last_hidden_state
        assert handle.stats == stats
        two = torch.cat([embeds, embeds], 1)
        with pytest.raises(RuntimeError, match="^pruning supports one prefill followed by one-token decode steps"):
            inner(inputs_embeds=two, attention_mask=torch.cat([mask, mask[:, -1:]], 1),
                  cache=copy.deepcopy(prefill.past_key_values), use_cache=True)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_per_layer_cache_lengths_and_stats(tiny, batch):
    model, _ = tiny
    num_layers = model.config.text_config.num_hidden_layers
    with apply_pruning(model, PruneConfig("entropyprune", keep_ratio=0.25, prune_layer=2)) as handle:
        out = _generate(model, batch)
        stats = handle.stats
    prompt_len = batch["input_ids"].shape[1]
    n_vis = int((batch["input_ids"][0] == model.config.image_token_id).sum())
    kept_vis = round(0.25 * n_vis)
    cache_lengths = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    expected_full = prompt_len + NEW_TOKENS - 1
    assert cache_lengths == [expected_full] * 2 + [expected_full - (n_vis - kept_vis)] * (num_layers - 2)
    with apply_pruning(model, PruneConfig("entropyprune", keep_ratio=0.25, prune_layer=2)) as handle:
        with torch.no_grad():
            prefill_cache = model(**batch, use_cache=True).past_key_values
    rows = batch["input_ids"].shape[0]
    cache_bytes = sum(l.keys.numel() + l.values.numel() for l in prefill_cache.layers) * 4 // rows
    padding = (batch["attention_mask"] == 0).sum(1)  # padded slots are cached too; the stats count real tokens
    per_pad_bytes = 2 * sum(l.keys.shape[1] * l.keys.shape[3] for l in prefill_cache.layers) * 4
    for s, pad in zip(handle.stats, padding):
        assert s["kv_cache_bytes"] == cache_bytes - int(pad) * per_pad_bytes
    for s, ids, valid in zip(stats, batch["input_ids"], batch["attention_mask"].bool()):
        assert 0 < s["flops_reduction"] < 1 and s["prefill_flops"] < s["prefill_flops_full"]
        assert s["visual_tokens"] == n_vis and s["visual_tokens_kept"] == kept_vis and s["prune_layer"] == 2
        unpadded = ids[valid]
        text_positions = (unpadded != model.config.image_token_id).nonzero()[:, 0].tolist()
        assert set(text_positions) <= set(s["kept_positions"])
        assert s["kept_positions"] == sorted(s["kept_positions"])
        assert len(s["kept_positions"]) == len(text_positions) + kept_vis
        assert s["text_tokens"] == len(text_positions)


# ---------------------------------------------------------------------------- LLaVA-NeXT (anyres)
@pytest.fixture(scope="module")
def tiny_next():
    from tests.tiny_models import build_tiny_llava_next

    model, processor = build_tiny_llava_next()
    batch = make_inputs(processor, PROMPTS[:2], random_images(2, size=20, seed=6))  # equal image sizes
    return model, batch


@pytest.mark.parametrize("method", PRUNING_METHODS)
def test_llava_next_masked_reference_and_cache_invariance(tiny_next, method):
    model, batch = tiny_next
    with apply_pruning(model, PruneConfig(method, keep_ratio=0.3)) as handle:
        pruned = _generate(model, batch)
        uncached = _generate(model, batch, use_cache=False)
        stats = handle.stats
    n_vis = int((batch["input_ids"][0] == model.config.image_token_id).sum())  # newline slots included
    assert all(s["visual_tokens"] == n_vis and s["visual_tokens_kept"] == round(0.3 * n_vis) for s in stats)
    assert torch.equal(pruned.sequences, uncached.sequences)
    reference = _masked_reference_generate(model, batch, stats)
    _assert_same_generation(pruned, reference)


@pytest.mark.parametrize("method", PRUNING_METHODS)
def test_a_prompt_ending_in_the_image_keeps_its_last_position(tiny, method):
    """The last prompt token produces the next-token logits: even when it is a visual token it
    is never dropped, and the pruned model still equals the masked reference."""
    model, processor = tiny
    batch = processor(images=random_images(1, seed=4), text=["USER: describe <image>"], return_tensors="pt")
    assert batch["input_ids"][0, -1] == model.config.image_token_id  # the prompt ends in a visual token
    with apply_pruning(model, PruneConfig(method, keep_ratio=0.1, prune_layer=2)) as handle:
        pruned = _generate(model, batch)
        stats = handle.stats
    length = batch["input_ids"].shape[1]
    assert length - 1 in stats[0]["kept_positions"] and stats[0]["visual_tokens_kept"] < stats[0]["visual_tokens"]
    reference = _masked_reference_generate(model, batch, stats)
    _assert_same_generation(pruned, reference)


# ---------------------------------------------------------------------------- mixed visual-token counts
MIXED_SIZES = [(20, 20), (30, 12), (12, 30)]  # LLaVA-NeXT anyres: 88, 52 and 56 visual tokens
MIXED_PROMPTS = ["describe this image", "what color is the circle", "how many red square are there ?"]


@pytest.fixture(scope="module")
def tiny_next_mixed():
    from tests.tiny_models import build_tiny_llava_next

    model, processor = build_tiny_llava_next()
    rng = np.random.default_rng(7)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in MIXED_SIZES]
    batch = make_inputs(processor, MIXED_PROMPTS, images)
    counts = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert len(set(counts)) == len(counts), counts  # every row its own visual-token count
    assert (batch["attention_mask"] == 0).any()
    return model, processor, images, batch


@pytest.fixture(params=BACKENDS)
def next_mixed(request, tiny_next_mixed):
    model = tiny_next_mixed[0]
    model.set_attn_implementation({"text_config": request.param, "vision_config": "sdpa"})
    yield tiny_next_mixed
    model.set_attn_implementation("sdpa")


def _equal_length_mixed_batch(processor):
    """Tiny LLaVA rows of 2 images and of 1 image, with text making them equally long: no
    padding, so sdpa and flash attention get no mask at all, and pruning must build one.
    The prompts start with the image (BOS removed), so a dropped first visual token has no
    earlier key: its filler slot is a query row that only the diagonal keeps non-empty."""
    texts = ["<image> <image> describe", "<image> describe " + "red " * 16]
    images = random_images(3, seed=8)
    groups = [images[:2], images[2:]]

    def encode(texts, groups):
        batch = processor(images=groups, text=texts, return_tensors="pt", padding=True)
        assert bool((batch["input_ids"][:, 0] == processor.tokenizer.bos_token_id).all())
        batch["input_ids"], batch["attention_mask"] = batch["input_ids"][:, 1:], batch["attention_mask"][:, 1:]
        return batch

    batch = encode(texts, groups)
    assert bool(batch["attention_mask"].all()), "the rows must be equally long"
    return batch, [encode([t], [g]) for t, g in zip(texts, groups)]


@pytest.mark.parametrize("method", PRUNING_METHODS)
@pytest.mark.parametrize("keep", [dict(keep_ratio=0.3), dict(budget=48)])  # budget: k = 2B − N
def test_mixed_counts_masked_reference_and_cache_invariance(next_mixed, method, keep):
    """Rows keeping different numbers of tokens share one generate: each equals the unpruned
    model with its own dropped keys masked, cached or not."""
    model, _, _, batch = next_mixed
    with apply_pruning(model, PruneConfig(method, **keep)) as handle:
        pruned = _generate(model, batch)
        stats = handle.stats
        uncached = _generate(model, batch, use_cache=False)
    kept = [s["visual_tokens_kept"] for s in stats]
    assert len(set(kept)) == len(kept) and all(s["visual_tokens_kept"] < s["visual_tokens"] for s in stats)
    # layers >= K hold the longest kept row: text + kept visual tokens, no left padding
    slots = max(s["text_tokens"] + s["visual_tokens_kept"] for s in stats)
    full = batch["input_ids"].shape[1]
    lengths = [layer.keys.shape[-2] for layer in pruned.past_key_values.layers]
    assert lengths == [full + NEW_TOKENS - 1] * 2 + [slots + NEW_TOKENS - 1] * 2
    _assert_same_generation(pruned, uncached)
    reference = _masked_reference_generate(model, batch, stats)
    _assert_same_generation(pruned, reference)


@pytest.mark.parametrize("method", PRUNING_METHODS)
def test_keep_tokens_keeps_that_many_per_row_directly(next_mixed, method):
    """``keep_tokens`` T (the official LLaVA-1.6 path): each row keeps min(T, N) of its own N,
    with no layer averaging, and equals the masked reference, cached or not."""
    model, _, _, batch = next_mixed
    counts = sorted((batch["input_ids"] == model.config.image_token_id).sum(1).tolist())
    tokens = counts[len(counts) // 2]  # some rows have fewer, some more
    with apply_pruning(model, PruneConfig(method, keep_tokens=tokens)) as handle:
        pruned = _generate(model, batch)
        stats = handle.stats
        uncached = _generate(model, batch, use_cache=False)
    assert [s["visual_tokens_kept"] for s in stats] == [min(tokens, s["visual_tokens"]) for s in stats]
    assert any(s["visual_tokens"] < tokens for s in stats) and any(s["visual_tokens"] > tokens for s in stats)
    _assert_same_generation(pruned, uncached)
    _assert_same_generation(pruned, _masked_reference_generate(model, batch, stats))


@pytest.mark.parametrize("method", PRUNING_METHODS)
def test_mixed_counts_batch_invariance(next_mixed, method):
    """Each row of a left-padded batch of different visual-token counts (and zero-padded
    anyres patches) is pruned and decoded exactly as alone."""
    model, processor, images, batch = next_mixed
    with apply_pruning(model, PruneConfig(method, keep_ratio=0.3)) as handle:
        _assert_rows_as_alone(model, handle, batch, [make_inputs(processor, [p], [im]) for p, im in zip(MIXED_PROMPTS, images)])


@pytest.mark.parametrize("method", ["none", *PRUNING_METHODS])
def test_mixed_counts_keep_all_is_bit_identical(next_mixed, method):
    model, _, _, batch = next_mixed
    reference = _generate(model, batch)
    config = PruneConfig(method, keep_ratio=1.0) if method != "none" else PruneConfig("none")
    with apply_pruning(model, config):
        pruned = _generate(model, batch)
    assert torch.equal(pruned.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(pruned.scores, reference.scores))


@pytest.mark.parametrize("method", PRUNING_METHODS)
def test_mixed_counts_without_any_padding(model, tiny, method):
    """Equal lengths, different visual-token counts: the backend passes no mask (sdpa, flash)
    and the filler slots still must not be seen, in prefill and in every decode step."""
    _, processor = tiny
    batch, rows = _equal_length_mixed_batch(processor)
    masks = []
    with apply_pruning(model, PruneConfig(method, keep_ratio=0.3)) as handle:
        spy = model.model.language_model.layers[2].register_forward_pre_hook(
            lambda module, args, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True
        )  # registered after the pruning hooks: sees the mask they hand to layer K
        together = _generate(model, batch)
        spy.remove()
        stats = handle.stats
        uncached = _generate(model, batch, use_cache=False)
        _assert_rows_as_alone(model, handle, batch, rows)
    assert [s["visual_tokens"] for s in stats] == [32, 16] and stats[0]["visual_tokens_kept"] != stats[1]["visual_tokens_kept"]
    assert len(masks) == NEW_TOKENS and all(m is not None for m in masks)  # built where the backend gave none
    for mask in masks:  # no query row without a key (an empty row is NaN on some kernels)
        if mask.dim() == 4:
            allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
            assert allowed.any(dim=-1).all()
    assert all(m.shape[-2] == 1 for m in masks[1:] if m.dim() == 4)  # a decode step: one query row
    lengths = [layer.keys.shape[-2] for layer in together.past_key_values.layers]
    assert len(set(lengths[2:])) == 1 and lengths[2] < lengths[0]  # layers >= K: one cache length, pruned
    assert torch.equal(together.sequences, uncached.sequences)
    reference = _masked_reference_generate(model, batch, stats)
    _assert_same_generation(together, reference)


def test_random_seed_does_not_depend_on_the_batch_padding_of_pixels(tiny_next_mixed):
    """A forward pass hands the zero-padded anyres patches to the hooks: the same image must
    get the same random subset alone and in a batch padded to a larger patch count."""
    model, processor, images, batch = tiny_next_mixed
    assert batch["pixel_values"].shape[1] > make_inputs(processor, MIXED_PROMPTS[1:2], images[1:2])["pixel_values"].shape[1]
    with apply_pruning(model, PruneConfig("random", keep_ratio=0.3)) as handle, torch.no_grad():
        model(**batch)
        together = handle.stats
        for i in (1, 2):
            model(**make_inputs(processor, [MIXED_PROMPTS[i]], [images[i]]))
            assert handle.stats[0]["kept_positions"] == together[i]["kept_positions"]
