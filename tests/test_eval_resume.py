"""Resumable evaluation: finished attack chunks are saved as they finish, keyed by model, data and settings;
an interrupted evaluation recomputes only the rest and ends with the numbers of an undisturbed one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import rayrobust
from rayrobust.evaluation.resume import CHUNKS_DIR

from conftest import digits_arrays, train_mlp

REPO = Path(__file__).resolve().parents[1]
EVAL = dict(eps=0.1, n=60, n_autoattack=60, chunk_size=10, pgd_steps=5, checks=False, verbose=False, seed=1)


@pytest.fixture(scope="module")
def mlp_and_data():
    x_all, y_all = digits_arrays()
    model = train_mlp(x_all[:1500], y_all[:1500], epochs=20)
    return model, x_all[1500:1560], y_all[1500:1560]


def _chunks(root: Path, kind: str = "autoattack") -> list:
    dirs = [d for d in (root / CHUNKS_DIR).iterdir() if d.name.split("-")[0] == kind] if (root / CHUNKS_DIR).exists() else []
    return sorted(p.name for d in dirs for p in d.glob("chunk_*.json"))


def test_chunk_store_keys_by_model_data_and_settings(tmp_path):
    from rayrobust.evaluation.resume import ChunkStore

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.rand(6, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    settings = {"eps": 0.1, "seed": 0, "chunk_size": 3}
    store = ChunkStore.open(tmp_path, "autoattack", model, x, y, settings)
    assert store.load(0, 0, 3) is None
    store.save(0, 0, 3, ["clean", None, "apgd-ce"])
    same = ChunkStore.open(tmp_path, "autoattack", model, x, y, dict(settings))
    assert same.dir == store.dir and same.load(0, 0, 3) == ["clean", None, "apgd-ce"]
    assert same.load(0, 0, 2) is None and same.load(1, 3, 6) is None  # other bounds, unfinished chunk
    assert same.counts(2) == {"total": 2, "resumed": 1, "computed": 0}
    other_weights = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    others = [ChunkStore.open(tmp_path, "autoattack", other_weights, x, y, settings),
              ChunkStore.open(tmp_path, "autoattack", model, x.flip(0), y, settings),
              ChunkStore.open(tmp_path, "autoattack", model, x, y, {**settings, "eps": 0.05}),
              ChunkStore.open(tmp_path, "bpda", model, x, y, settings)]
    assert len({store.dir} | {o.dir for o in others}) == 5
    assert all(o.load(0, 0, 3) is None for o in others)
    (store.dir / "chunk_00000.json").write_text('{"chunk": 0, "sta')  # damaged: as if never finished
    assert ChunkStore.open(tmp_path, "autoattack", model, x, y, settings).load(0, 0, 3) is None


@pytest.mark.extended
def test_rerun_reads_back_finished_chunks_and_recomputes_only_the_rest(mlp_and_data, tmp_path, one_thread):
    model, x, y = mlp_and_data
    kw = {**EVAL, "n": 30, "n_autoattack": 30}
    first = rayrobust.evaluate(model, (x, y), backend="local", resume_dir=tmp_path, **kw)
    aa = first["autoattack"]
    assert aa["chunks"] == {"total": 3, "resumed": 0, "computed": 3}
    assert 0 < first["autoattack_acc"] < first["clean_acc"]  # not vacuous: some points survive, some break
    assert _chunks(tmp_path) == [f"chunk_{k:05d}.json" for k in range(3)]
    (key_dir,) = [d for d in (tmp_path / CHUNKS_DIR).iterdir()]
    described = json.loads((key_dir / "key.json").read_text())
    assert {"model_sha256", "data_sha256", "eps", "seed", "chunk_size", "version"} <= set(described)

    (key_dir / "chunk_00001.json").unlink()  # an evaluation interrupted before chunk 1 finished
    again = rayrobust.evaluate(model, (x, y), backend="local", resume_dir=tmp_path, **kw)
    assert again["autoattack"]["chunks"] == {"total": 3, "resumed": 2, "computed": 1}
    assert again["autoattack"]["per_attack"] == aa["per_attack"] and again["autoattack_acc"] == first["autoattack_acc"]

    (key_dir / "chunk_00000.json").write_text('{"chunk": 0, "sta')  # damaged (not JSON): attacked again
    damaged = rayrobust.evaluate(model, (x, y), backend="local", resume_dir=tmp_path, **kw)
    assert damaged["autoattack"]["chunks"] == {"total": 3, "resumed": 2, "computed": 1}
    assert damaged["autoattack"]["per_attack"] == aa["per_attack"]

    # Another setting or other weights: never the saved chunks.
    other_eps = rayrobust.evaluate(model, (x, y), backend="local", resume_dir=tmp_path,
                                   **{**kw, "eps": 0.05, "n_autoattack": 10})
    assert other_eps["autoattack"]["chunks"] == {"total": 1, "resumed": 0, "computed": 1}
    retrained = train_mlp(*digits_arrays(), epochs=1, seed=1)
    other_model = rayrobust.evaluate(retrained, (x, y), backend="local", resume_dir=tmp_path, **{**kw, "n_autoattack": 10})
    assert other_model["autoattack"]["chunks"] == {"total": 1, "resumed": 0, "computed": 1}
    assert len(list((tmp_path / CHUNKS_DIR).iterdir())) == 3


DRIVER = r'''
import json, os, sys
import torch
import rayrobust

x, y, state, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
model.load_state_dict(torch.load(state))
res = rayrobust.evaluate(model.eval(), (torch.load(x), torch.load(y)), backend="ray", num_shards=1, resume_dir=out,
                         ray_address=os.environ["RAY_ADDRESS"], **json.loads(sys.argv[5]))
print("RESULT " + json.dumps({"autoattack_acc": res["autoattack_acc"], "per_attack": res["autoattack"]["per_attack"],
                              "chunks": res["autoattack"]["chunks"]}), flush=True)
'''


def _attacking_actor_pids() -> list:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith("ray::AutoAttackWorker"):
                pids.append(int(d))
    return pids


@pytest.mark.ray
@pytest.mark.faults
@pytest.mark.extended
def test_killed_actor_then_killed_driver_resume_with_only_the_rest(mlp_and_data, ray_cluster, tmp_path, one_thread):
    model, x, y = mlp_and_data
    for name, t in (("x.pt", x), ("y.pt", y), ("model.pt", model.state_dict())):
        torch.save(t, tmp_path / name)
    out = tmp_path / "eval"
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    args = [sys.executable, str(script), str(tmp_path / "x.pt"), str(tmp_path / "y.pt"), str(tmp_path / "model.pt"),
            str(out), json.dumps(EVAL)]

    driver = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    killed_actor, saved_at_actor_kill = None, 0
    try:
        deadline = time.time() + 300
        while time.time() < deadline and driver.poll() is None:
            saved = len(_chunks(out))
            if killed_actor is None and saved >= 1 and _attacking_actor_pids():
                killed_actor = _attacking_actor_pids()[0]
                os.kill(killed_actor, signal.SIGKILL)  # Ray restarts the actor and retries its chunk
                saved_at_actor_kill = saved
            elif killed_actor is not None and saved >= saved_at_actor_kill + 1:
                break  # the restarted actor finished a chunk: now the driver goes too
            time.sleep(0.02)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        log = driver.communicate()[0]
    assert killed_actor, "no chunk was saved before the deadline:\n" + log[-3000:]
    assert driver.returncode == -signal.SIGKILL, "the evaluation ended before its driver could be killed:\n" + log[-3000:]
    saved = len(_chunks(out))  # what the killed driver had saved: a chunk is complete or absent
    assert 2 <= saved < 6, saved

    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = json.loads(next(line for line in resumed.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    assert got["chunks"] == {"total": 6, "resumed": saved, "computed": 6 - saved}
    assert len(_chunks(out)) == 6

    undisturbed = rayrobust.evaluate(model, (x, y), backend="local", **EVAL)  # one thread, as the actors use
    assert got["per_attack"] == undisturbed["autoattack"]["per_attack"]
    assert got["autoattack_acc"] == undisturbed["autoattack_acc"]
    print(f"actor {killed_actor} killed after {saved_at_actor_kill} chunk(s); driver killed with {saved} of 6 saved; "
          f"the rerun attacked {6 - saved}")
