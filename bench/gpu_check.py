"""One command for a GPU machine: the `gpu` tests, PGD-AT epoch time against the plain reference loop, attack
throughput and the k-means assignment step, written to one JSON file and printed as one markdown table row.

Sections (every number is measured in this run):
- gpu_tests: `pytest -m gpu tests/test_gpu.py` in a subprocess (passed/failed/skipped counts); "skipped (no CUDA)"
  without a CUDA device.
- train_epoch: seconds for one PGD-10 adversarial-training epoch of preact_resnet18 over 50,000 synthetic 32x32 RGB
  images (batch 512, bf16 autocast, channels_last), through rayrobust's `train_epoch` and through
  bench/reference_pgd_at.py's `train_step` on the same batches, with torch.compile off and on;
  `ratio` = reference seconds / rayrobust seconds (> 1: rayrobust is faster).
- apgd_ce: APGD-CE (pyautoattack, 100 iterations, 1 restart) iterations x images per second on preact_resnet18
  (small_cnn with --tiny).
- autoattack: AutoAttack standard (rayrobust.attacks.run_autoattack) images per second on a small_cnn trained
  for a few epochs with PGD-AT on synthetic images.
- kmeans: rows per second of the k-means assignment step in torch (rayrobust.semantic.kmeans) on the device and
  on the CPU, and whether both choose the same centroids.

    python bench/gpu_check.py --device cuda                  # a GPU machine: under 8 minutes on one H100
    python bench/gpu_check.py --device cpu --tiny            # the same code paths at tiny sizes, seconds
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import reference_pgd_at as ref  # noqa: E402

from rayrobust.attacks import run_autoattack, summarize_autoattack  # noqa: E402
from rayrobust.methods import create_method  # noqa: E402
from rayrobust.models import create_model  # noqa: E402
from rayrobust.semantic import kmeans  # noqa: E402
from rayrobust.train.loop import Split, epoch_batches, make_optimizer, train_epoch  # noqa: E402

FULL = dict(images=50_000, batch=512, pgd_steps=10, model="preact_resnet18", side=32, warmup_steps=3,
            compile_backend="inductor", apgd_model="preact_resnet18", apgd_images=512, apgd_iters=100, aa_train=10_000, aa_epochs=3, aa_images=1000,
            km_rows=1_000_000, km_dim=128, km_k=256, test_timeout=360)
# Tiny: the same calls at sizes a 2-core CPU runs in seconds. torch.compile goes through the same dynamo
# capture with the aot_eager backend (no code generation, which alone takes minutes on two cores).
TINY = dict(images=256, batch=64, pgd_steps=2, model="small_cnn", side=32, warmup_steps=1,
            compile_backend="aot_eager", apgd_model="small_cnn", apgd_images=16, apgd_iters=5, aa_train=512, aa_epochs=1, aa_images=8,
            km_rows=20_000, km_dim=32, km_k=16, test_timeout=120)
EPS = 8 / 255


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU x{torch.get_num_threads()} threads"


def synthetic(n: int, side: int, *, seed: int, device: torch.device, noise: float = 0.1
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Learnable RGB images without files: x (n, 3, side, side) in [0,1] around one fixed random template per
    class (10 classes), y (n,); made on `device` in blocks."""
    g = torch.Generator().manual_seed(1234)
    templates = torch.rand(10, 3, side, side, generator=g).to(device)  # (10, 3, side, side)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g).to(device)
    x = torch.empty(n, 3, side, side, device=device)
    for s in range(0, n, 8192):
        yb = y[s:s + 8192]
        noise_b = torch.randn(len(yb), 3, side, side, generator=g).to(device)
        x[s:s + 8192] = (templates[yb] + noise * noise_b).clamp_(0, 1)
    return x, y


def new_model(name: str, side: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=10, in_channels=3, input_size=side).to(device)


def maybe_compile(model: torch.nn.Module, on: bool, backend: str) -> torch.nn.Module:
    return torch.compile(model, backend=backend) if on else model


# ------------------------------------------------------------------------------------------------ sections


