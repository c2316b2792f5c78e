"""Hostile files through the real entry points: a malicious pickle is refused and its payload never runs."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this runs `touch <marker>`: what an attacker's checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _run(args, tmp_path):
    env = {**os.environ, "RAYROBUST_DASHBOARD": "0", "OMP_NUM_THREADS": "1"}
    env.pop("RAYROBUST_STORAGE_PATH", None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


@pytest.mark.parametrize("entry", [["-m", "rayrobust.cli", "evaluate"], ["jobs/evaluate.py"]],
                         ids=["rayrobust-evaluate", "jobs-evaluate"])
@pytest.mark.parametrize("kind", ["torch-zip", "raw-pickle"])
def test_evaluate_refuses_a_malicious_checkpoint_without_running_it(tmp_path, entry, kind):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    if kind == "torch-zip":  # a rayrobust-looking checkpoint whose model entry is a code-running object
        torch.save({"format": "rayrobust-checkpoint-v1", "model": _Payload(marker), "epoch": 1}, evil)
    else:
        evil.write_bytes(pickle.dumps({"format": "rayrobust-checkpoint-v1", "model": _Payload(marker)}))

    # The payload is live: an unsafe load in a child process really runs it.
    live = _run(["-c", f"import pickle, torch; torch.load({str(evil)!r}, weights_only=False)"], tmp_path)
    assert marker.exists(), live.stderr
    marker.unlink()

    out = tmp_path / "eval.json"
    proc = _run([*entry, "--config", "configs/demo.yaml", "--set", f"run_dir={tmp_path / 'run'}",
                 "--checkpoint", str(evil), "--out", str(out)], tmp_path)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rayrobust: error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr  # (torch may add a UserWarning)
    assert errors[0].startswith(f"rayrobust: error: checkpoint {str(evil)!r} was refused"), errors[0]
    assert not marker.exists()  # the payload never ran
    assert not out.exists()
