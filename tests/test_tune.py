"""`rayrobust tune`: a real search on local Ray (Optuna + Tune + Train), the gradient-masking control,
resume after the driver is killed, the report, and bad input."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from rayrobust.config import config_from_dict, load_config
from rayrobust.errors import ConfigError

BASE = {
    "name": "tune-test",
    "data": {"name": "digits", "val_size": 100},
    "model": {"name": "small_cnn"},
    "train": {"method": "pgd_at", "epochs": 2, "batch_size": 32, "lr": 0.05, "eps": 0.1, "attack_steps": 2,
              "num_workers": 1, "cpus_per_worker": 1, "val_pgd_steps": 2},
    "eval": {"eps": 0.1, "n_eval": 100, "n_autoattack": 20, "pgd_steps": 5, "num_shards": 1, "batch_size": 100,
             "chunk_size": 20},
}


def _raw(run_dir, tune, **sections):
    raw = json.loads(json.dumps(BASE))
    raw["run_dir"] = str(run_dir)
    raw["tune"] = tune
    for k, v in sections.items():
        raw[k].update(v)
    return raw


def _study(run_dir):
    import optuna

    from rayrobust.tune.study import STUDY, journal_storage

    return optuna.load_study(study_name=STUDY, storage=journal_storage(run_dir))


@pytest.fixture(scope="module")
def search(ray_cluster, tmp_path_factory):
    """One real search: 4 trials of {saturated, pgd_at} (train_eps for pgd_at), 2 at a time, final AutoAttack
    (seed 0 samples pgd_at, saturated, saturated, pgd_at).

    Without ASHA, so that every trial trains all its epochs (ASHA's stopping is tested on its own below)."""
    from rayrobust.tune.search import max_concurrent, run_tune

    run_dir = tmp_path_factory.mktemp("tune") / "run"
    cfg = config_from_dict(_raw(run_dir, {
        "space": {"method": {"choices": ["saturated", "pgd_at"]}, "train_eps": {"low": 0.5, "high": 1.5}},
        "num_samples": 4, "val_n": 64, "final_top_k": 1, "seed": 0, "asha": False}))
    t0 = time.perf_counter()
    summary = run_tune(cfg)
    seconds = time.perf_counter() - t0
    print(f"search of 4 trials: {seconds:.1f}s")
    return {"cfg": cfg, "run_dir": run_dir, "summary": summary, "seconds": seconds,
            "concurrency": max_concurrent(cfg)}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.extended
def test_search_completes_stores_both_objectives_and_reevaluates_best(search):
    import optuna

    run_dir, s = search["run_dir"], search["summary"]
    assert search["concurrency"] == 2  # 2 CPUs // (1 worker x 1 CPU)
    assert len(s["trials"]) == 4 and all(t["status"] == "TERMINATED" for t in s["trials"])
    # The Optuna study on disk holds every trial with both objectives and the raw numbers.
    study = _study(run_dir)
    complete = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert len(complete) == 4
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MAXIMIZE"]
    rows = {t["trial_id"]: t for t in s["trials"]}
    assert sorted(t.user_attrs["tune_trial_id"] for t in complete) == sorted(rows)
    for t in complete:
        row = rows[t.user_attrs["tune_trial_id"]]
        assert t.values == pytest.approx([row["clean_acc"], row["robust_objective"]])
        assert t.user_attrs["robust_acc"] == pytest.approx(row["robust_acc"])
    # Per-epoch grading reached Tune (ASHA needs it), and TensorBoard logs sit in the experiment dir.
    assert all(t["epoch"] >= 1 for t in s["trials"])
    assert list((run_dir / "tune").rglob("events.out.tfevents*"))
    # The best unflagged configuration was re-evaluated with full AutoAttack on the test set.
    assert len(s["selected"]) == 1 and s["final"][0]["trial_id"] == s["selected"][0]
    best = rows[s["selected"][0]]
    assert not best["flagged"] and best["flags"] == []
    unflagged = [t for t in s["trials"] if not t["flagged"] and t["epoch"] == t["epochs_planned"]]
    assert best["robust_acc"] == max(t["robust_acc"] for t in unflagged)
    final = json.loads((run_dir / "trials" / best["trial_id"] / "final_eval.json").read_text())
    assert final["autoattack"]["version"] == "standard" and final["autoattack"]["n"] == 20
    assert set(final["autoattack"]["per_attack"]) >= {"apgd-ce", "apgd-t", "fab-t", "square"}
    assert s["final"][0]["autoattack_acc"] == final["autoattack_acc"]
    assert json.loads((run_dir / "summary.json").read_text())["rows"][0]["trial_id"] == best["trial_id"]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.extended
def test_gradient_masking_control_is_flagged_and_never_selected(search):
    s = search["summary"]
    saturated = [t for t in s["trials"] if t["method"] == "saturated"]
    assert saturated, "the seeded search must sample the masking control"
    for t in saturated:
        # PGD on cross-entropy is fooled (zero gradients), the APGD objective is not.
        assert t["pgd_ce_acc"] >= t["robust_acc"] + 0.2, t
        assert "zero_gradients" in t["flags"] and t["flagged"]
        assert t["robust_objective"] == 0.0
        assert t["trial_id"] not in s["selected"] and t["trial_id"] not in s["pareto"]
    # Under PGD-CE alone the control would have been the "most robust" configuration.
    best_by_pgd = max(s["trials"], key=lambda t: t["pgd_ce_acc"])
    assert best_by_pgd["method"] == "saturated"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.extended
def test_report_of_search_has_every_section(search):
    from rayrobust.tune.report import write_report

    out = write_report(search["run_dir"])
    text = out.read_text()
    for fig in ("plot-pareto", "plot-eps", "plot-importance", "autoattack-table", "trials-table"):
        assert f'id="{fig}"' in text
    assert text.count('id="curve-') == 4
    assert "no search in this run" not in text
    assert 'class="flag">zero_gradients' in text
    assert "<script" not in text.lower()  # self-contained: no scripts, no external resources
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", text)
    assert json.loads((search["run_dir"] / "summary.json").read_text())["report"] == str(out)


def test_grading_separates_a_saturated_model_from_its_plain_twin(one_thread):
    """The control on its own (no Ray): same predictions, PGD-CE fooled by zero gradients, APGD not."""
    from conftest import digits_arrays, train_mlp

    from rayrobust.methods.saturated import ScaledLogits
    from rayrobust.tune.grading import grade

    x_all, y_all = digits_arrays()
    model = train_mlp(x_all[:1500], y_all[:1500], epochs=20)
    x, y = x_all[1500:1564], y_all[1500:1564]
    plain = grade(model, x, y, eps=0.1)
    masked = grade(ScaledLogits(model, 1000.0), x, y, eps=0.1)
    assert masked["clean_acc"] == plain["clean_acc"]
    assert masked["pgd_ce_acc"] >= plain["pgd_ce_acc"] + 0.2
    assert masked["robust_acc"] <= plain["robust_acc"] + 0.1  # APGD-T's DLR loss is scale-invariant
    assert "zero_gradients" in masked["flags"] and masked["robust_objective"] == 0.0
    assert not plain["flagged"] and plain["robust_objective"] == plain["robust_acc"]


def test_selection_never_picks_a_flagged_trial():
    from rayrobust.tune.selection import pareto_front, select

    def row(tid, clean, robust, flagged=False, epoch=2):
        return {"trial_id": tid, "clean_acc": clean, "robust_acc": robust, "flagged": flagged,
                "status": "TERMINATED", "epoch": epoch, "epochs_planned": 2}

    rows = [row("masked", 0.99, 0.95, flagged=True), row("a", 0.9, 0.4), row("b", 0.8, 0.5), row("c", 0.7, 0.3),
            row("early", 0.95, 0.6, epoch=1)]
    assert [r["trial_id"] for r in select(rows, 3)] == ["b", "a"]  # c is dominated; early stopped by ASHA
    assert [r["trial_id"] for r in pareto_front(rows)] == ["masked"]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.extended
def test_resume_after_the_driver_is_killed(tmp_path):
    import optuna

    run_dir = tmp_path / "run"
    # No ASHA here: every trial trains to the end, so the resumed run's trials are all complete ones.
    raw = _raw(run_dir, {"space": {"train_eps": {"low": 0.5, "high": 1.5}}, "num_samples": 3, "val_n": 32,
                         "final_top_k": 1, "asha": False},
               eval={"n_eval": 50, "n_autoattack": 10, "chunk_size": 10, "batch_size": 50, "checks": False})
    cfg_file = tmp_path / "tune.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    env = dict(os.environ, RAYROBUST_DASHBOARD="0")
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "rayrobust.cli", "tune"]
    log = open(tmp_path / "first.log", "w")
    driver = subprocess.Popen(cmd + ["--config", str(cfg_file)], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    finished = {}
    try:
        deadline = time.time() + 400
        while time.time() < deadline and driver.poll() is None:
            time.sleep(1)
            if not (run_dir / "optuna.journal").exists():
                continue
            try:
                done = _study(run_dir).get_trials(states=[optuna.trial.TrialState.COMPLETE])
            except Exception:  # the study is being created
                continue
            if done:
                finished = {t.user_attrs["tune_trial_id"]: t.values for t in done}
                break
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
        driver.wait()
        log.close()
    assert finished, "no trial finished before the deadline:\n" + (tmp_path / "first.log").read_text()[-3000:]
    assert driver.returncode == -signal.SIGKILL, "the search ended before it could be killed"
    assert not (run_dir / "tune_summary.json").exists()
    before = {tid: json.loads((run_dir / "trials" / tid / "val" / "epoch_002.json").read_text()) for tid in finished}

    res = subprocess.run(cmd + ["--resume", str(run_dir)], env=env, capture_output=True, text=True, timeout=500)
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads((run_dir / "tune_summary.json").read_text())
    ids = [t["trial_id"] for t in s["trials"]]
    assert len(ids) == 3 and len(set(ids)) == 3 and all(t["status"] == "TERMINATED" for t in s["trials"])
    assert len({t["params"]["train_eps"] for t in s["trials"]}) == 3  # no configuration ran twice
    complete = _study(run_dir).get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert len(complete) == 3 and sorted(t.user_attrs["tune_trial_id"] for t in complete) == sorted(ids)
    rows = {t["trial_id"]: t for t in s["trials"]}
    for tid, values in finished.items():  # finished before the kill: kept, not rerun, unchanged
        assert tid in rows
        assert [rows[tid]["clean_acc"], rows[tid]["robust_objective"]] == pytest.approx(values)
        after = json.loads((run_dir / "trials" / tid / "val" / "epoch_002.json").read_text())
        assert after == before[tid]
    assert s["final"] and s["final"][0]["autoattack_acc"] is not None


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.extended
def test_search_in_object_storage_report_and_resume_from_the_bucket(ray_cluster, s3_server):
    """run_dir=s3://...: the Tune experiment, the Optuna journal, every trial's checkpoints and gradings and
    the summaries live in the bucket; `report` and `--resume` work on the URI from the bucket alone."""
    import optuna

    from rayrobust.cli import main
    from rayrobust.location import Location
    from rayrobust.tune.search import run_tune
    from rayrobust.tune.study import StudyStorage

    bucket = s3_server.make_bucket("rr-tune")
    uri = f"{bucket}/runs/bucket-search"
    cfg = config_from_dict(_raw(uri, {"space": {"train_eps": {"low": 0.5, "high": 1.5}}, "num_samples": 2,
                                      "val_n": 32, "final_top_k": 1, "asha": False},
                                eval={"n_eval": 50, "n_autoattack": 10, "chunk_size": 10, "batch_size": 50,
                                      "checks": False}))
    t0 = time.perf_counter()
    s = run_tune(cfg)
    print(f"search of 2 trials in S3: {time.perf_counter() - t0:.1f}s")
    assert len(s["trials"]) == 2 and all(t["status"] == "TERMINATED" for t in s["trials"])
    assert s["storage"] == f"{uri}/optuna.journal" and s["experiment_dir"] == f"{uri}/tune"
    keys = s3_server.keys("rr-tune", "runs/bucket-search/")
    names = {k.removeprefix("runs/bucket-search/") for k in keys}
    assert {"optuna.journal", "tune_config.json", "tune_summary.json", "summary.json", "tune/tuner.pkl"} <= names
    assert any(n.startswith("tune/experiment_state") for n in names)  # what Tuner.restore reads
    for t in s["trials"]:
        tid = t["trial_id"]
        assert {f"trials/{tid}/params.json", f"trials/{tid}/val/epoch_002.json",
                f"trials/{tid}/checkpoints/epoch_002/checkpoint.pt"} <= names, sorted(names)
    assert f"trials/{s['selected'][0]}/final_eval.json" in names
    assert not any(n.endswith(".tmp") or n.endswith(".lock") for n in names)
    assert not Path("s3:").exists() and not Path("runs/bucket-search").exists()  # nothing landed on the local disk

    def study_from_bucket():  # as a new driver process sees it: only what is in the bucket
        StudyStorage._working.clear()
        StudyStorage._pushed.clear()
        return _study(uri)

    complete = study_from_bucket().get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert sorted(t.user_attrs["tune_trial_id"] for t in complete) == sorted(t["trial_id"] for t in s["trials"])

    assert main(["report", uri]) == 0
    report = Location(f"{uri}/report.html").read_text()
    assert report.count('id="curve-') == 2 and 'id="autoattack-table"' in report

    c = s3_server.client()
    stamps = {k: c.head_object(Bucket="rr-tune", Key=k)["ETag"] for k in keys
              if "/trials/" in k and ("/checkpoints/" in k or "/val/" in k or k.endswith("final_eval.json"))}
    study_from_bucket()
    t0 = time.perf_counter()
    assert main(["tune", "--resume", uri]) == 0
    print(f"resume of the finished search: {time.perf_counter() - t0:.1f}s")
    again = json.loads(Location(f"{uri}/tune_summary.json").read_text())
    for key in ("trials", "pareto", "selected", "final"):
        assert again[key] == s[key], key
    assert {k: c.head_object(Bucket="rr-tune", Key=k)["ETag"] for k in stamps} == stamps  # no trial ran again
    assert len(study_from_bucket().get_trials()) == 2


@pytest.mark.ray
@pytest.mark.slow
def test_asha_stops_trials_which_free_their_workers(ray_cluster, s3_server):
    """ASHA on (the default), the run in object storage: 6 trials of {saturated, pgd_at}, 6 epochs each, rungs at
    epochs 1, 2 and 4. The flagged saturated trials score 0 and weak pgd_at ones fall below a rung's median: Tune
    stops them. A stopped trial's workers see its stop file in the bucket at their next epoch boundary and its
    Ray Train run finishes normally (train.json written, fewer checkpoints than planned), and the cluster's
    CPUs are all free again within 30 s."""
    import ray

    from rayrobust.location import Location
    from rayrobust.tune.search import run_tune
    from rayrobust.tune.trial import STOP_FILE

    total = ray.cluster_resources().get("CPU")
    run = Location(f"{s3_server.make_bucket('rr-asha')}/runs/search")
    cfg = config_from_dict(_raw(run.uri, {
        "space": {"method": {"choices": ["saturated", "pgd_at"]}, "train_eps": {"low": 0.5, "high": 1.5}},
        "num_samples": 6, "val_n": 32, "final_top_k": 1, "seed": 1, "asha": True, "grace_period": 1,
        "reduction_factor": 2}, train={"epochs": 6, "attack_steps": 5},
        eval={"n_eval": 50, "n_autoattack": 10, "chunk_size": 10, "batch_size": 50, "checks": False,
              "eps_curve": False}))
    t0 = time.perf_counter()
    s = run_tune(cfg)
    print(f"ASHA search of 6 trials: {time.perf_counter() - t0:.1f}s")
    trials = s["trials"]
    assert len(trials) == 6 and all(t["status"] == "TERMINATED" for t in trials)
    print("epochs graded per trial:", sorted((t["method"], t["epoch"]) for t in trials))
    stopped = [t for t in trials if t["epoch"] < t["epochs_planned"]]
    assert len(stopped) >= 2
    ended_early = 0
    for t in stopped:  # a trial whose training had already finished when Tune stopped it has nothing to stop
        tdir = run / "trials" / t["trial_id"]
        if (tdir / STOP_FILE).exists():
            assert json.loads((tdir / STOP_FILE).read_text())["after_epoch"] == t["epoch"]
            train = json.loads((tdir / "train.json").read_text())  # the Train run returned instead of being killed
            ended_early += train["epochs"] < t["epochs_planned"]
            print(f"trial {t['trial_id']} ({t['method']}): stopped after {t['epoch']} graded epoch(s), "
                  f"trained {train['epochs']} of {t['epochs_planned']}")
    assert ended_early >= 1  # at least one stop reached its workers mid-run
    for t in trials:
        if t["epoch"] == t["epochs_planned"]:
            assert not (run / "trials" / t["trial_id"] / STOP_FILE).exists()
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU") != total and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU") == total, (ray.available_resources(), total)


