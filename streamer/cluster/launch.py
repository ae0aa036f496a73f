"""Connecting `dvp serve --ray` to Ray: an existing cluster, or one started here.

`--ray ADDRESS` joins the cluster whose head `ray start --head` started (its GCS address,
`HOST:6379`, or `auto` on one of its hosts); `--ray local` starts a cluster of this machine
alone: every GPU of it `streamer.workers_per_gpu` (K) workers (none, or `--device cpu`: K
CPU workers, K units of the custom resource `dvp_worker`), stopped again when the front
exits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from streamer.live.capacity import usable_cores
from tracker.errors import DvpError

log = logging.getLogger(__name__)

#: Object store of a local cluster, bytes: the front and its workers pass only small
#: messages through Ray (SDP, controls, figures).
LOCAL_OBJECT_STORE = 256 << 20


def connect(address: str, device: str, workers_per_gpu: int = 1) -> Callable[[], None]:
    """Connect this process to the cluster at `address` (or start one: `local`, with
    `workers_per_gpu` units of `dvp_worker` when it has no GPU) and return the function
    that disconnects (and stops a local cluster)."""
    import ray

    if ray.is_initialized():
        return lambda: None
    try:
        if address == "local":
            gpus = 0
            if device != "cpu":
                import torch

                gpus = torch.cuda.device_count()
            ray.init(address="local", num_cpus=usable_cores(), num_gpus=gpus,
                     resources={"dvp_worker": workers_per_gpu} if gpus == 0 else {},
                     object_store_memory=LOCAL_OBJECT_STORE, include_dashboard=False,
                     configure_logging=False)
            log.info("started a local Ray cluster: %s", f"{workers_per_gpu} CPU worker(s)"
                     if gpus == 0 else f"{gpus} GPU(s), {workers_per_gpu} worker(s) each")
        else:
            ray.init(address=address, configure_logging=False)
            log.info("joined the Ray cluster at %s", address)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise DvpError(f"--ray {address}: cannot connect to Ray: {err}") from err
    return ray.shutdown
