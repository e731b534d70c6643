"""What kind of failure an error row records, and how the model stage survives a bad device.

Every error row of the output carries ``error_kind``:

* ``input``: the row itself is bad: a missing, unreadable, unsupported or oversized file, a
  video that will not decode in time, a prompt over the model's context, a row whose
  ``generate`` fails alone for a reason other than the device. Permanent: a rerun keeps it.
* ``transient``: the device failed the row: out of memory with the row alone in its call,
  or a device fault (illegal address, ECC error, launch failure) that came back on every
  attempt. A rerun drops these rows from the output and processes them again.

A device fault poisons the CUDA context: every later kernel of that process fails. The model
actor therefore ends its own process (:func:`end_poisoned_process`); Ray Data restarts it and
runs the failed batch again on the new actor. :class:`AttemptLedger`, one small Ray actor per
job, counts the attempts of each batch across those restarts, so that a batch whose rows fault
the device every time becomes ``transient`` error rows after :data:`DEVICE_ATTEMPTS` attempts
instead of restarting the actor forever.
"""

from __future__ import annotations

import hashlib
import logging
import os

INPUT = "input"
TRANSIENT = "transient"
ERROR_KINDS = (INPUT, TRANSIENT)
DEVICE_ATTEMPTS = 3  # attempts of one batch (the first plus restarts) before its rows become transient errors

# Messages of errors that leave a CUDA context unusable (torch raises them as RuntimeError or,
# since 2.8, torch.AcceleratorError). Out of memory is not among them: it leaves the context usable.
_DEVICE_FAULT_MARKS = (
    "cuda error", "illegal memory access", "illegal address", "uncorrectable ecc", "ecc error",
    "unspecified launch failure", "device-side assert", "cublas_status_execution_failed",
    "cudnn_status_execution_failed", "nccl error", "misaligned address", "an illegal instruction",
)

log = logging.getLogger(__name__)


def is_out_of_memory(exc: BaseException) -> bool:
    """``exc`` is the device running out of memory (torch's OutOfMemoryError, or its message)."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def is_device_fault(exc: BaseException) -> bool:
    """``exc`` is a device error that poisons the process's CUDA context (not out of memory)."""
    import torch

    if is_out_of_memory(exc):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(mark in text for mark in _DEVICE_FAULT_MARKS)


def batch_key(sample_ids: list[str]) -> str:
    """The identity of a batch of rows across actor restarts: a hash of its sorted sample ids."""
    digest = hashlib.sha1("\n".join(sorted(sample_ids)).encode("utf-8"))
    return digest.hexdigest()


class AttemptLedger:
    """Attempts per batch key, kept outside the model actors so that it survives their restarts.
    The caption job runs it as a Ray actor (``ray.remote(num_cpus=0)(AttemptLedger)``)."""

    def __init__(self):
        self._attempts: dict[str, int] = {}
        self._faults: dict[str, str] = {}
        self._repeats = 0

    def begin(self, key: str) -> tuple[int, str | None]:
        """Count one more attempt of the batch ``key``; returns its number (1 for the first) and
        the device fault that ended the attempt before, if one was recorded."""
        self._attempts[key] = self._attempts.get(key, 0) + 1
        self._repeats += self._attempts[key] > 1
        return self._attempts[key], self._faults.get(key)

    def fault(self, key: str, message: str) -> None:
        """Record the device fault that is about to end the attempt of batch ``key``."""
        self._faults[key] = message

    def finish(self, key: str) -> None:
        """The batch ``key`` returned its rows: forget it."""
        self._attempts.pop(key, None)
        self._faults.pop(key, None)

    def repeats(self) -> int:
        """Attempts beyond the first, over all batches: how often a batch ran again after its
        actor ended (a device fault, a killed worker, a lost node)."""
        return self._repeats


def end_poisoned_process(message: str) -> None:
    """End this process at once (a model actor after a device fault): Ray restarts the actor on
    a fresh CUDA context and runs the batch again. Never returns."""
    log.error(f"[caption] device fault, restarting this model worker: {message}")
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(70)
