"""`rayrobust results`: per-seed pipeline runs aggregated into summary.json and the README table."""
from __future__ import annotations

import json

import pytest

from rayrobust.config import load_config
from rayrobust.errors import ConfigError
from rayrobust.tables import summary_row
from rayrobust.results import BEGIN, END, aggregate, markdown_table, run_results, seed_config, update_readme

from conftest import tiny_config


def _summary(rows):
    return {"rows": rows}


def test_aggregate_mean_std_flags_and_gap():
    per_seed = {
        0: _summary([{"method": "pgd_at", "clean_acc": 0.80, "pgd_acc": 0.70, "autoattack_acc": 0.66, "flags": []},
                     {"method": "srd", "clean_acc": 0.7, "pgd_acc": 0.6, "autoattack_acc": 0.5, "adaptive_acc": 0.4,
                      "flags": ["adaptive_gap"]}]),
        1: _summary([{"method": "pgd_at", "clean_acc": 0.84, "pgd_acc": 0.72, "autoattack_acc": 0.68,
                      "flags": ["square_beats_whitebox"]},
                     {"method": "srd", "clean_acc": 0.7, "pgd_acc": 0.6, "autoattack_acc": 0.5, "adaptive_acc": 0.2,
                      "flags": []}]),
    }
    rows = {r["method"]: r for r in aggregate(per_seed)}
    assert rows["pgd_at"]["clean_acc"]["mean"] == pytest.approx(0.82)
    assert rows["pgd_at"]["clean_acc"]["std"] == pytest.approx(0.028284, abs=1e-5)
    assert rows["pgd_at"]["autoattack_acc"]["values"] == [0.66, 0.68]
    assert rows["pgd_at"]["flags"] == ["square_beats_whitebox"]  # a flag of any seed stays visible
    assert rows["pgd_at"]["pgd_minus_autoattack"] == pytest.approx(0.04)
    assert rows["pgd_at"]["seeds"] == [0, 1]
    assert "adaptive_acc" not in rows["pgd_at"]
    assert rows["srd"]["adaptive_acc"]["mean"] == pytest.approx(0.3)


def test_markdown_table_names_attacks_and_marks_missing_columns():
    summary = {"rows": aggregate({0: _summary([
        {"method": "pgd_at", "clean_acc": 0.8, "pgd_acc": 0.7, "autoattack_acc": 0.65, "flags": []},
        {"method": "srd", "clean_acc": 0.75, "pgd_acc": 0.6, "autoattack_acc": 0.5, "adaptive_acc": 0.45,
         "flags": ["adaptive_gap"]}])}),
        "pgd_steps": 20, "dataset": "fashion_mnist", "eps": 0.1, "n_eval": 1000, "n_autoattack": 1000,
        "seeds": [0], "hardware": "CPU", "command": "make results"}
    table = markdown_table(summary)
    lines = table.splitlines()
    assert "PGD-20 on CE (weaker)" in lines[0] and "AutoAttack" in lines[0] and "adaptive" in lines[0]
    pgd_row = next(line for line in lines if line.startswith("| `pgd_at`"))
    srd_row = next(line for line in lines if line.startswith("| `srd`"))
    assert "| **0.650** |" in pgd_row and "+0.050" in pgd_row
    assert "0.450" in srd_row and "adaptive_gap" in srd_row
    assert "—" in pgd_row  # no adaptive number for a method without a purifier
    assert "make results" in table and "n=1000" in table
    assert "sampling difference" not in table  # PGD and AutoAttack on the same images
    assert "sampling difference" in markdown_table({**summary, "n_autoattack": 300})


def _eval_result(aa, pgd_many, n_checks=300, n_aa=300):
    """An eval.json's fields that summary_row reads."""
    return {"method": "clustr", "clean_acc": 0.8, "pgd_acc": 0.1, "autoattack_acc": aa, "flags": [],
            "n_eval": 1000, "n_autoattack": n_aa,
            "measurements": {"n": n_checks, "pgd_many": pgd_many, "pgd_many_steps": 50, "pgd_many_restarts": 2}}


def test_masking_gap_uses_pgd_on_autoattacks_own_images():
    row = summary_row(_eval_result(0.01, 0.09))
    assert row["pgd_same_images_acc"] == 0.09
    assert row["pgd_same_images_attack"] == "PGD-50 on CE, 2 restarts"
    # no same-images PGD when the checks ran on other images, were off, or AutoAttack was skipped
    assert "pgd_same_images_acc" not in summary_row(_eval_result(0.01, 0.09, n_checks=200))
    assert "pgd_same_images_acc" not in summary_row({**_eval_result(0.01, 0.09), "measurements": None})
    assert "pgd_same_images_acc" not in summary_row({**_eval_result(None, 0.09), "n_autoattack": 0})

    rows = aggregate({0: _summary([summary_row(_eval_result(0.01, 0.09))]),
                      1: _summary([summary_row(_eval_result(0.03, 0.07))])})
    assert rows[0]["pgd_minus_autoattack"] == pytest.approx(0.06)  # 0.08 - 0.02, not PGD-20's 0.1 - 0.02
    assert rows[0]["pgd_minus_autoattack_images"] == "same"
    # one seed without it: the whole row falls back to PGD on n_eval, and says so
    mixed = aggregate({0: _summary([summary_row(_eval_result(0.01, 0.09))]),
                       1: _summary([summary_row(_eval_result(0.03, 0.07, n_checks=200))])})
    assert mixed[0]["pgd_minus_autoattack"] == pytest.approx(0.08)
    assert mixed[0]["pgd_minus_autoattack_images"] == "different"

    summary = {"rows": rows, "pgd_steps": 20, "dataset": "fashion_mnist", "eps": 0.1, "n_eval": 1000,
               "n_autoattack": 300, "seeds": [0, 1], "hardware": "CPU", "command": "make results"}
    table = markdown_table(summary)
    assert "+0.060" in next(line for line in table.splitlines() if line.startswith("| `clustr`"))
    assert "PGD-50 on CE, 2 restarts" in table and "same images" in table
    assert "sampling difference" not in table
    fallback = markdown_table({**summary, "rows": mixed})
    assert "For `clustr`, PGD − AA subtracts AutoAttack" in fallback and "sampling difference" in fallback


