"""Artifact directories of the semantic stages: atomic replacement, reuse keys, fingerprints.

Each stage writes one directory (`latents/`, `clusters/`, `dictionaries/`) with a `manifest.json`
holding a *reuse key*: the hashes and settings the artifact was made from. Re-running a stage with
the same key reuses the directory; a different key is refused (ArtifactMismatchError, nothing is
touched) unless `overwrite=True`. Directories live on a local disk or in object storage (a `Location`).
A directory is built under a temporary name next to its final place, then committed: renamed in on a
local disk; in object storage the old manifest goes first, the files are copied in (server-side) and
the manifest is written last. A reader trusts a directory only through its manifest, so a crash never
leaves a half-written artifact that a later stage would read.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch

from ..location import Location, Where, as_location
from .errors import ArtifactMismatchError, MissingArtifactError

MANIFEST = "manifest.json"


@contextlib.contextmanager
def atomic_dir(path: Where) -> Iterator[Location]:
    """Yield an empty temporary directory next to `path`; on success it replaces `path` whole."""
    dest = as_location(path)
    if dest.is_local:
        yield from _atomic_local_dir(dest.local_path())
        return
    staging = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        yield staging
        files = [rel for rel, _ in staging.files()]
        (dest / MANIFEST).delete()  # from here on readers see no artifact, never a mixed one
        dest.delete()
        for rel in sorted(files, key=lambda r: r == MANIFEST):  # the manifest last: it commits the directory
            (staging / rel).copy_to(dest / rel)
    finally:
        staging.delete()


def _atomic_local_dir(path: Path) -> Iterator[Location]:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield Location(tmp)
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


def save_npy(path: Location, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    path.write_bytes(buf.getvalue())


def save_npz(path: Location, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())


def load_npy(path: Location) -> Any:
    """An array (.npy) or an archive of arrays (.npz) from a local path or URI."""
    return np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)


def read_manifest(directory: Where, *, stage: str, hint: str) -> Dict[str, Any]:
    """The manifest of an artifact directory, or MissingArtifactError saying which stage makes it."""
    directory = as_location(directory)
    path = directory / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingArtifactError(f"{stage} artifact {directory.uri!r} is missing (no {MANIFEST}); {hint}") from None
    except json.JSONDecodeError as e:
        raise MissingArtifactError(f"{path} is not valid JSON ({e}); delete {directory.uri!r} and {hint}") from None


def check_reuse(directory: Where, key: Dict[str, Any], *, stage: str,
                overwrite: bool) -> Optional[Dict[str, Any]]:
    """The existing manifest when `directory` was made from `key`; None when it must be (re)built.

    A directory made from other inputs raises ArtifactMismatchError naming what differs, unless
    `overwrite` is set.
    """
    directory = as_location(directory)
    manifest = None
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        if not directory.exists():
            return None
    except json.JSONDecodeError:
        manifest = None
    old_key = manifest.get("reuse_key") if isinstance(manifest, dict) else None
    if old_key == _jsonable(key):
        return manifest
    if overwrite:
        return None
    if old_key is None:
        what = f"it has no readable {MANIFEST}"
    else:
        diff = [k for k in sorted(set(old_key) | set(key)) if old_key.get(k) != _jsonable(key).get(k)]
        what = "; ".join(f"{k}: on disk {_short(old_key.get(k))}, now {_short(_jsonable(key).get(k))}" for k in diff)
    raise ArtifactMismatchError(
        f"{stage} artifact {directory.uri!r} was made from other inputs ({what}); refusing to overwrite it. "
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
