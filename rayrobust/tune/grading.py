"""Grading of a search trial: clean, APGD-CE + APGD-T and PGD-CE accuracy of each epoch checkpoint on the fixed
held-out validation subset, with the sanity flags (`rayrobust.tune.search` describes the protocol)."""
from __future__ import annotations

import time
from typing import Any, Dict

import torch

from ..checkpoint import CHECKPOINT_FILE
from ..config import ExperimentConfig
from ..io import read_json, write_json
from ..location import Location, Where, as_location

GRADING_ATTACKS = ["apgd-ce", "apgd-t"]
PGD_CE_STEPS = 20
GRADING = ("clean, then APGD-CE and APGD-T (pyautoattack, cumulative) at eval.eps on the first "
           "tune.val_n held-out validation images; robust_objective = that accuracy, 0 if flagged")

def grade(decision: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "Linf",
          seed: int = 0, masking_gap: float = 0.2) -> Dict[str, Any]:
    """Clean, APGD-CE + APGD-T and PGD-CE accuracy of `decision` on (x, y), with sanity flags."""
    from ..attacks import PGD, accuracy, robust_accuracy
    from ..attacks.autoattack import run_autoattack, summarize_autoattack
    from ..attacks.checks import (Flag, check_deterministic, check_robust_le_clean, check_softmax_output,
                                  check_zero_gradients, failed)
    from ..attacks.pgd import eval_mode

    t0 = time.perf_counter()
    with eval_mode(decision):
        clean = accuracy(decision, x, y, len(x))
        broken_by = run_autoattack(decision, x, y, eps=eps, norm=norm, version="custom", attacks=GRADING_ATTACKS,
                                   seed=seed, chunk_size=len(x))
        per_attack = summarize_autoattack(broken_by, GRADING_ATTACKS)
        pgd = PGD(decision, eps=eps, norm=norm, steps=PGD_CE_STEPS, restarts=1, seed=seed)
        pgd_ce = robust_accuracy(decision, pgd, x, y, len(x))
        robust = per_attack["robust"]
        flags = [check_zero_gradients(decision, x, y), check_softmax_output(decision, x),
                 check_deterministic(decision, x),
                 check_robust_le_clean(clean, {"apgd-ce+apgd-t": robust, f"pgd{PGD_CE_STEPS}-ce": pgd_ce}),
                 Flag("pgd_ce_above_apgd", pgd_ce - robust <= masking_gap,
                      f"PGD-{PGD_CE_STEPS}-CE {pgd_ce:.4f} vs APGD-CE+APGD-T {robust:.4f} (gap tolerance {masking_gap:g})")]
    raised = failed(flags)
    return {"n": len(x), "eps": eps, "norm": norm, "seed": seed, "clean_acc": clean, "robust_acc": robust,
            "robust_attack": "APGD-CE + APGD-T (pyautoattack)", "per_attack": per_attack,
            "pgd_ce_acc": pgd_ce, "pgd_ce_attack": f"PGD-{PGD_CE_STEPS} on cross-entropy, random start (contrast only)",
            "robust_objective": 0.0 if raised else robust, "flagged": bool(raised), "flags": raised,
            "checks": [f.to_dict() for f in flags], "seconds": time.perf_counter() - t0}


def _decision_from_checkpoint(checkpoint: Where):
    from ..checkpoint import load_trained

    trained = load_trained(checkpoint)
    return trained.decision, trained.payload


def validation_subset(cfg: ExperimentConfig):
    """The fixed grading images: the first tune.val_n of the held-out split (seeded by train.seed)."""
    from ..data import load_dataset
    from ..train.loop import train_val_split

    ds = load_dataset(cfg.data.name, "train", root=cfg.data.root, download=cfg.data.download, limit=cfg.data.train_limit)
    split = train_val_split(ds.x, ds.y, cfg.data.val_size, seed=cfg.train.seed)
    return split.x_val[:cfg.tune.val_n].contiguous(), split.y_val[:cfg.tune.val_n].contiguous()


def _checkpoint_dir(checkpoint: Where) -> Location:
    """The epoch directory of a checkpoint given as `.../epoch_003`, `.../epoch_003/checkpoint.pt` or `.../epoch_003.pt`."""
    loc = as_location(checkpoint)
    return loc.parent if loc.name == CHECKPOINT_FILE else loc


def grade_checkpoint(cfg: ExperimentConfig, checkpoint: Where, x: torch.Tensor, y: torch.Tensor) -> Dict[str, Any]:
    """Grade one epoch checkpoint (cached in the trial's val/epoch_NNN.json, keyed by the checkpoint's sha256)."""
    from ..checkpoint import checkpoint_epoch, checkpoint_name, checkpoint_sha256

    ckpt = _checkpoint_dir(checkpoint)
    cache = ckpt.parent.parent / "val" / f"{checkpoint_name(checkpoint_epoch(ckpt))}.json"
    digest = checkpoint_sha256(ckpt)
    try:
        old = read_json(cache)
        if isinstance(old, dict) and old.get("checkpoint_sha256") == digest:
            return old
    except (FileNotFoundError, ValueError):
        pass
    decision, payload = _decision_from_checkpoint(ckpt)
    res = grade(decision, x, y, eps=cfg.eval.eps, norm=cfg.eval.norm, seed=cfg.eval.seed, masking_gap=cfg.tune.masking_gap)
    hist = payload.get("history") or [{}]
    res.update({"epoch": int(payload["epoch"]), "checkpoint": ckpt.uri, "checkpoint_sha256": digest,
                "train_loss": hist[-1].get("loss")})
    write_json(cache, res)
    return res


def checkpoint_complete(ckpt: Location) -> bool:
    """Whether an epoch checkpoint is fully persisted: payload and sidecar present and matching (Ray Train
    uploads the files of a checkpoint directory one by one)."""
    from ..checkpoint import payload_file
    from ..io import sha256_file

    payload = payload_file(ckpt)
    try:
        expected = payload.with_name(payload.name + ".sha256").read_text().strip()
        return bool(expected) and payload.exists() and sha256_file(payload) == expected
    except (FileNotFoundError, OSError):
        return False