def test_a_restarted_trial_drops_the_stop_file_of_its_earlier_run(tmp_path, monkeypatch):
    """A trial set up again (a search resumed after its driver stopped) must not end at once on the stop file
    that Tune's stop of its earlier run left; it trains with a fresh stop file path."""
    import rayrobust.train
    from rayrobust.tune import trial as trial_module

    seen = []
    monkeypatch.setattr(rayrobust.train, "fit", lambda cfg, tdir, stop=None: seen.append((tdir, stop.exists())))
    monkeypatch.setattr(trial_module, "validation_subset", lambda cfg: (None, None))
    base = config_from_dict(_raw(tmp_path, {"space": {"train_eps": {"low": 0.5, "high": 1.5}}})).to_dict()
    stale = tmp_path / "trials" / "default" / trial_module.STOP_FILE
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"trial_id": "default", "after_epoch": 1}))
    trial = trial_module.Trial.__new__(trial_module.Trial)
    trial._trial_info = None  # outside Tune: the trial id is "default"
    trial.setup({"train_eps": 1.0}, base=base, run_dir=str(tmp_path))
    trial.worker.join(30)
    assert seen and seen[0][1] is False and not stale.exists(), seen
    assert json.loads((stale.parent / "params.json").read_text())["params"] == {"train_eps": 1.0}


