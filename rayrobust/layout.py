"""The layout of a run directory: every path a stage reads or writes, in one place.

    <run_dir>/                              a local path or a storage URI (s3://, gs://, file://)
      <method>/checkpoints/epoch_003/       Ray Train checkpoint (checkpoint.pt + .sha256), one per epoch
      <method>/metrics.jsonl                per-epoch metrics (rank 0)
      <method>/train.json                   the finished training: checkpoint, epochs, metrics, provenance
      <method>/workers/rank<r>.json         which process on which node trains which epoch
      <method>/eval.json                    evaluation (clean, PGD, AutoAttack, flags, provenance)
      semantic/latents/ clusters/ dictionaries/
      summary.json  report.html             `pipeline`/`results`/`report`
      tune/ trials/ optuna.journal          `tune`

Example:
    >>> run = RunLayout("s3://bucket/runs/demo")
    >>> run.checkpoints("pgd_at")
    Location('s3://bucket/runs/demo/pgd_at/checkpoints')
"""
from __future__ import annotations

from typing import Optional

from .errors import CheckpointError
from .location import Location, Where, as_location

CHECKPOINTS = "checkpoints"  # Ray Train's run name: the directory of a method's epoch checkpoints
SEMANTIC = "semantic"


class RunLayout:
    """Paths of one run directory."""

    def __init__(self, run_dir: Where):
        self.root = as_location(run_dir)

    def __repr__(self) -> str:
        return f"RunLayout({self.root.uri!r})"

    def method_dir(self, method: str) -> Location:
        return self.root / method

    def checkpoints(self, method: str) -> Location:
        return self.root / method / CHECKPOINTS

    def metrics(self, method: str) -> Location:
        return self.root / method / "metrics.jsonl"

    def train_record(self, method: str) -> Location:
        return self.root / method / "train.json"

    def workers(self, method: str) -> Location:
        return self.root / method / "workers"

    def eval_file(self, method: str) -> Location:
        return self.root / method / "eval.json"

    @property
    def semantic(self) -> Location:
        return self.root / SEMANTIC

    @property
    def summary(self) -> Location:
        return self.root / "summary.json"

    @property
    def report(self) -> Location:
        return self.root / "report.html"

    def latest_checkpoint(self, method: str, *, hint: Optional[str] = None) -> Location:
        """The checkpoint `method` is evaluated from: its newest valid one, or under `train.early_stopping` the
        epoch with the best validation PGD accuracy (`checkpoint.selected_checkpoint`); a CheckpointError
        saying how to make one when there is none."""
        from .checkpoint import selected_checkpoint

        found = selected_checkpoint(self.checkpoints(method))
        found = found[0] if found else None
        if found is None:
            raise CheckpointError(f"no checkpoint for {method} in {self.checkpoints(method)}; "
                                  + (hint or f"run `rayrobust train --method {method}` first or pass --checkpoint"))
        return found
