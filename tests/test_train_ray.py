"""Ray Train: multi-worker runs, checkpoints per epoch, resume that continues the same run."""
import json
import shutil

import pytest
import torch

from rayrobust.checkpoint import CHECKPOINT_FILE, list_checkpoints, load_checkpoint
from rayrobust.errors import ConfigError
from rayrobust.train import fit

from conftest import tiny_config

pytestmark = pytest.mark.ray


@pytest.mark.extended  # the default run trains on 2 workers across 2 nodes (tests/test_cluster_s3.py)
def test_two_worker_run_writes_checkpoints_and_metrics(ray_cluster, tmp_path):
    cfg = tiny_config(tmp_path, train={"num_workers": 2, "method": "pgd_at", "epochs": 2, "lr": 0.2})
    result = fit(cfg, tmp_path / "pgd_at")
    assert result.epochs == 2 and result.resumed_from is None
    ckpts = list_checkpoints(tmp_path / "pgd_at" / "checkpoints")
    assert [p.name for p in ckpts] == ["epoch_001", "epoch_002"]  # Ray Train checkpoint directories
    payload = load_checkpoint(ckpts[-1])
    assert payload["provenance"]["world_size"] == 2
    assert payload["config"]["train"]["method"] == "pgd_at"
    lines = (tmp_path / "pgd_at" / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert {"loss", "val_clean_acc", "val_pgd2_acc", "images_per_s"} <= set(m)
        assert 0 <= m["val_pgd2_acc"] <= m["val_clean_acc"] <= 1
    assert metrics[-1]["val_clean_acc"] > 0.5  # digits learns fast even adversarially


@pytest.mark.extended
def test_resume_replays_the_uninterrupted_run(ray_cluster, tmp_path):
    cfg = tiny_config(tmp_path, train={"method": "fgsm_rs", "epochs": 2})
    full = fit(cfg, tmp_path / "a")
    final = load_checkpoint(full.checkpoint)
    # Crash after epoch 1: the newest checkpoint never made it.
    shutil.rmtree(tmp_path / "a" / "checkpoints" / "epoch_002")
    resumed = fit(cfg, tmp_path / "a")
    assert resumed.resumed_from == 1 and resumed.epochs == 2
    again = load_checkpoint(resumed.checkpoint)
    for k, v in final["model"].items():
        assert torch.allclose(v, again["model"][k], atol=1e-6), k
    assert [m["epoch"] for m in again["history"]] == [1, 2]
    assert again["history"][0] == final["history"][0]  # epoch 1 is kept, not redone


@pytest.mark.extended
def test_completed_run_is_reused_and_extending_epochs_continues(ray_cluster, tmp_path):
    cfg = tiny_config(tmp_path, train={"epochs": 1})
    first = fit(cfg, tmp_path / "s")
    payload = (first.checkpoint / CHECKPOINT_FILE).local_path()
    stamp = payload.stat().st_mtime_ns
    again = fit(cfg, tmp_path / "s")
    assert again.checkpoint == first.checkpoint and payload.stat().st_mtime_ns == stamp
    longer = fit(tiny_config(tmp_path, train={"epochs": 2}), tmp_path / "s")
    assert longer.resumed_from == 1 and longer.epochs == 2


def test_run_dir_of_another_method_is_refused(ray_cluster, tmp_path):
    fit(tiny_config(tmp_path, train={"epochs": 1}), tmp_path / "x")
    with pytest.raises(ConfigError, match="train.method='standard'"):
        fit(tiny_config(tmp_path, train={"epochs": 1, "method": "pgd_at"}), tmp_path / "x")