def test_bad_run_locations_are_one_line_errors_and_write_nothing(s3_server, tmp_path, capsys):
    from rayrobust.cli import main

    s3_server.make_bucket("rr-tune-bad")
    assert main(["tune", "--set", "run_dir=ftp://host/run", "--set", "tune.num_samples=1"]) == 2
    assert "unknown storage scheme 'ftp://'" in capsys.readouterr().err
    assert main(["tune", "--resume", "s3://rr-tune-bad/none"]) == 2
    err = capsys.readouterr().err
    assert "holds no search" in err and len(err.strip().splitlines()) == 1
    assert main(["tune", "--set", f"run_dir={tmp_path / 'run'}", "--set", "tune.optuna_storage=redis://x/0"]) == 2
    assert "unknown database scheme" in capsys.readouterr().err
    assert main(["tune", "--set", "run_dir=s3://no-such-bucket-rr/run"]) == 2
    assert "no-such-bucket-rr" in capsys.readouterr().err
    assert s3_server.keys("rr-tune-bad") == [] and not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("tune.space={}", "tune.space is empty"),
    ("tune.space={clusters: {low: 1, high: 3}}", "unknown parameter 'clusters'; valid parameters: n_clusters"),
    ("tune.space={n_clusters: {low: 0, high: 3}}", "tune.space.n_clusters.low=0 is outside the valid range 1..10"),
    ("tune.space={repulsion_margin: {low: 0.1, high: 5}}", "repulsion_margin.high=5 is outside the valid range 0.05..2.0"),
    ("tune.space={train_eps: {low: 0.2, high: 1}}", "train_eps.low=0.2 is outside the valid range 0.5..1.5"),
    ("tune.space={train_eps: {low: 1.2, high: 0.8}}", "low=1.2 > high=0.8"),
    ("tune.space={method: {choices: [drp, magic]}}", "unknown method(s) ['magic']; registered methods:"),
    ("tune.num_samples=0", "tune.num_samples=0 must be >= 1"),
    ("tune.max_concurrent_trials=0", "tune.max_concurrent_trials=0 must be >= 1"),
])
def test_bad_search_input_is_a_clear_error(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_cross_section_errors_and_cli_exit_code(tmp_path):
    from rayrobust.cli import main
    from rayrobust.tune.search import check_search

    cfg = load_config(None, ["data.val_size=50", "tune.val_n=64"])
    with pytest.raises(ConfigError, match="tune.val_n=64 exceeds data.val_size=50"):
        check_search(cfg)
    cfg = load_config(None, ["eval.eps=0.8", "tune.space={train_eps: {low: 0.5, high: 1.5}}"])
    with pytest.raises(ConfigError, match="times eval.eps=0.8 exceeds 1"):
        check_search(cfg)
    assert main(["tune", "--set", "tune.num_samples=0"]) == 2
    assert main(["tune", "--resume", str(tmp_path)]) == 2  # no search there
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert main(["report", str(tmp_path)]) == 2  # neither tune_summary.json nor summary.json


def test_conditional_space_suggests_only_the_knobs_of_the_drawn_method():
    """Optuna define-by-run: `method` first, then only that method's knobs; every method and knob is drawn."""
    import optuna

    from rayrobust.tune.config import ConditionalSpace, parse_space

    specs = parse_space({"method": {"choices": ["clustr", "drp_at", "pgd_at"]}, "n_clusters": {"low": 1, "high": 6},
                         "repulsion_margin": {"low": 0.1, "high": 1.0}, "train_eps": {"low": 0.5, "high": 1.5}})
    space = ConditionalSpace(specs, "pgd_at")
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=optuna.samplers.TPESampler(seed=0))
    knobs = {"clustr": {"method", "n_clusters"}, "drp_at": {"method", "repulsion_margin", "train_eps"},
             "pgd_at": {"method", "train_eps"}}  # clustr trains on clean images only: no train_eps
    seen = set()
    for i in range(24):
        t = study.ask()
        space(t)
        assert set(t.params) == knobs[t.params["method"]], t.params
        seen.add(t.params["method"])
        study.tell(t, [0.5, 0.1 * (i % 5)])
    assert seen == set(knobs)
    fixed = ConditionalSpace(parse_space({"repulsion_margin": {"low": 0.1, "high": 1.0}}), "drp")
    t = study.ask()
    fixed(t)
    assert set(t.params) == {"repulsion_margin"} and fixed.methods() == ["drp"]


