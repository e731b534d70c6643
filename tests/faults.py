"""Faults injected from the tests into the pipeline's processes (never carried by product code).

* A video decoder that hangs or crashes: :func:`faulty_video_decoder` points
  ``pipelines.media`` at ``tests/faulty_video_child.py``, the real decoding child with a
  switch: files named ``*__hang__*`` hang, ``*__crash__*`` segfault.
* A model worker that dies: :func:`install` (a Ray ``worker_process_setup_hook``) wraps
  ``CaptionPredictor.__call__`` so that a worker ends itself hard on its N-th batch, once, when
  the file named by ``EP_TEST_WORKER_EXIT`` holds ``N MARKER`` (MARKER, a path, records that it
  happened). The test writes that file; no file, no fault.
* A device that fails: :func:`_failing_device` wraps ``CaptionPredictor._generate`` so that,
  while the JSON file named by ``EP_TEST_DEVICE_FAULT`` exists, a generate call raises
  ``torch.OutOfMemoryError`` when it holds more than ``oom_above_tokens`` prompt tokens, and a
  CUDA "illegal memory access" ``RuntimeError`` when one of its rows' sources contains a key of
  ``poison`` (at most that many times over the whole session, counted by files in
  ``marker_dir``: each fault writes one, named by the pattern and the process id).

* A full disk: :func:`_full_disk` wraps the sink's ``pq.write_table`` so that, while the JSON
  file named by ``EP_TEST_DEVICE_FAULT`` holds ``"full_disk": true``, writing a part file
  writes four bytes of it and raises ``ENOSPC`` (the model workers write the parts).

``ray_runtime_env()`` is the runtime environment a test's Ray session starts with, so that
every worker of that session (decode tasks and model actors) gets both faults installed.
"""

from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER_EXIT = "EP_TEST_WORKER_EXIT"
DEVICE_FAULT = "EP_TEST_DEVICE_FAULT"


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


def _failing_device() -> None:
    import json

    import torch

    from pipelines.infer import CaptionPredictor

    real_generate, real_run_group = CaptionPredictor._generate, CaptionPredictor._run_group

    def spec() -> dict | None:
        path = os.environ.get(DEVICE_FAULT)
        if not path or not os.path.exists(path):
            return None
        with open(path) as fh:
            return json.load(fh)

    def run_group(self, members, rows, results, *args, **kwargs):
        self._test_sources = [rows[i].get("source") or "" for i, _ in members]
        return real_run_group(self, members, rows, results, *args, **kwargs)

    def generate(self, encs):
        fault = spec()
        if fault:
            tokens = len(encs) * max(e["input_ids"].shape[1] for e in encs)  # rows × longest prompt, as packed
            if fault.get("oom_above_tokens") is not None and tokens > fault["oom_above_tokens"]:
                raise torch.OutOfMemoryError(f"CUDA out of memory (test fault: a call of {tokens} tokens)")
            for pattern, times in (fault.get("poison") or {}).items():
                if any(pattern in source for source in getattr(self, "_test_sources", [])):
                    marker_dir = fault["marker_dir"]
                    done = [f for f in os.listdir(marker_dir) if f.startswith(pattern + ".")]
                    if len(done) < times:
                        with open(os.path.join(marker_dir, f"{pattern}.{os.getpid()}.{len(done)}"), "w"):
                            pass
                        raise RuntimeError("CUDA error: an illegal memory access was encountered (test fault)")
        return real_generate(self, encs)

    CaptionPredictor._generate, CaptionPredictor._run_group = generate, run_group


def _full_disk() -> None:
    import errno
    import json

    import pipelines.sink as sink

    real_write = sink.pq.write_table

    def write_table(table, where, *args, **kwargs):
        path = os.environ.get(DEVICE_FAULT)
        if path and os.path.exists(path):
            with open(path) as fh:
                if json.load(fh).get("full_disk"):
                    if isinstance(where, str):
                        with open(where, "wb") as out:  # half a file, then the device is full
                            out.write(b"PAR1")
                    raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(table, where, *args, **kwargs)

    sink.pq.write_table = write_table


def install() -> None:
    """Ray worker setup hook: every fault, in every worker of the session, and the stand-in
    video processor of the tiny Qwen-VL (``tests.video_standins``: no torchvision here)."""
    from tests import video_standins

    video_standins.install()
    faulty_video_decoder()
    _exit_on_nth_batch()
    _failing_device()
    _full_disk()


def ray_runtime_env(spec_file: str, device_fault_file: str = "") -> dict:
    return {
        "worker_process_setup_hook": "tests.faults.install",
        "env_vars": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", WORKER_EXIT: spec_file,
                     DEVICE_FAULT: device_fault_file, "PYTHONPATH": os.path.dirname(HERE)},
    }
