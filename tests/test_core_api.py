"""What each selection rule keeps (against independent references), and the clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from ep_core import PruneConfig, apply_pruning
from tests.oracles import numpy_token_entropy
from tests.tiny_models import build_tiny_llava, make_inputs, random_images

PROMPTS = ["what color is the circle", "how many red square are there in the picture ?"]
K = 2


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llava()


@pytest.fixture(scope="module")
def batch(tiny):
    return make_inputs(tiny[1], PROMPTS, random_images(2, seed=3))


@pytest.fixture(scope="module")
def narrow_heads():
    """Heads of 4 dims where hidden / heads is 8 (like Qwen3's and Gemma's explicit head_dim)."""
    model, processor = build_tiny_llava(head_dim=4)
    assert model.config.text_config.head_dim * model.config.text_config.num_attention_heads != 32
    return model, processor


@pytest.fixture(params=["tiny", "narrow_heads"])
def tiny_and_batch(request):
    model, processor = request.getfixturevalue(request.param)
    return (model, processor), make_inputs(processor, PROMPTS, random_images(2, seed=3))


def _kept_visual(stats_row, input_ids, valid, image_token_id) -> set[int]:
    unpadded = input_ids[valid]
    return {p for p in stats_row["kept_positions"] if unpadded[p] == image_token_id}


def _visual_positions(input_ids, valid, image_token_id) -> np.ndarray:
    return (input_ids[valid] == image_token_id).nonzero()[:, 0].numpy()


def _prune_stats(model, batch, method, **kw):
    with apply_pruning(model, PruneConfig(method, prune_layer=K, **kw)) as handle:
        with torch.no_grad():
            model(**batch)
        return handle.stats


def test_entropyprune_keeps_the_highest_entropy_queries(tiny_and_batch):
    (model, _), batch = tiny_and_batch
    captured = {}
    hook = model.model.language_model.layers[K - 1].self_attn.q_proj.register_forward_hook(
        lambda m, a, out: captured.setdefault("q", out.detach())
    )
    with torch.no_grad():
        model(**batch)
    hook.remove()
    stats = _prune_stats(model, batch, "entropyprune", keep_ratio=0.25)
    heads = model.config.text_config.num_attention_heads
    for b, valid in enumerate(batch["attention_mask"].bool()):
        q = captured["q"][b][valid].view(int(valid.sum()), heads, -1).numpy()
        visual = _visual_positions(batch["input_ids"][b], valid, model.config.image_token_id)
        scores = numpy_token_entropy(q[visual])
        k = stats[b]["visual_tokens_kept"]
        expected = set(visual[np.argsort(-scores)[:k]].tolist())
        assert _kept_visual(stats[b], batch["input_ids"][b], valid, model.config.image_token_id) == expected


def test_fastv_equals_eager_last_token_attention_under_sdpa(tiny_and_batch):
    (model, _), batch = tiny_and_batch
    model.set_attn_implementation({"text_config": "eager"})
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions
    model.set_attn_implementation({"text_config": "sdpa"})
    stats = _prune_stats(model, batch, "fastv", keep_ratio=0.25)  # pruned under sdpa: no attention maps
    for b, valid in enumerate(batch["attention_mask"].bool()):
        received = attentions[K - 1][b, :, -1, :].mean(0)[valid].numpy()  # last token, mean over heads
        visual = _visual_positions(batch["input_ids"][b], valid, model.config.image_token_id)
        k = stats[b]["visual_tokens_kept"]
        expected = set(visual[np.argsort(-received[visual])[:k]].tolist())
        assert _kept_visual(stats[b], batch["input_ids"][b], valid, model.config.image_token_id) == expected


def test_dart_keeps_k_tokens_including_the_largest_key_norm_pivots(tiny_and_batch):
    (model, _), batch = tiny_and_batch
    with torch.no_grad():
        cache = model(**batch, use_cache=True).past_key_values
    keys = cache.layers[K - 1].keys  # post-RoPE, [B, Hkv, T, hd]
    stats = _prune_stats(model, batch, "dart", keep_ratio=0.5)
    for b, valid in enumerate(batch["attention_mask"].bool()):
        norms = keys[b].abs().sum((0, 2))[valid].numpy()
        visual = _visual_positions(batch["input_ids"][b], valid, model.config.image_token_id)
        kept = _kept_visual(stats[b], batch["input_ids"][b], valid, model.config.image_token_id)
        assert len(kept) == stats[b]["visual_tokens_kept"] == round(0.5 * len(visual))
        assert set(visual[np.argsort(-norms[visual])[:4]].tolist()) <= kept


def test_random_is_seeded_per_sample(tiny):
    model, processor = tiny
    images = random_images(2, seed=4)
    same_prompt = make_inputs(processor, [PROMPTS[0]] * 2, images)
    first = _prune_stats(model, same_prompt, "random", keep_ratio=0.25, seed=0)
    again = _prune_stats(model, same_prompt, "random", keep_ratio=0.25, seed=0)
    other_seed = _prune_stats(model, same_prompt, "random", keep_ratio=0.25, seed=1)
    assert first == again
    assert first[0]["kept_positions"] != other_seed[0]["kept_positions"]
    assert first[0]["kept_positions"] != first[1]["kept_positions"], "two images with one prompt: two draws"


def test_zero_kept_tokens_still_generates(tiny, batch):
    model, _ = tiny
    with apply_pruning(model, PruneConfig("entropyprune", keep_ratio=0.0)) as handle:
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3
    assert all(s["visual_tokens_kept"] == 0 for s in handle.stats)


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="magic", budget=64), "unknown pruning method 'magic'; choose one of: none, entropyprune"),
        (dict(method="entropyprune"), "needs a budget"),
        (dict(method="random", budget=64, keep_ratio=0.5), "not budget and keep_ratio"),
        (dict(method="fastv", budget=-3), "budget must be"),
        (dict(method="fastv", budget=float("inf")), "budget must be a finite number"),
        (dict(method="fastv", budget=float("nan")), "budget must be a finite number"),
        (dict(method="dart", keep_ratio=1.5), "keep_ratio must be between 0 and 1"),
        (dict(method="fastv", keep_ratio=0.5, keep_tokens=64), "not keep_ratio and keep_tokens"),
        (dict(method="fastv", keep_tokens=-1), "keep_tokens must be an integer >= 0"),
        (dict(method="fastv", keep_tokens=2.5), "keep_tokens must be an integer >= 0"),
        (dict(method="entropyprune", budget=64, prune_layer=0), "prune_layer must be an integer >= 1"),
        (dict(method="entropyprune", budget=64, prune_layer=1.5), "prune_layer must be an integer >= 1"),
    ],
)
def test_prune_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruneConfig(**kwargs)


def test_prune_layer_beyond_the_decoder(tiny):
    with pytest.raises(ValueError, match="prune_layer must be between 1 and 3 for this 4-layer decoder"):
        apply_pruning(tiny[0], PruneConfig("entropyprune", budget=8, prune_layer=4))


def test_unsupported_family():
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match="model family 'llama' .* is not supported yet; supported: llava"):
        apply_pruning(llama, PruneConfig("entropyprune", budget=8))


def test_flex_attention_is_refused(tiny):
    model, _ = tiny
    model.config.get_text_config()._attn_implementation = "flex_attention"
    try:
        with pytest.raises(ValueError, match="^attention backend 'flex_attention' is not supported: .+; use sdpa, eager or flash_attention_2$"):
            apply_pruning(model, PruneConfig("entropyprune", budget=8))
    finally:
        model.config.get_text_config()._attn_implementation = "sdpa"


def test_compiled_model_is_refused(tiny):
    with pytest.raises(ValueError, match="^apply_pruning got a torch.compile'd model; pruning hooks need the uncompiled model$"):
        apply_pruning(torch.compile(tiny[0]), PruneConfig("entropyprune", budget=8))


def test_a_model_compiled_after_the_hooks_are_on_is_refused_when_it_runs(tiny, batch, monkeypatch):
    """torch.compile of a model that already has the hooks is caught by the first hook that runs
    under the compiler (told apart here by patching the compiler's flag), with one line."""
    model, _ = tiny
    with apply_pruning(model, PruneConfig("entropyprune", budget=8)) as handle:
        assert handle.stats == []  # nothing ran yet
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        with pytest.raises(RuntimeError, match="^EntropyPrune hooks do not support torch.compile; run the model uncompiled$"):
            model(**batch)


def test_a_mask_that_is_not_a_tensor_is_refused_at_the_prune_layer(tiny, batch):
    """Flex attention hands the layers a BlockMask, which the hooks cannot cut: refused with one
    line naming its type (flex attention is refused up front too; this is the runtime guard)."""
    model, _ = tiny

    class BlockMask:  # what flex attention passes instead of a tensor
        pass

    def flex_like(module, args, kwargs):
        return args, {**kwargs, "attention_mask": BlockMask()}

    layer = model.model.language_model.layers[K]
    spy = layer.register_forward_pre_hook(flex_like, with_kwargs=True)
    try:
        with apply_pruning(model, PruneConfig("entropyprune", budget=8, prune_layer=K)):
            with pytest.raises(RuntimeError, match=r"^cannot prune with a BlockMask attention mask \(flex attention\?\)$"):
                model(**batch)
    finally:
        spy.remove()


def test_static_cache_config_is_refused(tiny):
    model, _ = tiny
    model.generation_config.cache_implementation = "static"
    try:
        with pytest.raises(ValueError, match=r"^generation_config.cache_implementation='static' is not supported: pruned "
                           "layers hold shorter caches, which only DynamicCache allows; set it to None$"):
            apply_pruning(model, PruneConfig("entropyprune", budget=8))
        model.generation_config.cache_implementation = "dynamic"  # what DynamicCache is: accepted
        apply_pruning(model, PruneConfig("entropyprune", budget=8)).remove()
    finally:
        model.generation_config.cache_implementation = None


def test_sliding_window_layers_and_a_config_that_is_not_a_prune_config_are_refused(tiny):
    model, _ = tiny
    text = model.config.get_text_config()
    text.layer_types = ["full_attention", "sliding_attention"] * (text.num_hidden_layers // 2)
    try:
        with pytest.raises(ValueError, match="^sliding-window attention layers are not supported: a window over "
                           "pruned caches is ill-defined$"):
            apply_pruning(model, PruneConfig("entropyprune", budget=8))
    finally:
        text.layer_types = ["full_attention"] * text.num_hidden_layers
    with pytest.raises(TypeError, match="^config must be a PruneConfig, got dict$"):
        apply_pruning(model, {"method": "entropyprune"})


def test_continuing_from_a_filled_cache_and_inputs_embeds_alone_are_refused(tiny, batch):
    """Pruning takes one prefill, then one-token decode steps, from ``input_ids``: two tokens
    after a filled cache (assisted decoding, chunked prefill; a cache of one token too) and a prefill of ``inputs_embeds``
    alone raise; unpruned (method none) the embeddings run and there are no stats."""
    model, _ = tiny
    with apply_pruning(model, PruneConfig("entropyprune", keep_ratio=0.5)), torch.no_grad():
        cache = model(**batch, use_cache=True).past_key_values
        two = batch["input_ids"][:, -2:]
        mask = torch.cat([batch["attention_mask"], torch.ones_like(two)], 1)
        with pytest.raises(RuntimeError, match=r"^pruning supports one prefill followed by one-token decode steps; continuing "
                           r"from a filled cache \(assisted decoding, chunked prefill, multi-turn reuse\) is not supported$"):
            model(input_ids=two, attention_mask=mask, cache=cache, use_cache=True)
        one = model(input_ids=two[:, :1], attention_mask=torch.ones_like(two[:, :1]), use_cache=True).past_key_values
        assert one.get_seq_length() == 1  # a cache of one token is a filled cache too
        with pytest.raises(RuntimeError, match="^pruning supports one prefill"):
            model(input_ids=two, attention_mask=torch.ones(two.shape[0], 3, dtype=mask.dtype), cache=one, use_cache=True)
        embeds = model.get_input_embeddings()(batch["input_ids"][:, -3:])
        with pytest.raises(RuntimeError, match="^pruning supports one prefill"):  # the same step as embeddings
            model(inputs_embeds=embeds[:, -2:], attention_mask=mask, cache=cache, use_cache=True)
        with pytest.raises(ValueError, match=r"^pruning needs input_ids \(to find the visual tokens\); inputs_embeds alone "
                           "are not supported$"):
            model(inputs_embeds=embeds)
    with apply_pruning(model, PruneConfig("none")) as handle, torch.no_grad():
        model(inputs_embeds=embeds)
        assert handle.stats == []


@pytest.mark.parametrize("use_cache", [True, False])
def test_only_a_run_without_a_cache_keeps_its_images(tiny, batch, use_cache):
    """The hooks keep a forward's images only to compare them with the next forward of a run
    without a cache (is it that run's next step?): after a cached generate they hold none, so a
    batch's images are freed with the batch, on a GPU too. The images go in pre-encoded, as
    generate passes them to the model in transformers 5.2x."""
    import gc
    import weakref

    model, _ = tiny
    with torch.no_grad():
        encoded = model.model.get_image_features(pixel_values=batch["pixel_values"])
    features = encoded.pooler_output[0] if isinstance(encoded.pooler_output, (list, tuple)) else encoded.pooler_output
    alive = weakref.ref(features)
    text = {k: v for k, v in batch.items() if k != "pixel_values"}
    with apply_pruning(model, PruneConfig("entropyprune", keep_ratio=0.5)), torch.no_grad():
        model.generate(**text, mm_encoder_outputs={"image": encoded}, max_new_tokens=2, do_sample=False,
                       use_cache=use_cache)
        del encoded, features
        gc.collect()
        assert (alive() is not None) == (not use_cache)


class _CountCalls:
    def __init__(self, module):
        self.calls = 0
        self.hook = module.register_forward_hook(self)

    def __call__(self, *args):
        self.calls += 1


def test_static_cache_at_run_time_is_refused_before_any_compute(tiny, batch):
    model, _ = tiny
    counter = _CountCalls(model.model.vision_tower)
    cache = StaticCache(config=model.config.get_text_config(), max_cache_len=64)
    try:
        with apply_pruning(model, PruneConfig("entropyprune", budget=8)):
            with pytest.raises(RuntimeError, match=r"^pruned models need a DynamicCache \(per-layer cache lengths differ "
                               r"after pruning\), got StaticCache; leave cache_implementation unset$"):
                model(**batch, cache=cache, use_cache=True)
    finally:
        counter.hook.remove()
    assert counter.calls == 0


def test_rows_with_different_visual_counts_keep_their_own_share(tiny):
    model, processor = tiny
    images = random_images(3, seed=5)
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "describe"}]}],
            add_generation_prompt=True,
        ),
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}],
            add_generation_prompt=True,
        ),
    ]
    mixed = processor(images=[images[:2], images[2:]], text=texts, return_tensors="pt", padding=True)
    with apply_pruning(model, PruneConfig("entropyprune", keep_ratio=0.5)) as handle:
        model.generate(**mixed, max_new_tokens=2)
    assert [(s["visual_tokens"], s["visual_tokens_kept"]) for s in handle.stats] == [(32, 16), (16, 8)]


