"""Test fixtures made on the spot: odd and broken media, tiny videos, manifests, a saved tiny
model. Nothing is downloaded.

Videos are written as Motion-JPEG AVI by a small RIFF writer here (no FFmpeg binary needed);
decord reads them like any other file.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

# --------------------------------------------------------------------------- AVI (MJPEG)


def _chunk(fourcc: bytes, data: bytes) -> bytes:
    return fourcc + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")


def _list(kind: bytes, payload: bytes) -> bytes:
    return _chunk(b"LIST", kind + payload)


def write_avi(path: str, frames: list[np.ndarray], fps: int = 10) -> None:
    """Write ``frames`` (h × w × 3 uint8; use widths that are multiples of 32) as an MJPEG AVI."""
    jpegs = []
    for frame in frames:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    h, w = frames[0].shape[:2]
    n, biggest = len(jpegs), max(len(j) for j in jpegs)
    avih = struct.pack("<14I", 1_000_000 // fps, biggest * fps, 0, 0x10, n, 0, 1, biggest, w, h, 0, 0, 0, 0)
    strh = b"vids" + b"MJPG" + struct.pack("<IHHIIIIIIII4h", 0, 0, 0, 0, 1, fps, 0, n, biggest, 0xFFFFFFFF, 0, 0, 0, w, h)
    strf = struct.pack("<IiiHH4sIiiII", 40, w, h, 1, 24, b"MJPG", w * h * 3, 0, 0, 0, 0)
    hdrl = _list(b"hdrl", _chunk(b"avih", avih) + _list(b"strl", _chunk(b"strh", strh) + _chunk(b"strf", strf)))
    movi, index = b"", b""
    for jpeg in jpegs:
        index += b"00dc" + struct.pack("<III", 0x10, 4 + len(movi), len(jpeg))
        movi += _chunk(b"00dc", jpeg)
    body = b"AVI " + hdrl + _list(b"movi", movi) + _chunk(b"idx1", index)
    with open(path, "wb") as fh:
        fh.write(b"RIFF" + struct.pack("<I", len(body)) + body)


def write_mp4(path: str, frames: list[np.ndarray], fps: int = 10) -> None:
    """An MPEG-4 Part 2 video in an .mp4 container, written with PyAV (ffmpeg's own encoder)."""
    import av

    h, w = frames[0].shape[:2]
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def moving_square_frames(n: int = 12, h: int = 48, w: int = 64, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    color = rng.integers(60, 255, 3, dtype=np.uint8)
    frames = []
    for i in range(n):
        frame = np.zeros((h, w, 3), dtype=np.uint8)
        x = (i * 4) % (w - 12)
        frame[16:28, x : x + 12] = color
        frames.append(frame)
    return frames


# --------------------------------------------------------------------------- odd images


def _png_bomb(path: str, width: int = 40_000, height: int = 40_000) -> None:
    """A tiny PNG whose header claims ``width × height`` pixels."""
    buf = io.BytesIO()
    Image.new("1", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    # IHDR: 8-byte signature, 4-byte length, b"IHDR", width, height, ... then CRC over type+data
    ihdr_start = 8 + 4
    data[ihdr_start + 4 : ihdr_start + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr_start : ihdr_start + 4 + 13])) & 0xFFFFFFFF
    data[ihdr_start + 4 + 13 : ihdr_start + 4 + 17] = struct.pack(">I", crc)
    with open(path, "wb") as fh:
        fh.write(bytes(data))


def _rgb(size=(24, 16), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def make_corpus(root: str, *, videos: bool = True, faults: bool = True) -> dict[str, bool]:
    """Write odd and broken inputs under ``root``; returns {relative path: expect an error}.

    ``faults`` adds videos that hang or crash the decoder (``tests/faulty_video_child.py``).
    """
    os.makedirs(root, exist_ok=True)
    expect: dict[str, bool] = {}

    def put(rel: str, bad: bool) -> str:
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        expect[rel] = bad
        return path

    _rgb(seed=1).save(put("ok/plain.jpg", False), quality=90)
    _rgb(seed=2).save(put("ok/plain.png", False))
    _rgb(seed=3).save(put("ok/plain.webp", False))
    _rgb(seed=4).save(put("ok/plain.bmp", False))
    _rgb(seed=5).convert("CMYK").save(put("odd/cmyk.jpg", False))
    _rgb(seed=6).convert("CMYK").save(put("odd/cmyk.tiff", False))
    ramp = (np.arange(16 * 24, dtype=np.uint16).reshape(16, 24) * 170).astype(np.uint16)
    Image.fromarray(ramp).save(put("odd/gray16.png", False))  # mode I;16
    Image.fromarray(ramp.astype(np.int32) * 3, mode=None).save(put("odd/gray32.tif", False))  # mode I
    Image.fromarray(np.linspace(-5, 900, 16 * 24, dtype=np.float32).reshape(16, 24)).save(put("odd/float.tif", False))
    rgba = _rgb(seed=7).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(put("odd/rgba.png", False))
    _rgb(seed=8).convert("L").save(put("odd/gray.png", False))
    _rgb(seed=9).convert("1").save(put("odd/bilevel.png", False))
    pal = _rgb(seed=10).convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(put("odd/palette_alpha.png", False), transparency=0)
    frames = [_rgb(seed=s).convert("P", palette=Image.ADAPTIVE) for s in range(11, 14)]
    frames[0].save(put("odd/animated.gif", False), save_all=True, append_images=frames[1:], duration=80, loop=0)
    Image.new("RGB", (1, 1), (200, 10, 10)).save(put("odd/one_pixel.png", False))
    big = np.random.default_rng(14).integers(0, 255, (1500, 2500, 3), dtype=np.uint8)
    Image.fromarray(big).save(put("odd/large.jpg", False), quality=70)
    _rgb(seed=15).save(put("ünïcødé dir/a photo with spaces é.png", False))

    open(put("bad/zero_bytes.jpg", True), "wb").close()
    buf = io.BytesIO()
    _rgb(size=(64, 64), seed=16).save(buf, format="JPEG", quality=95)
    with open(put("bad/truncated.jpg", True), "wb") as fh:
        fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    _rgb(size=(64, 64), seed=17).save(buf, format="PNG")
    with open(put("bad/truncated.png", True), "wb") as fh:
        fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    with open(put("bad/text_as_image.png", True), "w", encoding="utf-8") as fh:
        fh.write("this is not an image\n" * 20)
    _png_bomb(put("bad/bomb.png", True))

    if videos:
        write_avi(put("video/moving.avi", False), moving_square_frames(12))
        write_avi(put("video/short.avi", False), moving_square_frames(3, seed=1))
        write_avi(os.path.join(root, ".tmp_full.avi"), moving_square_frames(12, seed=2))
        with open(os.path.join(root, ".tmp_full.avi"), "rb") as fh:
            full = fh.read()
        os.remove(os.path.join(root, ".tmp_full.avi"))
        with open(put("bad/truncated.avi", True), "wb") as fh:
            fh.write(full[:200])  # cut inside the headers
        open(put("bad/empty.mp4", True), "wb").close()
        with open(put("bad/garbage.mkv", True), "wb") as fh:
            fh.write(np.random.default_rng(18).integers(0, 255, 4096, dtype=np.uint8).tobytes())
        if faults:
            write_avi(put("bad/decoder__hang__.avi", True), moving_square_frames(4, seed=3))
            write_avi(put("bad/decoder__crash__.avi", True), moving_square_frames(4, seed=4))
    return expect


def write_manifest(path: str, rows: list[dict]) -> str:
    """Write ``rows`` as a .jsonl, .csv or .parquet manifest (by extension)."""
    if path.endswith(".jsonl"):
        with open(path, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif path.endswith(".csv"):
        import csv

        keys = sorted({k for r in rows for k in r})
        with open(path, "w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# --------------------------------------------------------------------------- tiny model


def save_tiny_llava(path: str, **kwargs) -> str:
    """Build the tiny random LLaVA of ``tests/tiny_models.py`` and save model + processor."""
    from tests.tiny_models import build_tiny_llava

    model, processor = build_tiny_llava(**kwargs)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def save_tiny_llava_next(path: str, **kwargs) -> str:
    """Build the tiny random anyres LLaVA-NeXT of ``tests/tiny_models.py`` and save it."""
    from tests.tiny_models import build_tiny_llava_next

    model, processor = build_tiny_llava_next(**kwargs)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


# ------------------------------------------------------------------ sharded datasets


def png_bytes(seed: int, size=(10, 8)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_hf_shards(root, shards: int = 2, rows: int = 3, row_group_size: int = 2) -> list[bytes]:
    """``datasets``-style shards: ``image`` a struct of ``bytes`` and ``path``, ``question``
    and ``answer`` text columns; several row groups per shard."""
    os.makedirs(root, exist_ok=True)
    images = []
    for s in range(shards):
        data = [png_bytes(10 * s + i) for i in range(rows)]
        images += data
        table = pa.table({
            "image": pa.array([{"bytes": b, "path": f"{s}_{i}.png"} for i, b in enumerate(data)],
                              pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            "question": [f"what is in image {s}-{i}?" for i in range(rows)],
            "answer": [f"answer {s}-{i}" for i in range(rows)],
        })
        pq.write_table(table, os.path.join(root, f"train-{s:05d}-of-{shards:05d}.parquet"), row_group_size=row_group_size)
    return images


def write_tar(path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
