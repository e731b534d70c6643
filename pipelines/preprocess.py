"""The preprocessing stage: decoded pixels → the model's inputs, on CPU workers.

The model's processor (resize, normalise, anyres tiling, the chat template, tokenisation)
costs tens of milliseconds per image (38 ms for LLaVA-1.5 at 1024×768, 103 ms for LLaVA-NeXT,
../shared/reference/GPU_REVIEW.md). Run inside the GPU actor, it leaves the GPU idle; here it
runs in the job's CPU stage, right after decoding (:func:`prepare_block`), before the model
stage, which then only collates, generates and decodes text. A row leaves this stage with ``encoded``: its processor output (``input_ids``,
``attention_mask``, ``pixel_values``, …) packed by :func:`pack_encoding` (no pickle), and
``prompt_tokens``; its pixels are dropped. A processor failure costs that row only.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pyarrow as pa

from ep_core.prompts import chat_prompt
from pipelines.media import DECODED_SCHEMA, decode_block, frames_of

PREPROCESSED_SCHEMA = pa.schema(
    [f for f in DECODED_SCHEMA if f.name not in ("pixels", "shape")]
    + [pa.field("encoded", pa.large_binary()), pa.field("prompt_tokens", pa.int32())]
)


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
def video_native(model: str) -> bool:
    """The model's family takes videos as videos (:attr:`ep_core.families.Family.video_native`)."""
    from ep_core.families import family_for
    from ep_core.loading import load_model_config

    return family_for(load_model_config(model)).video_native


def preprocess_row(row: dict, model: str) -> dict:
    """A decoded row → the same row with ``encoded`` and ``prompt_tokens`` (or ``error``)."""
    out = {k: row.get(k) for k in PREPROCESSED_SCHEMA.names}
    if row.get("error") or row.get("pixels") is None:
        return out
    try:
        native = row.get("media_type") == "video" and video_native(model)
        encoding = encode_row(_processor(model), row, video_native=native)
    except Exception as exc:  # noqa: BLE001 - a processor failure costs this row only
        out["error"] = f"preprocessing failed ({type(exc).__name__}: {exc}): {row.get('source')}"
        return out
    out["encoded"] = pack_encoding(encoding)
    out["prompt_tokens"] = int(encoding["input_ids"].shape[-1])
    return out


def preprocess_block(block: pa.Table, *, model: str) -> pa.Table:
    """:func:`preprocess_row` on every row of a decoded block."""
    rows = [preprocess_row(r, model) for r in block.to_pylist()]
    return pa.Table.from_pylist(rows, schema=PREPROCESSED_SCHEMA)


def prepare_block(block: pa.Table, *, model: str, max_pixels: int, max_side: int, timeout_s: float) -> pa.Table:
    """The CPU stage of the caption job (a Ray Data task): decode a block of source rows
    (``pipelines.media.decode_block``), then preprocess it. One task does both, so decoded
    pixels never travel through the object store and one CPU slot serves the stage."""
    decoded = decode_block(block, max_pixels=max_pixels, max_side=max_side, timeout_s=timeout_s)
    return preprocess_block(decoded, model=model)
