"""The preprocessing stage: decoded pixels → the model's inputs, on CPU workers.

The model's processor (resize, normalise, anyres tiling, the chat template, tokenisation)
costs tens of milliseconds per image (38 ms for LLaVA-1.5 at 1024×768, 103 ms for LLaVA-NeXT,
../shared/reference/GPU_REVIEW.md). Run inside the GPU actor, it leaves the GPU idle; here it
runs in the job's CPU stage, right after decoding (:func:`prepare_block`), before the model
stage, which then only collates, generates and decodes text. A row leaves this stage with ``encoded``: its processor output (``input_ids``,
``attention_mask``, ``pixel_values``, …) packed by :func:`pack_encoding` (no pickle), and
``prompt_tokens``; its pixels are dropped. Rows that share a prompt and a frame count share one
processor call where the family allows it (:func:`encode_group`): for small images the call's
fixed cost, not the pixels, is most of the time. A processor failure costs that row only.
"""

from __future__ import annotations

import functools
import json
import logging

import numpy as np
import pyarrow as pa

from ep_core.prompts import chat_prompt
from pipelines.media import DECODED_SCHEMA, decode_block, frames_of

PREPROCESSED_SCHEMA = pa.schema(
    [f for f in DECODED_SCHEMA if f.name not in ("pixels", "shape")]
    + [pa.field("encoded", pa.large_binary()), pa.field("prompt_tokens", pa.int32())]
)

log = logging.getLogger(__name__)


def encode_row(processor, row: dict, *, video_native: bool = False) -> dict[str, np.ndarray]:
    """The processor's output for one decoded row: an image; a video's frames as one video
    (``videos=``, a ``[T, H, W, 3]`` array, frames already sampled) for a video-native family
    (``video_native``: :attr:`ep_core.families.Family.video_native`); else its frames as images."""
    if video_native and row.get("media_type") == "video":
        n, h, w = row["shape"]
        video = np.frombuffer(row["pixels"], dtype=np.uint8).reshape(n, h, w, 3)
        text = chat_prompt(processor, 0, row["prompt"], video=True)
        encoding = processor(videos=[video], text=[text], do_sample_frames=False, return_tensors="np")
    else:
        images = frames_of(row)
        text = chat_prompt(processor, len(images), row["prompt"])
        encoding = processor(images=images, text=[text], return_tensors="np")
    return {k: np.asarray(v) for k, v in encoding.items()}


def pack_encoding(encoding: dict[str, np.ndarray]) -> bytes:
    """``encoding`` as bytes: a 4-byte little-endian header length, a JSON header
    ``[[name, dtype, shape], ...]``, then each array's C-order bytes in that order (no pickle;
    a tenth of ``np.savez``'s cost per row). Object arrays are refused."""
    arrays = {name: np.asarray(value, order="C") for name, value in encoding.items()}
    for name, array in arrays.items():
        if array.dtype.hasobject:
            raise TypeError(f"cannot pack {name}: an object array")
    header = json.dumps([[name, a.dtype.str, list(a.shape)] for name, a in arrays.items()]).encode("utf-8")
    return b"".join([len(header).to_bytes(4, "little"), header, *(a.tobytes() for a in arrays.values())])


def unpack_encoding(data: bytes) -> dict[str, np.ndarray]:
    """The inverse of :func:`pack_encoding` (writable copies)."""
    size = int.from_bytes(data[:4], "little")
    offset, out = 4 + size, {}
    for name, dtype, shape in json.loads(data[4:offset].decode("utf-8")):
        dtype, count = np.dtype(dtype), int(np.prod(shape, dtype=np.int64))
        if dtype.hasobject:
            raise TypeError(f"cannot unpack {name}: an object array")
        out[name] = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(tuple(shape)).copy()
        offset += count * dtype.itemsize
    return out


@functools.lru_cache(maxsize=4)
def _processor(model: str):
    """One processor per model and worker process (Ray reuses workers across tasks)."""
    from ep_core.loading import load_processor

    return load_processor(model)


@functools.lru_cache(maxsize=4)
def _family(model: str):
    """The model's :class:`ep_core.families.Family` (its config only, no weights)."""
    from ep_core.families import family_for
    from ep_core.loading import load_model_config

    return family_for(load_model_config(model))


