"""Checkpoints in a safe format.

A checkpoint is one file written with `torch.save` holding only tensors and plain Python values
(model and optimizer state, epoch, config, provenance, model metadata) and read back with
`torch.load(weights_only=True)`, which refuses to unpickle arbitrary objects: a malicious pickle is
rejected before any of its code runs. A `.sha256` sidecar written next to it detects corruption.
"""
from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .errors import CheckpointError
from .io import atomic_path, sha256_file

FORMAT = "rayrobust-checkpoint-v1"
_EPOCH_FILE = re.compile(r"^epoch_(\d{3,})\.pt$")


def checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}.pt"


def save_checkpoint(path: str | Path, payload: Dict[str, Any]) -> Path:
    """Atomically write `payload` (plain values and tensors) and its sha256 sidecar."""
    path = Path(path)
    payload = {"format": FORMAT, **payload}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
        digest = sha256_file(tmp)
        with atomic_path(_sidecar(path)) as tmp_sum:
            tmp_sum.write_text(digest + "\n")
    return path


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> Dict[str, Any]:
    """Load and verify a checkpoint; every failure is a CheckpointError saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; train first (`rayrobust train`) or pass an existing file")
    side = _sidecar(path)
    if side.exists():
        expected = side.read_text().strip()
        if expected and sha256_file(path) != expected:
            raise CheckpointError(
                f"checkpoint {str(path)!r} is corrupt or truncated (sha256 does not match {side.name}); "
                "delete it to resume from the previous epoch, or retrain"
            )
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore", UserWarning)
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was refused: it contains pickled objects other than tensors and "
            f"plain values, which could run code when loaded ({str(e).splitlines()[0][:160]}). "
            "Only load checkpoints written by rayrobust or saved as a plain state_dict"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
            "delete it to resume from the previous epoch, or retrain"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is not a rayrobust checkpoint (no '{FORMAT}' header); "
            "to evaluate your own model use rayrobust.evaluate(model, ...) from Python"
        )
    return payload


def list_checkpoints(directory: str | Path) -> List[Path]:
    """Epoch checkpoints in a directory, oldest first (temporary files are ignored)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _EPOCH_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def load_latest_checkpoint(directory: str | Path) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """(path, payload) of the newest checkpoint that loads and verifies; a corrupt newest one is
    skipped with a warning. None when there is none."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            print(f"warning: skipping {e}", flush=True)
    return None


def latest_valid_checkpoint(directory: str | Path) -> Optional[Path]:
    """The newest checkpoint that loads and verifies (see `load_latest_checkpoint`)."""
    found = load_latest_checkpoint(directory)
    return found[0] if found else None


def model_from_checkpoint(path: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model a checkpoint was trained as, with its weights, in eval mode."""
    from .models import create_model

    payload = load_checkpoint(path)
    meta = payload["model_meta"]
    model = create_model(
        meta["name"], num_classes=meta["num_classes"], in_channels=meta["in_channels"],
        input_size=meta["input_size"], mean=meta["mean"], std=meta["std"],
    )
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit model {meta['name']!r}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval()
