"""Checkpoints in a safe format, on a local disk or in object storage.

A checkpoint is one file, `checkpoint.pt`, written with `torch.save` holding only tensors and plain
Python values (model and optimizer state, epoch, config, provenance, model metadata) and read back
with `torch.load(weights_only=True)`, which refuses to unpickle arbitrary objects: a malicious pickle
is rejected before any of its code runs. A `checkpoint.pt.sha256` sidecar detects corruption.

Training stores one checkpoint per epoch as a Ray Train checkpoint directory,
`<run_dir>/<method>/checkpoints/epoch_003/checkpoint.pt`, persisted by Ray Train to the run's
storage (local path or URI). A path to a checkpoint may name that directory or the file itself;
single files named `epoch_003.pt` (older runs) load too.
"""
from __future__ import annotations

import io
import pickle
import re
import warnings
import zipfile
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .errors import CheckpointError
from .location import Location, Where, as_location

FORMAT = "rayrobust-checkpoint-v1"
CHECKPOINT_FILE = "checkpoint.pt"  # the payload inside a checkpoint directory
_EPOCH = re.compile(r"^epoch_(\d{3,})(\.pt)?$")  # epoch_003/ (a Ray Train checkpoint) or epoch_003.pt


def checkpoint_name(epoch: int) -> str:
    """The directory name of an epoch's checkpoint (Ray Train's checkpoint_dir_name)."""
    return f"epoch_{epoch:03d}"


def checkpoint_epoch(where: Where) -> int:
    loc = as_location(where)
    m = _EPOCH.match(loc.parent.name if loc.name == CHECKPOINT_FILE else loc.name)
    return int(m.group(1)) if m else 0


def payload_file(where: Where) -> Location:
    """The payload file of a checkpoint: the path itself when it names a .pt file or any other file,
    else <dir>/checkpoint.pt (a Ray Train checkpoint directory)."""
    loc = as_location(where)
    return loc if loc.suffix == ".pt" or loc.is_file() else loc / CHECKPOINT_FILE


def _encode(payload: Dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buf)
    return buf.getvalue()


def save_checkpoint(where: Where, payload: Dict[str, Any]) -> Location:
    """Atomically write `payload` (plain values and tensors) and its sha256 sidecar; returns the file."""
    import hashlib

    dest = payload_file(where)
    data = _encode(payload)
    dest.write_bytes(data)
    _sidecar(dest).write_text(hashlib.sha256(data).hexdigest() + "\n")
    return dest


def _sidecar(path: Location) -> Location:
    return path.with_name(path.name + ".sha256")


def checkpoint_sha256(where: Where) -> str:
    """The sha256 of a checkpoint's payload (from its sidecar when there is one: no second download)."""
    from .io import sha256_file

    path = payload_file(where)
    try:
        digest = _sidecar(path).read_text().strip()
    except FileNotFoundError:
        digest = ""
    return digest or sha256_file(path)


def load_checkpoint(where: Where, *, map_location: str | torch.device = "cpu") -> Dict[str, Any]:
    """Load and verify a checkpoint; every failure is a CheckpointError saying what is wrong."""
    import hashlib

    path = payload_file(where)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; train first (`rayrobust train`) or "
                              "pass an existing checkpoint") from None
    try:
        expected = _sidecar(path).read_text().strip()
    except FileNotFoundError:
        expected = ""
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or truncated (sha256 does not match {path.name}.sha256); "
            "delete it to resume from the previous epoch, or retrain"
        )
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore", UserWarning)
            payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
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


def list_checkpoints(directory: Where) -> List[Location]:
    """Epoch checkpoints (epoch_003/ directories or epoch_003.pt files) in a directory, oldest first."""
    found = [(int(m.group(1)), p) for p in as_location(directory).iterdir() if (m := _EPOCH.match(p.name))]
    return [p for _, p in sorted(found, key=lambda t: t[0])]


