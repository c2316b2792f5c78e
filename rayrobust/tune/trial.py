"""One search trial: the experiment config it trains (the search parameters set through `SETS`) and `Trial`,
the Tune trainable that runs its Ray Train fit and grades every epoch."""
from __future__ import annotations

import dataclasses
import json
import threading
import time
from typing import Any, Dict, Optional

import torch
from ray.tune import Trainable

from ..config import ExperimentConfig, config_from_dict
from ..errors import ConfigError, RayRobustError
from ..io import write_json
from ..layout import CHECKPOINTS
from ..location import Location
from ..methods.base import settings_class
from .config import ConditionalSpace
from .grading import checkpoint_complete, grade_checkpoint, validation_subset

def _field(section: str, key: str, convert):
    """A SETS target: `<section>.<key>` = convert(value, raw config)."""
    def put(raw: Dict[str, Any], value: Any, method: str) -> None:
        raw.setdefault(section, {})[key] = convert(value, raw)
    return put


def _setting(key: str, convert):
    """A SETS target: `train.method_args.<method>.<key>` = convert(value), for a method whose settings have `key`."""
    def put(raw: Dict[str, Any], value: Any, method: str) -> None:
        if key in {f.name for f in dataclasses.fields(settings_class(method))}:
            args = raw.setdefault("train", {}).setdefault("method_args", {})
            args.setdefault(method, {})[key] = convert(value)
    return put


# What each search parameter sets in a trial's experiment config (the trial's method decides which method's
# settings). n_clusters sets ClusTR's clusters per class and SRD's K_max alike.
SETS: Dict[str, tuple] = {
    "n_clusters": (_setting("k", int), _field("semantic", "k_max", lambda v, raw: int(v))),
    "repulsion_margin": (_setting("margin", float),),
    "train_eps": (_field("train", "eps", lambda v, raw: float(v) * raw["eval"]["eps"]),),
    "method": (_field("train", "method", lambda v, raw: str(v)),),
}


def apply_params(base: Dict[str, Any], params: Dict[str, Any]) -> ExperimentConfig:
    """The experiment config of one trial: `base` (a config dict) with the search parameters set (`SETS`)."""
    raw = json.loads(json.dumps(base))
    unknown = [name for name in params if name not in SETS]
    if unknown:
        raise ConfigError(f"unknown search parameter {unknown[0]!r}; valid parameters: {', '.join(SETS)}")
    method = str(params.get("method", raw.get("train", {}).get("method", "pgd_at")))
    settings_class(method)  # an unknown method is a one-line error here
    for name, value in params.items():
        for put in SETS[name]:
            put(raw, value, method)
    return config_from_dict(raw)


def search_space(cfg: ExperimentConfig):
    """The search's Optuna define-by-run space (`ConditionalSpace`)."""
    return ConditionalSpace(cfg.tune.params(), cfg.train.method)


STOP_FILE = "stop.json"  # in a trial's directory: written when Tune stops the trial; its workers end at the next epoch


class Trial(Trainable):
    """One Tune trial: a Ray Train fit (`rayrobust.train.fit`) in a background thread, one Tune step per graded
    epoch checkpoint.

    A class trainable so that stopping is synchronous: when Tune stops the trial (ASHA, or the end of the
    search), `cleanup` runs before the trial's actor exits; it writes `trials/<id>/stop.json`, the Train workers
    return at their next epoch boundary, Ray Train shuts the worker group down and removes its placement
    group, and `cleanup` waits for that. A trial that ended by itself has nothing left to stop."""

    STOP_WAIT_S = 600.0  # how long cleanup waits for the workers to reach an epoch boundary

    def setup(self, config: Dict[str, Any], base: Optional[Dict[str, Any]] = None, run_dir: Optional[str] = None):
        from ..train import fit

        torch.set_num_threads(1)
        self.params = dict(config)
        self.cfg = cfg = apply_params(base, self.params)
        self.tdir = Location(run_dir) / "trials" / self.trial_id
        stale = self.tdir / STOP_FILE
        if stale.exists():  # a stop of an earlier run of this trial (a search resumed after its driver stopped)
            stale.delete()
        write_json(self.tdir / "params.json", {"trial_id": self.trial_id, "params": self.params, "config": cfg.to_dict()})
        self.x, self.y = validation_subset(cfg)
        self.epoch = 0
        self.box: Dict[str, Any] = {}

        def work():
            try:
                self.box["result"] = fit(cfg, self.tdir, stop=self.tdir / STOP_FILE)
            except BaseException as e:  # re-raised in step()
                self.box["error"] = e

        self.worker = threading.Thread(target=work, name=f"fit-{self.trial_id}", daemon=True)
        self.worker.start()

    def _wait_for(self, ckpt: Location) -> None:
        poll = 0.5 if self.tdir.is_local else 1.0
        while not checkpoint_complete(ckpt):
            if not self.worker.is_alive() and not checkpoint_complete(ckpt):
                raise self.box.get("error") or RayRobustError(
                    f"training of trial {self.trial_id} ended without {ckpt.uri}")
            time.sleep(poll)

    def step(self) -> Dict[str, Any]:
        from ..checkpoint import checkpoint_name

        cfg = self.cfg
        self.epoch += 1
        ckpt = self.tdir / CHECKPOINTS / checkpoint_name(self.epoch)
        self._wait_for(ckpt)
        res = grade_checkpoint(cfg, ckpt, self.x, self.y)
        done = self.epoch >= cfg.train.epochs
        if done:
            self.worker.join()
            if "error" in self.box:
                raise self.box["error"]
        return {"epoch": self.epoch, "epochs_planned": cfg.train.epochs, "clean_acc": res["clean_acc"],
                "robust_acc": res["robust_acc"], "pgd_ce_acc": res["pgd_ce_acc"],
                "robust_objective": res["robust_objective"], "flagged": int(res["flagged"]),
                "flags": ",".join(res["flags"]), "train_loss": res.get("train_loss") or 0.0,
                "method": cfg.train.method, "grading_seconds": res["seconds"], "done": done}

    def cleanup(self) -> None:
        worker = getattr(self, "worker", None)
        if worker is None or not worker.is_alive():
            return
        write_json(self.tdir / STOP_FILE, {"trial_id": self.trial_id, "after_epoch": self.epoch,
                                           "reason": "stopped by Tune (early stopping or the end of the search)"})
        worker.join(self.STOP_WAIT_S)
        if worker.is_alive():
            print(f"warning: trial {self.trial_id}: training did not reach an epoch boundary within "
                  f"{self.STOP_WAIT_S:.0f}s of being stopped", flush=True)

    def save_checkpoint(self, checkpoint_dir: str):  # trials resume from their own epoch checkpoints (fit)
        return None

    def load_checkpoint(self, checkpoint):
        pass
