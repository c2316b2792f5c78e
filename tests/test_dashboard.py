"""`rayrobust dashboard`: optuna-dashboard over the Optuna study of a finished search (the run directory
`make_search_run` writes: a real journal, 5 trials with two objectives), served on a free loopback port
and loaded in real headless Chromium; the study of a run in object storage (a snapshot of its journal);
TensorBoard's command; and the one-line errors of the command."""
from __future__ import annotations

import io
import json
import socket
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest

from test_report_browser import browser, make_pipeline_run, make_search_run  # noqa: F401  (module-scoped Chromium)
from test_report_storage import _upload_tree


def _search_run(run_dir: Path) -> Path:
    """make_search_run's run, with the objective names `rayrobust tune` gives its study."""
    import optuna

    from optuna.storages.journal import JournalFileBackend

    from rayrobust.tune.study import JOURNAL, OBJECTIVES, STUDY

    make_search_run(run_dir)
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(run_dir / JOURNAL)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.load_study(study_name=STUDY, storage=storage).set_metric_names(OBJECTIVES)
    return run_dir


def _js(x: float) -> str:
    """A number as JavaScript prints it (0.0 -> '0', 0.8300000000000001 stays)."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _serve(study):
    """A DashboardServer of `study` on a free loopback port, serving in a thread, once it answers."""
    from rayrobust.dashboard import DashboardServer

    server = DashboardServer(study.storage, "127.0.0.1", 0)
    server.start()
    deadline = time.time() + 30
    while True:
        try:
            with urllib.request.urlopen(server.url("/api/meta"), timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            if time.time() > deadline:
                server.stop()
                raise
            time.sleep(0.1)


def _get_json(server, path: str) -> dict:
    with urllib.request.urlopen(server.url(path), timeout=10) as r:
        return json.loads(r.read())


def _body_text(driver, *needles: str, timeout: float = 90) -> str:
    """The page's text once every needle is in it (the dashboard is a React app: it draws its frame, then
    fills it in when the study's data has loaded)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.2).until(
        lambda d: all(n in d.find_element(By.TAG_NAME, "body").text for n in needles))
    return driver.find_element(By.TAG_NAME, "body").text


@pytest.mark.extended  # about 40 s on 2 busy cores (Chromium renders the React app and its Plotly charts)
def test_dashboard_shows_the_search_in_chromium(browser, tmp_path):  # noqa: F811
    from PIL import Image
    from selenium.webdriver.common.by import By

    from rayrobust.dashboard import open_study, study_path

    run = _search_run(tmp_path / "search")
    study = open_study(run)
    assert (study.name, study.n_trials, study.snapshot) == ("rayrobust", 5, False)
    expected = {t.number: t.values for t in study.storage.get_all_trials(study.study_id)}
    assert sorted(expected) == [0, 1, 2, 3, 4] and all(len(v) == 2 for v in expected.values())
    server = _serve(study)
    try:
        # the study page: its title, both objectives named, the Pareto front plotted
        browser.get(server.url(study_path(study)))
        text = _body_text(browser, f"rayrobust (id={study.study_id})", "Pareto Front", "Objective Values")
        for name in ("clean_acc", "robust_objective"):  # the objectives' names, as `rayrobust tune` sets them
            assert name in text, name
        pareto = {t.number for t in study.storage.get_all_trials(study.study_id) if t.values[1] > 0}
        for number in pareto:  # Best Trials: the Pareto front (the flagged trial 2 has objective 0)
            clean, objective = expected[number]
            assert f"Trial {number}\nObjective Values = [{_js(clean)}, {_js(objective)}]" in text, number
        plots = [e for e in browser.find_elements(By.CSS_SELECTOR, ".main-svg")
                 if e.size["width"] > 50 and e.size["height"] > 50]
        assert plots, "no plot rendered"
        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        pixels = np.asarray(Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("L"), dtype=np.float32)
        assert severe == []
        assert pixels.std() > 10 and len(np.unique(pixels)) > 20  # not a blank page

        # the trial list, every trial selected: each trial with both objective values
        browser.get(server.url(study_path(study) + "/trials?numbers=" + ",".join(map(str, expected))))
        text = _body_text(browser, f"Trial {max(expected)} (trial_id=")
        assert "5 Trials" in text
        for number, (clean, objective) in expected.items():
            assert f"Trial {number} (trial_id=" in text, number
            assert f"{_js(clean)}, {_js(objective)}" in text, (number, clean, objective)
        assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        server.stop()
        study.close()


