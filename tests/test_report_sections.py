"""The report's per-model sections from real evaluations: the robust-vs-eps curve and the gallery are
computed by `evaluate` (AutoAttack in this process) on a trained digits MLP; a pipeline run with SRD (a
purifier: adaptive / BPDA / non-adaptive) and ClusTR (a certificate) and a 2-seed `results` run are
written in the formats those commands write, then the report is opened in headless Chromium."""
from __future__ import annotations

import base64
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import digits_arrays, train_mlp
from test_report_browser import _load, _rendered, browser  # noqa: F401  (the module-scoped Chromium fixture)

EPS = 0.2  # AutoAttack's APGD-CE breaks every image: FAB-T and Square have nothing left, so the fixture is cheap


@pytest.fixture(scope="module")
def evaluated():
    """(model, x, y, result) of an MLP evaluated with eps_curve and a 6-image gallery."""
    from rayrobust.evaluation.core import evaluate

    x, y = digits_arrays()
    model = train_mlp(x[:1200], y[:1200])
    xt, yt = x[1200:1240], y[1200:1240]
    res = evaluate(model, (xt, yt), eps=EPS, n=40, n_autoattack=40, chunk_size=20, backend="local",
                   eps_curve=True, gallery=6, class_names=tuple(f"digit{i}" for i in range(10)), verbose=False)
    return model, xt, yt, res


def test_eps_curve_points_and_labels(evaluated):
    res = evaluated[3]
    curve = res["eps_curve"]
    assert [p["eps"] for p in curve["points"]] == [0.1, 0.2, 0.3, 0.4]
    assert [p["source"] for p in curve["points"]] == ["attacked", "the AutoAttack run at eps", "attacked", "attacked"]
    robust = [p["robust"] for p in curve["points"]]
    assert robust[1] == res["autoattack"]["per_attack"]["apgd-t"]
    assert robust == sorted(robust, reverse=True) and robust[0] > 0.2 and robust[-1] == 0.0
    assert curve["n"] == 40 and "weaker than full AutoAttack" in curve["attack"]


@pytest.mark.extended
def test_eps_curve_at_eps_is_autoattacks_apgd_t_stage_exactly():
    """The curve reads its eps point from AutoAttack's APGD-T stage; attacking again there with the curve's own
    attack (same chunks and seeds) gives the same per-image result, at an eps where points survive it."""
    from rayrobust.evaluation.core import evaluate
    from rayrobust.evaluation.figures import eps_curve

    x, y = digits_arrays()
    model = train_mlp(x[:1200], y[:1200])
    xt, yt = x[1200:1240], y[1200:1240]
    res = evaluate(model, (xt, yt), eps=0.1, n=40, n_autoattack=40, chunk_size=20, backend="local", eps_curve=True,
                   checks=False, verbose=False)
    at_aa = res["autoattack"]["per_attack"]["apgd-t"]
    again = eps_curve(model, xt, yt, eps=0.1, chunk_size=20, at_eps=None)
    assert next(p["robust"] for p in again["points"] if p["eps"] == 0.1) == at_aa > 0.1
    assert [p["robust"] for p in again["points"]] == [p["robust"] for p in res["eps_curve"]["points"]]
    # on the first chunk only (eps_curve_n): the point at eps is AutoAttack's stages on that chunk's images
    part = evaluate(model, (xt, yt), eps=0.1, n=40, n_autoattack=40, chunk_size=20, backend="local", eps_curve=True,
                    eps_curve_n=25, checks=False, verbose=False)["eps_curve"]
    first = eps_curve(model, xt[:20], yt[:20], eps=0.1, chunk_size=20, at_eps=None)
    assert part["n"] == 20 and part["points"][1]["source"] == "the AutoAttack run at eps"
    assert [p["robust"] for p in part["points"]] == [p["robust"] for p in first["points"]]


