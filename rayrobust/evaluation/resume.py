"""Resumable attacks: every finished chunk is saved as it finishes, so an interrupted evaluation recomputes
only the chunks it had not finished.

A chunk's outcome is a function of the attacked model, the chunk's images and labels, and the attack's
settings (chunks are cut by global index and chunk k is seeded with `chunk_seed(seed, k)`). The store's key
is a sha256 over exactly those: the model's weights and buffers (and any other tensor it holds, e.g. a
purifier's dictionaries) and its structure, the attacked images and labels, and the settings (attack kind,
eps, norm, version, attacks, seed, chunk size, and an identity such as the checkpoint's sha256). A chunk saved
under one key is never read for another: changing the checkpoint, the data or any setting starts afresh.

Layout under the evaluation's folder (a local path or a storage URI):
    attack_chunks/<kind>-<key[:16]>/key.json           the settings the key covers (for people)
    attack_chunks/<kind>-<key[:16]>/chunk_00003.json   {"chunk": 3, "start": 30, "stop": 40, "key": ..., "result": ...}
Each chunk file is written atomically (the storage layer's atomic write), so a chunk is either complete or absent.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, Optional

import torch
from torch import nn

CHUNKS_DIR = "attack_chunks"


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy().tobytes()


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of what decides a model's outputs: its structure (repr), its state dict, and tensors its modules
    hold outside the state dict (plain attributes)."""
    h = hashlib.sha256(repr(model).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(_tensor_bytes(t))
    for mod_name, mod in model.named_modules():
        for attr, value in sorted(vars(mod).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                h.update(f"{mod_name}.{attr}".encode())
                h.update(_tensor_bytes(value))
    return h.hexdigest()


def data_fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    h = hashlib.sha256(str((tuple(x.shape), str(x.dtype), tuple(y.shape))).encode())
    h.update(_tensor_bytes(x))
    h.update(_tensor_bytes(y))
    return h.hexdigest()


class ChunkStore:
    """Finished chunks of one attack run, keyed by model, data and settings (see the module docstring)."""

    def __init__(self, root, kind: str, key: str, settings: Dict[str, Any]):
        from ..location import as_location

        self.kind, self.key, self.settings = kind, key, settings
        self.dir = as_location(root) / CHUNKS_DIR / f"{kind}-{key[:16]}"
        self.resumed = 0
        self.computed = 0
        self._described = False

    @classmethod
    def open(cls, root, kind: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             settings: Dict[str, Any]) -> "ChunkStore":
        """The store of `kind` (e.g. "autoattack", "bpda") for `model` on (x, y) with `settings` under `root`."""
        described = {"kind": kind, **settings, "model_sha256": model_fingerprint(model),
                     "data_sha256": data_fingerprint(x, y)}
        key = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()
        return cls(root, kind, key, described)

    @classmethod
    def maybe_open(cls, root, kind: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   settings: Dict[str, Any]) -> Optional["ChunkStore"]:
        """`open`, or None when `root` is None (nothing is saved)."""
        return None if root is None else cls.open(root, kind, model, x, y, settings)

    def _path(self, k: int):
        return self.dir / f"chunk_{k:05d}.json"

    def load(self, k: int, start: int, stop: int) -> Optional[Any]:
        """The saved result of chunk k (examples start..stop), or None when it was not finished."""
        from ..io import read_json

        try:
            rec = read_json(self._path(k))
        except (FileNotFoundError, ValueError):
            return None
        if rec.get("key") != self.key or (rec.get("start"), rec.get("stop")) != (start, stop):
            return None
        self.resumed += 1
        return rec["result"]

    def save(self, k: int, start: int, stop: int, result: Any) -> None:
        from ..io import write_json

        if not self._described:
            write_json(self.dir / "key.json", {"key": self.key, **self.settings})
            self._described = True
        write_json(self._path(k), {"chunk": k, "start": start, "stop": stop, "key": self.key, "result": result})
        self.computed += 1

    def counts(self, total: int) -> Dict[str, int]:
        """{"total", "resumed", "computed"}: how many chunks were read back and how many were attacked."""
        return {"total": total, "resumed": self.resumed, "computed": self.computed}
