"""The hardware a command found, in one line (no Ray needed).

    >>> hardware_line()
    'hardware: 1x NVIDIA H100 80GB HBM3 (CUDA 13.0)'
    >>> hardware_line({"CPU": 64.0, "GPU": 8.0}, nodes=2)      # a Ray cluster: ray.cluster_resources()
    'hardware: Ray cluster of 2 nodes: 8 GPUs, 64 CPUs'

`announce_hardware` prints it to stderr once per process (the driver's; a Ray worker prints nothing).
"""
from __future__ import annotations

import os
import sys
from typing import Dict, Optional

_announced = False


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def hardware_line(resources: Optional[Dict[str, float]] = None, *, nodes: Optional[int] = None) -> str:
    """"hardware: ..." for this machine (its CUDA devices by name, or its CPU cores), or, given a Ray
    cluster's `ray.cluster_resources()`, that cluster's GPU and CPU totals (and its node count when given)."""
    if resources is not None:
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        where = f"Ray cluster of {_plural(nodes, 'node')}" if nodes else "Ray cluster"
        return f"hardware: {where}: {_plural(gpus, 'GPU') if gpus else 'no GPU'}, {_plural(cpus, 'CPU')}"
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 1:
        return f"hardware: CPU only ({_plural(cpu_cores(), 'core')})"
    names: Dict[str, int] = {}
    for i in range(count):
        name = torch.cuda.get_device_name(i)
        names[name] = names.get(name, 0) + 1
    devices = ", ".join(f"{n}x {name}" for name, n in names.items())
    cuda = getattr(torch.version, "cuda", None)
    return f"hardware: {devices}" + (f" (CUDA {cuda})" if cuda else "")


def pending() -> bool:
    """Whether `announce_hardware` would still print (not yet printed, and not a Ray worker)."""
    from .progress import in_ray_worker

    return not _announced and not in_ray_worker()


def announce_hardware(resources: Optional[Dict[str, float]] = None, *, nodes: Optional[int] = None,
                      file=None) -> Optional[str]:
    """Print `hardware_line(...)` to stderr, once per process; nothing in a Ray worker. Returns the line
    printed, or None."""
    global _announced

    if not pending():
        return None
    _announced = True
    line = hardware_line(resources, nodes=nodes)
    print(line, file=file if file is not None else sys.stderr, flush=True)
    return line


def ray_node_id() -> Optional[str]:
    """The Ray node this process runs on, or None outside a Ray worker or driver (never imports Ray: a process
    that runs Ray code has imported it already)."""
    ray = sys.modules.get("ray")
    try:
        return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
    except Exception:  # a partly imported or shut-down Ray
        return None
