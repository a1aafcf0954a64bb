"""Connecting to Ray: the one place that decides which cluster a job runs on.

``--ray`` takes the addresses Ray itself understands, so the same command runs on a
laptop, on a ``ray up`` cluster and on KubeRay:

- ``auto``: the cluster in ``RAY_ADDRESS`` or the one running on this machine (started
  with ``ray start``); a new local one if there is none.
- ``local``: always a new single-machine cluster, stopped when the job ends.
- ``HOST:PORT``: join a running cluster's head (this machine must be one of its nodes).
- ``ray://HOST:PORT``: Ray Client, from a machine outside the cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from types import ModuleType

from cbir.distributed.deps import require
from cbir.errors import CbirError


class RayClusterError(CbirError):
    """The Ray cluster named by ``--ray`` could not be reached."""


def _init(ray: ModuleType, address: str) -> None:
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address == "local":
        ray.init(address="local", include_dashboard=False, **quiet)
        return
    if address == "auto":
        try:
            ray.init(address="auto", **quiet)
        except ConnectionError:  # nothing running and no RAY_ADDRESS: a cluster of our own
            ray.init(address="local", include_dashboard=False, **quiet)
        return
    ray.init(address=address, **quiet)


@contextlib.contextmanager
def ray_session(address: str = "auto") -> Iterator[ModuleType]:
    """Ray, connected to ``address`` for the duration of the block.

    When the caller already called ``ray.init`` (a notebook, a test, a bench), that
    connection is used as it is and left open; otherwise this one is closed at the end
    (which also stops a cluster that ``local`` started).
    """
    ray = require("ray", "--ray")
    require("ray.data", "--ray")
    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports from our jobs
    try:
        _init(ray, address)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise RayClusterError(f"cannot start or reach the Ray cluster {address!r}: {exc}") from exc
    try:
        yield ray
    finally:
        ray.shutdown()


def cluster_cpus(ray: ModuleType) -> int:
    """CPUs of the whole cluster (at least 1): the default number of describing actors."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