def load_latest_checkpoint(directory: Where) -> Optional[Tuple[Location, Dict[str, Any]]]:
    """(path, payload) of the newest checkpoint that loads and verifies; a corrupt newest one is
    skipped with a warning. None when there is none."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            print(f"warning: skipping {e}", flush=True)
    return None


def latest_valid_checkpoint(directory: Where) -> Optional[Location]:
    """The newest checkpoint that loads and verifies (see `load_latest_checkpoint`)."""
    found = load_latest_checkpoint(directory)
    return found[0] if found else None


def best_validation_epoch(history: List[Dict[str, Any]]) -> Optional[Tuple[int, str, float]]:
    """(epoch, metric, value) of the epoch with the highest validation PGD accuracy (`val_pgd<k>_acc`; the
    earliest on ties), or None when no epoch was validated under attack."""
    best = None
    for m in history:
        key = next((k for k in m if k.startswith("val_pgd") and k.endswith("_acc")), None)
        if key is not None and (best is None or m[key] > best[2]):
            best = (int(m["epoch"]), key, float(m[key]))
    return best


def selected_checkpoint(directory: Where) -> Optional[Tuple[Location, Dict[str, Any]]]:
    """(path, selection) of the checkpoint a run is evaluated from: the newest valid one, or, when it was
    trained with `train.early_stopping` (Rice et al. 2020), the epoch with the best validation PGD accuracy.
    `selection` says which: {"rule", "epoch", ("metric", "value")}. None when there is no valid checkpoint."""
    found = load_latest_checkpoint(directory)
    if found is None:
        return None
    path, payload = found
    latest = {"rule": "last epoch", "epoch": int(payload["epoch"])}
    if not payload.get("config", {}).get("train", {}).get("early_stopping"):
        return path, latest
    best = best_validation_epoch(payload.get("history", []))
    if best is None:
        return path, dict(latest, rule="last epoch (early stopping found no validation PGD accuracy)")
    epoch, key, value = best
    chosen = as_location(directory) / checkpoint_name(epoch)
    try:
        load_checkpoint(chosen)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"warning: early stopping's epoch {epoch} is unusable ({str(e).splitlines()[0][:200]}); "
              f"using the last epoch", flush=True)
        return path, dict(latest, rule="last epoch (the best validation epoch's checkpoint is unusable)")
    return chosen, {"rule": f"early stopping: best {key}", "epoch": epoch, "metric": key, "value": value}


class Trained:
    """A checkpoint rebuilt: the model (eval mode), its method with the state saved beside the weights, the
    decision function an attack must target (built on first use: a method without its state has none), and the
    raw payload (config, metadata). Unpacks as (model, method, decision, payload)."""

    def __init__(self, model: nn.Module, method: Any, payload: Dict[str, Any]):
        self.model, self.method, self.payload = model, method, payload
        self._decision: Optional[nn.Module] = None

    @property
    def decision(self) -> nn.Module:
        if self._decision is None:
            self._decision = self.method.decision(self.model).eval()
        return self._decision

    def __iter__(self):
        return iter((self.model, self.method, self.decision, self.payload))


def load_trained(path: Where, *, device: str | torch.device = "cpu") -> Trained:
    """Rebuild (model, method, decision, payload) from a checkpoint (a local path or URI).

    The method is created from the training config with the model's label count and given its saved state
    (DRP prototypes, SPAT weight map, ClusTR clusters, SRD purifier), so `decision` is what was deployed.
    """
    from .methods import create_method, method_kwargs

    payload = load_checkpoint(path)
    model = model_from_payload(payload, path, device=device)
    kwargs = method_kwargs(payload["config"]["train"])
    if payload.get("model_meta", {}).get("num_labels"):
        kwargs["num_classes"] = payload["model_meta"]["num_labels"]
    method = create_method(payload["config"]["train"]["method"], **kwargs)
    if payload.get("method_state"):  # what the method generated outside the model
        method.load_state_dict(payload["method_state"])
    return Trained(model, method, payload)


def model_from_checkpoint(path: Where, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model a checkpoint was trained as, with its weights, in eval mode."""
    return model_from_payload(load_checkpoint(path), path, device=device)


def model_from_payload(payload: Dict[str, Any], path: Where = "checkpoint", *,
                       device: str | torch.device = "cpu") -> nn.Module:
    """The model of an already loaded checkpoint payload (`path` names it in errors)."""
    from .models import create_model

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