def test_method_none_only_observes(tiny, batch):
    """'none' refuses nothing the model can do (a StaticCache here) and still reports stats."""
    model, _ = tiny
    cache = StaticCache(config=model.config.get_text_config(), max_cache_len=64)
    with apply_pruning(model, PruneConfig("none")) as handle:
        with torch.no_grad():
            model(**batch, cache=cache, use_cache=True)
        assert [s["visual_tokens_kept"] for s in handle.stats] == [s["visual_tokens"] for s in handle.stats] == [16, 16]


def test_fastv_ignores_padded_keys_even_when_they_would_take_the_attention():
    """A hand-built row: a padded key with a huge logit in one head would flip FastV's choice
    if it took part in the softmax. Softmax over the valid keys (A, B and the last token):
    head 0 [1, 0, 0], head 1 [0, 2, 0] → mean attention A 0.341 < B 0.500: B is kept."""
    import math

    from ep_core.methods import Row

    r2 = math.sqrt(2.0)  # the score divides by √hd, hd = 2
    keys = torch.tensor([
        [[0.0, 0.0], [0.0, 10 * r2]],  # position 0: padding, logit 10 in head 1
        [[r2, 0.0], [0.0, 0.0]],  # A: logit 1 in head 0
        [[0.0, 0.0], [0.0, 2 * r2]],  # B: logit 2 in head 1
        [[0.0, 0.0], [0.0, 0.0]],  # the last prompt token
    ])
    queries = torch.zeros(4, 2, 2)
    queries[3, 0, 0] = queries[3, 1, 1] = 1.0
    row = Row(visual_pos=torch.tensor([1, 2]), valid=torch.tensor([False, True, True, True]), seed=0,
              queries=queries, keys=keys, cos=torch.ones(4, 2), sin=torch.zeros(4, 2))
    assert _fastv_kept(row, 1) == [1]  # B (index 1 of visual_pos); with the padded key: A


