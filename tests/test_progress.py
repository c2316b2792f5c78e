"""Readable progress: the hardware line, bars when interactive (or RAYROBUST_PROGRESS=1), plain lines in logs.

Fast and Ray-free: a tiny CNN epoch, local AutoAttack on a tiny MLP, the Tune trial bar fed fake trials.
"""
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rayrobust import hardware
from rayrobust.progress import ENV, AttackBar, Bar, progress_enabled


class _Stream:
    def __init__(self, tty):
        self.tty = tty

    def isatty(self):
        return self.tty


# --- the hardware line ---------------------------------------------------------------------------------
def test_hardware_line_cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert hardware.hardware_line() == f"hardware: CPU only ({cores} core{'' if cores == 1 else 's'})"


def test_hardware_line_names_faked_cuda_devices(monkeypatch):
    names = ["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: names[i])
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert hardware.hardware_line() == "hardware: 1x NVIDIA H100 80GB HBM3 (CUDA 13.0)"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert hardware.hardware_line() == "hardware: 2x NVIDIA H100 80GB HBM3, 1x NVIDIA A100-SXM4-40GB (CUDA 13.0)"


def test_hardware_line_of_a_ray_cluster_uses_its_totals():
    assert hardware.hardware_line({"CPU": 64.0, "GPU": 8.0, "memory": 1e11}, nodes=2) == \
        "hardware: Ray cluster of 2 nodes: 8 GPUs, 64 CPUs"
    assert hardware.hardware_line({"CPU": 2.0}) == "hardware: Ray cluster: no GPU, 2 CPUs"


def test_the_hardware_line_is_printed_once_per_process(monkeypatch, capsys):
    from rayrobust import raycluster

    monkeypatch.setattr(hardware, "_announced", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(raycluster, "_ray_if_initialized", lambda: None)  # as at the start of a command
    raycluster.announce_cluster_or_local(None)  # no cluster named: this machine, Ray not started
    hardware.announce_hardware()
    err = capsys.readouterr().err
    assert err.splitlines() == [hardware.hardware_line()]
    assert err.startswith("hardware: CPU only (")


# --- when bars are drawn -------------------------------------------------------------------------------
def test_progress_enabled_follows_the_terminal_unless_forced(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert progress_enabled(_Stream(True)) and not progress_enabled(_Stream(False))
    monkeypatch.setattr(sys, "stderr", _Stream(True))
    assert progress_enabled()
    monkeypatch.setenv(ENV, "0")
    assert not progress_enabled(_Stream(True))
    monkeypatch.setenv(ENV, "1")
    assert progress_enabled(_Stream(False))


def test_a_disabled_bar_writes_nothing(capsys):
    with Bar(total=10, desc="x", unit="img", enabled=False) as bar:
        bar.update(10)
        bar.postfix("loss 1")
    assert capsys.readouterr().err == ""


def test_attack_bar_counts_robust_points_left_per_stage(monkeypatch, capsys):
    monkeypatch.setenv(ENV, "1")
    bar = AttackBar(6, ["apgd-ce", "apgd-t"], "AutoAttack")
    bar.stage("apgd-ce", 1, 3)  # a running chunk's stage
    assert "chunk: 1/3 robust after apgd-ce" in capsys.readouterr().err
    bar.chunk(["clean", None, "apgd-ce"])
    assert bar.counts() == {"clean": 2, "apgd-ce": 1, "apgd-t": 1}
    bar.chunk(["apgd-t", None, None])
    assert bar.counts() == {"clean": 5, "apgd-ce": 4, "apgd-t": 3}
    bar.close()
    err = capsys.readouterr().err
    assert "6/6" in err and "img/s" in err
    assert "robust left: clean 5, apgd-ce 4, apgd-t 3 of 6" in err


# --- a training epoch ----------------------------------------------------------------------------------
def _epoch(capsys):
    from rayrobust.methods import create_method
    from rayrobust.models import create_model
    from rayrobust.train.loop import Split, make_optimizer, train_epoch

    torch.manual_seed(0)
    model = create_model("small_cnn", input_size=8)
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    capsys.readouterr()
    stats = train_epoch(model, create_method("standard"), make_optimizer(model, 0.05, 0.9, 0.0),
                        Split(x, y, x[:0], y[:0]), epoch=0, epochs=1, batch_size=8, lr=0.05, seed=0,
                        log=lambda msg: print(msg, file=sys.stderr, flush=True))
    return stats, capsys.readouterr()


def test_training_epoch_draws_a_bar_with_rate_when_forced_on(monkeypatch, capsys):
    monkeypatch.setenv(ENV, "1")
    stats, out = _epoch(capsys)
    assert stats["loss"] > 0
    assert "epoch 1/1" in out.err and "img/s" in out.err and "100%" in out.err
    assert "64/64" in out.err  # 8 steps x 8 images
    assert "loss " in out.err  # the running loss rides on the bar
    assert "step 2/8" not in out.err  # the bar replaces the step lines


def test_training_epoch_logs_step_lines_and_no_bar_when_forced_off(monkeypatch, capsys):
    monkeypatch.setenv(ENV, "0")
    stats, out = _epoch(capsys)
    lines = out.err.splitlines()
    assert [line.split("  loss")[0] for line in lines] == [f"  epoch 1/1  step {s}/8" for s in (2, 4, 6)]
    assert "img/s" not in out.err and "\r" not in out.err and "%|" not in out.err
    assert stats["images_per_s"] > 0


# --- AutoAttack on a tiny MLP, in this process -----------------------------------------------------------
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10)).eval()


def _points():
    g = torch.Generator().manual_seed(1)
    return torch.rand(10, 1, 4, 4, generator=g), torch.randint(0, 10, (10,), generator=g)


def test_run_autoattack_draws_a_bar_with_robust_points_left(monkeypatch, capsys):
    from rayrobust.attacks.autoattack import run_autoattack

    x, y = _points()
    monkeypatch.setenv(ENV, "1")
    shown = run_autoattack(_mlp(), x, y, eps=0.05, version="custom", attacks=["apgd-ce"], chunk_size=5)
    err = capsys.readouterr().err
    monkeypatch.setenv(ENV, "0")
    quiet = run_autoattack(_mlp(), x, y, eps=0.05, version="custom", attacks=["apgd-ce"], chunk_size=5)
    assert shown == quiet  # the bar changes nothing but the screen
    left = sum(b is None for b in shown)
    assert "AutoAttack (custom: apgd-ce)" in err and "img/s" in err and "10/10" in err
    assert f"apgd-ce {left} of 10" in err
    assert capsys.readouterr().err == ""


def _evaluate(capsys):
    from rayrobust.evaluation.core import evaluate

    x, y = _points()
    capsys.readouterr()
    res = evaluate(_mlp(), (x, y), eps=0.5, n=10, n_autoattack=10, pgd_steps=2, chunk_size=5, checks=False,
                   backend="local", label="mlp")
    return res, capsys.readouterr().err


def test_local_evaluate_draws_autoattack_bars_when_forced_on(monkeypatch, capsys):
    monkeypatch.setenv(ENV, "1")
    monkeypatch.setattr(hardware, "_announced", False)
    res, err = _evaluate(capsys)
    assert err.splitlines()[0] == hardware.hardware_line()  # the hardware line comes first
    assert "[mlp] AutoAttack (standard)" in err and "img/s" in err and "10/10" in err
    assert "robust left: clean" in err and "robust after clean" in err  # per chunk, then each stage
    assert "AutoAttack chunk" not in err  # the bar replaces the chunk lines
    assert res["autoattack_acc"] is not None


def test_local_evaluate_prints_chunk_lines_and_no_bar_when_forced_off(monkeypatch, capsys):
    monkeypatch.setenv(ENV, "0")
    res, err = _evaluate(capsys)
    assert "  [mlp] AutoAttack chunk 1/2" in err and "  [mlp] AutoAttack chunk 2/2" in err
    assert "img/s" not in err and "\r" not in err and "%|" not in err
    assert f"  [mlp] AutoAttack (standard) {res['autoattack_acc']:.4f} on n=10" in err


# --- latents and Tune trials -------------------------------------------------------------------------------
def test_extract_latents_bar(capsys):
    from rayrobust.models import create_model
    from rayrobust.semantic.extract import extract_latents

    model = create_model("small_cnn", input_size=8)
    z = extract_latents(model, torch.rand(20, 1, 8, 8), batch_size=8, progress=True)
    err = capsys.readouterr().err
    assert z.shape[0] == 20 and "latents" in err and "20/20" in err and "img/s" in err
    extract_latents(model, torch.rand(20, 1, 8, 8), batch_size=8)
    assert capsys.readouterr().err == ""


def _trial(tid, status):
    return SimpleNamespace(trial_id=tid, status=status)


@pytest.mark.parametrize("forced", ["1", "0"])
def test_tune_trial_bar_counts_finished_trials(monkeypatch, capsys, forced):
    from rayrobust.tune.search import TrialBar

    monkeypatch.setenv(ENV, forced)
    bar = TrialBar(4)
    trials = [_trial("a", "TERMINATED"), _trial("b", "RUNNING"), _trial("c", "PENDING")]  # "a": a resumed one
    bar.on_trial_start(0, trials, trials[1])
    trials[1].status = "RUNNING"
    bar.on_trial_complete(1, trials, trials[1])  # Tune calls it before the status changes
    trials[1].status, trials[2].status = "TERMINATED", "ERROR"
    bar.on_experiment_end(trials)
    err = capsys.readouterr().err
    if forced == "1":
        assert "trials" in err and "3/4" in err and "trial/s" in err and "running" in err
    else:
        assert err == "" and bar.bar is not None and not bar.bar.enabled
