"""Reference agreement: rayrobust's sharded AutoAttack (2 Ray actors) against pyautoattack's own
`AutoAttack.run_standard_evaluation` on the same model, images, eps and seed.

The two runs are not the same computation, so per image they may differ; in aggregate they must not:

- rayrobust cuts the 200 images into 2 chunks of 100 by index and seeds chunk k with
  `chunk_seed(seed, k)` (seed for the first, seed + 1 for the second); the reference attacks all the
  images still robust as one batch, every attack seeded with `seed`. The random starts of APGD-CE and
  APGD-T and Square's random squares are therefore drawn for other batches from other streams (and
  APGD-T and Square see other sets of still-robust points in a batch). FAB-T (one restart, which
  has no random start) is deterministic per image: it can differ only by the images that reach it.
- The clean pass is the same forward pass on both sides, so the set of correctly classified images
  is identical (asserted per image). Every later stage (cumulative robust accuracy after APGD-CE,
  APGD-T, FAB-T, Square) may differ only by images whose fate depends on those random draws; each
  stage is required to be within one image (1/200) of the reference. Measured (CPU, one torch
  thread): one image changes stage. Its APGD-CE start fools it in the reference's run but not in
  rayrobust's, where APGD-T then breaks it, so "after APGD-CE" reads 0.375 vs 0.370 and every other
  stage, the robust accuracy (0.360) included, is equal.

The reference's per-attack breakdown comes from its own run: `run_standard_evaluation` with a
`state_path` writes its robust flags to that file after every batch, and logs "running <attack>"
before each attack, so the flags on disk when an attack starts say which images it was run on; the
final flags say which survived. That per-image breakdown is cross-checked against the cumulative
accuracies the reference logs itself ("robust accuracy after APGD-CE: ...").
"""
import copy
import json
import logging
import re
import time

import pytest
import torch

from conftest import digits_arrays, train_mlp
from rayrobust.attacks.autoattack import AA_STANDARD, summarize_autoattack
from rayrobust.evaluation.sharded import sharded_autoattack

pytestmark = pytest.mark.ray

N = 200  # held-out digits (the last 200); the MLP trains on the other 1597
EPS = 0.1  # L-inf, [0,1] pixel units: about a third of the points survives APGD-CE, so every stage runs
SEED = 0
CHUNK = 100  # 2 chunks, one per actor
STAGES = ["clean", *AA_STANDARD, "robust"]


@pytest.fixture(scope="module")
def mlp_and_images(one_thread):
    x, y = digits_arrays()
    with torch.random.fork_rng():
        model = train_mlp(x[:-N], y[:-N], epochs=30, seed=0)
    return model, x[-N:].contiguous(), y[-N:].contiguous()


def reference_autoattack(model, x, y, *, eps, seed, state_path, device):
    """pyautoattack's run_standard_evaluation (standard version, L-inf) on all of x as one batch.

    Returns (broken_by, logged): per image "clean", the attack that first fooled it, or None (robust),
    read from the reference's state file; and the cumulative accuracies the reference logged."""
    from pyautoattack import AutoAttack

    aa = AutoAttack(model, eps=eps, norm="Linf", version="standard", seed=seed, device=device)
    flags_at_start = {}  # attack -> the reference's robust flags when it started that attack
    logged = {}

    class Tap(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            started = re.fullmatch(r"running (\S+)", msg)
            if started:
                flags_at_start[started[1]] = json.loads(state_path.read_text())["_robust_flags"]
            acc = re.match(r"(?:initial accuracy|robust accuracy after (\S+)): ([0-9.]+)%", msg)
            if acc:
                logged[(acc[1] or "clean").lower()] = float(acc[2]) / 100

    tap, level = Tap(level=logging.DEBUG), aa.logger.level
    aa.logger.addHandler(tap)
    aa.logger.setLevel(logging.DEBUG)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            _, y_adv = aa.run_standard_evaluation(x.to(device), y.to(device), batch_size=len(x),
                                                  state_path=state_path)
    finally:
        aa.logger.removeHandler(tap)
        aa.logger.setLevel(level)
    final = json.loads(state_path.read_text())["_robust_flags"]
    assert final == (y_adv.cpu() == y).tolist()  # robust exactly where the returned label is still y
    assert list(flags_at_start) == AA_STANDARD, f"the reference started {list(flags_at_start)}"

    after = [flags_at_start[a] for a in AA_STANDARD[1:]] + [final]
    broken_by = []
    for i in range(len(x)):
        if not flags_at_start[AA_STANDARD[0]][i]:
            broken_by.append("clean")
            continue
        broken_by.append(next((a for a, flags in zip(AA_STANDARD, after) if not flags[i]), None))
    return broken_by, logged


def _table(ours, ref):
    head = f"{'stage':>8} {'rayrobust (2 actors)':>21} {'pyautoattack':>13}"
    rows = [f"{k:>8} {ours[k]:>21.3f} {ref[k]:>13.3f}" for k in STAGES]
    return "\n".join([head, *rows])


def test_sharded_autoattack_agrees_with_reference_run_standard_evaluation(ray_cluster, mlp_and_images, tmp_path):
    model, x, y = mlp_and_images
    t0 = time.perf_counter()
    ours_run = sharded_autoattack(copy.deepcopy(model), x, y, eps=EPS, seed=SEED, chunk_size=CHUNK, num_shards=2)
    t_ours = time.perf_counter() - t0
    assert ours_run["num_shards"] == 2 and len(ours_run["workers"]) == 2  # both actors attacked a chunk
    ours_by = ours_run["broken_by"]

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the actors' device
    t0 = time.perf_counter()
    ref_by, logged = reference_autoattack(copy.deepcopy(model).to(device), x, y, eps=EPS, seed=SEED,
                                          state_path=tmp_path / "aa_state.json", device=device)
    t_ref = time.perf_counter() - t0

    ours, ref = summarize_autoattack(ours_by, AA_STANDARD), summarize_autoattack(ref_by, AA_STANDARD)
    moved = {i: (a, b) for i, (a, b) in enumerate(zip(ours_by, ref_by)) if a != b}
    print(f"\nAutoAttack standard, L-inf eps={EPS}, {N} digits, seed {SEED}, small MLP; "
          f"rayrobust {t_ours:.1f}s, pyautoattack {t_ref:.1f}s\n{_table(ours, ref)}\n"
          f"images at a different stage (rayrobust, reference): {moved or 'none'}")

    # The per-image breakdown read from the reference's state is the one it logged.
    assert logged.keys() == {"clean", *AA_STANDARD}
    for k, v in logged.items():
        assert ref[k] == pytest.approx(v, abs=1e-9), (k, v, ref[k])

    # Non-vacuous: APGD-CE breaks many points but leaves a share robust, APGD-T breaks some of those,
    # and FAB-T and Square each run on some points, in both runs.
    for run in (ours, ref):
        assert run["clean"] > 0.85
        assert run["clean"] - run["apgd-ce"] >= 0.2
        assert 0.15 <= run["apgd-ce"] <= 0.6
        assert run["apgd-ce"] > run["apgd-t"]
        assert run["fab-t"] > 0

    # The clean pass is the same forward pass: identical per image.
    assert [b == "clean" for b in ours_by] == [b == "clean" for b in ref_by]
    # Every later stage within one image of the reference, and so the robust accuracy.
    for k in STAGES:
        assert abs(ours[k] - ref[k]) <= 1 / N + 1e-9, f"{k}: rayrobust {ours[k]} vs reference {ref[k]}\n" + _table(ours, ref)