def _fastv_kept(row, k: int) -> list[int]:
    """FastV's kept indices into ``row.visual_pos``, through its whole-batch rule on a batch of
    one (batches of several rows are checked by the oracles of test_core_oracles.py)."""
    from ep_core.methods import Candidates, fastv

    n = len(row.visual_pos)
    candidates = Candidates(
        visual_pos=row.visual_pos[None], visual_valid=torch.ones(1, n, dtype=torch.bool), ks=torch.tensor([k]),
        valid=row.valid[None], queries=row.queries[None], keys=row.keys[None], cos=row.cos[None], sin=row.sin[None],
    )
    return fastv.select_batch(candidates)[0].nonzero()[:, 0].tolist()


def _numpy_fastv(queries, keys, cos, sin, visual_pos, valid, k):
    """FastV re-derived in NumPy: post-RoPE query of the last valid token against every valid
    post-RoPE key (GQA keys repeated), softmax at temperature √hd per head, mean over heads,
    the k visual tokens with the most attention."""
    def rope(x, c, s):
        half = x.shape[-1] // 2
        return x * c[:, None, :] + np.concatenate([-x[..., half:], x[..., :half]], axis=-1) * s[:, None, :]

    last = np.nonzero(valid)[0][-1]
    q = rope(queries[last : last + 1], cos[last : last + 1], sin[last : last + 1])[0]  # [H, hd]
    kk = np.repeat(rope(keys, cos, sin), q.shape[0] // keys.shape[1], axis=1)  # [T, H, hd]
    logits = np.einsum("hd,thd->ht", q, kk) / np.sqrt(q.shape[-1])
    logits[:, ~valid] = -np.inf
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    attention = (weights / weights.sum(axis=1, keepdims=True)).mean(axis=0)
    return set(np.argsort(-attention[visual_pos], kind="stable")[:k].tolist())


def test_fastv_takes_each_rows_own_last_token_in_a_batch():
    """Two rows at once, the first right-padded (its last valid token is not the batch's last
    position), the second left-padded: each row's selection equals the NumPy reference of that
    row alone, with that row's last valid token as the query."""
    from ep_core.methods import Candidates, fastv

    rng = np.random.default_rng(7)
    B, T, H, Hkv, hd, k = 2, 20, 4, 2, 8, 5
    queries = rng.normal(0, 3, (B, T, H, hd)).astype(np.float32)
    keys = rng.normal(0, 1, (B, T, Hkv, hd)).astype(np.float32)
    angles = np.arange(T)[:, None] * (1.0 / 10000 ** (np.arange(0, hd, 2) / hd))[None, :]
    cos = np.concatenate([np.cos(angles)] * 2, axis=-1).astype(np.float32)
    sin = np.concatenate([np.sin(angles)] * 2, axis=-1).astype(np.float32)
    valid = np.ones((B, T), dtype=bool)
    valid[0, 14:] = False  # right padding: row 0 ends at position 13
    valid[1, :2] = False  # left padding
    visual_pos = np.stack([np.arange(3, 13), np.arange(5, 15)])
    candidates = Candidates(
        visual_pos=torch.from_numpy(visual_pos), visual_valid=torch.ones(B, 10, dtype=torch.bool), ks=torch.tensor([k, k]),
        valid=torch.from_numpy(valid), queries=torch.from_numpy(queries), keys=torch.from_numpy(keys),
        cos=torch.from_numpy(cos)[None], sin=torch.from_numpy(sin)[None],
    )
    kept = fastv.select_batch(candidates)
    for b in range(B):
        assert set(kept[b].nonzero()[:, 0].tolist()) == _numpy_fastv(queries[b], keys[b], cos, sin, visual_pos[b], valid[b], k)


def test_top_per_row_of_no_rows_is_empty():
    from ep_core.methods.base import top_per_row

    kept = top_per_row(torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.bool), torch.zeros(0, dtype=torch.long))
    assert kept.shape == (0, 5) and kept.dtype == torch.bool


