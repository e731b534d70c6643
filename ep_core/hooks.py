"""The single integration point with transformers: hooks that prune visual tokens at layer K.

``apply_pruning(model, config)`` registers, on an unmodified model:

1. a forward pre-hook on the multimodal model (``model.model``) that reads ``input_ids`` and
   the 2-D attention mask, finds the visual tokens, tells prefill from decode, and refuses
   what cannot work (StaticCache, torch.compile, a restart from a filled cache) before any
   compute;
2. forward hooks on layer K−1's ``q_proj`` / ``k_proj`` when the rule reads queries or keys
   (their outputs are computed anyway: nothing is recomputed);
3. a forward pre-hook on every decoder layer i ≥ K:
   - prefill, layer K: select the kept tokens of every row, then gather the hidden states,
     the rotary tables, the position ids and the mask (rows *and* columns) by ``keep``;
   - prefill, layers > K: hand them the gathered tables and mask (the decoder loop keeps
     passing the full-length ones);
   - decode: the layer's cache holds only the kept tokens, so cut the mask's key columns to
     ``keep`` plus the generated positions. Positions need nothing: ``generate`` numbers new
     tokens from the full prompt length, and layer 0's cache (which ``generate`` reads) is full.

Kept tokens keep their original positions. Text tokens are always kept, the left padding is
dropped with the visual tokens (it is masked anyway), so row b keeps ``P_b = text_b + k_b``
tokens. Rows may keep different numbers (different visual-token counts, e.g. LLaVA-NeXT's
anyres): the batch after layer K has ``P = max_b P_b`` slots, each row's kept tokens
right-aligned, and the ``P − P_b`` filler slots on the left masked out as keys in every
layer ≥ K, prefill and decode (a filler query always sees itself, so no attention row is
empty). No row drops anything → nothing is gathered and the model runs unchanged.

DeepStack (Qwen3-VL, ``Family.deepstack``) adds visual features to the hidden states at the
visual positions after the first decoder layers. After layer K those additions must follow the
kept tokens: the handle wraps the text model's own ``_deepstack_process`` on the instance (the
method itself is untouched; ``remove()`` restores it) to hand it, after the cut, the kept visual
positions of the shortened sequence and those tokens' rows of the features.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from ep_core.accounting import sample_stats
from ep_core.budget import keep_count, keep_count_for_ratio
from ep_core.config import PruneConfig
from ep_core.families import Family, check_supported
from ep_core.methods import RULES, Candidates, Row

# The multimodal model's inputs that carry images or videos: a forward without a cache continues
# the last selection only when each is the same (``mm_encoder_outputs``: what generate passes
# in transformers 5.2x, pre-encoded, with pixel_values None).
MEDIA_INPUTS = ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")  # pixel_values first: the random rule hashes it
NO_MEDIA = (None,) * len(MEDIA_INPUTS)

UNSUPPORTED_ATTENTION = {"flex_attention": "its BlockMask cannot be cut to the kept tokens"}


@dataclass
class _Prefill:
    """What the hooks know about the current forward pass."""

    phase: str  # "prefill" (select), "continue" (use_cache=False step: reuse keep), "decode"
    prompt_ids: torch.Tensor | None = None  # [B, T] the prompt that was selected on
    media: tuple = NO_MEDIA  # its MEDIA_INPUTS (a use_cache=False step passes the same again)
    is_visual: torch.Tensor | None = None  # [B, T] bool, candidate visual tokens
    valid: torch.Tensor | None = None  # [B, T] bool, not padding
    row_seeds: list[int] = field(default_factory=list)
    captured: dict[str, torch.Tensor] = field(default_factory=dict)  # q_proj / k_proj outputs
    full_len: int = 0
    keep: torch.Tensor | None = None  # [B, P] positions reaching layer K (filler first); None = no pruning
    slot_valid: torch.Tensor | None = None  # [B, P] bool, False at filler slots
    has_filler: bool = False  # some row keeps fewer than P tokens
    layer_dtype: torch.dtype = torch.float32  # hidden-state dtype (for masks built from scratch)
    layer_kwargs: dict = field(default_factory=dict)  # gathered cos/sin, mask, position ids
    decode_kv: int = 0  # key length of the current decode step in the full (layer < K) cache
    step_mask: tuple | None = None  # (the decode step's mask for layers >= K,), computed once per step
    cut: tuple | None = None  # (keep, slot_valid) of this forward once layer K has cut it (DeepStack follows it)


class PruningHandle:
    """Hooks of one :func:`apply_pruning` call. ``stats`` describes the last prefill."""

    def __init__(self, model: nn.Module, config: PruneConfig):
        self.model = model
        self.config = config
        self.family: Family = check_supported(model, config)  # family, method, prune layer
        self.text_config = model.config.get_text_config()
        language_model = self.family.language_model(model)
        self.layers = language_model.layers
        self.final_norm = language_model.norm
        self.num_layers = len(self.layers)
        self.visual_ids = torch.tensor(self.family.visual_token_ids(model.config))
        self.video_ids = torch.tensor(self.family.video_token_ids(model.config), dtype=torch.long)
        self._dtype_bytes = next(model.parameters()).element_size()
        self.rule = RULES.get(config.method)
        self.stats: list[dict] = []
        self._state: _Prefill | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._restore: list = []  # undo actions of instance-level wrappers (DeepStack)
        if self.rule is not None:  # method "none" only observes: it refuses nothing the model can do
            _refuse_unsupported(model, self.text_config)

        try:
            self._install(model, language_model, config.prune_layer)
        except BaseException:
            self.remove()  # a refusal halfway (no _deepstack_process) leaves the model as it was
            raise

    def _install(self, model: nn.Module, language_model: nn.Module, k: int) -> None:
        self._hooks.append(
            self.family.multimodal_model(model).register_forward_pre_hook(self._on_model_input, with_kwargs=True)
        )
        if self.rule is not None:
            attention = self.layers[k - 1].self_attn
            for need, module in (("queries", attention.q_proj), ("keys", attention.k_proj)):
                if need in self.rule.NEEDS:
                    self._hooks.append(module.register_forward_hook(self._capture(need)))
            for index in range(k, self.num_layers):
                self._hooks.append(
                    self.layers[index].register_forward_pre_hook(self._layer_pre_hook(index), with_kwargs=True)
                )
            if self.family.deepstack:
                self._wrap_deepstack(language_model)

    # ------------------------------------------------------------------ public
    def remove(self) -> None:
        """Remove every hook: the model behaves exactly as before :func:`apply_pruning`."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        while self._restore:
            self._restore.pop()()
        self._state = None

    def __enter__(self) -> "PruningHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ------------------------------------------------------------------ hook 1: model input
    def _on_model_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.compiler.is_compiling():
            raise RuntimeError("EntropyPrune hooks do not support torch.compile; run the model uncompiled")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        pruning = self.rule is not None
        if self._state is not None:
            self._state.cut = None  # a new forward: nothing is cut until its layer K
        if pruning and cache is not None and not isinstance(cache, DynamicCache):
            raise RuntimeError(
                f"pruned models need a DynamicCache (per-layer cache lengths differ after pruning), got "
                f"{type(cache).__name__}; leave cache_implementation unset"
            )
        past = cache.get_seq_length() if cache is not None else 0
        if past > 0:
            tokens = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
            if pruning and tokens is not None and tokens.shape[1] > 1:
                raise RuntimeError(
                    "pruning supports one prefill followed by one-token decode steps; continuing from a filled "
                    "cache (assisted decoding, chunked prefill, multi-turn reuse) is not supported"
                )
            if self._state is not None:
                self._state.phase = "decode"
                self._state.decode_kv = past + (input_ids.shape[1] if input_ids is not None else 1)
                self._state.step_mask = None
            return
        if input_ids is None:
            if pruning:
                raise ValueError("pruning needs input_ids (to find the visual tokens); inputs_embeds alone are not supported")
            self._state, self.stats = None, []
            return
        media = tuple(kwargs.get(name) for name in MEDIA_INPUTS)
        self._start_prefill(input_ids, kwargs.get("attention_mask"), media, no_cache=cache is None)

    def _start_prefill(self, input_ids, attention_mask, media: tuple, no_cache: bool) -> None:
        batch, length = input_ids.shape
        previous = self._state
        if (
            no_cache
            and previous is not None
            and previous.prompt_ids is not None
            and previous.prompt_ids.shape[0] == batch
            and previous.full_len < length
            and torch.equal(input_ids[:, : previous.full_len], previous.prompt_ids)
            and not torch.isin(input_ids[:, previous.full_len :], self.visual_ids.to(input_ids.device)).any()
            and all(map(_same_media, media, previous.media))
        ):
            # generate(use_cache=False): the same prompt and images plus generated tokens. Keep the
            # first step's selection and every new position, so the result equals the cached run.
            previous.phase = "continue"
            return
        is_visual = torch.isin(input_ids, self.visual_ids.to(input_ids.device))
        if attention_mask is not None and attention_mask.dim() == 2:
            valid = attention_mask.bool()
        else:
            valid = torch.ones_like(input_ids, dtype=torch.bool)
        is_visual[:, -1] = False  # the last prompt token produces the next-token logits: never drop it
        self._state = _Prefill(
            phase="prefill",
            prompt_ids=input_ids,
            media=media if no_cache else NO_MEDIA,  # compared by the next step without a cache only
            is_visual=is_visual,
            valid=valid,
            full_len=length,
            row_seeds=self._row_seeds(input_ids, valid, media[0]) if self.config.method == "random" else [],
        )
        if self.rule is None:
            self.stats = self._all_row_stats(None, None)

    def _row_seeds(self, input_ids, valid, pixel_values) -> list[int]:
        """Per-sample seeds: config seed + the sample's tokens (+ its image when one per row).

        The image is hashed without trailing all-zero patches: LLaVA-NeXT's processor zero-pads
        every image to the batch's largest patch count, and the seed must not depend on the batch.
        """
        seeds = []
        one_image_per_row = isinstance(pixel_values, torch.Tensor) and pixel_values.shape[0] == input_ids.shape[0]
        ids, valid = input_ids.cpu(), valid.cpu()
        pixels = pixel_values.detach().float().cpu() if one_image_per_row else None
        for b in range(ids.shape[0]):
            digest = hashlib.blake2b(str(self.config.seed).encode(), digest_size=8)
            digest.update(ids[b][valid[b]].numpy().tobytes())
            if pixels is not None:
                digest.update(_strip_zero_patches(pixels[b]).numpy().tobytes())
            seeds.append(int.from_bytes(digest.digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF)
        return seeds

    # ------------------------------------------------------------------ hook 2: q/k capture
    def _capture(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            state = self._state
            if state is not None and state.phase == "prefill":  # the prefill of layer K-1: what the rule scores
                state.captured[name] = output

        return hook

    # ------------------------------------------------------------------ hook 3: layers >= K
    def _layer_pre_hook(self, index: int):
        is_prune_layer = index == self.config.prune_layer

        def hook(module: nn.Module, args: tuple, kwargs: dict):
            state = self._state
            if state is None:
                return None
            if state.phase in ("prefill", "continue"):
                if is_prune_layer:
                    return self._prune(state, args, kwargs)
                if state.keep is None:
                    return None
                kwargs.update(state.layer_kwargs)
                return args, kwargs
            if state.phase == "decode" and state.keep is not None:
                if state.step_mask is None:  # cut once per step, not once per layer
                    state.step_mask = (self._decode_mask(state, kwargs.get("attention_mask")),)
                if state.step_mask[0] is not None:
                    kwargs["attention_mask"] = state.step_mask[0]
                    return args, kwargs
            return None

        return hook

    def _prune(self, state: _Prefill, args: tuple, kwargs: dict):
        hidden = args[0] if args else kwargs["hidden_states"]
        batch, length = hidden.shape[:2]
        if state.keep is None and state.phase == "continue":
            return None
        if state.phase == "continue":
            extra = torch.arange(state.full_len, length, device=hidden.device).expand(batch, -1)
            keep = torch.cat([state.keep, extra], dim=1)
            slot_valid = torch.cat([state.slot_valid, torch.ones_like(extra, dtype=torch.bool)], dim=1)
        else:
            selection = self._select(state, hidden, kwargs)
            state.captured.clear()
            if selection is None:
                return None
            keep, slot_valid, state.has_filler = selection
            state.layer_dtype = hidden.dtype
            state.keep, state.slot_valid = keep, slot_valid
        state.cut = (keep, slot_valid)

        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (_gather_tokens(cos, keep), _gather_tokens(sin, keep))
        if _uses_flash_masks(self.text_config._attn_implementation):
            kwargs["position_ids"] = None  # gapped ids would be taken for packed sequences
        elif isinstance(kwargs.get("position_ids"), torch.Tensor):
            kwargs["position_ids"] = _gather_positions(kwargs["position_ids"], keep)
        mask = kwargs.get("attention_mask")
        if mask is not None and not isinstance(mask, torch.Tensor):
            raise RuntimeError(f"cannot prune with a {type(mask).__name__} attention mask (flex attention?)")
        if mask is not None:
            kwargs["attention_mask"] = _cut_mask(mask, keep, slot_valid if state.has_filler else None)
        elif state.has_filler:  # the backend skipped the mask (no padding): the filler needs one
            kwargs["attention_mask"] = _build_mask(keep[:, :, None], keep, slot_valid, self.text_config._attn_implementation, hidden.dtype)
        state.layer_kwargs = {k: kwargs[k] for k in ("position_embeddings", "position_ids", "attention_mask") if k in kwargs}
        hidden = hidden.gather(1, keep[..., None].expand(-1, -1, hidden.shape[-1]))
        args = (hidden, *args[1:]) if args else args
        if not args:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _select(self, state: _Prefill, hidden: torch.Tensor, kwargs: dict):
        """``(keep [B, P], slot_valid [B, P], has_filler)``, or None when no row drops anything.

        Row b keeps its ``P_b`` text tokens and ``k_b`` visual tokens (its left padding is
        dropped with the visual tokens: it is masked anyway) in ascending order in the last
        ``P_b`` slots of ``P = max_b P_b``; the first ``P − P_b`` slots (filler) hold dropped
        positions and are masked. One device sync for the counts, one for the stats.
        """
        text = state.valid & ~state.is_visual
        text[:, -1] = True  # the last position is always kept (it gives the next-token logits)
        counts, text_counts = torch.stack([state.is_visual.sum(1), text.sum(1)]).tolist()
        ks = [self._keep_count(n) for n in counts]
        if all(k == n for k, n in zip(ks, counts)):
            self.stats = self._all_row_stats(None, None)
            return None
        kept_visual = self._kept_visual(state, hidden, kwargs, counts, ks)  # [B, T] bool
        keep_mask = text | kept_visual  # padding goes too: it is masked anyway, filler replaces it
        sizes = [t + k for t, k in zip(text_counts, ks)]
        keep, slot_valid = _right_aligned(keep_mask, max(sizes))
        self.stats = self._all_row_stats(keep, slot_valid)
        return keep, slot_valid, min(sizes) < max(sizes)

    def _kept_visual(self, state: _Prefill, hidden: torch.Tensor, kwargs: dict, counts: list[int], ks: list[int]):
        """``[B, T]`` bool: the visual tokens each row keeps (``ks[b]`` of its ``counts[b]``)."""
        batch, length = hidden.shape[:2]
        text_cfg = self.text_config
        head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
        captured = state.captured
        needs = self.rule.NEEDS
        queries = captured["queries"].view(batch, length, -1, head_dim) if "queries" in needs else None
        keys = captured["keys"].view(batch, length, -1, head_dim) if "keys" in needs else None
        cos, sin = kwargs["position_embeddings"]
        if hasattr(self.rule, "select_batch"):  # the whole batch at once, no sync
            visual_pos, visual_valid = _right_aligned(state.is_visual, max(counts))
            candidates = Candidates(
                visual_pos=visual_pos,
                visual_valid=visual_valid,
                ks=torch.tensor(ks, device=hidden.device),
                valid=state.valid, queries=queries, keys=keys, cos=cos, sin=sin,
            )
            chosen = self.rule.select_batch(candidates)  # [B, width] bool
            kept = torch.zeros_like(state.is_visual)
            return kept.scatter_(1, candidates.visual_pos, chosen & candidates.visual_valid)

        normed = self.final_norm(hidden) if "hidden" in needs else None
        kept = state.is_visual.clone()
        is_visual = state.is_visual.cpu()
        for b in range(batch):
            if ks[b] == counts[b]:
                continue
            visual_pos = is_visual[b].nonzero()[:, 0].to(hidden.device)
            row = Row(
                visual_pos=visual_pos,
                valid=state.valid[b],
                seed=state.row_seeds[b] if state.row_seeds else 0,
                queries=queries[b] if queries is not None else None,
                keys=keys[b] if keys is not None else None,
                cos=cos[min(b, cos.shape[0] - 1)],
                sin=sin[min(b, sin.shape[0] - 1)],
                hidden=normed[b] if normed is not None else None,
            )
            kept[b, visual_pos] = False
            kept[b, visual_pos[self.rule.select(row, ks[b])]] = True
        return kept

    # ------------------------------------------------------------------ DeepStack (Qwen3-VL)
    def _wrap_deepstack(self, language_model: nn.Module) -> None:
        """Make the text model's ``_deepstack_process(hidden, visual_pos_masks, visual_embeds)``
        follow the cut: after layer K it gets the kept visual positions of the shortened sequence
        and the rows of ``visual_embeds`` of those tokens (rows are ordered like the True entries
        of ``visual_pos_masks``, batch-major). Before the cut, or with nothing cut, it runs as is."""
        original = getattr(language_model, "_deepstack_process", None)
        if original is None:
            raise ValueError(
                f"{self.family.model_type}: {type(language_model).__name__} has no _deepstack_process; this "
                "transformers version adds DeepStack features differently, which the pruning hooks do not support"
            )
        previous = language_model.__dict__.get("_deepstack_process")

        def deepstack_process(hidden_states, visual_pos_masks, visual_embeds):
            state = self._state
            if state is not None and state.cut is not None and visual_pos_masks is not None:
                keep, slot_valid = state.cut
                visual_pos_masks, visual_embeds = _deepstack_kept(visual_pos_masks, visual_embeds, keep, slot_valid)
            return original(hidden_states, visual_pos_masks, visual_embeds)

        language_model._deepstack_process = deepstack_process

        def restore() -> None:
            if previous is None:
                language_model.__dict__.pop("_deepstack_process", None)
            else:
                language_model._deepstack_process = previous

        self._restore.append(restore)

    def _decode_mask(self, state: _Prefill, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The decode step's mask for layers ≥ K: key columns ``keep`` + generated positions."""
        if not isinstance(mask, torch.Tensor) and not state.has_filler:
            return None
        kv_full = mask.shape[-1] if isinstance(mask, torch.Tensor) else state.decode_kv
        generated = torch.arange(state.full_len, kv_full, device=state.keep.device).expand(state.keep.shape[0], -1)
        columns = torch.cat([state.keep, generated], dim=1)
        column_valid = torch.cat([state.slot_valid, torch.ones_like(generated, dtype=torch.bool)], dim=1)
        if isinstance(mask, torch.Tensor):
            return _cut_key_columns(mask, columns, column_valid if state.has_filler else None)
        query = torch.full((columns.shape[0], 1, 1), kv_full - 1, device=columns.device)
        return _build_mask(query, columns, column_valid, self.text_config._attn_implementation, state.layer_dtype)

    def _keep_count(self, num_visual: int) -> int:
        if self.config.budget is not None:
            return keep_count(self.config.budget, num_visual, self.num_layers, self.config.prune_layer)
        if self.config.keep_ratio is not None:
            return keep_count_for_ratio(self.config.keep_ratio, num_visual)
        if self.config.keep_tokens is not None:
            return min(self.config.keep_tokens, num_visual)
        return num_visual

    def _all_row_stats(self, keep: torch.Tensor | None, slot_valid: torch.Tensor | None) -> list[dict]:
        """``handle.stats``: one dict per row, computed on host copies (one transfer)."""
        state = self._state
        valid, is_visual = state.valid.cpu(), state.is_visual.cpu()
        is_video = is_visual & torch.isin(state.prompt_ids.cpu(), self.video_ids)
        if keep is not None:
            keep, slot_valid = keep.cpu(), slot_valid.cpu()
        return [
            self._row_stats(valid[b], is_visual[b], is_video[b], keep[b][slot_valid[b]] if keep is not None else None)
            for b in range(valid.shape[0])
        ]

    def _row_stats(self, valid, is_visual, is_video, keep_row: torch.Tensor | None) -> dict:
        """One row's stats; ``video_tokens`` / ``video_tokens_kept`` count the visual tokens that
        are video placeholders (the rest are image tokens)."""
        num_visual = int(is_visual.sum())
        unpadded_index = valid.long().cumsum(0) - 1
        if keep_row is None:
            kept_positions = unpadded_index[valid]
            kept, video_kept = num_visual, int(is_video.sum())
        else:
            kept_positions = unpadded_index[keep_row][valid[keep_row]]
            kept, video_kept = int(is_visual[keep_row].sum()), int(is_video[keep_row].sum())
        return {"video_tokens": int(is_video.sum()), "video_tokens_kept": video_kept} | sample_stats(
            self.model.config,
            method=self.config.method,
            visual_tokens=num_visual,
            visual_tokens_kept=kept,
            text_tokens=int(valid.sum()) - num_visual,
            prune_layer=self.config.prune_layer,
            dtype_bytes=self._dtype_bytes,
            kept_positions=kept_positions.tolist(),
        )


def apply_pruning(model: nn.Module, config: PruneConfig) -> PruningHandle:
    """Prune visual tokens of ``model`` at layer ``config.prune_layer`` on every prefill.

    Returns a :class:`PruningHandle`; ``handle.stats`` holds one dict per sample of the last
    prefill, ``handle.remove()`` restores the unpruned model. Works with ``generate`` (greedy,
    sampling, beam search), batches with left padding, ``use_cache`` on or off, and the eager,
    sdpa and flash-attention backends. Raises ValueError for what cannot work.
    """
    if hasattr(model, "_orig_mod"):
        raise ValueError("apply_pruning got a torch.compile'd model; pruning hooks need the uncompiled model")
    if not isinstance(config, PruneConfig):
        raise TypeError(f"config must be a PruneConfig, got {type(config).__name__}")
    if config.prune_layer is None:  # the family's default K
        from dataclasses import replace

        from ep_core.families import family_for

        config = replace(config, prune_layer=family_for(model).default_prune_layer)
    return PruningHandle(model, config)


# ---------------------------------------------------------------------- refusals
def _refuse_unsupported(model: nn.Module, text_config) -> None:
    implementation = text_config._attn_implementation or "eager"
    if implementation in UNSUPPORTED_ATTENTION:
        raise ValueError(
            f"attention backend {implementation!r} is not supported: {UNSUPPORTED_ATTENTION[implementation]}; "
            "use sdpa, eager or flash_attention_2"
        )
    layer_types = getattr(text_config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError("sliding-window attention layers are not supported: a window over pruned caches is ill-defined")
    cache_implementation = getattr(getattr(model, "generation_config", None), "cache_implementation", None)
    if cache_implementation not in (None, "dynamic"):
        raise ValueError(
            f"generation_config.cache_implementation={cache_implementation!r} is not supported: pruned layers hold "
            "shorter caches, which only DynamicCache allows; set it to None"
        )


def _uses_flash_masks(implementation: str | None) -> bool:
    """True for flash-attention backends (2-D padding masks; gapped position ids mean packing)."""
    if implementation is None:
        return False
    mask_function = AttentionMaskInterface._global_mapping.get(implementation)
    return "flash" in implementation or mask_function is flash_attention_mask


# ---------------------------------------------------------------------- tensor surgery
def _same_media(a, b) -> bool:
    """Whether two forwards got the same value of one of MEDIA_INPUTS: the same object (both
    none), equal tensors, or mappings and sequences of the same media (transformers'
    ``mm_encoder_outputs``: a ``ModelOutput`` per modality, its ``pooler_output`` a list)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.equal(a, b)  # False for other shapes
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same_media(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(map(_same_media, a, b))
    return False


def _right_aligned(mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's True positions of ``mask [B, T]``, ascending, in the last columns of
    ``[B, width]`` (``width`` ≥ every row's count); the columns before them hold some of the
    row's False positions. Returns (positions, True where the column is one of the row's).
    A stable sort puts each row's False positions first and its True ones last, in order."""
    order = torch.sort(mask.to(torch.int8), dim=1, stable=True)
    start = mask.shape[1] - width
    return order.indices[:, start:], order.values[:, start:].bool()


def _deepstack_kept(visual_pos_masks, visual_embeds, keep, slot_valid):
    """DeepStack's ``visual_pos_masks [B, T]`` and ``visual_embeds [N, D]`` (one row per True
    entry, batch-major) → the kept visual slots ``[B, P]`` of the cut sequence and their rows."""
    mask = visual_pos_masks.to(keep.device)
    rank = mask.flatten().cumsum(0).view_as(mask) - 1  # each visual token's row of visual_embeds
    kept = mask.gather(1, keep) & slot_valid  # filler slots hold dropped positions: never added to
    rows = rank.gather(1, keep)[kept]
    return kept, visual_embeds[rows.to(visual_embeds.device)]


def _gather_tokens(table: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``table [B|1, T, D]`` → ``[B, P, D]`` at the kept positions of each row."""
    table = table.expand(keep.shape[0], -1, -1)
    return table.gather(1, keep[..., None].expand(-1, -1, table.shape[-1]))


def _gather_positions(position_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``position_ids [B|1, T]`` → ``[B, P]``."""
    return position_ids.expand(keep.shape[0], -1).gather(1, keep)


def _cut_mask(mask: torch.Tensor, keep: torch.Tensor, slot_valid: torch.Tensor | None) -> torch.Tensor:
    """Cut a prefill mask to the kept slots: 4-D ``[B|1, h, T, T]`` on rows and columns,
    2-D ``[B, T]`` (flash attention) on columns. Cutting a causal+padding mask to a sorted
    subset gives exactly the causal+padding mask of that subset. Filler slots
    (``slot_valid`` False) are then masked as keys; each filler query keeps its diagonal."""
    batch, kept = keep.shape
    if mask.dim() == 2:
        return _mask_keys(mask.gather(1, keep), slot_valid)
    mask = mask.expand(batch, -1, -1, -1)
    heads, kv = mask.shape[1], mask.shape[3]
    rows = mask.gather(2, keep[:, None, :, None].expand(batch, heads, kept, kv))
    cut = rows.gather(3, keep[:, None, None, :].expand(batch, heads, kept, kept))
    if slot_valid is None:
        return cut
    diagonal = torch.eye(kept, dtype=torch.bool, device=keep.device)
    return _mask_keys(cut, slot_valid[:, None, None, :] | diagonal)


def _cut_key_columns(mask: torch.Tensor, columns: torch.Tensor, column_valid: torch.Tensor | None) -> torch.Tensor:
    """Decode-step mask ``[B|1, h, q, kv_full]`` (or 2-D ``[B, kv_full]``) → the key columns
    the pruned cache holds (``keep`` plus every generated position), filler columns masked."""
    if mask.dim() == 2:
        return _mask_keys(mask.gather(1, columns), column_valid)
    mask = mask.expand(columns.shape[0], -1, -1, -1)
    cut = mask.gather(3, columns[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))
    return _mask_keys(cut, column_valid[:, None, None, :] if column_valid is not None else None)


def _mask_keys(mask: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """``mask`` with every entry where ``allowed`` (broadcast) is False masked: False for a
    bool mask, 0 for a 2-D integer padding mask, the dtype's minimum for an additive float mask."""
    if allowed is None:
        return mask
    if mask.dtype == torch.bool:
        return mask & allowed
    if mask.dim() == 2:
        return mask * allowed.to(mask.dtype)
    return mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)


def _build_mask(query_pos, key_pos, key_valid, implementation: str | None, dtype: torch.dtype) -> torch.Tensor:
    """A mask where the backend passed none (no padding): the 2-D ``key_valid`` for flash
    attention, else ``[B, 1, q, kv]`` causal on positions (``key_pos ≤ query_pos``) over the
    valid keys, plus the diagonal when q = kv (a filler query may precede every kept key);
    bool for sdpa, additive float for eager."""
    if _uses_flash_masks(implementation):
        return key_valid
    allowed = (key_pos[:, None, :] <= query_pos) & key_valid[:, None, :]
    if query_pos.shape[1] == key_pos.shape[1]:
        allowed |= torch.eye(key_pos.shape[1], dtype=torch.bool, device=key_pos.device)
    allowed = allowed[:, None]
    if (implementation or "eager") == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


def _strip_zero_patches(pixels: torch.Tensor) -> torch.Tensor:
    """``pixels [patches, ...]`` without its trailing all-zero patches (a batch's padding);
    any other shape unchanged."""
    if pixels.dim() < 4:
        return pixels
    nonzero = pixels.flatten(1).ne(0).any(dim=1).nonzero()
    return pixels[: int(nonzero[-1]) + 1] if len(nonzero) else pixels[:0]
