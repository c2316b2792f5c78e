"""Which device a training worker uses, as a pure function of what Ray assigned it (no Ray import).

Ray gives every GPU worker the ids of its GPUs (`ray.get_gpu_ids()`) and sets CUDA_VISIBLE_DEVICES for the
process, either to those ids alone or (Ray Train's default) to every GPU its node's workers share. Torch numbers
the visible GPUs from 0, so a worker's device is `cuda:<position of its GPU id in CUDA_VISIBLE_DEVICES>`: rank 1
of a two-GPU node with CUDA_VISIBLE_DEVICES="0,1" trains on cuda:1, but with CUDA_VISIBLE_DEVICES="1" on cuda:0.
This is `ray.train.torch.get_device()`'s rule; `bind_device` then makes that device the process's current one,
so kernels, NCCL and CUDA generators default to the worker's own GPU instead of cuda:0.

    >>> worker_device(["1"], "0,1", device_count=2)
    device(type='cuda', index=1)
    >>> bind_device(worker_device(ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"),
    ...                           device_count=torch.cuda.device_count()))
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch


def visible_ids(cuda_visible_devices: Optional[str]) -> Optional[List[str]]:
    """The GPU ids in CUDA_VISIBLE_DEVICES, in order; None when the variable is unset or empty (every GPU is
    visible under its own index). Ray's "NoDevFiles" placeholder counts as unset."""
    if cuda_visible_devices is None:
        return None
    ids = [s.strip() for s in cuda_visible_devices.split(",") if s.strip()]
    return ids if ids and ids != ["NoDevFiles"] else None


def worker_device(gpu_ids: Sequence[Union[int, str]], cuda_visible_devices: Optional[str], *,
                  device_count: int) -> torch.device:
    """The torch device of a worker Ray assigned `gpu_ids`, given its CUDA_VISIBLE_DEVICES and how many CUDA
    devices torch sees in that process. No GPU ids, or no CUDA devices: the CPU. With several GPUs per worker,
    the lowest device index (as `ray.train.torch.get_device()`).

    Raises RuntimeError when an assigned id is not visible or its index is beyond the visible devices (a worker
    that would silently train on another rank's GPU).
    """
    ids = [str(g) for g in gpu_ids]
    if not ids or device_count < 1:
        return torch.device("cpu")
    visible = visible_ids(cuda_visible_devices)
    indices = []
    for gid in ids:
        if visible is None:
            if not gid.isdigit():
                raise RuntimeError(f"GPU id {gid!r} is not an index and CUDA_VISIBLE_DEVICES is unset")
            indices.append(int(gid))
        elif gid in visible:
            indices.append(visible.index(gid))
        else:
            raise RuntimeError(f"GPU {gid} assigned to this worker is not in CUDA_VISIBLE_DEVICES={cuda_visible_devices!r}")
    index = min(indices)
    if index >= device_count:
        raise RuntimeError(f"GPU {ids} maps to cuda:{index} but this process sees {device_count} CUDA device(s) "
                           f"(CUDA_VISIBLE_DEVICES={cuda_visible_devices!r})")
    return torch.device("cuda", index)


def bind_device(device: torch.device) -> torch.device:
    """Make a CUDA `device` this process's current device (a no-op for the CPU); returns it."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


DEVICE_DATA_FRACTION = 0.25  # in-memory training images go to the GPU when they take at most this share of it


def data_on_device(data, device: torch.device):
    """The in-memory training images on the GPU once, when they fit in DEVICE_DATA_FRACTION of its memory (batches
    are then gathered there, with no host-to-device copy per step); otherwise as they are (the CPU, or a stream)."""
    from .loop import Split

    if device.type != "cuda" or data.x_train is None:
        return data
    size = data.x_train.element_size() * data.x_train.numel()
    if size > DEVICE_DATA_FRACTION * torch.cuda.get_device_properties(device).total_memory:
        return data
    return Split(data.x_train.to(device), data.y_train.to(device), data.x_val, data.y_val)