def gpu_tests(device: torch.device, timeout: int) -> Dict[str, Any]:
    """`pytest -m gpu tests/test_gpu.py` in a subprocess; its counts, or "skipped (no CUDA)"."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return {"status": "skipped (no CUDA)", "passed": 0, "failed": 0, "skipped": 0, "seconds": 0.0}
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider", "-rfEs"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
    counts = {k: int(m.group(1)) if (m := re.search(rf"(\d+) {k}", out)) else 0
              for k in ("passed", "failed", "skipped", "error", "deselected")}
    ok = rc == 0 and counts["failed"] == counts["error"] == 0 and counts["passed"] > 0
    return {"status": "passed" if ok else "failed", "returncode": rc, **counts,
            "seconds": time.perf_counter() - t0, "tail": out[-3000:] if not ok else out[-400:]}


def train_epoch_times(device: torch.device, p: Dict[str, Any]) -> Dict[str, Any]:
    """One PGD-AT epoch through rayrobust's loop and through the reference loop, compile off then on."""
    amp = torch.bfloat16 if device.type == "cuda" else None
    x, y = synthetic(p["images"], p["side"], seed=0, device=device)
    data = Split(x, y, x[:0], y[:0])
    warm = Split(x[:p["warmup_steps"] * p["batch"]], y[:p["warmup_steps"] * p["batch"]], x[:0], y[:0])
    method = create_method("pgd_at", eps=EPS, steps=p["pgd_steps"])
    batches = epoch_batches(p["images"], p["batch"], epoch=0, seed=0)
    out: Dict[str, Any] = {"model": p["model"], "images": p["images"], "batch": p["batch"],
                           "pgd_steps": p["pgd_steps"], "amp": "bf16" if amp else "off (CPU)", "channels_last": True,
                           "steps": len(batches), "compile_backend": p["compile_backend"]}

    def ours(compiled: bool) -> float:
        model = maybe_compile(new_model(p["model"], p["side"], device).to(memory_format=torch.channels_last),
                              compiled, p["compile_backend"])
        opt = make_optimizer(model, 0.05, 0.9, 5e-4)
        kw = dict(epochs=1, batch_size=p["batch"], lr=0.05, seed=0, device=device, amp_dtype=amp, channels_last=True)
        train_epoch(model, method, opt, warm, epoch=0, **kw)  # warm-up: compilation, cudnn autotuning
        return train_epoch(model, method, opt, data, epoch=0, **kw)["epoch_seconds"]

    def reference(compiled: bool) -> float:
        model = maybe_compile(new_model(p["model"], p["side"], device).to(memory_format=torch.channels_last),
                              compiled, p["compile_backend"])
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)

        def step(idx: torch.Tensor) -> None:
            xb = x[idx].contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=amp, enabled=amp is not None):
                ref.train_step(model, opt, xb, y[idx], EPS, p["pgd_steps"])

        for idx in batches[:p["warmup_steps"]]:
            step(idx)
        sync(device)
        t0 = time.perf_counter()
        for idx in batches:
            step(idx)
        sync(device)
        return time.perf_counter() - t0

    for compiled in (False, True):
        key = "compile_on" if compiled else "compile_off"
        s_ours = ours(compiled)
        s_ref = reference(compiled)
        out[key] = {"rayrobust_s": s_ours, "reference_s": s_ref, "ratio": s_ref / s_ours,
                    "rayrobust_images_per_s": p["images"] // p["batch"] * p["batch"] / s_ours}
        torch._dynamo.reset()
    return out


def apgd_throughput(device: torch.device, p: Dict[str, Any]) -> Dict[str, Any]:
    """APGD-CE (L-inf, 1 restart) on every image (labels = the model's own predictions, so none is skipped)."""
    from pyautoattack.autopgd_base import APGDAttack

    model = new_model(p["apgd_model"], 32, device).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    x, _ = synthetic(p["apgd_images"], 32, seed=1, device=device)
    attack = APGDAttack(model, n_iter=p["apgd_iters"], norm="Linf", n_restarts=1, eps=EPS, seed=0, loss="ce",
                        device=device, verbose=False)
    warm = APGDAttack(model, n_iter=2, norm="Linf", n_restarts=1, eps=EPS, seed=0, loss="ce", device=device)
    warm.perturb(x[:8].clone())
    sync(device)
    t0 = time.perf_counter()
    adv = attack.perturb(x.clone())
    sync(device)
    seconds = time.perf_counter() - t0
    assert (adv - x).abs().max().item() <= EPS + 1e-5
    return {"model": p["apgd_model"], "images": len(x), "iterations": p["apgd_iters"], "seconds": seconds,
            "iter_images_per_s": p["apgd_iters"] * len(x) / seconds}


def autoattack_throughput(device: torch.device, p: Dict[str, Any]) -> Dict[str, Any]:
    """AutoAttack standard on a small_cnn after a few PGD-AT epochs on synthetic 32x32 images."""
    x, y = synthetic(p["aa_train"], 32, seed=2, device=device)
    xt, yt = synthetic(p["aa_images"], 32, seed=3, device=device)
    model = new_model("small_cnn", 32, device)
    method = create_method("pgd_at", eps=EPS, steps=3)
    opt = make_optimizer(model, 0.05, 0.9, 5e-4)
    t0 = time.perf_counter()
    for epoch in range(p["aa_epochs"]):
        train_epoch(model, method, opt, Split(x, y, x[:0], y[:0]), epoch=epoch, epochs=p["aa_epochs"],
                    batch_size=128, lr=0.05, seed=0, device=device)
    train_s = time.perf_counter() - t0
    model.eval()
    sync(device)
    t0 = time.perf_counter()
    broken = run_autoattack(model, xt, yt, eps=EPS, seed=0, chunk_size=500, device=device)
    sync(device)
    seconds = time.perf_counter() - t0
    summary = summarize_autoattack(broken)
    return {"model": "small_cnn", "train_epochs": p["aa_epochs"], "train_seconds": train_s, "images": len(xt),
            "seconds": seconds, "images_per_s": len(xt) / seconds, "clean_acc": summary["clean"],
            "robust_acc": summary["robust"]}


def kmeans_throughput(device: torch.device, p: Dict[str, Any]) -> Dict[str, Any]:
    """Rows per second of the torch assignment step on `device` and on the CPU (same rows and centroids)."""
    rng = np.random.RandomState(0)
    x = rng.randn(p["km_rows"], p["km_dim"]).astype(np.float32)
    c = rng.randn(p["km_k"], p["km_dim"]).astype(np.float32)

    def timed(dev: str) -> Tuple[float, np.ndarray]:
        kmeans._nearest_torch(x[:1000], c, device=dev)  # warm-up (CUDA context, kernels)
        sync(torch.device(dev))
        t0 = time.perf_counter()
        labels, _ = kmeans._nearest_torch(x, c, device=dev)
        return time.perf_counter() - t0, labels

    s_dev, labels_dev = timed(str(device))
    s_cpu, labels_cpu = timed("cpu")
    return {"rows": len(x), "dim": x.shape[1], "k": len(c), "device": str(device),
            "device_rows_per_s": len(x) / s_dev, "cpu_rows_per_s": len(x) / s_cpu, "speedup": s_cpu / s_dev,
            "labels_agree": float((labels_dev == labels_cpu).mean())}


# ------------------------------------------------------------------------------------------------ output


def table_row(r: Dict[str, Any]) -> str:
    """One markdown row: date, device, gpu tests, epoch seconds and ratios, attack and k-means throughput."""
    t, a, aa, km, g = r["train_epoch"], r["apgd_ce"], r["autoattack"], r["kmeans"], r["gpu_tests"]
    tests = g["status"] if g["status"] != "passed" else f"{g['passed']} passed"
    off, on = t["compile_off"], t["compile_on"]
    return (f"| {r['date']} | {r['device']} ({r['mode']}) | {tests} | {off['rayrobust_s']:.1f} s / {on['rayrobust_s']:.1f} s "
            f"| {off['reference_s']:.1f} s / {on['reference_s']:.1f} s | **{off['ratio']:.3f}** / **{on['ratio']:.3f}** "
            f"| {a['iter_images_per_s']:.0f} | {aa['images_per_s']:.1f} | {km['device_rows_per_s']:.3g} / "
            f"{km['cpu_rows_per_s']:.3g} |")


TABLE_HEADER = ("| date | device | gpu tests | rayrobust s/epoch (compile off / on) | reference s/epoch (off / on) "
                "| ratio=reference/ours (off / on) | APGD-CE iter·img/s | AutoAttack img/s | k-means rows/s (device / CPU) |\n"
                "|---|---|---|---|---|---|---|---|---|")


def finite_numbers(obj: Any) -> bool:
    """True when every number in a nested dict/list is finite."""
    if isinstance(obj, dict):
        return all(finite_numbers(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(finite_numbers(v) for v in obj)
    if isinstance(obj, float):
        return math.isfinite(obj)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the same code paths at tiny sizes (a CPU smoke run)")
    ap.add_argument("--out", default=str(REPO / "bench" / "gpu_check.json"))
    ap.add_argument("--skip-tests", action="store_true", help="leave out the gpu tests (recorded as skipped)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here; use --device cpu --tiny for a smoke run")
    device = torch.device(args.device)
    p = TINY if args.tiny else FULL
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    result: Dict[str, Any] = {"date": datetime.date.today().isoformat(), "device": device_name(device),
                              "mode": "tiny" if args.tiny else "full", "torch": torch.__version__,
                              "python": sys.version.split()[0], "sizes": p}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sections: Dict[str, Callable[[], Dict[str, Any]]] = {
        "gpu_tests": lambda: ({"status": "skipped (--skip-tests)", "passed": 0, "failed": 0, "skipped": 0,
                               "seconds": 0.0} if args.skip_tests else gpu_tests(device, p["test_timeout"])),
        "train_epoch": lambda: train_epoch_times(device, p),
        "apgd_ce": lambda: apgd_throughput(device, p),
        "autoattack": lambda: autoattack_throughput(device, p),
        "kmeans": lambda: kmeans_throughput(device, p),
    }
    t_all = time.perf_counter()
    for name, run in sections.items():
        t0 = time.perf_counter()
        result[name] = run()
        print(f"{name}: {time.perf_counter() - t0:.1f}s  {json.dumps(result[name], default=str)[:300]}",
              file=sys.stderr, flush=True)
        out.write_text(json.dumps(result, indent=2, default=str))  # what is done so far survives a timeout
    result["seconds"] = time.perf_counter() - t_all
    result["finite"] = finite_numbers(result)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(TABLE_HEADER)
    print(table_row(result))


if __name__ == "__main__":
    main()
