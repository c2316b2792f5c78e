"""Checkpoints: safe format, integrity, refusal of malicious pickles."""
import os
import pickle

import pytest
import torch

from rayrobust.checkpoint import (latest_valid_checkpoint, load_checkpoint, model_from_checkpoint,
                                  save_checkpoint, checkpoint_name)
from rayrobust.errors import CheckpointError
from rayrobust.models import create_model

META = {"name": "small_cnn", "num_classes": 10, "in_channels": 1, "input_size": 8, "mean": [0.3], "std": [0.4]}


def _save(path, epoch=1, seed=0):
    torch.manual_seed(seed)
    model = create_model("small_cnn", input_size=8, mean=[0.3], std=[0.4])
    save_checkpoint(path, {"model": model.state_dict(), "epoch": epoch, "config": {"train": {"method": "standard"}},
                           "model_meta": META, "history": [], "provenance": {}})
    return model


def test_roundtrip_restores_identical_model(tmp_path):
    path = tmp_path / "ck" / checkpoint_name(1)
    model = _save(path)
    loaded = model_from_checkpoint(path)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(model.eval()(x), loaded(x))
    assert (path.parent / (path.name + ".sha256")).exists()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / checkpoint_name(1)
    _save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    os.remove(str(path) + ".sha256")  # no sidecar: the loader itself must notice
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_bit_flip_detected_by_checksum(tmp_path):
    path = tmp_path / checkpoint_name(1)
    _save(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['RR_PWNED']}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("RR_PWNED", str(marker))
    path = tmp_path / checkpoint_name(1)
    torch.save({"format": "rayrobust-checkpoint-v1", "model": _Payload()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(CheckpointError):
        load_checkpoint(plain)
    assert not marker.exists()


def test_latest_valid_skips_a_corrupt_newest(tmp_path):
    _save(tmp_path / checkpoint_name(1), epoch=1)
    _save(tmp_path / checkpoint_name(2), epoch=2)
    (tmp_path / checkpoint_name(2)).write_bytes(b"garbage")
    assert latest_valid_checkpoint(tmp_path) == tmp_path / checkpoint_name(1)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    foreign = tmp_path / "sd.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a rayrobust checkpoint"):
        load_checkpoint(foreign)