@pytest.mark.parametrize("seed", range(4))
def test_fastv_selection_equals_a_numpy_reference_at_the_right_temperature(seed):
    """Large random logits (std ≈ 3), H = 4 ≠ hd = 8 and GQA: the kept set depends on the
    softmax temperature, so a wrong scale (× √hd, or √H) changes it."""
    from ep_core.methods import Row

    rng = np.random.default_rng(seed)
    T, H, Hkv, hd, k = 24, 4, 2, 8, 6
    queries = rng.normal(0, 3, (T, H, hd)).astype(np.float32)
    keys = rng.normal(0, 1, (T, Hkv, hd)).astype(np.float32)
    angles = np.arange(T)[:, None] * (1.0 / 10000 ** (np.arange(0, hd, 2) / hd))[None, :]
    cos = np.concatenate([np.cos(angles)] * 2, axis=-1).astype(np.float32)
    sin = np.concatenate([np.sin(angles)] * 2, axis=-1).astype(np.float32)
    valid = np.ones(T, dtype=bool)
    valid[:3] = False  # left padding
    visual_pos = np.arange(5, 19)
    row = Row(visual_pos=torch.from_numpy(visual_pos), valid=torch.from_numpy(valid), seed=0,
              queries=torch.from_numpy(queries), keys=torch.from_numpy(keys), cos=torch.from_numpy(cos),
              sin=torch.from_numpy(sin))
    assert set(_fastv_kept(row, k)) == _numpy_fastv(queries, keys, cos, sin, visual_pos, valid, k)


