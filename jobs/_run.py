"""What every `jobs/*.py` entry point does: run one `rayrobust` command as a Ray job.

Inside `ray job submit` the driver runs on the head node and connects to the job's cluster through
RAY_ADDRESS; the cluster's token (RAY_AUTH_MODE=token, ~/.ray/auth_token on every node, see
cluster.yaml) is inherited from the node, so nothing here handles secrets. Every stage reads and
writes the run directory itself (a local path or a storage URI; on `cluster.yaml`'s cluster a
relative run_dir lives under $RAYROBUST_STORAGE_PATH), so a resubmitted job continues where the
last one stopped, on any head, with nothing to copy.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working directory


def run(command: str, argv: list) -> int:
    from rayrobust.cli import main

    return main([command, *argv])
