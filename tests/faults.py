"""Faults injected from the tests into the pipeline's processes (never carried by product code).

* A video decoder that hangs or crashes: :func:`faulty_video_decoder` points
  ``pipelines.media`` at ``tests/faulty_video_child.py``, the real decoding child with a
  switch: files named ``*__hang__*`` hang, ``*__crash__*`` segfault.
* A model worker that dies: :func:`install` (a Ray ``worker_process_setup_hook``) wraps
  ``CaptionPredictor.__call__`` so that a worker ends itself hard on its N-th batch, once, when
  the file named by ``EP_TEST_WORKER_EXIT`` holds ``N MARKER`` (MARKER, a path, records that it
  happened). The test writes that file; no file, no fault.

``ray_runtime_env()`` is the runtime environment a test's Ray session starts with, so that
every worker of that session (decode tasks and model actors) gets both faults installed.
"""

from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER_EXIT = "EP_TEST_WORKER_EXIT"


def faulty_video_decoder() -> None:
    """Decode videos with the faulty child script in this process."""
    import pipelines.media as media

    media._CHILD_SCRIPT = os.path.join(HERE, "faulty_video_child.py")


def _exit_on_nth_batch() -> None:
    from pipelines.infer import CaptionPredictor

    real_call = CaptionPredictor.__call__
    calls = {"n": 0}

    def call(self, batch):
        calls["n"] += 1
        spec = os.environ.get(WORKER_EXIT)
        if spec and os.path.exists(spec):
            with open(spec) as fh:
                after, marker = fh.read().split(maxsplit=1)
            if calls["n"] >= int(after) and not os.path.exists(marker):
                with open(marker, "w") as fh:
                    fh.write(str(os.getpid()))
                os._exit(1)
        return real_call(self, batch)

    CaptionPredictor.__call__ = call


def install() -> None:
    """Ray worker setup hook: both faults, in every worker of the session."""
    faulty_video_decoder()
    _exit_on_nth_batch()


def ray_runtime_env(spec_file: str) -> dict:
    return {
        "worker_process_setup_hook": "tests.faults.install",
        "env_vars": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", WORKER_EXIT: spec_file, "PYTHONPATH": os.path.dirname(HERE)},
    }
