"""Results storage: a run directory mirrored to a pyarrow-filesystem URI (file:// stands in for s3://)."""
import os
from pathlib import Path

import pytest
import torch

from rayrobust.checkpoint import checkpoint_name, list_checkpoints, load_checkpoint, save_checkpoint
from rayrobust.errors import ConfigError
from rayrobust.storage import ENV_VAR, Mirror, StorageError, mirror_for, pull, push, storage_path

from conftest import tiny_config


def _ckpt(path, epoch):
    save_checkpoint(path, {"model": {"w": torch.full((4,), float(epoch))}, "epoch": epoch, "history": [],
                           "config": {}, "model_meta": {}, "provenance": {}})


def _run_dir(root):
    """A run directory as training and evaluation leave it: 3 checkpoints, metrics, eval, node-local state."""
    for e in (1, 2, 3):
        _ckpt(root / "pgd_at" / "checkpoints" / checkpoint_name(e), e)
    (root / "pgd_at" / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (root / "pgd_at" / "eval.json").write_text('{"clean_acc": 0.9}\n')
    (root / "summary.json").write_text("{}\n")
    (root / "pgd_at" / "ray").mkdir()
    (root / "pgd_at" / "ray" / "state.pkl").write_bytes(b"ray train's node-local state")
    (root / "pgd_at" / "workers").mkdir()
    (root / "pgd_at" / "workers" / "rank0.json").write_text("{}")
    (root / "pgd_at" / ".eval.json.123.tmp").write_text("half-written")


def test_storage_path_comes_from_config_then_environment(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert storage_path(cfg) is None and mirror_for(cfg, tmp_path / "run" / "pgd_at") is None
    monkeypatch.setenv(ENV_VAR, "s3://bucket/prefix?region=us-west-2")
    m = mirror_for(cfg, tmp_path / "run" / "pgd_at")
    assert m == Mirror("s3://bucket/prefix?region=us-west-2", "run/pgd_at")
    assert str(m) == "s3://bucket/prefix/run/pgd_at"
    assert mirror_for(cfg, tmp_path / "run").subpath == "run"
    assert mirror_for(cfg, tmp_path / "elsewhere").subpath == "run/elsewhere"
    monkeypatch.setenv(ENV_VAR, "/mnt/nfs/runs")
    with pytest.raises(ConfigError, match="must be a URI"):
        storage_path(cfg)


def test_push_mirrors_artifacts_only_and_sends_only_changes(tmp_path):
    local, store = tmp_path / "run", tmp_path / "store"
    _run_dir(local)
    m = Mirror(store.as_uri(), "run")
    sent = push(local, m)
    assert sorted(sent) == sorted(
        ["summary.json", "pgd_at/eval.json", "pgd_at/metrics.jsonl"]
        + [f"pgd_at/checkpoints/{checkpoint_name(e)}{s}" for e in (1, 2, 3) for s in ("", ".sha256")])
    assert not (store / "run" / "pgd_at" / "ray").exists() and not (store / "run" / "pgd_at" / "workers").exists()
    assert not [p for p in store.rglob("*") if p.name.startswith(".")]  # no temp file left behind
    assert push(local, m) == []  # nothing changed: nothing travels
    (local / "pgd_at" / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    assert push(local, m) == ["pgd_at/metrics.jsonl"]
    assert (store / "run" / "pgd_at" / "metrics.jsonl").read_text().count("epoch") == 2


def test_pull_restores_a_fresh_node_with_the_newest_valid_checkpoint(tmp_path):
    local, store, fresh = tmp_path / "run", tmp_path / "store", tmp_path / "fresh"
    _run_dir(local)
    m = Mirror(store.as_uri(), "run")
    push(local, m)
    # The newest stored checkpoint is corrupt: the node falls back to the one before, verified.
    stored3 = store / "run" / "pgd_at" / "checkpoints" / checkpoint_name(3)
    stored3.write_bytes(stored3.read_bytes()[:100])
    got = pull(m, fresh)
    assert [p.name for p in list_checkpoints(fresh / "pgd_at" / "checkpoints")] == [checkpoint_name(2)]
    assert load_checkpoint(fresh / "pgd_at" / "checkpoints" / checkpoint_name(2))["epoch"] == 2
    assert (fresh / "summary.json").exists() and (fresh / "pgd_at" / "eval.json").read_text() == '{"clean_acc": 0.9}\n'
    assert f"pgd_at/checkpoints/{checkpoint_name(1)}" not in got  # older checkpoints stay in storage
    assert pull(m, fresh) == []  # up to date (the stored epoch 3 is still corrupt and still refused)
    assert push(fresh, Mirror(store.as_uri(), "run")) == []  # what was pulled is not sent back
    assert [p.name for p in list_checkpoints(fresh / "pgd_at" / "checkpoints")] == [checkpoint_name(2)]
    # A local file newer than its stored copy is kept.
    (fresh / "summary.json").write_text('{"local": true}\n')
    pull(m, fresh)
    assert (fresh / "summary.json").read_text() == '{"local": true}\n'


def test_unreachable_storage_is_a_clear_error(tmp_path):
    with pytest.raises(StorageError, match="cannot open storage path"):
        pull(Mirror("nosuchscheme://bucket/x", "run"), tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "a.json").write_text("{}")
    with pytest.raises(StorageError, match="cannot push"):
        push(tmp_path / "run", Mirror(blocker.as_uri(), "run"), attempts=1)


@pytest.mark.ray
def test_training_resumes_from_storage_on_an_empty_run_dir(ray_cluster, tmp_path, monkeypatch):
    """A new head (empty local run_dir) continues the run stored in the storage path."""
    store = tmp_path / "store"
    monkeypatch.setenv(ENV_VAR, store.as_uri())
    from rayrobust.train import fit

    cfg = tiny_config(tmp_path, train={"epochs": 1})
    first = fit(cfg, tmp_path / "run" / "standard")
    stored = store / "run" / "standard"
    assert (stored / "checkpoints" / checkpoint_name(1)).exists() and (stored / "train.json").exists()
    assert (stored / "metrics.jsonl").read_text() == (tmp_path / "run" / "standard" / "metrics.jsonl").read_text()
    os.rename(tmp_path / "run", tmp_path / "old-head")
    longer = fit(tiny_config(tmp_path, train={"epochs": 2}), tmp_path / "run" / "standard")
    assert longer.resumed_from == 1 and longer.epochs == 2
    old = load_checkpoint(tmp_path / "old-head" / "standard" / "checkpoints" / checkpoint_name(1))
    again = load_checkpoint(tmp_path / "run" / "standard" / "checkpoints" / checkpoint_name(1))
    assert all(torch.equal(old["model"][k], again["model"][k]) for k in old["model"])
    assert (stored / "checkpoints" / checkpoint_name(2)).exists()
    assert first.checkpoint.name == checkpoint_name(1)


def test_job_entry_points_pull_before_and_push_after_their_command(tmp_path, monkeypatch, capsys):
    store, local = tmp_path / "store", tmp_path / "run"
    (store / "run" / "standard").mkdir(parents=True)
    (store / "run" / "standard" / "eval.json").write_text('{"from": "storage"}\n')
    local.mkdir()
    (local / "notes.json").write_text('{"from": "this head"}\n')
    monkeypatch.setenv(ENV_VAR, store.as_uri())
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "jobs"))
    from _run import run

    assert run("config", ["--set", f"run_dir={local}"]) == 0
    out = capsys.readouterr().out
    assert "pulled 1 file(s)" in out and "pushed 1 file(s)" in out
    assert (local / "standard" / "eval.json").read_text() == '{"from": "storage"}\n'
    assert (store / "run" / "notes.json").read_text() == '{"from": "this head"}\n'
    monkeypatch.setenv(ENV_VAR, "not-a-uri")
    assert run("config", ["--set", f"run_dir={local}"]) == 2
    assert "rayrobust: error: storage_path='not-a-uri' must be a URI" in capsys.readouterr().err
