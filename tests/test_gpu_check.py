"""`bench/gpu_check.py --device cpu --tiny`: the GPU machine's one command, run here at tiny sizes on the CPU."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = {
    "gpu_tests": ("passed", "failed", "skipped", "seconds"),
    "train_epoch": ("images", "batch", "pgd_steps", "steps"),
    "apgd_ce": ("images", "iterations", "seconds", "iter_images_per_s"),
    "autoattack": ("images", "seconds", "images_per_s", "clean_acc", "robust_acc", "train_seconds"),
    "kmeans": ("rows", "dim", "k", "device_rows_per_s", "cpu_rows_per_s", "speedup", "labels_agree"),
}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def test_tiny_cpu_run_writes_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--tiny", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["mode"] == "tiny" and res["finite"] is True and _finite(res["seconds"])
    assert res["gpu_tests"]["status"] == "skipped (no CUDA)"
    for section, keys in SECTIONS.items():
        for key in keys:
            assert _finite(res[section][key]), (section, key, res[section].get(key))
    for mode in ("compile_off", "compile_on"):
        timing = res["train_epoch"][mode]
        assert all(_finite(timing[k]) and timing[k] > 0 for k in ("rayrobust_s", "reference_s", "ratio"))
        assert timing["ratio"] == timing["reference_s"] / timing["rayrobust_s"]
    assert res["kmeans"]["labels_agree"] == 1.0
    assert res["apgd_ce"]["iter_images_per_s"] > 0 and res["autoattack"]["images_per_s"] > 0
    row = proc.stdout.strip().splitlines()[-1]  # the markdown row, under its header
    assert row.startswith("| ") and row.count("|") == 10 and "skipped (no CUDA)" in row