def test_curve_images_keep_autoattacks_chunks():
    from rayrobust.evaluation.figures import curve_images, robust_after

    assert curve_images(200, 100, 0) == 200 and curve_images(200, 100, 150) == 100
    assert curve_images(200, 50, 120) == 100 and curve_images(200, 100, 30) == 30 and curve_images(80, 100, 500) == 80
    outcomes = ["clean", "apgd-ce", None, "apgd-t", "fab-t", "square", None, None]
    assert robust_after(outcomes, "standard") == 5 / 8 and robust_after(outcomes, "plus") is None
    assert robust_after(["clean", None, "apgd-dlr", None], "rand") == 0.5


def test_gallery_examples_are_real_adversarial_examples(evaluated):
    model, x, y, res = evaluated
    g = res["gallery"]
    assert 1 <= len(g["examples"]) <= 6 and g["class_names"][3] == "digit3"
    for e in g["examples"]:
        assert e["broken_by"] not in (None, "clean") and e["found"]
        clean = np.frombuffer(base64.b64decode(e["clean"]), np.uint8).reshape(e["shape"]) / 255.0
        adv = np.frombuffer(base64.b64decode(e["adv"]), np.uint8).reshape(e["shape"]) / 255.0
        assert np.abs(clean - x[e["index"]].numpy()).max() <= 0.5 / 255 + 1e-6
        assert np.abs(adv - clean).max() <= EPS + 1 / 255 + 1e-6 and e["size"] <= EPS + 1e-5
        assert e["label"] == int(y[e["index"]]) == e["clean_pred"] != e["adv_pred"]
        with torch.no_grad():  # the stored prediction is the model's on the stored (unquantised) example
            assert int(model(x[e["index"]][None]).argmax()) == e["clean_pred"]


def _srd_and_clustr(res):
    """The eval.json of an SRD-like purifier and a ClusTR-like certificate, in the formats evaluation writes."""
    srd = copy.deepcopy(res)
    srd.update(method="srd", autoattack_mode="adaptive (AutoAttack through the unrolled purifier)",
               bpda={"attack": "APGD-CE + APGD-T, BPDA + EOT=1", "robust_acc": res["autoattack_acc"] + 0.025},
               non_adaptive={"attack": "APGD-CE + APGD-T on the bare classifier, transferred",
                             "robust_acc": res["autoattack_acc"] + 0.3},
               adaptive_acc=res["autoattack_acc"], adaptive_attack="AutoAttack (standard), adaptive",
               nonadaptive_acc=res["autoattack_acc"] + 0.3)
    srd["checks"] = srd["checks"] + [{"name": "adaptive_gap", "passed": False,
                                      "detail": "non-adaptive 0.6250 vs adaptive 0.3250: gap +0.3000 (tol 0.05)"}]
    srd["flags"] = srd["flags"] + ["adaptive_gap"]
    clustr = copy.deepcopy(res)
    clustr["method"] = "clustr"
    clustr["certificate"] = {
        "certificate": "ClusTR", "norm": "L2", "n": 100, "num_clusters": 20, "clean_acc": 0.9,
        "lipschitz": {"bound": 12.5, "layers": []}, "certified_radius": {"n": 90, "median": 0.031},
        "certified_acc": {"0.01": 0.71, "0.02": 0.44, "0.05": 0.08},
        "check": {"attack": "L2 PGD-100 on the margin", "n": 40, "violations": 0, "seed": 0}}
    return srd, clustr


def _pipeline_dir(run_dir: Path, evals: dict) -> Path:
    rows = []
    for method, ev in evals.items():
        ev = dict(ev, method=method)
        (run_dir / method).mkdir(parents=True, exist_ok=True)
        (run_dir / method / "eval.json").write_text(json.dumps(ev))
        (run_dir / method / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "loss": 1.0, "val_clean_acc": 0.8}))
        from rayrobust.tables import summary_row

        rows.append(summary_row(ev))
    (run_dir / "summary.json").write_text(json.dumps({
        "dataset": "digits", "eps": EPS, "norm": "Linf", "n_eval": 100, "n_autoattack": 40,
        "attacks": {"autoattack": "AutoAttack standard"}, "rows": rows}))
    return run_dir