def test_update_readme_only_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\nbefore\n{BEGIN}\nold table\n{END}\nafter\n")
    assert update_readme(readme, "| new |")
    assert readme.read_text() == f"# x\nbefore\n{BEGIN}\n| new |\n{END}\nafter\n"
    plain = tmp_path / "OTHER.md"
    plain.write_text("no markers\n")
    assert not update_readme(plain, "| new |")
    assert plain.read_text() == "no markers\n"


def test_seed_config_and_bad_seeds(tmp_path):
    cfg = tiny_config(tmp_path)
    s1 = seed_config(cfg, 1)
    assert s1.train.seed == 1 and s1.run_dir.endswith("seed1") and s1.eval.seed == cfg.eval.seed
    # a URI stays a URI, a relative run_dir stays relative (it may live under storage_path)
    assert seed_config(load_config(None, ["run_dir=s3://bucket/runs/r/"]), 2).run_dir == "s3://bucket/runs/r/seed2"
    assert seed_config(load_config(None, ["run_dir=runs/r"]), 0).run_dir == "runs/r/seed0"
    with pytest.raises(ConfigError, match="seeds"):
        load_config(None, ["seeds=[0, 0]"])
    with pytest.raises(ConfigError, match="method_overrides.pgd_at.train.lrr"):
        load_config(None, ["method_overrides={pgd_at: {train: {lrr: 1}}}"])


@pytest.mark.parametrize("path, min_aa, gpu_sized", [("configs/results.yaml", 1000, True),
                                                      ("configs/results_cpu.yaml", 200, False)])
def test_results_configs_cover_every_defense(path, min_aa, gpu_sized):
    from rayrobust.methods import list_methods

    cfg = load_config(path)
    defenses = set(list_methods()) - {"saturated"}  # the masking control is not a defense
    assert set(cfg.methods) == defenses, f"{path} misses {defenses - set(cfg.methods)}"
    assert len(cfg.seeds) >= 2 and cfg.eval.eps == 0.1 and cfg.data.name == "fashion_mnist"
    assert cfg.eval.n_autoattack >= min_aa and cfg.eval.n_eval >= cfg.eval.n_autoattack
    assert cfg.stages[-1] == "evaluate" and {"extract", "cluster", "dictionaries"} <= set(cfg.stages)
    assert (cfg.data.train_limit is None) == gpu_sized  # the full version trains on all 60,000 images


@pytest.mark.ray
@pytest.mark.extended
def test_two_seed_run_writes_summary_and_readme(tmp_path, ray_cluster, one_thread):
    cfg = tiny_config(tmp_path, train={"epochs": 1, "method": "standard"}, eval={"n_eval": 60, "n_autoattack": 10,
                                                                                 "num_shards": 1, "checks": False,
                                                                                 "eps_curve": True, "gallery": 3})
    raw = cfg.to_dict()
    raw["seeds"] = [0, 1]
    raw["methods"] = ["standard"]
    raw["method_overrides"] = {"standard": {"train": {"lr": 0.02}}}
    from rayrobust.config import config_from_dict

    cfg = config_from_dict(raw)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\n{END}\n")
    summary = run_results(cfg, command="rayrobust results --config tiny.yaml", readme=readme)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["seeds"] == [0, 1]
    (row,) = on_disk["rows"]
    assert row["method"] == "standard" and row["seeds"] == [0, 1]
    assert len(row["clean_acc"]["values"]) == 2 and len(row["autoattack_acc"]["values"]) == 2
    for s in (0, 1):
        per = json.loads((tmp_path / "run" / f"seed{s}" / "summary.json").read_text())
        assert per["rows"][0]["clean_acc"] == row["clean_acc"]["values"][s]
        ckpt_cfg = json.loads((tmp_path / "run" / f"seed{s}" / "standard" / "train.json").read_text())["config"]
        assert ckpt_cfg["train"]["seed"] == s and ckpt_cfg["train"]["lr"] == 0.02  # the method override applied
    shas = {json.loads((tmp_path / "run" / f"seed{s}" / "standard" / "eval.json").read_text())
            ["provenance"]["checkpoint_sha256"] for s in (0, 1)}
    assert len(shas) == 2  # two seeds are two different models
    assert "| `standard` |" in readme.read_text() and "rayrobust results --config tiny.yaml" in readme.read_text()
    assert summary["rows"] == on_disk["rows"]
    # `results` writes the report: mean ± std across the seeds, then seed 0's evaluation in detail
    assert summary["report"] == str(tmp_path / "run" / "report.html") == on_disk["report"]
    page = (tmp_path / "run" / "report.html").read_text()
    for section in ('id="plot-seeds"', 'id="seeds-table"', 'id="gap-table"', 'id="checks"', 'id="gallery"'):
        assert section in page, section
    ev = json.loads((tmp_path / "run" / "seed0" / "standard" / "eval.json").read_text())
    assert [p["eps"] for p in ev["eps_curve"]["points"]] == [0.05, 0.1, 0.15, 0.2]
    assert '<figure id="plot-eps">' in page and len(ev["gallery"]["examples"]) == page.count('<div class="ex">')
