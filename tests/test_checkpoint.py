"""Checkpoints: safe format, integrity, refusal of malicious pickles."""
import os
import pickle

import pytest
import torch

from rayrobust.checkpoint import (CHECKPOINT_FILE, checkpoint_name, checkpoint_sha256, latest_valid_checkpoint,
                                  list_checkpoints, load_checkpoint, model_from_checkpoint, save_checkpoint)
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
    ckpt = tmp_path / "ck" / checkpoint_name(1)  # a checkpoint directory, as Ray Train persists it
    model = _save(ckpt)
    loaded = model_from_checkpoint(ckpt)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(model.eval()(x), loaded(x))
    assert sorted(p.name for p in ckpt.iterdir()) == [CHECKPOINT_FILE, CHECKPOINT_FILE + ".sha256"]
    assert torch.equal(model_from_checkpoint(ckpt / CHECKPOINT_FILE)(x), loaded(x))  # the file itself loads too


def test_checkpoints_in_object_storage(s3_server):
    """The same format in a bucket: saved, listed by epoch, verified, and a bit flip there is caught."""
    root = s3_server.make_bucket("ckpt-test") + "/run/checkpoints"
    models = [_save(f"{root}/{checkpoint_name(e)}", epoch=e, seed=e) for e in (1, 2, 10)]
    assert [c.name for c in list_checkpoints(root)] == ["epoch_001", "epoch_002", "epoch_010"]
    latest = latest_valid_checkpoint(root)
    assert latest.uri == f"{root}/epoch_010" and load_checkpoint(latest)["epoch"] == 10
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(model_from_checkpoint(latest)(x), models[2].eval()(x))
    assert checkpoint_sha256(latest) == (latest / (CHECKPOINT_FILE + ".sha256")).read_text().strip()
    data = bytearray((latest / CHECKPOINT_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (latest / CHECKPOINT_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(latest)
    assert latest_valid_checkpoint(root).name == "epoch_002"  # the corrupt newest is skipped


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "epoch_001.pt"  # a single-file checkpoint (older runs) loads the same way
    _save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    os.remove(str(path) + ".sha256")  # no sidecar: the loader itself must notice
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_bit_flip_detected_by_checksum(tmp_path):
    path = tmp_path / checkpoint_name(1) / CHECKPOINT_FILE
    _save(path.parent)
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
    path = tmp_path / "epoch_001.pt"
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
    (tmp_path / checkpoint_name(2) / CHECKPOINT_FILE).write_bytes(b"garbage")
    assert latest_valid_checkpoint(tmp_path).local_path() == tmp_path / checkpoint_name(1)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    foreign = tmp_path / "sd.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a rayrobust checkpoint"):
        load_checkpoint(foreign)
