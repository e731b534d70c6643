"""The hooks' small tensor helpers (``ep_core.hooks``) against direct indexing: the masks each
attention backend gets, and the pixels a sample's seed is hashed from. The whole-model oracles
that use them are in test_core_oracles.py."""

from __future__ import annotations

import pytest
import torch

from ep_core.hooks import _build_mask, _cut_key_columns, _cut_mask, _same_media, _strip_zero_patches, _uses_flash_masks


def test_trailing_zero_patches_are_stripped_and_nothing_else():
    """A LLaVA-NeXT image zero-padded to the batch's most patches: the padding goes, a zero
    patch inside the image stays, an all-zero image has no patches, other shapes pass through."""
    pixels = torch.randn(6, 3, 2, 2)
    pixels[1] = 0  # inside the image
    pixels[4:] = 0  # the batch's padding
    assert torch.equal(_strip_zero_patches(pixels), pixels[:4])
    assert torch.equal(_strip_zero_patches(pixels[:4]), pixels[:4])
    assert _strip_zero_patches(torch.zeros(3, 3, 2, 2)).shape == (0, 3, 2, 2)
    flat = torch.zeros(5, 12)  # Qwen's [patches, dim]: not a stack of images
    assert _strip_zero_patches(flat) is flat


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("implementation", ["eager", None, "sdpa"])
def test_a_built_mask_is_additive_for_eager_and_bool_for_sdpa(implementation, dtype):
    """Keys at positions 0, 2, 5 (the middle one filler) for queries at 2 and 5: a key is seen
    when it is valid and not after the query. Eager (also when no implementation is named) gets
    0 / the dtype's minimum in the layer's dtype, sdpa a bool mask."""
    key_pos = torch.tensor([[0, 2, 5]])
    key_valid = torch.tensor([[True, False, True]])
    query_pos = torch.tensor([[[2], [5]]])
    allowed = torch.tensor([[[[True, False, False], [True, False, True]]]])
    mask = _build_mask(query_pos, key_pos, key_valid, implementation, dtype)
    if implementation == "sdpa":
        assert mask.dtype == torch.bool and torch.equal(mask, allowed)
    else:
        expected = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        assert mask.dtype == dtype and torch.equal(mask, expected)
    assert torch.equal(_build_mask(query_pos, key_pos, key_valid, "flash_attention_2", dtype), key_valid)


def test_key_columns_are_cut_for_every_head_and_query_of_a_broadcast_mask():
    """A ``[1, h=2, q=3, kv=7]`` mask (one for the whole batch, several queries: speculative
    decoding) cut to each row's own columns equals indexing it directly; filler columns masked."""
    mask = torch.randn(1, 2, 3, 7)
    columns = torch.tensor([[0, 2, 5, 6], [1, 3, 4, 6]])
    column_valid = torch.tensor([[True, True, False, True], [True, True, True, True]])
    cut = _cut_key_columns(mask, columns, column_valid)
    assert cut.shape == (2, 2, 3, 4)
    for b in range(2):
        expected = mask[0][:, :, columns[b]].masked_fill(~column_valid[b], torch.finfo(mask.dtype).min)
        assert torch.equal(cut[b], expected)
    assert torch.equal(_cut_key_columns(mask, columns, None)[1], mask[0][:, :, columns[1]])


def test_a_prefill_mask_with_several_heads_is_cut_on_rows_and_columns():
    mask = torch.randn(1, 2, 6, 6)
    keep = torch.tensor([[0, 2, 5], [1, 2, 3]])
    cut = _cut_mask(mask, keep, None)
    assert cut.shape == (2, 2, 3, 3)
    for b in range(2):
        assert torch.equal(cut[b], mask[0][:, keep[b]][:, :, keep[b]])


def test_flash_backends_are_told_by_their_name_or_their_mask_function():
    """Flash kernels take 2-D padding masks: every ``flash*`` name (a hub kernel such as
    ``kernels-community/flash-attn3`` may have no mask function registered), or any backend
    registered with transformers' flash mask function; sdpa, eager and none are not."""
    from tests.oracles import FLASH_LIKE

    assert _uses_flash_masks("flash_attention_2") and _uses_flash_masks("kernels-community/flash-attn3")
    assert _uses_flash_masks(FLASH_LIKE)  # no "flash" in its name: its mask function says it
    assert not any(_uses_flash_masks(name) for name in ("sdpa", "eager", None))


def test_same_media_compares_tensors_mappings_and_lists_by_value():
    """What a forward without a cache compares with the last one before continuing its selection:
    none with none, tensors by value (an equal copy is the same image), and transformers'
    ``mm_encoder_outputs`` (a ``ModelOutput`` per modality, ``pooler_output`` a per-image list)
    key by key and item by item."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    x = torch.arange(6.0).reshape(2, 3)
    assert _same_media(None, None) and _same_media(x, x.clone())
    assert not any([_same_media(x, x + 1), _same_media(x, x[:1]), _same_media(x, None), _same_media(None, x)])

    def encoded(*features, modality="image"):
        return {modality: BaseModelOutputWithPooling(pooler_output=list(features))}

    assert _same_media(encoded(x, x + 1), encoded(x.clone(), x + 1))
    assert not _same_media(encoded(x, x), encoded(x, x + 1))  # the second image differs
    assert not _same_media(encoded(x), encoded(x, x))  # another image count
    assert not _same_media(encoded(x), encoded(x, modality="video"))
    assert not _same_media(encoded(x), x) and not _same_media([x], x[None])  # another layout: compared no further
