"""Atomic artifact writes and provenance.

Every artifact goes through a `Location` (a local path or a storage URI): a local file is written to a
temporary name and renamed into place, an object-store object appears only when complete, so a crash
never leaves a half-written file that a later stage would read.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from .location import Location, Where, as_location


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: "Where", obj: Any) -> "Location":
    """Atomically write `obj` as indented JSON to a local path or storage URI."""
    loc = as_location(path)
    loc.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    return loc


def write_jsonl(path: "Where", rows: list) -> "Location":
    """Atomically write one JSON object per line."""
    loc = as_location(path)
    loc.write_text("".join(json.dumps(r, default=_json_default) + "\n" for r in rows))
    return loc


def read_json(path: "Where") -> Any:
    """A JSON file from a local path or storage URI (FileNotFoundError when absent, ValueError when not JSON)."""
    return json.loads(as_location(path).read_text())


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (Path, Location)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_file(path: "Where", chunk: int = 1 << 20) -> str:
    """sha256 of a file on a local path or storage URI, streamed."""
    loc = as_location(path)
    h = hashlib.sha256()
    if loc.is_local:
        with open(loc.path, "rb") as f:
            for block in iter(lambda: f.read(chunk), b""):
                h.update(block)
    else:
        with loc.open_input() as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def git_commit() -> Optional[str]:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> Dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("rayrobust", "torch", "torchvision", "ray", "numpy", "pyautoattack", "faiss-cpu", "optuna"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def hardware() -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import torch

        info["cuda"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
    except ImportError:
        pass
    return info


def provenance(config: Optional[Dict[str, Any]] = None, seed: Optional[int] = None, **extra: Any) -> Dict[str, Any]:
    """What produced an artifact: config, seed, commit, versions, hardware, time (+ extra keys)."""
    prov: Dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": git_commit(),
        "versions": package_versions(),
        "hardware": hardware(),
    }
    if seed is not None:
        prov["seed"] = seed
    if config is not None:
        prov["config"] = config
    prov.update(extra)
    return prov
