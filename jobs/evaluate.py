"""`ray job submit --working-dir . -- python jobs/evaluate.py --config configs/demo.yaml [--set key=value ...]`

Same as `rayrobust evaluate ...`; inside a Ray job it connects to the job's cluster (RAY_ADDRESS).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working directory

from rayrobust.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
