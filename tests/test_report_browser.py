"""`report.html` in real headless Chromium (Debian `chromium` + `chromium-driver`, installed by
`make setup`): it loads without console errors, its plots are present and rendered, and the page is
not blank. Run directories are written in the formats `rayrobust tune` and `rayrobust pipeline`
write (a search run with an Optuna journal, and a pipeline run), without training anything."""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _eval_json(label, clean, pgd, aa, flags=()):
    return {"label": label, "method": label, "dataset": "digits", "eps": 0.1, "norm": "Linf", "n_eval": 100,
            "clean_acc": clean, "pgd_acc": pgd, "pgd": {"steps": 5, "restarts": 1}, "n_autoattack": 20,
            "autoattack_acc": aa, "flags": list(flags),
            "autoattack": {"version": "standard", "n": 20, "per_attack": {
                "n": 20, "clean": clean, "apgd-ce": aa + 0.05, "apgd-t": aa, "fab-t": aa, "square": aa, "robust": aa}},
            "measurements": {"pgd_steps": 10, "pgd_by_eps": {"0.05": (clean + pgd) / 2, "0.1": pgd, "0.2": pgd / 3}}}


def make_search_run(run_dir: Path) -> Path:
    """A finished search: 5 trials (one flagged masking control), Optuna journal, final AutoAttack."""
    import optuna

    from rayrobust.tune.study import JOURNAL, STUDY, journal_storage

    run_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    trials = []
    study = optuna.create_study(study_name=STUDY, storage=journal_storage(run_dir), directions=["maximize", "maximize"])
    dists = {"method": optuna.distributions.CategoricalDistribution(["pgd_at", "saturated"]),
             "train_eps": optuna.distributions.FloatDistribution(0.5, 1.5)}
    for i in range(5):
        tid = f"t{i:07d}"
        method = "saturated" if i == 2 else "pgd_at"
        params = {"method": method, "train_eps": float(0.5 + 0.25 * i)}
        flagged = method == "saturated"
        clean, robust = float(0.8 + 0.03 * i), float(0.5 - 0.04 * i + 0.02 * rng.random())
        pgd_ce = 0.95 if flagged else robust + 0.03
        objective = 0.0 if flagged else robust
        flags = ["zero_gradients"] if flagged else []
        for epoch in (1, 2):
            _write(run_dir / "trials" / tid / "val" / f"epoch_{epoch:03d}.json",
                   {"epoch": epoch, "clean_acc": clean - 0.1 * (2 - epoch), "robust_acc": robust - 0.05 * (2 - epoch),
                    "pgd_ce_acc": pgd_ce, "flags": flags})
        (run_dir / "trials" / tid / "metrics.jsonl").write_text(
            "\n".join(json.dumps({"epoch": e, "loss": 2.0 / e}) for e in (1, 2)) + "\n")
        trials.append({"trial_id": tid, "params": params, "method": method, "status": "TERMINATED", "epoch": 2,
                       "epochs_planned": 2, "clean_acc": clean, "robust_acc": robust, "pgd_ce_acc": pgd_ce,
                       "robust_objective": objective, "flagged": flagged, "flags": flags, "error": None})
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, values=[clean, objective],
                                                  user_attrs={"tune_trial_id": tid}))
    _write(run_dir / "trials" / "t0000000" / "final_eval.json", _eval_json("t0000000", 0.82, 0.55, 0.5))
    final = [{"trial_id": "t0000000", "params": trials[0]["params"], "method": "pgd_at", "clean_acc": 0.82,
              "pgd_acc": 0.55, "autoattack_acc": 0.5, "flags": [],
              "autoattack_per_attack": _eval_json("t", 0.82, 0.55, 0.5)["autoattack"]["per_attack"],
              "eval": str(run_dir / "trials" / "t0000000" / "final_eval.json")}]
    _write(run_dir / "tune_summary.json", {
        "kind": "tune", "dataset": "digits", "eps": 0.1, "norm": "Linf", "n_eval": 100, "n_autoattack": 20,
        "pgd_steps": 5, "val_n": 64, "attacks": {"grading": "APGD-CE + APGD-T"}, "trials": trials,
        "pareto": ["t0000000", "t0000001", "t0000003", "t0000004"], "selected": ["t0000000"], "final": final,
        "storage": str(run_dir / JOURNAL)})
    return run_dir


