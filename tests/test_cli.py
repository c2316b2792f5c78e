"""The command line: --help everywhere, and bad input -> one readable line, exit 2, nothing overwritten."""
import os
import subprocess
import sys

import pytest
import torch

from rayrobust.checkpoint import CHECKPOINT_FILE, checkpoint_name, save_checkpoint
from rayrobust.cli import COMMANDS, main


def run_cli(*args, env=None, cwd=None):
    full_env = {**os.environ, "RAYROBUST_DASHBOARD": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", "rayrobust.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=300)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr  # one readable line, no traceback
    assert lines[0].startswith("rayrobust: error: ")
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage: rayrobust " + command in capsys.readouterr().out


@pytest.mark.parametrize("override, fragments", [
    ("train.method=pgd-at", ["unknown method 'pgd-at'", "pgd_at", "trades"]),
    ("model.name=resnet", ["unknown model 'resnet'", "small_cnn", "preact_resnet18"]),
    ("data.name=mnist", ["unknown dataset 'mnist'", "fashion_mnist", "cifar10"]),
    ("eval.eps=0", ["eval.eps=0", "(0, 1]"]),
    ("train.eps=2", ["train.eps=2", "(0, 1]"]),
    ("train.epoks=2", ["unknown config key 'train.epoks'", "epochs"]),
])
def test_bad_config_is_one_line_error_and_writes_nothing(tmp_path, override, fragments):
    run_dir = tmp_path / "run"
    proc = run_cli("train", "--config", "configs/demo.yaml", "--set", f"run_dir={run_dir}", "--set", override)
    assert_one_line_error(proc, *fragments)
    assert not run_dir.exists()


def test_missing_dataset_files_name_the_fix(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("train", "--config", "configs/demo.yaml", "--set", f"run_dir={run_dir}",
                   "--set", f"data.root={tmp_path / 'empty'}", "--set", "data.name=cifar10")
    assert_one_line_error(proc, "cifar10 not found", "data.download=true")
    assert not (run_dir / "standard" / "checkpoints").exists()


def _write_checkpoint(path):
    from rayrobust.models import create_model

    model = create_model("small_cnn", input_size=8)
    meta = {"name": "small_cnn", "num_classes": 10, "in_channels": 1, "input_size": 8, "mean": [0.5], "std": [0.5]}
    save_checkpoint(path, {"model": model.state_dict(), "epoch": 1, "history": [], "model_meta": meta,
                           "config": {"train": {"method": "standard", "eps": 0.1, "attack_steps": 7},
                                      "data": {"name": "digits"}}, "provenance": {}})


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_checkpoint_is_refused_and_earlier_eval_kept(tmp_path, damage):
    ckpt = tmp_path / checkpoint_name(1)  # a checkpoint directory, as training writes it
    _write_checkpoint(ckpt)
    payload = ckpt / CHECKPOINT_FILE
    data = payload.read_bytes()
    payload.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"\x00" * 100)
    out = tmp_path / "eval.json"
    out.write_text('{"earlier": true}\n')
    proc = run_cli("evaluate", "--config", "configs/demo.yaml", "--checkpoint", str(ckpt), "--out", str(out))
    assert_one_line_error(proc, str(ckpt), "corrupt")
    assert out.read_text() == '{"earlier": true}\n'


def test_evaluate_without_any_checkpoint(tmp_path):
    proc = run_cli("evaluate", "--config", "configs/demo.yaml", "--set", f"run_dir={tmp_path}")
    assert_one_line_error(proc, "no checkpoint", "rayrobust train")


def test_list_shows_every_registry():
    proc = run_cli("list")
    assert proc.returncode == 0
    for name in ("fashion_mnist", "small_cnn", "pgd_at", "fgsm_rs", "pgd"):
        assert name in proc.stdout


def test_jobs_entry_points_forward_to_the_cli(tmp_path):
    proc = subprocess.run([sys.executable, "jobs/pipeline.py", "--config", "configs/demo.yaml", "--set", "eval.eps=5"],
                          capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc, "eval.eps=5")
