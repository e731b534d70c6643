"""The isolated video-decoding process (started by ``pipelines.media.VideoDecoder``).

A standalone script, so it needs neither this package on ``sys.path`` nor Ray: it reads one
JSON request per line from stdin and answers each with a JSON header line, followed, on
success, by the raw uint8 frames (``n × h × w × 3`` bytes). decord runs here, never in the
pipeline's own processes: when it hangs holding the GIL or crashes, the parent kills or
loses this process and turns that into an error row for one input.
"""

from __future__ import annotations

import json
import sys


def _sample(path: str, frames: int, max_side: int) -> tuple[bytes, list[int], int]:
    import numpy as np

    from decord import VideoReader, cpu

    vr = VideoReader(path, ctx=cpu(0), num_threads=1)
    total = len(vr)
    if total < 1:
        raise ValueError("video has no frames")
    n = min(frames, total)
    indices = np.linspace(0, total - 1, n).round().astype(int).tolist()
    batch = vr.get_batch(indices).asnumpy()
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