def test_dashboard_of_a_search_in_object_storage_is_a_snapshot(s3_server, tmp_path):
    from rayrobust.dashboard import open_study, study_path, tensorboard_command

    bucket = s3_server.make_bucket("rr-dashboard")
    uri = f"{bucket}/runs/search"
    _upload_tree(_search_run(tmp_path / "search"), uri)
    study = open_study(uri)
    local_copy = Path(study._tmp.name)
    assert study.snapshot and study.n_trials == 5 and study.source == f"{uri}/optuna.journal"
    server = _serve(study)
    try:
        detail = _get_json(server, f"/api/studies/{study.study_id}?after=0")
        assert len(detail["trials"]) == 5 and detail["objective_names"] == ["clean_acc", "robust_objective"]
        assert study_path(study) == f"/dashboard/studies/{study.study_id}"
    finally:
        server.stop()
        study.close()
    assert not local_copy.exists()  # the temporary copy of the journal is removed
    assert s3_server.keys("rr-dashboard", "runs/search/optuna.journal") == ["runs/search/optuna.journal"]
    cmd = tensorboard_command(uri)
    assert cmd.startswith(f"tensorboard --logdir {uri}/tune") or f" --logdir {uri}/tune" in cmd
    assert "boto3" in cmd


def test_dashboard_command_errors_are_one_line(tmp_path, capsys):
    from rayrobust.cli import main
    from rayrobust.dashboard import tensorboard_command

    def one_line_error(argv, *needles):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("rayrobust: error: "), err
        for needle in needles:
            assert needle in err, err

    one_line_error(["dashboard", str(tmp_path / "missing")], "does not exist")
    one_line_error(["dashboard", str(make_pipeline_run(tmp_path / "pipeline"))], "holds no Optuna study")
    one_line_error(["dashboard", "ftp://host/run"], "unknown storage scheme 'ftp://'")
    one_line_error(["dashboard", "s3://x/run"], "names no bucket")

    run = _search_run(tmp_path / "search")
    capsys.readouterr()  # Optuna's log line about the study it created
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        one_line_error(["dashboard", str(run), "--port", str(port)], f"port {port} on 127.0.0.1 is in use")
    assert not list(run.glob("*.tmp"))

    (run / "tune" / "trial_0").mkdir(parents=True)
    cmd = tensorboard_command(run)
    assert cmd.split("  ")[0].endswith(f"tensorboard --logdir {run / 'tune'}")
    assert "does not exist" not in cmd


def test_dashboard_listens_on_loopback_by_default():
    from rayrobust.cli import build_parser

    args = build_parser().parse_args(["dashboard", "runs/tune"])
    assert (args.host, args.port) == ("127.0.0.1", 8080)


def test_dashboard_serves_a_database_study_directly(tmp_path, capsys):
    """tune.optuna_storage: the run's study among the database's studies, named after the run."""
    import optuna

    from rayrobust.cli import main
    from rayrobust.dashboard import open_study, study_path
    from rayrobust.location import Location

    url = f"sqlite:///{tmp_path / 'studies.db'}"
    run = tmp_path / "run"
    run.mkdir()
    (run / "tune_config.json").write_text(json.dumps({"tune": {"optuna_storage": url}}))
    assert main(["dashboard", str(run)]) == 2  # the database holds no study of this run yet
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"no study named 'rayrobust:{Location(run).uri}'" in err

    optuna.create_study(study_name="rayrobust:another-run", storage=url)
    db = optuna.create_study(study_name=f"rayrobust:{Location(run).uri}", storage=url, directions=["maximize"] * 2)
    for values in ([0.8, 0.5], [0.9, 0.4], [0.7, 0.0]):
        db.add_trial(optuna.trial.create_trial(values=values, params={}, distributions={}))
    study = open_study(run)
    assert not study.snapshot and study.n_trials == 3 and study.source == url
    server = _serve(study)
    try:
        detail = _get_json(server, f"/api/studies/{db._study_id}")
        assert study_path(study) == f"/dashboard/studies/{db._study_id}"
        assert [t["values"] for t in detail["trials"]] == [[0.8, 0.5], [0.9, 0.4], [0.7, 0.0]]
    finally:
        server.stop()
        study.close()