def make_pipeline_run(run_dir: Path) -> Path:
    rows = []
    for method, clean, pgd, aa in (("standard", 0.95, 0.1, 0.05), ("pgd_at", 0.9, 0.6, 0.55)):
        _write(run_dir / method / "eval.json", _eval_json(method, clean, pgd, aa))
        (run_dir / method / "metrics.jsonl").write_text("\n".join(json.dumps(
            {"epoch": e, "loss": 1.0 / e, "val_clean_acc": clean - 0.1 / e, "val_pgd10_acc": pgd - 0.1 / e}) for e in (1, 2, 3)))
        rows.append({"method": method, "clean_acc": clean, "pgd_acc": pgd, "autoattack_acc": aa, "flags": []})
    _write(run_dir / "summary.json", {"dataset": "digits", "eps": 0.1, "norm": "Linf", "n_eval": 100,
                                      "n_autoattack": 20, "attacks": {"autoattack": "AutoAttack standard"}, "rows": rows})
    return run_dir


@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    why = (f"{missing} not installed: `make browser` installs Debian chromium and chromium-driver "
           "(or apt-get install -y chromium chromium-driver)")
    if missing and not os.environ.get("CI"):  # a developer's machine without Chromium: said, not silent
        pytest.skip(why)
    assert not missing, why  # CI (the CI variable set, as .ci/run does) must run the browser tests
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM  # explicit binary and driver: selenium-manager never downloads
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,2400"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _load(driver, report):
    """Open a report (the Location write_report returns) in the browser: console errors and a screenshot."""
    from PIL import Image

    driver.get(report.local_path().as_uri())
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    png = driver.get_screenshot_as_png()
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
    return severe, pixels


def _rendered(driver, selector: str) -> list:
    from selenium.webdriver.common.by import By

    return [e for e in driver.find_elements(By.CSS_SELECTOR, selector) if e.size["width"] > 50 and e.size["height"] > 50]


def test_search_report_renders_in_chromium(browser, tmp_path):
    from selenium.webdriver.common.by import By

    from rayrobust.tune.report import write_report

    out = write_report(make_search_run(tmp_path / "search"))
    severe, pixels = _load(browser, out)
    assert severe == []
    for fig in ("plot-pareto", "plot-eps", "plot-importance"):
        assert len(_rendered(browser, f"#{fig} svg")) == 1, fig
    assert len(_rendered(browser, "#curves figure svg")) == 5
    assert browser.find_element(By.ID, "autoattack-table").text.count("t0000000") == 1
    flags = browser.find_elements(By.CSS_SELECTOR, "#trials-table .flag")
    assert [f.text for f in flags] == ["zero_gradients"]
    assert flags[0].value_of_css_property("color") in ("rgba(176, 0, 32, 1)", "rgb(176, 0, 32)")
    assert pixels.std() > 10 and len(np.unique(pixels)) > 20  # not a blank page


def test_pipeline_report_renders_in_chromium(browser, tmp_path):
    from selenium.webdriver.common.by import By

    from rayrobust.tune.report import write_report

    out = write_report(make_pipeline_run(tmp_path / "pipeline"))
    severe, pixels = _load(browser, out)
    assert severe == []
    assert len(_rendered(browser, "#plot-eps svg")) == 1
    assert len(_rendered(browser, "#curves figure svg")) == 2
    for section in ("plot-pareto", "plot-importance", "trials-table"):
        assert browser.find_element(By.ID, section).text == "no search in this run."
    assert "pgd_at" in browser.find_element(By.ID, "autoattack-table").text
    assert pixels.std() > 10