def _numpy_dart(keys, hidden, cos, sin, visual_pos, valid, k, pivots=4):
    """DART's selection re-derived in NumPy from the captured keys and hidden states: image and
    text pivots by the L1 norm of the post-RoPE keys, then, pivot by pivot, the least similar
    (cosine) remaining visual tokens."""
    half = keys.shape[-1] // 2
    rotated = np.concatenate([-keys[..., half:], keys[..., :half]], axis=-1)
    norm = np.abs(keys * cos[:, None, :] + rotated * sin[:, None, :]).sum(axis=(1, 2))
    image_pivots = list(np.argsort(-norm[visual_pos], kind="stable")[: min(pivots, k)])
    text = [t for t in range(len(valid)) if valid[t] and t > visual_pos[-1]]
    text_pivots = sorted(text, key=lambda t: -norm[t])[:pivots]
    unit = hidden / np.linalg.norm(hidden, axis=1, keepdims=True)
    vectors = [unit[visual_pos[i]] for i in image_pivots] + [unit[t] for t in text_pivots]
    kept, available = list(image_pivots), set(range(len(visual_pos))) - set(image_pivots)
    share, extra = divmod(k - len(image_pivots), len(vectors))
    for i, v in enumerate(vectors):
        for _ in range(share + (i < extra)):
            best = min(available, key=lambda j: float(unit[visual_pos[j]] @ v))
            kept.append(best)
            available.remove(best)
    return sorted(kept)


