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
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)

# environment a locally started Ray passes to its workers: the user's offline switch, and one
# OpenMP thread per worker (decode tasks and CPU model actors set their own torch threads)
_LOCAL_WORKER_ENV = ("HF_HUB_OFFLINE",)


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
    ray.init(**kwargs)
    try:
        yield True
    finally:
        ray.shutdown()
