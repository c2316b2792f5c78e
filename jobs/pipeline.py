"""`ray job submit --working-dir . -- python jobs/pipeline.py --config configs/cifar10.yaml [--set key=value ...]`

Same as `rayrobust pipeline ...`, run as a Ray job: it connects to the job's cluster (RAY_ADDRESS) and,
with a storage path, pulls the run directory before and pushes it after (jobs/_run.py).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _run import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("pipeline", sys.argv[1:]))
