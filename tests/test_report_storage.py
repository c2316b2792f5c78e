"""`rayrobust report` and the Optuna study of a search whose run directory is in object storage (the
moto S3 server of conftest): nothing is read from or written to a shared filesystem."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from test_report_browser import make_pipeline_run, make_search_run


def _upload_tree(local: Path, uri: str) -> None:
    from rayrobust.location import Location

    base = Location(uri)
    for f in sorted(local.rglob("*")):
        if f.is_file() and not f.name.endswith(".lock"):
            (base / f.relative_to(local).as_posix()).upload(f)


def test_report_of_a_search_in_object_storage(s3_server, tmp_path):
    from rayrobust.cli import main
    from rayrobust.location import Location

    bucket = s3_server.make_bucket("rr-report-search")
    uri = f"{bucket}/runs/search"
    _upload_tree(make_search_run(tmp_path / "search"), uri)
    assert main(["report", uri]) == 0
    keys = s3_server.keys("rr-report-search", "runs/search/")
    assert "runs/search/report.html" in keys and not any(k.endswith(".tmp") for k in keys)
    text = Location(uri + "/report.html").read_text()
    # the importances come from the study in the bucket's optuna.journal
    assert '<figure id="plot-importance">' in text
    assert '<figure id="plot-eps">' in text  # final_eval.json found next to the trial, not at its old local path
    assert text.count('id="curve-') == 5 and 'class="flag">zero_gradients' in text
    summary = json.loads(Location(uri + "/summary.json").read_text())
    assert summary["report"] == f"{uri}/report.html"


def test_report_of_a_pipeline_in_object_storage(s3_server, tmp_path):
    from rayrobust.location import Location
    from rayrobust.tune.report import write_report

    bucket = s3_server.make_bucket("rr-report-pipeline")
    uri = f"{bucket}/p"
    local = make_pipeline_run(tmp_path / "pipeline")
    summary = json.loads((local / "summary.json").read_text())
    (local / "summary.json").unlink()  # methods found by listing <run_dir>/*/eval.json in the bucket
    _upload_tree(local, uri)
    Location(uri + "/tune_summary.json").delete()
    Location(uri + "/extra.json").write_text(json.dumps({**summary, "rows": []}))
    with pytest.raises(Exception, match="neither tune_summary.json nor summary.json"):
        write_report(uri)
    Location(uri + "/summary.json").write_text(json.dumps({**summary, "rows": []}))
    out = write_report(uri)
    text = out.read_text()
    assert out.uri == f"{uri}/report.html"
    assert text.count('id="curve-') == 2 and "pgd_at" in text and "standard" in text


def test_report_bad_locations_are_one_line_errors(s3_server, capsys):
    from rayrobust.cli import main

    s3_server.make_bucket("rr-report-empty")
    assert main(["report", "ftp://host/run"]) == 2
    err = capsys.readouterr().err
    assert "unknown storage scheme 'ftp://'" in err and len(err.strip().splitlines()) == 1
    assert main(["report", "s3://rr-report-empty/nothing/here"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert s3_server.keys("rr-report-empty") == []  # nothing half-written


def test_journal_lives_in_the_bucket_and_a_restored_searcher_reconnects(s3_server):
    """The driver works on a local copy of optuna.journal and pushes it to the run's storage; a searcher
    pickled by Tune (experiment state) and restored in a process without that copy reconnects to the
    study downloaded from the bucket, and its sampler continues instead of repeating suggestions."""
    import optuna

    from rayrobust.tune.config import ConditionalSpace, TuneConfig
    from rayrobust.tune.study import JOURNAL, STUDY, RecordingOptunaSearch, StudyStorage, journal_storage

    bucket = s3_server.make_bucket("rr-study")
    uri = f"{bucket}/runs/s"
    space = ConditionalSpace(TuneConfig(space={"train_eps": {"low": 0.5, "high": 1.5}}).params(), "pgd_at")
    store = StudyStorage(uri)
    optuna.create_study(study_name=STUDY, storage=store.storage(), directions=["maximize", "maximize"])
    searcher = RecordingOptunaSearch(store, space=space, metric=["clean_acc", "robust_objective"],
                                     mode=["max", "max"], seed=0)
    first = searcher.suggest("t1")
    searcher.on_trial_complete("t1", {"clean_acc": 0.9, "robust_objective": 0.4, "robust_acc": 0.4})
    searcher.suggest("t2")  # running when the driver dies
    state = pickle.dumps(searcher)
    store.push()
    assert f"runs/s/{JOURNAL}" in s3_server.keys("rr-study", "runs/s/")

    StudyStorage._working.clear()  # a new driver process: no local copy of the journal
    StudyStorage._pushed.clear()
    restored = pickle.loads(state)
    local = StudyStorage(uri).local_journal()
    assert local.exists() and not str(local).startswith(str(Path.cwd()))
    assert set(restored._ot_trials) == {"t1", "t2"}
    third = restored.suggest("t3")
    assert third != first  # the sampler's RNG continued (a fresh TPE with seed 0 would repeat trial 1)
    restored.on_trial_complete("t2", {"clean_acc": 0.8, "robust_objective": 0.5, "robust_acc": 0.5})
    restored.on_trial_complete("t4", {"clean_acc": 0.7, "robust_objective": 0.3, "config": {"train_eps": 1.1}})
    StudyStorage(uri).push()
    StudyStorage._working.clear()
    study = optuna.load_study(study_name=STUDY, storage=journal_storage(uri))
    done = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert sorted(t.user_attrs["tune_trial_id"] for t in done) == ["t1", "t2", "t4"]


def test_optuna_storage_database_url(tmp_path):
    """tune.optuna_storage: a study in a database, named after the run; bad URLs are one-line errors."""
    import optuna

    from rayrobust.config import load_config
    from rayrobust.errors import ConfigError
    from rayrobust.tune.study import StudyStorage, journal_storage

    url = f"sqlite:///{tmp_path / 'studies.db'}"
    cfg = load_config(None, [f"tune.optuna_storage={url}", f"run_dir={tmp_path / 'run'}"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tune_config.json").write_text(json.dumps(cfg.to_dict()))
    store = StudyStorage.of_run(tmp_path / "run")
    assert store.url == url and store.study_name == f"rayrobust:{tmp_path / 'run'}"
    optuna.create_study(study_name=store.study_name, storage=journal_storage(tmp_path / "run"))
    assert optuna.get_all_study_names(url) == [store.study_name]
    assert not (tmp_path / "run" / "optuna.journal").exists()
    for bad, msg in (("redis://host/0", "unknown database scheme 'redis://'"),
                     ("sqlite://", "names no database file"),
                     ("postgresql://user:secret@/db", "needs a host and a database")):
        with pytest.raises(ConfigError, match=msg) as err:
            load_config(None, [f"tune.optuna_storage={bad}"])
        assert "secret" not in str(err.value) and "\n" not in str(err.value)
    missing_driver = StudyStorage(tmp_path, "postgresql://user:secret@db.invalid/optuna")
    with pytest.raises(ConfigError, match="cannot open tune.optuna_storage='postgresql://user:\\*\\*\\*@db.invalid") as err:
        missing_driver.storage()
    assert "secret" not in str(err.value)
