"""Attacks: FGSM/PGD for training and quick checks, AutoAttack (sharded by example) for the
numbers we report, and the sanity checks of docs/evaluation.md §4.

    >>> from rayrobust.attacks import ATTACKS
    >>> atk = ATTACKS.create("pgd", model=model, eps=0.1, steps=10, seed=0)
    >>> x_adv = atk.perturb(x, y)
"""
from ..registry import Registry
from .pgd import (FGSM, PGD, Attack, accuracy, eval_mode, frozen_params, input_grad,
                  model_device, perturbation_norm, robust_accuracy)

ATTACKS: Registry[Attack] = Registry("attack")
ATTACKS.register("fgsm")(FGSM)
ATTACKS.register("pgd")(PGD)

from .autoattack import (AA_ATTACKS, AA_STANDARD, autoattack_chunk, chunk_plan,  # noqa: E402
                         chunk_seed, run_autoattack, summarize_autoattack)
from .checks import Flag, failed, run_model_checks  # noqa: E402

__all__ = [
    "ATTACKS", "Attack", "FGSM", "PGD", "accuracy", "robust_accuracy", "eval_mode",
    "frozen_params", "input_grad", "model_device", "perturbation_norm",
    "AA_ATTACKS", "AA_STANDARD", "autoattack_chunk", "chunk_plan", "chunk_seed", "run_autoattack",
    "summarize_autoattack", "Flag", "failed", "run_model_checks",
]