@pytest.mark.parametrize("k", [1, 5, 13, 20])
def test_dart_selection_equals_an_independent_numpy_computation(k):
    from ep_core.methods import Row, dart

    g = torch.Generator().manual_seed(k)
    length, heads, head_dim, width = 34, 2, 4, 16
    visual_pos = torch.arange(4, 28)  # text before (positions 1..3, 0 is padding) and after the image
    valid = torch.ones(length, dtype=torch.bool)
    valid[0] = False
    keys = torch.randn(length, heads, head_dim, generator=g)
    keys[1:4] *= 5  # text *before* the image has the largest keys: it must not be a text pivot
    keys[27] *= 8  # nor the image's last token, whose key beats every text token after it
    hidden = torch.randn(length, width, generator=g)
    angles = torch.rand(length, head_dim // 2, generator=g) * 3
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    row = Row(visual_pos=visual_pos, valid=valid, seed=0, keys=keys, hidden=hidden, cos=cos, sin=sin)
    ours = sorted(dart.select(row, k).tolist())
    assert len(ours) == k == len(set(ours))
    assert ours == _numpy_dart(keys.numpy(), hidden.numpy(), cos.numpy(), sin.numpy(), visual_pos.numpy(), valid.numpy(), k)


def test_filler_slots_are_hidden_keys_and_never_empty_queries():
    """Row 0 keeps 3 tokens, row 1 keeps 4: row 0's slot 0 is filler at position 0, before every
    kept key. Prefill masks (cut from the backend's, or built where it gave none) hide the filler
    column from every other query and leave no query row empty; decode masks hide it too."""
    from ep_core.hooks import _build_mask, _cut_key_columns, _cut_mask

    keep = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    slot_valid = torch.tensor([[False, True, True, True], [True, True, True, True]])
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].expand(2, 1, 5, 5)
    additive = torch.zeros(causal.shape).masked_fill(~causal, torch.finfo(torch.float32).min)
    built = {name: _build_mask(keep[:, :, None], keep, slot_valid, name, torch.float32) for name in ("sdpa", "eager")}
    for mask in (_cut_mask(causal, keep, slot_valid), _cut_mask(additive, keep, slot_valid), *built.values()):
        allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        assert allowed.any(dim=-1).all()  # no empty query row
        assert not allowed[0, 0, 1:, 0].any() and allowed[1, 0, 1:, 0].all()  # the filler key hidden in row 0 only
        assert torch.equal(allowed[:, :, 1:, 1:], causal[:, :, 1:4, 1:4])  # the rest is the causal mask
    assert torch.equal(_cut_mask(torch.ones(2, 5, dtype=torch.long), keep, slot_valid), slot_valid.long())
    columns = torch.cat([keep, torch.tensor([[5], [5]])], dim=1)
    column_valid = torch.cat([slot_valid, torch.ones(2, 1, dtype=torch.bool)], dim=1)
    decode = _cut_key_columns(torch.ones(2, 1, 1, 6, dtype=torch.bool), columns, column_valid)
    assert torch.equal(decode[:, 0, 0], column_valid)
    decode_built = _build_mask(torch.full((2, 1, 1), 5), columns, column_valid, "sdpa", torch.float32)
    assert torch.equal(decode_built[:, 0, 0], column_valid)