def _check_sections(driver):
    from selenium.webdriver.common.by import By

    for section in ("autoattack-table", "gap-table", "checks", "plot-eps", "gallery"):
        assert driver.find_element(By.ID, section).is_displayed(), section
    assert len(_rendered(driver, "#plot-eps svg")) == 1
    imgs = driver.find_elements(By.CSS_SELECTOR, "#gallery img")
    assert imgs and all(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i) == 8
                        for i in imgs)  # 8x8 digits, decoded by the browser
    return driver


def test_pipeline_report_with_srd_and_clustr_in_chromium(browser, evaluated, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By

    from rayrobust.tune.report import write_report

    res = evaluated[3]
    srd, clustr = _srd_and_clustr(res)
    out = write_report(_pipeline_dir(tmp_path / "run", {"standard": res, "srd": srd, "clustr": clustr}))
    severe, pixels = _load(browser, out)
    assert severe == [] and pixels.std() > 10
    _check_sections(browser)
    gap = browser.find_element(By.ID, "gap-table").text
    assert gap.count("PGD-50 on CE, 2 restarts") == 3  # the same-image PGD of the sanity checks, per model
    same = res["measurements"]["pgd_many"] - res["autoattack_acc"]
    assert f"{same:+.4f}" in gap
    purifier = browser.find_element(By.ID, "purifier-table").text
    assert "srd" in purifier and f"{res['autoattack_acc'] + 0.3:.4f}" in purifier and "clustr" not in purifier
    cert = browser.find_element(By.ID, "certificate-table").text
    assert "r=0.01" in cert and "0.7100" in cert and "0 of 40" in cert
    checks = browser.find_element(By.ID, "checks")
    flagged = [r.text for r in checks.find_elements(By.TAG_NAME, "tr") if "FLAG" in r.text]
    assert len(flagged) == 1 and "adaptive_gap" in flagged[0] and "report the adaptive number" in flagged[0]
    assert checks.text.count("passed") >= 3 * 8  # every check of every model, with its measurement
    assert len(browser.find_elements(By.CSS_SELECTOR, "#gallery .ex")) == 3 * len(res["gallery"]["examples"])
    assert "digit" in browser.find_element(By.ID, "gallery").text


def test_results_report_with_two_seeds_in_chromium(browser, evaluated, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By

    from rayrobust.results import aggregate
    from rayrobust.tune.report import write_report

    res = evaluated[3]
    run = tmp_path / "results"
    per_seed = {}
    for seed, shift in ((0, 0.0), (1, 0.05)):
        evals = {m: dict(copy.deepcopy(res), clean_acc=c - shift, autoattack_acc=a - shift)
                 for m, c, a in (("standard", 0.95, 0.2), ("pgd_at", 0.9, 0.5))}
        _pipeline_dir(run / f"seed{seed}", evals)
        per_seed[seed] = json.loads((run / f"seed{seed}" / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({
        "dataset": "digits", "eps": EPS, "norm": "Linf", "n_eval": 100, "n_autoattack": 40, "pgd_steps": 20,
        "seeds": [0, 1], "attacks": {"autoattack": "AutoAttack standard"}, "rows": aggregate(per_seed),
        "per_seed": {str(s): str(run / f"seed{s}" / "summary.json") for s in (0, 1)}}))
    out = write_report(run)
    severe, pixels = _load(browser, out)
    assert severe == [] and pixels.std() > 10
    assert len(_rendered(browser, "#plot-seeds svg")) == 1
    table = browser.find_element(By.ID, "seeds-table").text
    assert "0.4750 ± 0.0354" in table and "0.9250 ± 0.0354" in table  # pgd_at: AA and clean over the 2 seeds
    assert "seed 0" in browser.page_source
    _check_sections(browser)
