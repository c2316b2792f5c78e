"""`rayrobust tune`: Optuna on Ray Tune over the knobs of the defenses, graded by a strong attack.

Layout of a search run directory (`cfg.run_dir`: a local path or a storage URI, s3://bucket/run, gs://...,
file://...; every file below is written atomically through `rayrobust.location`):

    tune_config.json        the experiment config the search was started with (what --resume reads)
    optuna.journal          the Optuna study (JournalStorage) unless tune.optuna_storage names a database:
                            `rayrobust dashboard <run_dir>` serves optuna-dashboard over it (rayrobust.dashboard)
    tune/                   the Tune experiment (RunConfig(storage_path=<run_dir>, name="tune"): experiment
                            state, per-trial TensorBoard logs): `tensorboard --logdir <run_dir>/tune`
    trials/<trial_id>/      one Ray Train run per trial: checkpoints/epoch_NNN/, metrics.jsonl, params.json,
                            val/epoch_NNN.json (the per-epoch grading), final_eval.json (if selected),
                            stop.json (if Tune stopped the trial early: after which graded epoch)
    tune_summary.json       every trial, the Pareto front, the final AutoAttack table
    summary.json            the same rows in the `rayrobust pipeline` summary format

No stage needs a shared filesystem: the Tune experiment lives in the run's storage (`Tuner.restore(<run_dir>/tune)`
resumes it from any node), the driver works on the Optuna journal in a local file (a temporary copy when
the run is remote) and copies it to `<run_dir>/optuna.journal` after every trial and with every Tune
experiment checkpoint (`StudyStorage`, `StudySync`), and `--resume` downloads it from there. With
`tune.optuna_storage: postgresql://...` (or sqlite:///..., mysql://...) the study lives in that database
instead, named `rayrobust:<run_dir>`.

Design (our choices, stated):
- A trial (`Trial`, a class trainable) holds no CPU (`tune.with_resources(..., {"CPU": 0, "memory": 1})`): it
  starts `rayrobust.train.fit` (a Ray Train V2 `TorchTrainer`, whose workers hold the CPUs/GPUs) in
  a background thread and grades every epoch checkpoint as it appears, one Tune step per epoch.
  A trial Tune stops (ASHA) writes `trials/<id>/stop.json` in its cleanup and waits there until its
  workers have returned at the next epoch boundary and Ray Train has removed their placement group:
  a stopped trial frees its CPUs/GPUs before its actor exits, with no help from the Ray state API.
  `max_concurrent_trials` defaults to the cluster's CPUs // (num_workers x cpus_per_worker).
- Grading: clean accuracy and APGD-CE then APGD-T (pyautoattack, each on the points the previous
  left robust) at `eval.eps` on the first `tune.val_n` images of the held-out validation split
  (fixed: the split is seeded by `train.seed`, which the search does not vary). PGD-20 on
  cross-entropy is measured on the same images for contrast only. Flags: zero input gradients,
  softmax outputs, non-determinism, robust above clean, and PGD-CE above APGD by more than
  `tune.masking_gap` (a weak attack beating a strong one signals gradient masking).
- Objectives: Optuna study with two maximised values, clean accuracy and `robust_objective` =
  APGD robust accuracy, or 0 (the worst) for a flagged trial. ASHA stops trials on
  `robust_objective` alone (Optuna's multi-objective samplers take no intermediate values).
  Raw numbers and flags are Optuna user attributes of every trial.
- Selection: the Pareto front (clean, robust) of the unflagged trials that trained all epochs
  (all unflagged trials if none did), at most `tune.final_top_k` by robust accuracy, re-evaluated
  with full AutoAttack (standard version) on the test set with `cfg.eval`.
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
import threading
import time
import warnings
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Optional

import torch
from ray.tune import Callback, Trainable
from ray.tune.search.optuna import OptunaSearch

from ..checkpoint import CHECKPOINT_FILE
from ..config import ExperimentConfig, config_from_dict
from ..errors import ConfigError, RayRobustError
from ..io import provenance, read_json, write_json
from ..layout import CHECKPOINTS
from ..location import Location, Where, as_location, check_writable
from ..progress import Bar
from .config import redact

EXPERIMENT = "tune"
STUDY = "rayrobust"
JOURNAL = "optuna.journal"
GRADING_ATTACKS = ["apgd-ce", "apgd-t"]
OBJECTIVES = ["clean_acc", "robust_objective"]  # the Optuna study's values, both maximised
ASHA_METRIC = "robust_objective"
PGD_CE_STEPS = 20
GRADING = ("clean, then APGD-CE and APGD-T (pyautoattack, cumulative) at eval.eps on the first "
           "tune.val_n held-out validation images; robust_objective = that accuracy, 0 if flagged")
USER_ATTRS = ("clean_acc", "robust_acc", "pgd_ce_acc", "robust_objective", "flagged", "flags", "epoch",
              "epochs_planned")


# ----------------------------------------------------------------------------------- parameters


def apply_params(base: Dict[str, Any], params: Dict[str, Any]) -> ExperimentConfig:
    """The experiment config of one trial: `base` (a config dict) with the search parameters set."""
    raw = json.loads(json.dumps(base))
    for name, value in params.items():
        if name == "n_clusters":
            raw["semantic"]["k_max"] = int(value)
            if "clustr_k" in raw["train"]:
                raw["train"]["clustr_k"] = int(value)
        elif name == "repulsion_margin":
            raw["train"]["repulsion_margin"] = float(value)
        elif name == "train_eps":
            raw["train"]["eps"] = float(value) * raw["eval"]["eps"]
        elif name == "method":
            raw["train"]["method"] = str(value)
        else:
            raise ConfigError(f"unknown search parameter {name!r}")
    return config_from_dict(raw)


def check_search(cfg: ExperimentConfig) -> None:
    """Cross-section checks that TuneConfig alone cannot make."""
    tc = cfg.tune
    for spec in tc.params():
        if spec.name == "train_eps" and spec.high * cfg.eval.eps > 1:
            raise ConfigError(f"tune.space.train_eps.high={spec.high} times eval.eps={cfg.eval.eps} exceeds 1; "
                              "lower the bound or eval.eps")
    if cfg.data.val_size < tc.val_n:
        raise ConfigError(f"tune.val_n={tc.val_n} exceeds data.val_size={cfg.data.val_size}: trials are graded on "
                          "held-out validation images; raise data.val_size or lower tune.val_n")
    if cfg.eval.n_autoattack < 1:
        raise ConfigError("eval.n_autoattack=0: the selected configurations are re-evaluated with AutoAttack; "
                          "set eval.n_autoattack >= 1")


def max_concurrent(cfg: ExperimentConfig) -> int:
    """tune.max_concurrent_trials, else how many trials' Ray Train workers fit in the cluster at once."""
    if cfg.tune.max_concurrent_trials is not None:
        return cfg.tune.max_concurrent_trials
    from ..raycluster import cluster_cpus, cluster_gpus, resolve_use_gpu

    per_trial = cfg.train.num_workers * cfg.train.cpus_per_worker
    n = cluster_cpus() // per_trial
    if resolve_use_gpu(cfg.train.use_gpu)[0]:
        n = min(n, cluster_gpus() // cfg.train.num_workers)
    return max(1, n)


# -------------------------------------------------------------------------------------- grading


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


def _checkpoint_complete(ckpt: Location) -> bool:
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


# ---------------------------------------------------------------------------------------- trial


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
        while not _checkpoint_complete(ckpt):
            if not self.worker.is_alive() and not _checkpoint_complete(ckpt):
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


# ---------------------------------------------------------------------------------------- study


class StudyStorage:
    """Where a search's Optuna study lives: a database (`tune.optuna_storage`) or `<run_dir>/optuna.journal`.

    The journal (Optuna JournalStorage) is worked on in a local file by the driver: the run's own file
    when the run is on this disk; for a run in object storage, a file in a temporary directory,
    downloaded from `<run_dir>/optuna.journal` on first use in a process and copied back there by
    `push` (after every trial, and with every Tune experiment checkpoint). It pickles as the run's URI
    and the URL, so a searcher restored by `Tuner.restore` reconnects in the process that restores it.
    """

    _working: Dict[str, Path] = {}  # run URI -> this process's local copy of the journal
    _pushed: Dict[str, int] = {}  # run URI -> size of the journal last copied to the run's storage
    _lock = threading.Lock()

    def __init__(self, run: Where, url: Optional[str] = None):
        self.run_uri = as_location(run).uri
        self.url = url

    @classmethod
    def of_run(cls, run: Where) -> "StudyStorage":
        """The study of an existing search run (its tune_config.json names a database, if any)."""
        run = as_location(run)
        try:
            url = ((read_json(run / "tune_config.json") or {}).get("tune") or {}).get("optuna_storage")
        except (FileNotFoundError, ValueError):
            url = None
        return cls(run, url)

    @property
    def run(self) -> Location:
        return Location(self.run_uri)

    @property
    def study_name(self) -> str:
        # A database may hold the studies of many runs: each run's study is named after the run.
        return f"{STUDY}:{self.run_uri}" if self.url else STUDY

    def describe(self) -> str:
        """Where the study is, for messages and summaries (a database password hidden)."""
        return redact(self.url) if self.url else (self.run / JOURNAL).uri

    def exists(self) -> bool:
        if self.url:
            return True
        if self.run.is_local or self.run_uri in self._working:
            return self.local_journal().exists()
        return (self.run / JOURNAL).exists()

    def local_journal(self) -> Path:
        """The journal file the driver works on (downloaded from the run's storage on first use)."""
        run = self.run
        if run.is_local:
            return run.local_path() / JOURNAL
        with self._lock:
            path = self._working.get(self.run_uri)
            if path is None:
                path = Path(tempfile.mkdtemp(prefix="rayrobust-study-")) / JOURNAL
                try:
                    data = (run / JOURNAL).read_bytes()
                except FileNotFoundError:
                    data = None
                if data is not None:
                    path.write_bytes(data)
                    self._pushed[self.run_uri] = len(data)
                self._working[self.run_uri] = path
            return path

    def storage(self):
        """An Optuna storage of the study (a ConfigError when the database cannot be opened)."""
        import optuna

        if self.url:
            try:
                return optuna.storages.RDBStorage(self.url)
            except Exception as e:  # missing driver, unreachable host, bad credentials
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                raise ConfigError(f"cannot open tune.optuna_storage={self.describe()!r}: {redact(first)}") from None
        from optuna.storages.journal import JournalFileBackend

        path = self.local_journal()
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))

    def push(self, *, strict: bool = True) -> None:
        """Copy the local journal to `<run_dir>/optuna.journal` when it changed since the last copy.
        strict=False: a failed copy is a warning (the next trial's copy retries)."""
        if self.url or self.run.is_local:
            return
        path = self.local_journal()
        with self._lock:
            if not path.exists():
                return
            size = path.stat().st_size
            if self._pushed.get(self.run_uri) == size:
                return
            try:
                (self.run / JOURNAL).upload(path)
            except RayRobustError as e:
                if strict:
                    raise
                print(f"warning: {e}; retrying after the next trial", flush=True)
                return
            self._pushed[self.run_uri] = size


