"""Artifact directories of the semantic stages: atomic replacement, reuse keys, fingerprints.

Each stage writes one directory (`latents/`, `clusters/`, `dictionaries/`) with a `manifest.json`
holding a *reuse key*: the hashes and settings the artifact was made from. Re-running a stage with
the same key reuses the directory; a different key is refused (ArtifactMismatchError, nothing is
touched) unless `overwrite=True`. A directory is built under a temporary name next to its final
place and renamed in, so a crash never leaves a half-written artifact that a later stage would read.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch

from .errors import ArtifactMismatchError, MissingArtifactError

MANIFEST = "manifest.json"


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory next to `path`; on success it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():  # overwrite: move the old one aside first, drop it after the rename
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_manifest(directory: str | os.PathLike, *, stage: str, hint: str) -> Dict[str, Any]:
    """The manifest of an artifact directory, or MissingArtifactError saying which stage makes it."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise MissingArtifactError(f"{stage} artifact {str(Path(directory))!r} is missing (no {MANIFEST}); {hint}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MissingArtifactError(f"{path} is not valid JSON ({e}); delete {str(Path(directory))!r} and {hint}") from None


def check_reuse(directory: str | os.PathLike, key: Dict[str, Any], *, stage: str,
                overwrite: bool) -> Optional[Dict[str, Any]]:
    """The existing manifest when `directory` was made from `key`; None when it must be (re)built.

    A directory made from other inputs raises ArtifactMismatchError naming what differs, unless
    `overwrite` is set.
    """
    directory = Path(directory)
    if not directory.exists():
        return None
    manifest_path = directory / MANIFEST
    old_key = None
    if manifest_path.is_file():
        try:
            old_key = json.loads(manifest_path.read_text()).get("reuse_key")
        except (json.JSONDecodeError, AttributeError):
            old_key = None
    if old_key == _jsonable(key):
        return json.loads(manifest_path.read_text())
    if overwrite:
        return None
    if old_key is None:
        what = f"it has no readable {MANIFEST}"
    else:
        diff = [k for k in sorted(set(old_key) | set(key)) if old_key.get(k) != _jsonable(key).get(k)]
        what = "; ".join(f"{k}: on disk {_short(old_key.get(k))}, now {_short(_jsonable(key).get(k))}" for k in diff)
    raise ArtifactMismatchError(
        f"{stage} artifact {str(directory)!r} was made from other inputs ({what}); refusing to overwrite it. "
        f"Use another run directory, delete it, or pass overwrite=True (CLI: --set semantic.overwrite=true)"
    )


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _short(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


# ------------------------------------------------------------------------------------------------
# Fingerprints: what an artifact's inputs were, cheap enough to recompute on every run
# ------------------------------------------------------------------------------------------------
def sha256_arrays(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def module_sha256(model: torch.nn.Module) -> str:
    """sha256 over a module's state_dict (names, dtypes, shapes, bytes): the identity of its weights."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        a = t.detach().cpu().contiguous()
        h.update(f"{name}:{a.dtype}:{tuple(a.shape)}".encode())
        h.update(a.view(torch.uint8).numpy().tobytes() if a.numel() else b"")
    return h.hexdigest()


def dataset_sha256(x: torch.Tensor, y: torch.Tensor) -> str:
    """sha256 of a dataset's images (N, C, H, W) float32 and labels (N,) int64."""
    return sha256_arrays(x.detach().cpu().contiguous().numpy(), y.detach().cpu().contiguous().numpy())
