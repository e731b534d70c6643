"""CPU decoding: images with PIL, videos with decord in an isolated process.

Nothing here raises on bad input. :func:`decode_row` turns a source row into a row with the
decoded pixels (``pixels``: raw uint8 bytes, ``shape``: ``[n, h, w]``, 3 channels) or with
``error`` set (what went wrong, with the path).

* Images: a decompression-bomb limit (``max_pixels``, checked from the header before any
  pixel is decoded), the first frame of animated files, conversion to RGB from every PIL mode
  (CMYK, 16-bit and 32-bit grayscale, float, palette, alpha composited on white), and a
  downscale so that the longer side is at most ``max_side``.
* Videos: ``frames`` uniformly spaced frames (``linspace(0, len-1, N)``; fewer if the video is
  shorter) decoded by :class:`VideoDecoder`, a long-lived child process per CPU worker with a
  time limit per video. A decoder that hangs is killed, one that crashes is restarted; either
  costs that one row an error, never the job.
"""

from __future__ import annotations

import io
import json
import os
import select
import signal
import subprocess
import sys
import tarfile
import time
import warnings

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipelines import storage
from pipelines.shards import parse_member_ref, read_member
from pipelines.sources import local_path, readable

DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MAX_SIDE = 1024
DEFAULT_DECODE_TIMEOUT_S = 60.0

_CHILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_video_child.py")


class MediaError(Exception):
    """An input that cannot be decoded; the message names what went wrong."""


# ----------------------------------------------------------------------------------- images


