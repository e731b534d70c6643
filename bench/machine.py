"""What machine a bench ran on, to print beside its figures."""

from __future__ import annotations

import datetime as _dt
import os
import platform


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict:
    """CPU model, cores, torch threads, torch / transformers versions, the GPU if any, the date (UTC)."""
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": gpu,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
    }


def one_line(machine: dict) -> str:
    """``Intel Xeon …, 2 cores, torch 2.13.0, transformers 5.24.0, no GPU, 2026-12-01``."""
    gpu = machine.get("gpu") or "no GPU"
    return (f"{machine.get('cpu')}, {machine.get('cores')} cores, torch {machine.get('torch')}, "
            f"transformers {machine.get('transformers')}, {gpu}, {machine.get('date')}")
