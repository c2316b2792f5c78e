"""Where a search's Optuna study lives and how the driver keeps it in the run's storage (`StudyStorage`,
`StudySync`), and the Optuna searcher that records every trial's numbers (`RecordingOptunaSearch`)."""
from __future__ import annotations

import pickle
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, Optional

from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from ..errors import ConfigError, RayRobustError
from ..io import read_json
from ..location import Location, Where, as_location
from .config import applies, redact
from .trial import SETS

EXPERIMENT = "tune"
STUDY = "rayrobust"
JOURNAL = "optuna.journal"
OBJECTIVES = ["clean_acc", "robust_objective"]  # the Optuna study's values, both maximised
ASHA_METRIC = "robust_objective"
USER_ATTRS = ("clean_acc", "robust_acc", "pgd_ce_acc", "robust_objective", "flagged", "flags", "epoch",
              "epochs_planned")

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
        space = self._space
        params = {k: v for k, v in (result.get("config") or {}).items() if k in SETS}
        method = params.get("method", space.fixed_method)
        if set(params) != {s.name for s in space.specs if s.name == "method" or applies(s.name, method)}:
            return
        values = [result.get(m) for m in OBJECTIVES]
        done = all(v is not None for v in values)
        attrs = {"tune_trial_id": trial_id, **{k: result[k] for k in USER_ATTRS if k in result}}
        try:
            self._ot_study.add_trial(optuna.trial.create_trial(
                params=params, distributions=space.distributions(params), values=values if done else None, user_attrs=attrs,
                state=optuna.trial.TrialState.COMPLETE if done else optuna.trial.TrialState.FAIL))
        except Exception as e:
            print(f"warning: trial {trial_id} could not be recorded in the Optuna study: {e}", flush=True)