def test_load_model_reads_weights_straight_onto_the_device_in_the_resolved_dtype(monkeypatch):
    """``device_map`` is passed to ``from_pretrained`` (so a GPU gets no CPU copy of the weights
    first), with the dtype ``auto`` resolves to: bf16 on a GPU that has it, else fp16, fp32 on CPU."""
    import torch
    import transformers

    from ep_core import loading

    seen = {}
    real = transformers.AutoModelForImageTextToText.from_pretrained

    def from_pretrained(path, **kwargs):
        seen.update(kwargs)
        return real(path, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", from_pretrained)
    model, _ = loading.load_model("demo", device="cpu")
    assert seen["device_map"] == "cpu" and seen["dtype"] == torch.float32 and model.device.type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert loading.resolve_dtype("auto", "cuda") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert loading.resolve_dtype("auto", "cuda") == torch.bfloat16


def test_the_api_takes_the_family_prune_layer_when_none_is_given():
    """``PruneConfig`` without ``prune_layer``: K = 2 on LLaVA, K = 1 on Qwen-VL (the paper's)."""
    from ep_core import PruneConfig, apply_pruning
    from tests.tiny_models import build_tiny_llava, build_tiny_qwen_vl

    assert PruneConfig(keep_ratio=0.5).prune_layer is None
    for model, k in ((build_tiny_llava()[0], 2), (build_tiny_qwen_vl("qwen2_5_vl"), 1)):
        handle = apply_pruning(model, PruneConfig(keep_ratio=0.5))
        try:
            assert handle.config.prune_layer == k
        finally:
            handle.remove()


def test_keep_tokens_travels_from_the_caption_flags_to_the_rows_and_old_identities_stay(tmp_path):
    """``--keep-tokens`` becomes ``PruneConfig.keep_tokens``, an output column and part of the
    job identity; a config without it has the identity it had before the field existed."""
    import argparse

    from jobs.caption import add_arguments, config_from_args
    from pipelines.sink import OUTPUT_COLUMNS

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--model", "demo", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--method", "fastv"]
    cfg = config_from_args(parser.parse_args(base + ["--keep-tokens", "320"]))
    assert cfg.prune == PruneConfig("fastv", keep_tokens=320, prune_layer=2)
    assert cfg.prune.row_fields()["keep_tokens"] == 320 and "keep_tokens" in OUTPUT_COLUMNS
    assert cfg.job_identity()["keep_tokens"] == 320
    old = config_from_args(parser.parse_args(base + ["--keep-ratio", "0.25"]))
    assert set(old.prune.to_dict()) == {"method", "budget", "keep_ratio", "prune_layer", "seed"}
    with pytest.raises(ValueError, match="not keep_ratio and keep_tokens"):
        config_from_args(parser.parse_args(base + ["--keep-ratio", "0.25", "--keep-tokens", "320"]))
