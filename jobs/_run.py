"""What every `jobs/*.py` entry point does: run one `rayrobust` command as a Ray job, with results storage.

Inside `ray job submit` the driver runs on the head node and connects to the job's cluster through
RAY_ADDRESS; the cluster's token (RAY_AUTH_MODE=token, ~/.ray/auth_token on every node, see
cluster.yaml) is inherited from the node, so nothing here handles secrets.

With a storage path (RAYROBUST_STORAGE_PATH, set on every node by cluster.yaml, or the config's
`storage_path`), the run directory is pulled from storage before the command (a resubmitted job
continues where the last one stopped, on any head) and pushed after it, also when it fails, so
finished stages are kept. Training pushes each epoch's checkpoint itself.
"""
from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working directory


def _config(command: str, argv: list):
    """The experiment config the command will use, or None when its arguments are bad (the command reports it)."""
    from rayrobust.cli import build_parser
    from rayrobust.config import load_config
    from rayrobust.errors import RayRobustError

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args = build_parser().parse_args([command, *argv])  # bad args and --help: the command itself speaks
        overrides = list(args.overrides) + ([f"train.method={args.method}"] if getattr(args, "method", None) else [])
        return load_config(args.config, overrides)
    except (RayRobustError, SystemExit):
        return None


def run(command: str, argv: list) -> int:
    from rayrobust import storage
    from rayrobust.cli import main
    from rayrobust.errors import RayRobustError

    cfg = _config(command, argv)
    try:
        mirror = storage.mirror_for(cfg, cfg.run_dir) if cfg is not None else None
        if mirror is not None:
            got = storage.pull(mirror, cfg.run_dir)
            print(f"[storage] {mirror}: pulled {len(got)} file(s) into {cfg.run_dir}", flush=True)
    except RayRobustError as e:
        print(f"rayrobust: error: {e}", file=sys.stderr)
        return 2
    code = 1
    try:
        code = main([command, *argv])
    finally:
        if mirror is not None:
            try:
                sent = storage.push(cfg.run_dir, mirror)
                print(f"[storage] {mirror}: pushed {len(sent)} file(s)", flush=True)
            except RayRobustError as e:
                print(f"rayrobust: error: {e}", file=sys.stderr)
                code = code or 2
    return code
