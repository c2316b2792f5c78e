"""`rayrobust dashboard RUN_DIR`: optuna-dashboard over the Optuna study of a search, and TensorBoard's command.

The study is found the way `rayrobust report` finds it (`rayrobust.tune.study.StudyStorage`):

- a run on this disk: `<run_dir>/optuna.journal` is served live (the page follows a running search);
- a run in object storage (s3://, gs://): the journal is downloaded to a temporary file first, so the
  dashboard shows a snapshot taken at start; restart the command to see newer trials;
- `tune.optuna_storage` (a database URL in the run's tune_config.json): the database is served directly
  (live), and the printed address opens this run's study among the database's studies.

optuna-dashboard runs on the standard library's threaded WSGI server (as its own `wsgiref` server
does), bound to 127.0.0.1 by default: reach it from another machine through an SSH tunnel
(`ssh -N -L 8080:127.0.0.1:8080 user@host`) rather than binding it to a public interface.

TensorBoard reads the per-trial event files that Ray Tune writes into `<run_dir>/tune/<trial>/`; the
command prints `tensorboard --logdir <run_dir>/tune` for it (TensorBoard and optuna-dashboard come with
`pip install 'rayrobust[dashboard]'`, which `make setup` installs).
"""
from __future__ import annotations

import errno
import importlib.util
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any, Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from .errors import ConfigError
from .location import Where, as_location

INSTALL = "pip install 'rayrobust[dashboard]'"


@dataclass
class Study:
    """The Optuna study of a search run, opened for the dashboard."""

    storage: Any  # an optuna BaseStorage
    study_id: int
    name: str
    source: str  # where it is, for messages (a database password hidden)
    snapshot: bool  # a downloaded copy of a journal in object storage
    n_trials: int
    _tmp: Optional[tempfile.TemporaryDirectory] = field(default=None, repr=False)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def open_study(run_dir: Where) -> Study:
    """The study of the search in `run_dir` (a local path or a storage URI); a RayRobustError naming the
    problem when the run directory does not exist or holds no study."""
    import optuna

    from .tune.study import JOURNAL, StudyStorage

    run = as_location(run_dir)
    if not run.is_dir():
        raise ConfigError(f"run directory {run.uri!r} does not exist; pass the run_dir of a `rayrobust tune` run")
    store = StudyStorage.of_run(run)
    tmp = None
    if store.url:
        storage = store.storage()  # ConfigError (one line, password hidden) when the database cannot be opened
        source, snapshot = store.describe(), False
    else:
        journal = run / JOURNAL
        if not journal.is_file():
            raise ConfigError(f"{run.uri!r} holds no Optuna study ({JOURNAL} not found): `rayrobust dashboard` needs "
                              "the run_dir of a `rayrobust tune` search (a `rayrobust pipeline` run has no study)")
        from optuna.storages.journal import JournalFileBackend

        if run.is_local:
            path, snapshot = journal.local_path(), False
        else:
            tmp = tempfile.TemporaryDirectory(prefix="rayrobust-dashboard-")
            path, snapshot = Path(tmp.name) / JOURNAL, True
            path.write_bytes(journal.read_bytes())
        storage = optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        source = journal.uri
    try:
        study_id = storage.get_study_id_from_name(store.study_name)
    except KeyError:
        if tmp is not None:
            tmp.cleanup()
        raise ConfigError(f"{source} has no study named {store.study_name!r}; is {run.uri!r} the run_dir of "
                          "that search?") from None
    n_trials = len(storage.get_all_trials(study_id, deepcopy=False))
    return Study(storage, study_id, store.study_name, source, snapshot, n_trials, tmp)


