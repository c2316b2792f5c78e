"""Fault tolerance: a worker process killed with SIGKILL mid-run costs time, never results.

(a) Ray Train: one of 2 workers is killed in the middle of epoch 2. FailureConfig restarts the worker
    group, every rank resumes from epoch 1's checkpoint, and the run ends with the same weights and
    metrics as an uninterrupted run with the same seed (tolerance: |Δ| <= 1e-6 on every weight, metrics
    equal except wall-clock ones; in practice bit-identical), with every checkpoint intact.
(b) Sharded AutoAttack: an actor is killed while it attacks its chunk. Ray restarts it and retries the
    chunk with the same seed; the evaluation equals an undisturbed one exactly.
"""
import json
import os
import signal
import threading
import time

import pytest
import torch

from rayrobust.checkpoint import checkpoint_name, checkpoint_sha256, list_checkpoints, load_checkpoint
from rayrobust.evaluation.sharded import sharded_autoattack
from rayrobust.io import sha256_file
from rayrobust.train import fit

from conftest import tiny_config

# Extended tier: the worker-node kill on the 2-node cluster (tests/test_cluster_s3.py, test_c) is the default run's
# fault test; these are the single-node variants (a worker process, an AutoAttack actor).
pytestmark = [pytest.mark.ray, pytest.mark.faults, pytest.mark.extended, pytest.mark.timeout(240)]

WALL_CLOCK = {"seconds", "images_per_s", "epoch_seconds"}


def _poll(predicate, timeout: float, every: float = 0.02):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    return None


def _read_json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Killer(threading.Thread):
    """Waits until `find()` names a pid, then SIGKILLs it once and records what the run looked like then."""

    def __init__(self, find, snapshot, timeout: float = 150):
        super().__init__(daemon=True)
        self.find, self.snapshot, self.timeout = find, snapshot, timeout
        self.killed = None
        self.seen = None

    def run(self):
        pid = _poll(self.find, self.timeout)
        if pid:
            self.seen = self.snapshot()
            os.kill(pid, signal.SIGKILL)
            self.killed = pid


def test_killed_training_worker_resumes_from_last_checkpoint_and_matches_uninterrupted_run(ray_cluster, tmp_path):
    torch.set_num_threads(1)
    # PGD-AT with 8 steps and small batches: an epoch takes seconds, so the kill lands inside epoch 2.
    cfg = tiny_config(tmp_path, train={"num_workers": 2, "method": "pgd_at", "epochs": 3, "batch_size": 32,
                                       "attack_steps": 8, "lr": 0.1, "max_failures": 2})
    run = tmp_path / "killed"
    ckpts = run / "checkpoints"

    def rank1_in_epoch2():
        rec = _read_json(run / "workers" / "rank1.json")
        return rec["pid"] if rec and rec["epoch"] == 2 and (ckpts / checkpoint_name(1)).exists() else None

    def snapshot():
        return {"checkpoints": [p.name for p in list_checkpoints(ckpts)],
                "epoch1_sha": checkpoint_sha256(ckpts / checkpoint_name(1))}

    killer = Killer(rank1_in_epoch2, snapshot)
    killer.start()
    result = fit(cfg, run)
    killer.join(timeout=5)
    assert killer.killed, "rank 1 never reached epoch 2"
    assert killer.seen["checkpoints"] == [checkpoint_name(1)]  # the kill landed mid-epoch 2

    # The worker group was restarted and resumed from epoch 1's checkpoint (not from scratch).
    for rank in (0, 1):
        rec = _read_json(run / "workers" / f"rank{rank}.json")
        assert rec["start_epoch"] == 1 and rec["epoch"] == 3 and rec["pid"] != killer.killed
    # No checkpoint lost or corrupted; epoch 1's file is the one written before the kill.
    assert [p.name for p in list_checkpoints(ckpts)] == [checkpoint_name(e) for e in (1, 2, 3)]
    assert checkpoint_sha256(ckpts / checkpoint_name(1)) == killer.seen["epoch1_sha"]
    assert sha256_file(ckpts / checkpoint_name(1) / "checkpoint.pt") == killer.seen["epoch1_sha"]
    assert not [p for p in ckpts.rglob(".*") if p.is_file() and p.suffix == ".tmp"]  # no temp file left
    for p in list_checkpoints(ckpts):
        load_checkpoint(p)  # verifies the sha256 sidecar
    assert result.epochs == 3

    reference = fit(cfg, tmp_path / "uninterrupted")
    got, want = load_checkpoint(result.checkpoint), load_checkpoint(reference.checkpoint)
    for k, v in want["model"].items():
        assert torch.allclose(got["model"][k].float(), v.float(), rtol=0, atol=1e-6), k
    strip = lambda h: [{k: v for k, v in m.items() if k not in WALL_CLOCK} for m in h]  # noqa: E731
    assert strip(got["history"]) == strip(want["history"])
    assert [m["epoch"] for m in got["history"]] == [1, 2, 3]


def test_killed_autoattack_actor_is_restarted_and_the_result_is_unchanged(ray_cluster, digits_model, digits, tmp_path):
    torch.set_num_threads(1)
    _, test = digits
    x, y = test.x[:20], test.y[:20]
    kwargs = dict(eps=0.1, seed=5, chunk_size=10, num_shards=2)
    undisturbed = sharded_autoattack(digits_model, x, y, **kwargs)

    pids = tmp_path / "pids"
    pids.mkdir()

    class Tripwire(torch.nn.Module):
        """The same model; the first forward in each process leaves the pid where the test can find it."""

        def __init__(self, inner, where):
            super().__init__()
            self.inner, self.where, self.noted = inner, str(where), False

        def forward(self, inp):
            if not self.noted:
                self.noted = True
                open(os.path.join(self.where, str(os.getpid())), "w").close()
            return self.inner(inp)

    def an_attacking_actor():
        found = sorted(pids.iterdir(), key=lambda p: p.stat().st_mtime)
        return int(found[0].name) if found else None

    killer = Killer(an_attacking_actor, lambda: None)
    killer.start()
    disturbed = sharded_autoattack(Tripwire(digits_model, pids), x, y, **kwargs)
    killer.join(timeout=5)
    assert killer.killed
    assert disturbed["broken_by"] == undisturbed["broken_by"]
    # The killed process finished nothing; its chunk was attacked again by the restarted actor.
    assert str(killer.killed) not in disturbed["workers"]
    assert sum(disturbed["workers"].values()) == len(x)
    assert len(list(pids.iterdir())) >= 3  # 2 actors + at least 1 restarted process