def journal_storage(run_dir: Where):
    """The Optuna storage of the study of the search in `run_dir`."""
    return StudyStorage.of_run(run_dir).storage()


class StudySync(Callback):
    """Tune callback on the driver: copies the Optuna journal to the run's storage as trials start and end."""

    def __init__(self, study: StudyStorage):
        self.study = study

    def on_trial_start(self, iteration, trials, trial, **info):
        self.study.push(strict=False)

    def on_trial_complete(self, iteration, trials, trial, **info):  # after the searcher told Optuna
        self.study.push(strict=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.study.push(strict=False)

    def on_experiment_end(self, trials, **info):
        self.study.push(strict=False)


class TrialBar(Callback):
    """Tune callback on the driver: when interactive (`progress_enabled()`), a bar over the trials finished
    (trial/s, ETA), with how many run now. A resumed search counts the trials it restored as finished."""

    FINISHED = ("TERMINATED", "ERROR")

    def __init__(self, total: int):
        self.total = total
        self.bar: Optional[Bar] = None

    def _show(self, trials, extra: Optional[str] = None) -> None:
        finished = {t.trial_id for t in trials if t.status in self.FINISHED}
        if extra is not None:
            finished.add(extra)
        running = sum(1 for t in trials if t.status == "RUNNING" and t.trial_id not in finished)
        if self.bar is None:
            self.bar = Bar(total=self.total, desc="trials", unit="trial", initial=len(finished))
        self.bar.set_count(len(finished))
        self.bar.postfix(f"{running} running")

    def on_trial_start(self, iteration, trials, trial, **info):
        self._show(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._show(trials, trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._show(trials, trial.trial_id)

    def on_experiment_end(self, trials, **info):
        if self.bar is not None:
            self._show(trials)
            self.bar.close()

    def __getstate__(self) -> Dict[str, Any]:  # saved with the experiment state: the bar stays on the driver
        return {"total": self.total, "bar": None}


class RecordingOptunaSearch(OptunaSearch):
    """OptunaSearch that stores each trial's raw numbers and flags as Optuna user attributes, and whose
    saved state names its study by run (not by a file on the driver that saved it): restored in
    another process, on another node, it reconnects to the study there."""

    def __init__(self, study: StudyStorage, **kwargs):
        self._study_store = study
        super().__init__(study_name=study.study_name, storage=study.storage(), **kwargs)

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        study = state.pop("_ot_study", None)
        state["_storage"] = None
        state["_ot_sampler"] = study.sampler if study is not None else None  # the sampler's RNG continues
        state["_ot_trials"] = {tid: t._trial_id for tid, t in self._ot_trials.items()}
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        import optuna

        if "_ot_sampler" not in state:  # the state of a plain OptunaSearch
            self.__dict__.update(state)
            self.__dict__.setdefault("_study_store", None)
            return
        state = dict(state)
        trial_ids, sampler = state.pop("_ot_trials"), state.pop("_ot_sampler")
        self.__dict__.update(state)
        self._storage = self._study_store.storage()
        self._setup_study(self._mode)  # loads the existing study
        if sampler is not None:
            self._ot_study.sampler = sampler
        self._ot_trials = {}
        for tid, number in trial_ids.items():
            try:
                self._ot_trials[tid] = optuna.Trial(self._ot_study, number)
            except Exception:  # asked after the journal's last copy: recorded afresh when the trial completes
                pass

    def save(self, checkpoint_path: str):
        if self._study_store is not None:  # the stored journal is never older than the searcher state
            self._study_store.push(strict=False)
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str):
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        if isinstance(state, dict):
            self.__setstate__(state)
        else:
            super().restore(checkpoint_path)

    def on_trial_complete(self, trial_id, result=None, error=False):
        if trial_id in self._completed_trials:
            return
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            self._record_unknown(trial_id, result)
            self._completed_trials.add(trial_id)
            return
        try:
            ot_trial.set_user_attr("tune_trial_id", trial_id)
            for key in USER_ATTRS:
                if result and key in result:
                    ot_trial.set_user_attr(key, result[key])
        except Exception:  # the trial was already finished in the storage (a resumed search)
            pass
        super().on_trial_complete(trial_id, result=result, error=error)

    def _record_unknown(self, trial_id: str, result: Optional[Dict[str, Any]]) -> None:
        """A trial the study does not know (asked after the last copy of the journal a resumed search
        started from): added as a finished trial with its parameters and values."""
        import optuna

        result = result or {}
        params = {k: v for k, v in (result.get("config") or {}).items() if k in self._space}
        if set(params) != set(self._space):
            return
        values = [result.get(m) for m in OBJECTIVES]
        done = all(v is not None for v in values)
        attrs = {"tune_trial_id": trial_id, **{k: result[k] for k in USER_ATTRS if k in result}}
        try:
            self._ot_study.add_trial(optuna.trial.create_trial(
                params=params, distributions=self._space, values=values if done else None, user_attrs=attrs,
                state=optuna.trial.TrialState.COMPLETE if done else optuna.trial.TrialState.FAIL))
        except Exception as e:
            print(f"warning: trial {trial_id} could not be recorded in the Optuna study: {e}", flush=True)


def _trainable(cfg: ExperimentConfig, run: Location):
    from ray import tune

    fn = tune.with_parameters(Trial, base=cfg.to_dict(), run_dir=run.uri)
    # The trial itself holds no CPU or GPU (its TorchTrainer workers do); Tune refuses an empty
    # request, so the trial asks for one byte of memory instead.
    return tune.with_resources(fn, {"CPU": 0, "memory": 1})


def _tuner(cfg: ExperimentConfig, run: Location, study_store: StudyStorage):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    tc = cfg.tune
    space = {p.name: p.distribution() for p in tc.params()}
    import optuna

    study = optuna.create_study(study_name=study_store.study_name, storage=study_store.storage(),
                                directions=["maximize", "maximize"], load_if_exists=True)
    with warnings.catch_warnings():  # set_metric_names is marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(OBJECTIVES)  # objective names shown by optuna-dashboard
    study_store.push()
    searcher = RecordingOptunaSearch(study_store, space=space, metric=OBJECTIVES, mode=["max", "max"], seed=tc.seed)
    if tc.asha:
        scheduler = ASHAScheduler(metric=ASHA_METRIC, mode="max", time_attr="training_iteration",
                                  max_t=cfg.train.epochs, grace_period=min(tc.grace_period, cfg.train.epochs),
                                  reduction_factor=tc.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        _trainable(cfg, run),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=tc.num_samples,
                                    max_concurrent_trials=max_concurrent(cfg)),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=run.uri, verbose=1,
                                  callbacks=[StudySync(study_store), TrialBar(tc.num_samples)],
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )


def _prepare_ray(cfg: ExperimentConfig) -> None:
    from ..raycluster import ensure_ray

    # Experiment state is written at least every few seconds, so a killed driver loses little.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    ensure_ray(cfg.ray_address)


def run_tune(cfg: ExperimentConfig) -> Dict[str, Any]:
    """Run the search of `cfg.tune` in `cfg.run_dir` (a local path or a storage URI), then re-evaluate the
    selected trials. Every input is checked before anything is written."""
    from ray import tune

    check_search(cfg)
    run = cfg.run_location()
    check_writable(run)  # a wrong bucket, endpoint or credential fails here
    exp = run / EXPERIMENT
    if tune.Tuner.can_restore(exp.uri):
        raise ConfigError(f"{run.uri} already holds a search; continue it with `rayrobust tune --resume {run.uri}` "
                          "or choose another run_dir (--set run_dir=...)")
    from ..train.ray_train import preflight_data

    preflight_data(cfg)
    study_store = StudyStorage(run, cfg.tune.optuna_storage)
    study_store.storage()  # an unreachable database fails here
    write_json(run / "tune_config.json", cfg.to_dict())
    _prepare_ray(cfg)
    print(f"== search: {cfg.tune.num_samples} trial(s), {max_concurrent(cfg)} at a time; "
          f"Optuna study in {study_store.describe()}; Tune experiment in {exp.uri}", flush=True)
    grid = _tuner(cfg, run, study_store).fit()
    return finish(cfg, run, grid, study_store)


def resume_tune(run_dir: Where) -> Dict[str, Any]:
    """Continue an interrupted search (local path or storage URI): finished trials are kept, unfinished
    ones continue; a finished search is summarised again without running any trial."""
    from ray import tune

    run = as_location(run_dir)
    try:
        raw = read_json(run / "tune_config.json")
    except FileNotFoundError:
        raise ConfigError(f"{run.uri} holds no search (no tune_config.json); start one with "
                          "`rayrobust tune --config ...`") from None
    except ValueError:
        raise ConfigError(f"{(run / 'tune_config.json').uri} is not valid JSON; the search cannot be resumed") from None
    cfg = config_from_dict(raw)
    exp = run / EXPERIMENT
    if not tune.Tuner.can_restore(exp.uri):
        raise ConfigError(f"{exp.uri} has no Tune experiment state to resume (the search was killed before its first "
                          f"checkpoint); delete {run.uri} and start again")
    study_store = StudyStorage(run, cfg.tune.optuna_storage)
    study_store.storage()  # the journal is downloaded from the run's storage here
    _prepare_ray(cfg)
    print(f"== resuming the search in {exp.uri} (Optuna study in {study_store.describe()})", flush=True)
    tuner = tune.Tuner.restore(exp.uri, trainable=_trainable(cfg, run), resume_unfinished=True,
                               resume_errored=True, restart_errored=False)
    grid = tuner.fit()
    return finish(cfg, run, grid, study_store)


# ------------------------------------------------------------------------------------ selection


def pareto_front(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Rows not dominated in (clean_acc, robust_acc), best robust first."""
    front = []
    for r in rows:
        dominated = any(o is not r and o["clean_acc"] >= r["clean_acc"] and o["robust_acc"] >= r["robust_acc"]
                        and (o["clean_acc"] > r["clean_acc"] or o["robust_acc"] > r["robust_acc"]) for o in rows)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: (-r["robust_acc"], -r["clean_acc"], r["trial_id"]))


def select(rows: List[Dict[str, Any]], top_k: int) -> List[Dict[str, Any]]:
    """Never a flagged trial; prefer trials that trained every epoch (not stopped by ASHA)."""
    ok = [r for r in rows if not r["flagged"] and r.get("status") == "TERMINATED"]
    full = [r for r in ok if r["epoch"] >= r["epochs_planned"]]
    return pareto_front(full or ok)[:top_k]


def _trial_rows(run: Location, grid) -> List[Dict[str, Any]]:
    rows = []
    for result in grid:
        m = result.metrics or {}
        trial_id = m.get("trial_id") or PurePosixPath(str(result.path)).name
        try:
            params = read_json(run / "trials" / trial_id / "params.json")["params"]
        except (FileNotFoundError, ValueError, KeyError):
            params = dict(result.config or {})
        rows.append({
            "trial_id": trial_id, "params": params, "method": m.get("method"),
            "status": "ERROR" if result.error else "TERMINATED",
            "epoch": int(m.get("epoch", 0)), "epochs_planned": int(m.get("epochs_planned", 0)),
            "clean_acc": m.get("clean_acc"), "robust_acc": m.get("robust_acc"), "pgd_ce_acc": m.get("pgd_ce_acc"),
            "robust_objective": m.get("robust_objective"), "flagged": bool(m.get("flagged", 1)) if m else True,
            "flags": [f for f in str(m.get("flags", "")).split(",") if f] if m else ["no_result"],
            "error": str(result.error).splitlines()[0] if result.error else None,
        })
    return sorted(rows, key=lambda r: r["trial_id"])


def _close_orphans(study_store: StudyStorage) -> int:
    """Optuna trials left RUNNING by a killed driver (never told): mark them FAIL, labelled."""
    import optuna

    storage = study_store.storage()
    study = optuna.load_study(study_name=study_store.study_name, storage=storage)
    n = 0
    for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
        storage.set_trial_user_attr(t._trial_id, "orphaned", "asked by a search driver that was killed; its Tune trial was not kept")
        storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        n += 1
    return n


def _final_eval(tcfg: ExperimentConfig, ckpt: Location, out: Location, label: str) -> Dict[str, Any]:
    """Full AutoAttack of a selected trial; an earlier evaluation of the same checkpoint with the same
    eval settings (a resumed or re-summarised search) is reused."""
    from ..checkpoint import checkpoint_sha256
    from ..evaluation import evaluate_checkpoint

    try:
        old = read_json(out)
        prov = old.get("provenance") or {}
        if (prov.get("checkpoint_sha256") == checkpoint_sha256(ckpt)
                and (prov.get("config") or {}).get("eval") == tcfg.to_dict()["eval"]):
            print(f"   reusing {out.uri} (same checkpoint, same eval settings)", flush=True)
            return old
    except (FileNotFoundError, ValueError, AttributeError):
        pass
    return evaluate_checkpoint(tcfg, ckpt, out, label=label)


def finish(cfg: ExperimentConfig, run: Location, grid, study_store: Optional[StudyStorage] = None) -> Dict[str, Any]:
    """Select the Pareto front, re-evaluate it with full AutoAttack, write tune_summary.json and summary.json."""
    from ..checkpoint import latest_valid_checkpoint
    from ..pipeline import format_table, summary_row

    run = as_location(run)
    study_store = study_store or StudyStorage(run, cfg.tune.optuna_storage)
    rows = _trial_rows(run, grid)
    orphans = _close_orphans(study_store)
    study_store.push()
    chosen = select(rows, cfg.tune.final_top_k)
    final = []
    for r in chosen:
        tdir = run / "trials" / r["trial_id"]
        ckpt = latest_valid_checkpoint(tdir / CHECKPOINTS)
        if ckpt is None:
            print(f"warning: trial {r['trial_id']} has no valid checkpoint in {(tdir / CHECKPOINTS).uri}; "
                  "not re-evaluated", flush=True)
            continue
        tcfg = config_from_dict(read_json(tdir / "params.json")["config"])
        print(f"== final AutoAttack: trial {r['trial_id']} ({r['method']}, {r['params']})", flush=True)
        res = _final_eval(tcfg, ckpt, tdir / "final_eval.json", r["trial_id"])
        final.append({"trial_id": r["trial_id"], "params": r["params"], **summary_row(res),
                      "autoattack_per_attack": (res.get("autoattack") or {}).get("per_attack"),
                      "eval": (tdir / "final_eval.json").uri})
    from ..labels import autoattack_label

    ec = cfg.eval
    attacks = {"grading": GRADING, "pgd_ce": f"PGD-{PGD_CE_STEPS} on cross-entropy (contrast only, never the objective)",
               "pgd": f"{ec.norm} PGD-{ec.pgd_steps}, {ec.pgd_restarts} restart(s) (weaker than AutoAttack)",
               "autoattack": f"{autoattack_label(ec.autoattack_version)}, {ec.norm} (pyautoattack)"}
    summary = {
        "kind": "tune", "dataset": cfg.data.name, "eps": ec.eps, "norm": ec.norm, "n_eval": ec.n_eval,
        "n_autoattack": ec.n_autoattack, "pgd_steps": ec.pgd_steps, "val_n": cfg.tune.val_n, "num_samples": cfg.tune.num_samples,
        "space": cfg.tune.space, "objectives": OBJECTIVES, "asha_metric": ASHA_METRIC if cfg.tune.asha else None,
        "storage": study_store.describe(), "study_name": study_store.study_name,
        "experiment_dir": (run / EXPERIMENT).uri,
        "attacks": attacks, "trials": rows, "pareto": [r["trial_id"] for r in pareto_front(
            [r for r in rows if not r["flagged"] and r["clean_acc"] is not None])],
        "selected": [r["trial_id"] for r in chosen], "final": final, "orphaned_optuna_trials": orphans,
        "provenance": provenance(config=cfg.to_dict(), seed=cfg.tune.seed),
    }
    write_json(run / "tune_summary.json", summary)
    write_json(run / "summary.json", {
        "kind": "tune", "dataset": cfg.data.name, "eps": ec.eps, "norm": ec.norm, "n_eval": ec.n_eval,
        "n_autoattack": ec.n_autoattack, "attacks": attacks,
        "rows": [{k: f[k] for k in ("trial_id", "method", "clean_acc", "pgd_acc", "autoattack_acc", "flags")} for f in final],
        "tune_summary": (run / "tune_summary.json").uri, "provenance": summary["provenance"]})
    _print_trials(rows)
    if final:
        print(format_table(final, pgd_steps=ec.pgd_steps, n_eval=ec.n_eval, n_aa=ec.n_autoattack, eps=ec.eps), flush=True)
    else:
        print("no unflagged trial finished: nothing re-evaluated", flush=True)
    print(f"summary: {(run / 'tune_summary.json').uri}", flush=True)
    return summary


def _print_trials(rows: List[Dict[str, Any]]) -> None:
    head = f"{'trial':<16} {'method':<10} {'epochs':>6} {'clean':>7} {'APGD':>7} {'PGD-CE':>7}  flags"
    print(head + "\n" + "-" * len(head), flush=True)
    fmt = lambda v: "   -   " if v is None else f"{v:7.4f}"  # noqa: E731
    for r in rows:
        print(f"{r['trial_id']:<16} {str(r['method']):<10} {r['epoch']:>6} {fmt(r['clean_acc'])} {fmt(r['robust_acc'])} "
              f"{fmt(r['pgd_ce_acc'])}  {', '.join(r['flags']) or '-'}", flush=True)
    print(f"APGD = APGD-CE + APGD-T (pyautoattack) on the validation subset; PGD-CE = PGD-{PGD_CE_STEPS} on "
          "cross-entropy, shown for contrast only.", flush=True)