def video_native(model: str) -> bool:
    """The model's family takes videos as videos (:attr:`ep_core.families.Family.video_native`)."""
    return _family(model).video_native


def encode_group(processor, rows: list[dict]) -> list[dict[str, np.ndarray]]:
    """The processor's outputs for ``rows`` that share one prompt text and frame count, from one
    call: each output array is cut back per row along its leading dimension, which holds either
    one entry per row (``input_ids``: equal texts need no padding) or one per image (``pixel_values``).
    Equal to :func:`encode_row` on each row for a family whose
    :attr:`~ep_core.families.Family.encodes_in_groups` holds; a ValueError for an output that
    splits neither way."""
    n, frames = len(rows), int(rows[0]["shape"][0])
    images = [image for row in rows for image in frames_of(row)]
    text = chat_prompt(processor, frames, rows[0]["prompt"])
    encoding = processor(images=images, text=[text] * n, return_tensors="np")
    out: list[dict[str, np.ndarray]] = [{} for _ in rows]
    for name, value in encoding.items():
        value = np.asarray(value)
        if value.ndim and value.shape[0] == n * frames:
            step = frames
        elif value.ndim and value.shape[0] == n:
            step = 1
        else:
            raise ValueError(f"processor output {name} of shape {value.shape} is neither per row ({n}) nor per image ({n * frames})")
        for i in range(n):
            out[i][name] = value[i * step:(i + 1) * step]
    return out


def _carried(row: dict) -> dict:
    """The fields of a decoded row that leave this stage as they came (pixels dropped)."""
    return {k: row.get(k) for k in PREPROCESSED_SCHEMA.names}


def _with_encoding(row: dict, encoding: dict[str, np.ndarray]) -> dict:
    out = _carried(row)
    out["encoded"] = pack_encoding(encoding)
    out["prompt_tokens"] = int(encoding["input_ids"].shape[-1])
    return out


def preprocess_row(row: dict, model: str) -> dict:
    """A decoded row → the same row with ``encoded`` and ``prompt_tokens`` (or ``error``)."""
    if row.get("error") or row.get("pixels") is None:
        return _carried(row)
    try:
        native = row.get("media_type") == "video" and video_native(model)
        encoding = encode_row(_processor(model), row, video_native=native)
    except Exception as exc:  # noqa: BLE001 - a processor failure costs this row only
        out = _carried(row)
        out["error"] = f"preprocessing failed ({type(exc).__name__}: {exc}): {row.get('source')}"
        return out
    return _with_encoding(row, encoding)


def preprocess_block(block: pa.Table, *, model: str) -> pa.Table:
    """:func:`preprocess_row` on every row of a decoded block, with one processor call per
    group of rows that share a prompt and a frame count where the family allows it
    (:func:`encode_group`; the per-row call's fixed cost — argument checks, the chat template,
    one tokenizer call — is most of a small image's time). A group whose call fails is encoded
    row by row, so a bad row still costs that row only."""
    rows = block.to_pylist()
    out: list[dict | None] = [None] * len(rows)
    groups: dict[tuple, list[int]] = {}
    if rows and _family(model).encodes_in_groups:
        for i, row in enumerate(rows):
            if not row.get("error") and row.get("pixels") is not None:
                groups.setdefault((row["shape"][0], row["prompt"]), []).append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        try:
            encodings = encode_group(_processor(model), [rows[i] for i in members])
        except Exception as exc:  # noqa: BLE001 - the rows are encoded one by one instead
            log.debug("a grouped processor call failed (%s: %s); encoding %d rows one by one",
                      type(exc).__name__, exc, len(members))
            continue
        for i, encoding in zip(members, encodings):
            out[i] = _with_encoding(rows[i], encoding)
    rows = [done if done is not None else preprocess_row(row, model) for done, row in zip(out, rows)]
    return pa.Table.from_pylist(rows, schema=PREPROCESSED_SCHEMA)


def prepare_block(block: pa.Table, *, model: str, max_pixels: int, max_side: int, timeout_s: float) -> pa.Table:
    """The CPU stage of the caption job (a Ray Data task): decode a block of source rows
    (``pipelines.media.decode_block``), then preprocess it. One task does both, so decoded
    pixels never travel through the object store and one CPU slot serves the stage."""
    decoded = decode_block(block, max_pixels=max_pixels, max_side=max_side, timeout_s=timeout_s)
    return preprocess_block(decoded, model=model)