def test_a_knob_of_no_searched_method_is_a_config_error():
    from rayrobust.tune.search import check_search

    cfg = load_config(None, ["train.method=drp_at", "tune.space={n_clusters: {low: 1, high: 4}}"])
    with pytest.raises(ConfigError, match=r"tune.space.n_clusters applies to clustr, srd, and the search trains only "
                                          r"drp_at \(train.method\); remove"):
        check_search(cfg)
    cfg = load_config(None, ["train.method=standard", "tune.space={train_eps: {low: 0.5, high: 1.5}}"])
    with pytest.raises(ConfigError, match="train_eps applies to the methods that train on adversarial examples"):
        check_search(cfg)
    cfg = load_config(None, ["tune.space={method: {choices: [pgd_at, trades]}, repulsion_margin: {low: 0.1, high: 1}}"])
    with pytest.raises(ConfigError, match=r"repulsion_margin applies to drp, drp_at.*\(tune.space.method.choices\)"):
        check_search(cfg)
    check_search(load_config(None, ["tune.space={method: {choices: [pgd_at, drp]}, repulsion_margin: {low: 0.1, high: 1}}"]))


def test_apply_params_maps_every_knob():
    from rayrobust.tune.trial import apply_params

    base = load_config(None, ["eval.eps=0.2"]).to_dict()
    cfg = apply_params(base, {"n_clusters": 4, "repulsion_margin": 0.3, "train_eps": 1.5, "method": "drp_at"})
    # each knob lands in the trial's own method's settings (and only where that method has the setting)
    assert cfg.semantic.k_max == 4 and cfg.train.method == "drp_at"
    assert cfg.train.method_args == {"drp_at": {"margin": 0.3}}
    assert cfg.train.eps == pytest.approx(0.3)
    cfg = apply_params(base, {"n_clusters": 4, "method": "clustr"})
    assert cfg.train.method_args == {"clustr": {"k": 4}} and cfg.semantic.k_max == 4
    cfg = apply_params(base, {"n_clusters": 3, "method": "srd"})  # SRD's K is the semantic stage's K_max
    assert cfg.train.method_args == {} and cfg.semantic.k_max == 3
    # the trial's method comes from the base config when the search does not choose it
    cfg = apply_params(load_config(None, ["train.method=drp"]).to_dict(), {"repulsion_margin": 0.7})
    assert cfg.train.method_args == {"drp": {"margin": 0.7}}
    with pytest.raises(ConfigError, match="unknown search parameter 'margin'; valid parameters: n_clusters"):
        apply_params(base, {"margin": 0.3})
