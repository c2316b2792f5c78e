"""Evaluation: clean, PGD and AutoAttack accuracy with sanity-check flags; AutoAttack sharded over Ray actors."""
from .core import evaluate, evaluate_checkpoint

__all__ = ["evaluate", "evaluate_checkpoint"]
