"""Connecting to Ray: an existing cluster (RAY_ADDRESS, `ray start`, a `ray job submit` driver) or a local one."""
from __future__ import annotations

import os
from typing import Optional, Tuple


def ensure_ray(address: Optional[str] = None, *, num_cpus: Optional[int] = None) -> None:
    """Initialise Ray once. address None: RAY_ADDRESS if set, else a new local cluster.

    A local cluster starts the dashboard (http://127.0.0.1:8265) unless RAYROBUST_DASHBOARD=0;
    Ray Train's state monitoring relies on it. The first start prints the hardware line (stderr, once per
    process): an existing cluster's GPU/CPU totals, or this machine's devices for a local cluster.
    """
    import ray

    from .hardware import announce_hardware, pending

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = {"logging_level": "WARNING", "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
        if pending():
            announce_hardware(ray.cluster_resources(), nodes=_alive_nodes())
    else:
        dashboard = os.environ.get("RAYROBUST_DASHBOARD", "1") != "0"
        ray.init(num_cpus=num_cpus, include_dashboard=dashboard, **kwargs)
        announce_hardware()


def announce_cluster_or_local(address: Optional[str] = None) -> None:
    """The hardware line at the start of a command: the Ray cluster's totals when a cluster is named
    (`address`, RAY_ADDRESS) or already connected, else this machine's (without starting Ray)."""
    from .hardware import announce_hardware, pending

    if not pending():
        return
    ray = _ray_if_initialized()
    if ray is not None:
        announce_hardware(ray.cluster_resources(), nodes=_alive_nodes())
    elif address or os.environ.get("RAY_ADDRESS"):
        ensure_ray(address)  # connects and announces the cluster
    else:
        announce_hardware()


def _ray_if_initialized():
    import sys

    ray = sys.modules.get("ray")
    return ray if ray is not None and ray.is_initialized() else None


def _alive_nodes() -> Optional[int]:
    import ray

    try:
        return sum(1 for n in ray.nodes() if n.get("Alive"))
    except Exception:
        return None


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def resolve_use_gpu(use_gpu: Optional[bool]) -> Tuple[bool, int]:
    """(whether to use GPUs, GPUs in the cluster); None means "when the cluster has them"."""
    import ray

    from .errors import ConfigError

    gpus = int(ray.cluster_resources().get("GPU", 0))
    use = gpus > 0 if use_gpu is None else use_gpu
    if use and gpus == 0:
        raise ConfigError("use_gpu=True but the Ray cluster has no GPU; set it to null (auto) or false")
    return use, gpus
