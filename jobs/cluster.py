"""`ray job submit --working-dir . -- python jobs/cluster.py --config configs/cifar10.yaml [--set key=value ...]`

Same as `rayrobust cluster ...`, run as a Ray job: it connects to the job's cluster (RAY_ADDRESS) and
reads and writes the run directory (a local path or a storage URI) itself (jobs/_run.py).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _run import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("cluster", sys.argv[1:]))
