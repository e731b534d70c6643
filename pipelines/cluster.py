"""The one place that connects to Ray: :func:`ray_session`.

Every job (``ep caption``, ``ep sweep``, ``ep demo``, the pipeline bench) runs inside
``with ray_session(...)``. It joins the cluster named by ``address`` or ``RAY_ADDRESS``
(which ``ray job submit`` sets), else starts a fresh local instance; it shuts Ray down on
exit only when it started it, so a caller that already runs Ray (a test, a notebook) keeps
its session.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)

# environment a locally started Ray passes to its workers: the user's offline switch, and one
# OpenMP thread per worker (decode tasks and CPU model actors set their own torch threads)
_LOCAL_WORKER_ENV = ("HF_HUB_OFFLINE",)


def _python_sigterm_handler():
    """The SIGTERM handler the caller installed in Python (jobs.cli's), or None."""
    if threading.current_thread() is not threading.main_thread():
        return None
    handler = signal.getsignal(signal.SIGTERM)
    return handler if callable(handler) else None


def check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """Refuse, in one line and within ``timeout_s``, a cluster address nothing answers on (Ray
    itself would retry for minutes). ``None``, ``auto`` and ``local`` are left to Ray."""
    import socket

    if not address or address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"Ray address {address!r} is not host:port (e.g. 10.0.0.1:6379); check --address or RAY_ADDRESS")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ValueError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); "
                         "check --address or RAY_ADDRESS, or leave both unset to start Ray locally") from None


@contextmanager
def ray_session(
    address: str | None = None, num_cpus: int | None = None, *, label: str = "caption", quiet: bool = False
) -> Iterator[bool]:
    """Connect to (or start) Ray for the block; yields True when this call started it.

    ``address``: a cluster address; default ``RAY_ADDRESS``, else a new local instance
    (never a stale one found on disk) with ``num_cpus`` CPUs (default: all).
    ``label`` prefixes the one line that says which it did (DEBUG instead of INFO if ``quiet``).
    """
    import ray

    say = log.debug if quiet else log.info
    if ray.is_initialized():
        yield False
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = {"log_to_driver": True, "logging_level": "WARNING"}
    if address is None:
        env = {k: os.environ[k] for k in _LOCAL_WORKER_ENV if k in os.environ}
        kwargs.update(address="local", num_cpus=num_cpus, include_dashboard=False,
                      runtime_env={"env_vars": {**env, "OMP_NUM_THREADS": "1"}})
        say(f"[{label}] starting a local Ray instance (use --address or RAY_ADDRESS to join a cluster)")
    else:
        kwargs["address"] = address
        say(f"[{label}] joining the Ray cluster at {address}")
    handler = _python_sigterm_handler()
    ray.init(**kwargs)
    if handler is not None:  # Ray's driver replaces it with a C handler that aborts the process
        signal.signal(signal.SIGTERM, handler)
    try:
        yield True
    finally:
        ray.shutdown()
