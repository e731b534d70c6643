"""The real video-decoding child (``pipelines/_video_child.py``) with a fault switch for tests:
a file named ``*__hang__*`` hangs the decoder, ``*__crash__*`` segfaults it, ``*__nodecord__*``
makes decord refuse it (so PyAV decodes it)."""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines import _video_child  # noqa: E402

_real_sample = _video_child._sample
_real_decord = _video_child._decord_frames


def _decord_frames(path: str, frames: int):
    if "__nodecord__" in os.path.basename(path):
        raise RuntimeError("[12:00:00] src/video/video_reader.cc:83: Check failed: st_nb >= 0 (-1381258232 vs. 0)")
    return _real_decord(path, frames)


def _sample(path: str, frames: int, max_side: int):
    name = os.path.basename(path)
    if "__hang__" in name:
        while True:
            time.sleep(60)
    if "__crash__" in name:
        os.kill(os.getpid(), signal.SIGSEGV)
    return _real_sample(path, frames, max_side)


_video_child._sample = _sample
_video_child._decord_frames = _decord_frames

if __name__ == "__main__":
    _video_child.main()