def to_rgb(im: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of any PIL image; transparent pixels become white."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(im).astype(np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        elif arr.size and (arr.min() < 0 or arr.max() > 255):
            lo, hi = float(arr.min()), float(arr.max())
            if mode.startswith("I") and lo >= 0 and hi <= 65535:
                arr = arr / 257.0
            else:
                arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
        return gray.convert("RGB")
    if mode in ("P", "PA"):
        im = im.convert("RGBA" if (mode == "PA" or "transparency" in im.info) else "RGB")
        if im.mode == "RGB":
            return im
    elif mode == "L" and "transparency" in im.info:
        im = im.convert("LA")
    if im.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB")


def load_image(path, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = DEFAULT_MAX_SIDE,
               label: str | None = None) -> np.ndarray:
    """Decode ``path`` (a file name, or a file object named ``label`` in messages) to an
    ``h × w × 3`` uint8 array; raises :class:`MediaError`."""
    if label is not None:
        return _load_image(path, max_pixels, max_side, label)
    return _load_image(path, max_pixels, max_side, path)


def _load_image(source, max_pixels: int, max_side: int, path: str) -> np.ndarray:
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                w, h = im.size
                if w < 1 or h < 1:
                    raise MediaError(f"image has no pixels ({w}x{h}): {path}")
                if w * h > max_pixels:
                    raise MediaError(
                        f"image too large: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
                        f"(decompression bomb?): {path}"
                    )
                if getattr(im, "n_frames", 1) > 1:
                    im.seek(0)
                if im.format == "JPEG" and max(w, h) > 2 * max_side:
                    im.draft(None, (max_side, max_side))  # decode JPEGs at a reduced scale directly
                im.load()
                rgb = to_rgb(ImageOps.exif_transpose(im))  # a phone photo upright, as a viewer shows it
                if max(rgb.size) > max_side:
                    rgb.thumbnail((max_side, max_side), Image.BILINEAR)
                arr = np.asarray(rgb, dtype=np.uint8)
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:
        raise MediaError(f"image too large (decompression bomb?): {exc}: {path}") from None
    except UnidentifiedImageError:
        size = _size_or_none(source)
        what = "empty file (0 bytes)" if size == 0 else "not an image PIL can read"
        raise MediaError(f"{what}: {path}") from None
    except FileNotFoundError:
        raise MediaError(f"file not found: {path}") from None
    except Exception as exc:  # noqa: BLE001 - truncated data, broken headers, codec errors, ...
        raise MediaError(f"cannot decode image ({type(exc).__name__}: {exc}): {path}") from None
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise MediaError(f"cannot convert image to RGB (got shape {arr.shape}): {path}")
    return np.ascontiguousarray(arr)


def _size_or_none(source) -> int | None:
    if hasattr(source, "getbuffer"):  # in memory (a shard member)
        return source.getbuffer().nbytes
    try:
        return os.path.getsize(source)
    except OSError:
        return None


# ----------------------------------------------------------------------------------- videos


class VideoDecoder:
    """Decodes videos in a long-lived child process, with a time limit per video.

    The child is started on first use and restarted after it hangs (killed at the deadline)
    or dies (a segfault in the codec); each such event is reported for the one video only.
    """

    def __init__(self, timeout_s: float = DEFAULT_DECODE_TIMEOUT_S):
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen | None = None
        self.restarts = 0

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        return subprocess.Popen(
            [sys.executable, _CHILD_SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            close_fds=True,
        )

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass

    def __del__(self):  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def decode(self, path: str, frames: int, *, max_side: int = DEFAULT_MAX_SIDE) -> np.ndarray:
        """``n × h × w × 3`` uint8 frames of ``path``; raises :class:`MediaError`."""
        if not os.path.isfile(path):
            raise MediaError(f"file not found: {path}")
        if os.path.getsize(path) == 0:
            raise MediaError(f"empty file (0 bytes): {path}")
        if self._proc is None or self._proc.poll() is not None:
            if self._proc is not None:
                self.close()
                self.restarts += 1
            self._proc = self._start()
        proc = self._proc
        request = {"path": path, "frames": frames, "max_side": max_side}
        deadline = time.monotonic() + self.timeout_s
        try:
            proc.stdin.write((json.dumps(request) + "\n").encode())
            proc.stdin.flush()
            header = json.loads(self._read_line(proc, deadline))
            if not header["ok"]:
                raise MediaError(f"not a decodable video ({header['error']}): {path}")
            shape = header["shape"]
            data = self._read_exact(proc, int(np.prod(shape)), deadline)
        except TimeoutError:
            self.close()
            raise MediaError(f"video decoding timed out after {self.timeout_s:g} s (decoder killed): {path}") from None
        except (EOFError, BrokenPipeError, ValueError) as exc:
            code = proc.wait()
            self.close()
            how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit status {code}"
            detail = f" ({exc})" if isinstance(exc, ValueError) else ""
            raise MediaError(f"video decoder crashed ({how}){detail}: {path}") from None
        return np.frombuffer(data, dtype=np.uint8).reshape(shape)

    @staticmethod
    def _wait_readable(proc: subprocess.Popen, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if not ready:
            raise TimeoutError

    def _read_line(self, proc: subprocess.Popen, deadline: float) -> bytes:
        buf = bytearray()
        fd = proc.stdout.fileno()
        while not buf.endswith(b"\n"):
            self._wait_readable(proc, deadline)
            chunk = os.read(fd, 1)  # the header is short; byte reads keep the frames in the pipe
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    def _read_exact(self, proc: subprocess.Popen, n: int, deadline: float) -> bytes:
        buf = bytearray()
        fd = proc.stdout.fileno()
        while len(buf) < n:
            self._wait_readable(proc, deadline)
            chunk = os.read(fd, min(n - len(buf), 1 << 20))
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)


_DECODERS: dict[float, VideoDecoder] = {}


def shared_video_decoder(timeout_s: float) -> VideoDecoder:
    """One decoder per worker process (Ray reuses worker processes across tasks)."""
    key = float(timeout_s)
    if key not in _DECODERS:
        _DECODERS[key] = VideoDecoder(timeout_s)
    return _DECODERS[key]


# ----------------------------------------------------------------------------------- rows


def decode_row(
    row: dict,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int = DEFAULT_MAX_SIDE,
    timeout_s: float = DEFAULT_DECODE_TIMEOUT_S,
) -> dict:
    """A source row plus ``pixels``/``shape`` (and ``frames`` = frames actually decoded), or
    plus ``error``. Never raises for bad input."""
    out = dict(row)
    out["pixels"], out["shape"] = None, None
    if out.get("error"):
        return out
    path = local_path(row["path"])  # a file name that is not UTF-8 travels as its bytes
    in_shard = parse_member_ref(path) is not None  # inside a shard: read its bytes (pipelines.shards)
    member = in_shard or storage.is_uri(path)  # bytes from a shard or an object store, not a local file
    try:
        if member:
            path = readable(row["source"])
            what = "the shard member" if in_shard else "the object"
            try:
                data = read_member(row["path"]) if in_shard else storage.read_bytes(row["path"])
            except (OSError, ValueError, KeyError, tarfile.TarError) as exc:
                raise MediaError(f"cannot read {what} ({type(exc).__name__}: {exc}): {path}") from None
        if row["media_type"] == "image":
            source = io.BytesIO(data) if member else path
            arr = load_image(source, max_pixels=max_pixels, max_side=max_side, label=path)[None]
        elif row["media_type"] == "video":
            if member:
                arr = _decode_video_bytes(data, path, int(row["frames"]), max_side, timeout_s)
            else:
                arr = shared_video_decoder(timeout_s).decode(path, int(row["frames"]), max_side=max_side)
            out["frames"] = int(arr.shape[0])
        else:
            raise MediaError(f"unsupported media type {row['media_type']!r}: {path}")
    except MediaError as exc:
        out["error"] = readable(str(exc))
        return out
    except Exception as exc:  # noqa: BLE001 - a bug here must still cost one row, not the job
        out["error"] = readable(f"decoding failed ({type(exc).__name__}: {exc}): {path}")
        return out
    out["pixels"] = arr.tobytes()
    out["shape"] = [int(s) for s in arr.shape[:3]]
    return out


def _decode_video_bytes(data: bytes, label: str, frames: int, max_side: int, timeout_s: float) -> np.ndarray:
    """A video held in memory (a shard member), decoded from a temporary file by the child."""
    import tempfile

    suffix = os.path.splitext(label)[1] or ".mp4"
    with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            return shared_video_decoder(timeout_s).decode(tmp.name, frames, max_side=max_side)
        except MediaError as exc:
            raise MediaError(str(exc).replace(tmp.name, label)) from None


def frames_of(row: dict) -> list[Image.Image]:
    """The decoded frames of a row as PIL images (one for an image, N for a video)."""
    n, h, w = row["shape"]
    arr = np.frombuffer(row["pixels"], dtype=np.uint8).reshape(n, h, w, 3)
    return [Image.fromarray(f) for f in arr]


# ----------------------------------------------------------------------------------- blocks

DECODED_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("source", pa.string()),
        ("path", pa.string()),
        ("media_type", pa.string()),
        ("frames", pa.int32()),
        ("prompt", pa.string()),
        ("reference", pa.string()),
        ("error", pa.string()),
        ("unit", pa.string()),  # the input piece the row belongs to: names its part file (pipelines.sink.part_name)
        ("pixels", pa.large_binary()),
        ("shape", pa.list_(pa.int32())),
    ]
)


def decode_block(block: pa.Table, *, max_pixels: int, max_side: int, timeout_s: float) -> pa.Table:
    """The decoding half of the caption job's CPU stage: :func:`decode_row` on every
    row of a block. This module imports neither torch nor transformers (the job's CPU stage adds
    the model's processor: ``pipelines.preprocess.prepare_block``)."""
    rows = [decode_row(r, max_pixels=max_pixels, max_side=max_side, timeout_s=timeout_s) for r in block.to_pylist()]
    return pa.Table.from_pylist([{k: r.get(k) for k in DECODED_SCHEMA.names} for r in rows], schema=DECODED_SCHEMA)
