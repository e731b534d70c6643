"""The model stage: a callable class that Ray Data runs as an actor pool (one per GPU).

``CaptionPredictor`` loads the model once, applies pruning once (``ep_core.apply_pruning``),
and for each batch of decoded rows:

1. takes each row's model inputs from the preprocessing stage (``pipelines.preprocess``: the
   chat prompt, token ids and pixel tensors, made on CPU workers), or makes them here for rows
   that come without (the bare loop): an image row is one image + the prompt; a video row is
   its N frames as one video for a video-native family (the processor's ``videos=`` input:
   Qwen-VL's ``video_pad`` tokens with their temporal grid, NeXT-Video's and OneVision's video
   tokens), else its N frames given as N images in one prompt (LLaVA's multi-image input);
2. refuses, as an error row, a prompt longer than the model's context;
3. packs the rows into ``generate`` calls by tokens (``pipelines.packing``: shortest first,
   rows × longest prompt ≤ ``batch_tokens``, at most ``batch_size`` rows; rows of different
   visual-token counts share a call), left-padded text and concatenated pixel tensors (an
   image row and a video row may share a call; anyres crop stacks are zero-padded to the
   call's largest, which the model cuts back by ``image_sizes``);
4. runs greedy ``generate`` and returns one output row per input row, in the output schema,
   with ``generate_rows`` (rows of its call) and ``padding_share`` (of the call's token slots).
   A call that runs out of memory is split in halves and retried (``oom_splits`` counts the
   halvings a row's call went through).

Rows that arrive with ``error`` (unreadable input) pass through with a null output. A call
that runs out of memory is retried in halves down to one row (a row that alone does not fit
becomes a ``transient`` error row); a call whose ``generate`` raises anything else is retried
row by row, and a row that still fails alone becomes an ``input`` error row: one row lost,
never the job. A device fault (``pipelines.failures``) ends the actor's process so that Ray
restarts it with a fresh CUDA context; the ``attempts`` ledger turns a batch that faulted
:data:`~pipelines.failures.DEVICE_ATTEMPTS` times into ``transient`` error rows. The same class
runs without Ray (the bench's bare loop does that); there a device fault makes this and every
later row of the predictor a ``transient`` error row.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback

import pyarrow as pa

from ep_core.accounting import sample_stats
from ep_core.config import PruneConfig
from pipelines.failures import DEVICE_ATTEMPTS, INPUT, TRANSIENT, batch_key, end_poisoned_process, is_device_fault, is_out_of_memory
from pipelines.packing import call_of, default_batch_tokens, pack
from pipelines.preprocess import encode_row, unpack_encoding
from pipelines.sink import to_table

FIRST_TOKEN_TOPK = 32  # first-token log-probabilities kept per row, for first_token_kl
# per-sample figures taken from the pruning handle's stats
_STATS_COLUMNS = (
    "visual_tokens", "visual_tokens_kept", "prefill_flops", "flops_reduction", "flops_reduction_paper", "kv_cache_bytes",
)
_ROW_COLUMNS = (*_STATS_COLUMNS, "prefill_ms", "first_token_ids", "first_token_logprobs")
# tensors that run along the text sequence (left-padded when collated); others concatenate.
_SEQUENCE_KEYS = {"input_ids": "pad", "attention_mask": 0, "token_type_ids": 0, "mm_token_type_ids": 0}

log = logging.getLogger(__name__)


class CaptionPredictor:
    """The model actor: ``CaptionPredictor(model=NAME, prune=PruneConfig(...), ...)``."""

    def __init__(
        self,
        *,
        model: str,
        prune: PruneConfig = PruneConfig(method="none"),
        max_new_tokens: int = 32,
        dtype: str = "auto",
        device: str = "auto",
        torch_threads: int | None = None,
        run_id: str | None = None,
        batch_size: int = 8,
        batch_tokens: int | None = None,
        attn_implementation: str | None = None,
        attempts=None,
    ):
        """``attempts``: the job's :class:`~pipelines.failures.AttemptLedger` actor (Ray only)."""
        import torch

        from ep_core import apply_pruning
        from ep_core.families import FAMILIES
        from ep_core.loading import load_model, resolve_attention

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        self.prune = prune
        self.model, self.processor = load_model(
            model, dtype=dtype, device=device, attn_implementation=resolve_attention(attn_implementation, device)
        )
        self.model_name = model
        self.max_new_tokens = max_new_tokens
        self.run_id = run_id
        self.device = next(self.model.parameters()).device
        tok = getattr(self.processor, "tokenizer", self.processor)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.attempts = attempts
        self._batch: str | None = None  # the batch key of the current call (with a ledger)
        self._poisoned: str | None = None  # without Ray: the device fault that ended this predictor's device
        self.handle = None
        family = FAMILIES.get(getattr(self.model.config, "model_type", None))
        if prune.prune_layer is None and family is not None:  # the family's default K
            self.prune = prune = dataclasses.replace(prune, prune_layer=family.default_prune_layer)
        self.video_native = family is not None and family.video_native
        self.visual_token_ids = family.visual_token_ids(self.model.config) if family is not None else ()
        if prune.method != "none" or (family is not None and family.prunable):
            # method "none" too: the handle's per-sample stats carry token counts and FLOPs
            self.handle = apply_pruning(self.model, prune)
        self._prefill = _PrefillTimer(self.model)
        self._flops_warned = False
        self.context = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        self.batch_size = batch_size
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        self.batch_tokens = batch_tokens or default_batch_tokens(
            self.model.config, free_bytes=free, dtype_bytes=self.model.dtype.itemsize,
            max_rows=batch_size, max_new_tokens=max_new_tokens,
        )
        log.info(f"[caption] generate calls: up to {batch_size} rows and {self.batch_tokens} prompt tokens each")

    # ------------------------------------------------------------------ row plumbing

    def _base(self, row: dict) -> dict:
        return {
            "sample_id": row["sample_id"],
            "source": row.get("source"),
            "media_type": row.get("media_type"),
            "frames": row.get("frames") if row.get("media_type") == "video" else None,
            "prompt": row.get("prompt"),
            "reference": row.get("reference"),
            "model": self.model_name,
            **self.prune.row_fields(),
            "error": row.get("error"),
            "error_kind": INPUT if row.get("error") else None,
            "run_id": self.run_id,
        }

    def _encode(self, row: dict) -> dict:
        """The row's model inputs: from the preprocessing stage (``encoded``), or made here."""
        import torch

        encoding = unpack_encoding(row["encoded"]) if row.get("encoded") else encode_row(self.processor, row, video_native=self.video_native)
        return {k: torch.from_numpy(v) for k, v in encoding.items()}

    def _collate(self, encs: list[dict]) -> dict:
        """One call's inputs from its rows' encodings: sequence tensors left-padded to the
        longest row; every other tensor concatenated over the rows that have it (an image row
        has ``pixel_values``, a video row ``pixel_values_videos``), see :func:`concat_rows`."""
        import torch

        out = {}
        length = max(e["input_ids"].shape[1] for e in encs)
        keys = list(dict.fromkeys(k for e in encs for k in e))
        for key in keys:
            values = [e[key] for e in encs if key in e]
            if key in _SEQUENCE_KEYS:
                fill = self.pad_id if _SEQUENCE_KEYS[key] == "pad" else 0
                out[key] = torch.stack(
                    [torch.nn.functional.pad(v[0], (length - v.shape[1], 0), value=fill) for v in values]
                )
            elif isinstance(values[0], torch.Tensor):
                out[key] = concat_rows(values)
            else:
                out[key] = values[0]
        return {k: v.to(self.device) if hasattr(v, "to") else v for k, v in out.items()}

    def _generate(self, encs: list[dict]) -> tuple[list[str], list[dict], float]:
        import torch

        inputs = self._collate(encs)
        for key in ("pixel_values", "pixel_values_videos"):
            if key in inputs and inputs[key].is_floating_point():
                inputs[key] = inputs[key].to(self.model.dtype)
        start = time.perf_counter()
        self._prefill.arm()
        first_token = _FirstTokenTopK()
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, logits_processor=[first_token]
            )
        latency_ms = (time.perf_counter() - start) * 1000.0
        prefill_ms_per_item = self._prefill.ms / len(encs) if self._prefill.ms is not None else None
        new = out[:, inputs["input_ids"].shape[1] :]
        texts = [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]
        first = first_token.top
        stats = list(self.handle.stats) if self.handle is not None else []
        per_row = []
        for i in range(len(encs)):
            ids, mask = inputs["input_ids"][i], inputs["attention_mask"][i]
            visual = self._visual_count(ids) if self.visual_token_ids else None
            info = {"visual_tokens": visual, "visual_tokens_kept": visual, "text_tokens": int(mask.sum()) - (visual or 0)}
            if len(stats) == len(encs):
                info.update({k: stats[i].get(k) for k in _STATS_COLUMNS})
                info["text_tokens"] = stats[i]["text_tokens"]
            else:
                info.update(self._flops(info))
            info["prefill_ms"] = prefill_ms_per_item
            info["first_token_ids"] = first.indices[i].tolist()
            info["first_token_logprobs"] = first.values[i].tolist()
            per_row.append(info)
        return texts, per_row, latency_ms

    def _flops(self, info: dict) -> dict:
        """FLOPs columns from the config, for models the pruning hooks do not cover."""
        if info.get("visual_tokens") is None:
            return {}
        try:
            stats = sample_stats(
                self.model.config,
                method=self.prune.method,
                visual_tokens=info["visual_tokens"],
                visual_tokens_kept=info["visual_tokens_kept"],
                text_tokens=info["text_tokens"],
                prune_layer=self.prune.prune_layer,
                dtype_bytes=self.model.dtype.itemsize,
            )
        except Exception as exc:  # noqa: BLE001 - FLOPs are a report column, not a reason to fail
            if not self._flops_warned:
                self._flops_warned = True
                log.warning(f"[caption] FLOPs unavailable for this model ({type(exc).__name__}: {exc})")
            return {}
        return {k: stats[k] for k in _STATS_COLUMNS}

    # ------------------------------------------------------------------ the batch

    def predict_rows(self, rows: list[dict]) -> list[dict]:
        results = [self._base(r) for r in rows]
        ready: list[tuple[int, dict]] = []
        for i, row in enumerate(rows):
            if row.get("error"):
                continue
            try:
                enc = self._encode(row)
            except Exception as exc:  # noqa: BLE001 - a processor failure costs this row only
                results[i].update(error=f"preprocessing failed ({type(exc).__name__}: {exc}): {row.get('source')}",
                                  error_kind=INPUT)
                continue
            too_long = self._over_context(row, enc)
            if too_long:
                results[i].update(error=too_long, error_kind=INPUT)
                continue
            ready.append((i, enc))
        lengths = [enc["input_ids"].shape[1] for _, enc in ready]
        for call in pack(lengths, self.batch_tokens, self.batch_size):
            self._run_group([ready[j] for j in call.rows], rows, results, padding_share=call.padding_share)
        return results

    def _visual_count(self, ids) -> int:
        """Visual placeholder tokens (image and video) in ``ids``."""
        import torch

        return int(torch.isin(ids, torch.tensor(self.visual_token_ids, device=ids.device)).sum()) if self.visual_token_ids else 0

    def _over_context(self, row: dict, enc: dict) -> str | None:
        """The error of a prompt that does not fit the model's context, else None."""
        length = enc["input_ids"].shape[1]
        if self.context is None or length + self.max_new_tokens <= self.context:
            return None
        visual = self._visual_count(enc["input_ids"])
        what = f"video of {row.get('frames')} frames" if row.get("media_type") == "video" else "image"
        fix = ("use fewer --frames (or a smaller --max-side)" if row.get("media_type") == "video"
               else "use a shorter prompt (or, for a tiling model such as LLaVA-NeXT, a smaller --max-side)")
        return (
            f"prompt too long: this {what} is {length} tokens ({visual} visual) + {self.max_new_tokens} new, over the "
            f"model's context of {self.context} positions; {fix}: {row.get('source')}"
        )

    def _run_group(self, members, rows, results, padding_share: float = 0.0, splits: int = 0) -> None:
        """One ``generate`` call for ``members`` (``(row index, inputs)`` pairs).

        Out of memory: free the device and run each half as its own call, down to one row; a row
        that alone does not fit is a ``transient`` error with its token count. A device fault:
        :meth:`_device_fault`. Any other failure: retry row by row, so the row at fault is the
        only one lost (an ``input`` error). Retries start after the ``except`` block has ended,
        when nothing references the failed call's tensors any more."""
        if self._poisoned is not None:
            return self._fail(members, rows, results, f"device unusable after an earlier fault ({self._poisoned})")
        failure, kind = None, None
        try:
            texts, infos, latency = self._generate([enc for _, enc in members])
            finished = time.time()
        except Exception as exc:  # noqa: BLE001 - classified below, once the block has let go of the call
            kind = "oom" if is_out_of_memory(exc) else "device" if is_device_fault(exc) else "error"
            failure = traceback.format_exception_only(exc)[-1].strip()
        if failure is not None:
            _release_memory(self.device)
            if kind == "device":
                return self._device_fault(members, rows, results, failure)
            if len(members) > 1:
                oom = kind == "oom"
                parts = [members[: len(members) // 2], members[len(members) // 2 :]] if oom else [[m] for m in members]
                for part in parts:
                    share = call_of([enc["input_ids"].shape[1] for _, enc in part]).padding_share
                    self._run_group(part, rows, results, padding_share=share, splits=splits + oom)
                return
            i, enc = members[0]
            if kind == "oom":
                results[i].update(error_kind=TRANSIENT, error=(
                    f"out of memory: this row alone ({enc['input_ids'].shape[1]} prompt tokens + {self.max_new_tokens} "
                    f"new) does not fit the device; use fewer --frames or a smaller --max-side: {rows[i].get('source')}"
                ))
            else:
                results[i].update(error_kind=INPUT, error=f"generation failed ({failure}): {rows[i].get('source')}")
            return
        for (i, _), text, info in zip(members, texts, infos):
            results[i].update(output=text, latency_ms=latency, **{k: info.get(k) for k in _ROW_COLUMNS})
            results[i].update(generate_rows=len(members), padding_share=padding_share, generated_at=finished,
                              oom_splits=splits)

    def _device_fault(self, members, rows, results, failure: str) -> None:
        """A fault that poisons the CUDA context. In a Ray actor: record it in the ledger and end
        the process (Ray restarts the actor and reruns the batch). Without Ray: this call's rows,
        and every later one, become ``transient`` error rows."""
        if self.attempts is not None:
            import ray

            ray.get(self.attempts.fault.remote(self._batch, failure))
            end_poisoned_process(failure)
        log.error(f"[caption] device fault; the remaining rows of this predictor become transient errors: {failure}")
        self._poisoned = failure
        self._fail(members, rows, results, f"device fault ({failure})")

    @staticmethod
    def _fail(members, rows, results, why: str) -> None:
        for i, _ in members:
            results[i].update(error_kind=TRANSIENT, error=f"{why}: {rows[i].get('source')}")

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        if self.attempts is None:
            return to_table(self.predict_rows(rows))
        import ray

        self._batch = batch_key([r["sample_id"] for r in rows])
        attempt, fault = ray.get(self.attempts.begin.remote(self._batch))
        if attempt > DEVICE_ATTEMPTS:  # this batch faulted the device on every attempt: give its rows back as transient
            results = [self._base(r) for r in rows]
            self._fail([(i, None) for i, r in enumerate(rows) if not r.get("error")], rows, results,
                       f"device fault on each of {DEVICE_ATTEMPTS} attempts at this batch ({fault})")
        else:
            results = self.predict_rows(rows)
        self.attempts.finish.remote(self._batch)
        return to_table(results)


def concat_rows(values: list):
    """Tensors of several rows concatenated along dim 0. Where they differ beyond dim 0 (an
    anyres family's ``pixel_values`` ``[1, crops, C, H, W]`` with another crop count per image
    shape), each is zero-padded at the end of every other dim to the largest first; the model
    reads each image's real crops by its ``image_sizes``, so the padding is never seen."""
    import torch

    if len({tuple(v.shape[1:]) for v in values}) > 1:
        dims = [max(v.shape[d] for v in values) for d in range(1, values[0].dim())]
        padded = []
        for v in values:
            pad: list[int] = []
            for d in reversed(range(1, v.dim())):
                pad += [0, dims[d - 1] - v.shape[d]]
            padded.append(torch.nn.functional.pad(v, pad))
        values = padded
    return torch.cat(values, dim=0)


class _FirstTokenTopK:
    """A logits processor that keeps the top-k log-probabilities of the first generated token."""

    def __init__(self):
        self.top = None

    def __call__(self, input_ids, scores):
        if self.top is None:
            import torch

            logprobs = torch.log_softmax(scores.float(), dim=-1)
            self.top = logprobs.topk(min(FIRST_TOKEN_TOPK, logprobs.shape[-1]), dim=-1)
        return scores


class _PrefillTimer:
    """Wall time of the first forward of each ``generate`` call (the prefill), via hooks."""

    def __init__(self, model):
        import torch

        self._sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
        self._armed = False
        self._start = 0.0
        self.ms: float | None = None
        model.register_forward_pre_hook(self._before)
        model.register_forward_hook(self._after)

    def arm(self) -> None:
        self._armed, self.ms = True, None

    def _before(self, module, args) -> None:
        if self._armed:
            self._sync()
            self._start = time.perf_counter()

    def _after(self, module, args, output) -> None:
        if self._armed:
            self._sync()
            self.ms = (time.perf_counter() - self._start) * 1000.0
            self._armed = False


def _release_memory(device) -> None:
    """After a failed call: collect its garbage and return the device's cached blocks."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