def tensorboard_command(run_dir: Where) -> str:
    """How to open the run's TensorBoard logs (Ray Tune's per-trial event files under <run_dir>/tune/)."""
    run = as_location(run_dir)
    logdir = run / "tune"
    cmd = f"tensorboard --logdir {shlex.quote(logdir.uri)}"
    if run.is_local:
        note = "" if logdir.is_dir() else f"  ({logdir.uri} does not exist yet: Tune writes it as trials run)"
    elif run.scheme == "s3":
        boto3 = importlib.util.find_spec("boto3") is not None
        note = (f"  (TensorBoard reads s3:// itself through boto3{'' if boto3 else ', once installed: pip install boto3'}, "
                f"with the same AWS_* variables; or copy {logdir.uri} down first and pass the local copy)")
    else:
        note = ("  (TensorBoard reads gs:// through fsspec once gcsfs is installed: pip install gcsfs; or copy "
                f"{logdir.uri} down first, e.g. `gcloud storage cp -r {shlex.quote(logdir.uri)} .`, and pass the local copy)")
    exe = _tensorboard_exe()
    if exe is None:
        note += f"  [tensorboard is not installed: {INSTALL}]"
    elif exe != "tensorboard":  # installed beside this Python, whose bin/ is not on PATH (a venv not activated)
        cmd = shlex.quote(exe) + cmd[len("tensorboard"):]
    return cmd + note


def _tensorboard_exe() -> Optional[str]:
    if shutil.which("tensorboard"):
        return "tensorboard"
    beside = Path(sys.executable).parent / "tensorboard"
    return str(beside) if beside.is_file() else None


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # no line per request
        pass


class DashboardServer(ThreadingMixIn, WSGIServer):
    """optuna-dashboard's WSGI app on a threaded standard-library server: `serve_forever()` in the
    foreground (the command) or a thread (tests); `shutdown()` + `server_close()` stop it."""

    daemon_threads = True

    def __init__(self, storage: Any, host: str = "127.0.0.1", port: int = 8080):
        try:
            import optuna_dashboard
        except ImportError:
            raise ConfigError(f"optuna-dashboard is not installed: {INSTALL}") from None
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            super().__init__((host, port), _QuietHandler)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on {host} is in use; pass another with --port") from None
            if isinstance(e, socket.gaierror):
                raise ConfigError(f"cannot listen on --host {host!r}: unknown host") from None
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self.set_app(optuna_dashboard.wsgi(storage))

    def url(self, path: str = "") -> str:
        host, port = self.server_address[:2]
        if self.address_family == socket.AF_INET6:
            host = f"[{host}]"
        return f"http://{host}:{port}{path}"

    def start(self) -> threading.Thread:
        """Serve in a daemon thread (for tests and notebooks)."""
        thread = threading.Thread(target=self.serve_forever, name="optuna-dashboard", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def study_path(study: Study) -> str:
    return f"/dashboard/studies/{study.study_id}"


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve(run_dir: Where, host: str = "127.0.0.1", port: int = 8080) -> None:
    """The `rayrobust dashboard` command: print where the study is and TensorBoard's command, then serve
    optuna-dashboard until Ctrl-C."""
    study = open_study(run_dir)
    try:
        server = DashboardServer(study.storage, host, port)
        how = ("a snapshot downloaded now: restart to see newer trials; changes made in the dashboard are not "
               "copied back" if study.snapshot else "live")
        print(f"Optuna study {study.name!r}: {study.source} ({study.n_trials} trials, {how})")
        print(f"TensorBoard (Ray Tune's per-trial logs): {tensorboard_command(run_dir)}")
        if host in ("0.0.0.0", "::", ""):
            print(f"warning: listening on every interface ({host}); anyone who reaches this port can read and "
                  "edit the study", flush=True)
        print(f"optuna-dashboard: {server.url(study_path(study))}  (Ctrl-C to stop)", flush=True)
        if threading.current_thread() is threading.main_thread():  # SIGTERM stops it like Ctrl-C: the copy is removed
            signal.signal(signal.SIGTERM, _interrupt)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    finally:
        study.close()


__all__ = ["DashboardServer", "Study", "open_study", "serve", "study_path", "tensorboard_command"]
