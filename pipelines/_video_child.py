"""The isolated video-decoding process (started by ``pipelines.media.VideoDecoder``).

A standalone script, so it needs neither this package on ``sys.path`` nor Ray: it reads one
JSON request per line from stdin and answers each with a JSON header line, followed, on
success, by the raw uint8 frames (``n × h × w × 3`` bytes); PyAV decodes what decord cannot
open. decord runs here, never in the
pipeline's own processes: when it hangs holding the GIL or crashes, the parent kills or
loses this process and turns that into an error row for one input.
"""

from __future__ import annotations

import json
import sys


def _decord_frames(path: str, frames: int):
    """``(n × h × w × 3 uint8 frames, total)``: ``frames`` uniformly spaced frames, with decord."""
    import numpy as np

    from decord import VideoReader, cpu

    vr = VideoReader(path, ctx=cpu(0), num_threads=1)
    total = len(vr)
    if total < 1:
        raise ValueError("video has no frames")
    return vr.get_batch(_spaced(total, frames)).asnumpy(), total


def _av_frames(path: str, frames: int):
    """The same with PyAV, for what decord cannot open: one pass counts the frames (when the
    container does not say), one keeps the chosen ones."""
    import av
    import numpy as np

    with av.open(path) as container:
        total = container.streams.video[0].frames
    if total < 1:
        with av.open(path) as container:
            total = sum(1 for _ in container.decode(video=0))
    if total < 1:
        raise ValueError("video has no frames")
    wanted, kept = set(_spaced(total, frames)), []
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                kept.append(frame.to_ndarray(format="rgb24"))
    if not kept:
        raise ValueError("no frame decoded")
    return np.stack(kept), total


def _spaced(total: int, frames: int) -> list[int]:
    """``min(frames, total)`` indices spread uniformly over ``0 … total − 1``."""
    import numpy as np

    return np.linspace(0, total - 1, min(frames, total)).round().astype(int).tolist()


def _sample(path: str, frames: int, max_side: int) -> tuple[bytes, list[int], int]:
    import numpy as np

    try:
        batch, total = _decord_frames(path, frames)
    except Exception as decord_error:  # noqa: BLE001 - PyAV plays some files decord refuses
        try:
            batch, total = _av_frames(path, frames)
        except Exception as av_error:  # noqa: BLE001
            raise ValueError(f"decord: {str(decord_error).strip()[:200]}; PyAV: {str(av_error).strip()[:200]}") from None
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"unexpected decoded shape {tuple(batch.shape)}")
    h, w = batch.shape[1:3]
    if max(h, w) > max_side:
        from PIL import Image

        scale = max_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        batch = np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BILINEAR)) for f in batch])
    batch = np.ascontiguousarray(batch, dtype=np.uint8)
    return batch.tobytes(), list(batch.shape), total


def main() -> None:
    out = sys.stdout.buffer
    for line in sys.stdin:
        req = json.loads(line)
        try:
            data, shape, total = _sample(req["path"], int(req["frames"]), int(req["max_side"]))
            header = {"ok": True, "shape": shape, "total": total}
        except Exception as exc:  # noqa: BLE001 - every decoder failure is reported, none escapes
            data, header = b"", {"ok": False, "error": f"{type(exc).__name__}: {exc}".strip()}
        out.write((json.dumps(header) + "\n").encode())
        out.write(data)
        out.flush()


if __name__ == "__main__":
    main()
