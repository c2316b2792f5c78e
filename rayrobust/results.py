"""`rayrobust results`: the whole comparison, once per seed, aggregated into one table.

For every seed s in `cfg.seeds` the pipeline runs in `<run_dir>/seed<s>/` (a local path or a storage
URI, s3://, gs://, file://) with train.seed = s (the
evaluation seed stays `eval.seed`, so every model meets the same attack randomness). The per-seed
summaries are aggregated per method into `<run_dir>/summary.json` (mean, standard deviation and
the per-seed values of every accuracy, the union of the flags), and the README's results table,
between the markers below, is regenerated from it:

    <!-- results:begin -->  ...  <!-- results:end -->

Every robust column names the attack that produced it; PGD on cross-entropy is labelled weaker
than AutoAttack, and purification numbers say whether the attack went through the purifier.
"""
from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional

from .config import ExperimentConfig, config_from_dict
from .errors import ConfigError
from .io import atomic_path, provenance, write_json
from .location import check_writable

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

# (row key, column title) for the accuracies aggregated over seeds, in table order.
COLUMNS = [
    ("clean_acc", "clean"),
    ("pgd_acc", "PGD-{pgd_steps} on CE (weaker)"),
    ("autoattack_acc", "AutoAttack"),
    ("adaptive_acc", "adaptive (through the purifier)"),
    ("nonadaptive_acc", "non-adaptive (bare classifier)"),
]


def _child_dir(run_dir: str, name: str) -> str:
    """`run_dir`/`name`, keeping a URI a URI and a relative path relative (it may live under storage_path)."""
    if "://" in run_dir:
        return run_dir.rstrip("/") + "/" + name
    return str(Path(run_dir) / name)


def seed_config(cfg: ExperimentConfig, seed: int) -> ExperimentConfig:
    raw = cfg.to_dict()
    raw["run_dir"] = _child_dir(cfg.run_dir, f"seed{seed}")
    raw["train"]["seed"] = seed
    raw["seeds"] = [seed]
    return config_from_dict(raw)


def _stats(values: List[float]) -> Dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def aggregate(per_seed: Dict[int, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per method: every numeric accuracy as {mean, std, values}, flags united, seeds listed."""
    methods: List[str] = []
    for summary in per_seed.values():
        for row in summary["rows"]:
            if row["method"] not in methods:
                methods.append(row["method"])
    rows = []
    for method in methods:
        found = {s: r for s, summary in per_seed.items() for r in summary["rows"] if r["method"] == method}
        out: Dict[str, Any] = {"method": method, "seeds": sorted(found)}
        for key, _ in COLUMNS:
            values = [r[key] for r in found.values() if isinstance(r.get(key), (int, float))]
            if values:
                out[key] = _stats([float(v) for v in values])
        flags = sorted({f for r in found.values() for f in r.get("flags", [])})
        out["flags"] = flags
        same = [r for r in found.values() if isinstance(r.get("pgd_same_images_acc"), (int, float))]
        if "autoattack_acc" in out and len(same) == len(found):  # every seed: PGD on AutoAttack's own images
            out["pgd_same_images_acc"] = _stats([float(r["pgd_same_images_acc"]) for r in same])
            out["pgd_same_images_attack"] = same[0]["pgd_same_images_attack"]
            out["pgd_minus_autoattack"] = out["pgd_same_images_acc"]["mean"] - out["autoattack_acc"]["mean"]
            out["pgd_minus_autoattack_images"] = "same"
        elif "pgd_acc" in out and "autoattack_acc" in out:  # PGD on n_eval images, AutoAttack on its subset
            out["pgd_minus_autoattack"] = out["pgd_acc"]["mean"] - out["autoattack_acc"]["mean"]
            out["pgd_minus_autoattack_images"] = "different"
        rows.append(out)
    return rows


def _cell(stat: Optional[Dict[str, Any]]) -> str:
    if stat is None:
        return "—"
    if len(stat["values"]) > 1:
        return f"{stat['mean']:.3f} ± {stat['std']:.3f}"
    return f"{stat['mean']:.3f}"


def markdown_table(summary: Dict[str, Any]) -> str:
    rows = summary["rows"]
    cols = [(k, t.format(pgd_steps=summary["pgd_steps"])) for k, t in COLUMNS if any(k in r for r in rows)]
    head = ["method", *[t for _, t in cols], "PGD − AA", "flags", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        gap = r.get("pgd_minus_autoattack")
        cells = [f"`{r['method']}`", *[_cell(r.get(k)) if k != "autoattack_acc" else f"**{_cell(r.get(k))}**"
                                      for k, _ in cols],
                 "—" if gap is None else f"{gap:+.3f}", ", ".join(r["flags"]) or "—",
                 ", ".join(str(s) for s in r["seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    from .labels import autoattack_label, threat_label

    aa = autoattack_label(summary.get("autoattack_version", "standard"))
    lines.append(f"{summary['dataset']}, {threat_label(summary.get('norm', 'Linf'), summary['eps'], unicode=True)}; "
                 f"clean and PGD-{summary['pgd_steps']} on n={summary['n_eval']} test images, "
                 f"{aa[:-1]}, `pyautoattack`) on the first n={summary['n_autoattack']}; mean ± std over seeds "
                 f"{', '.join(str(s) for s in summary['seeds'])}. Hardware: {summary['hardware']}. "
                 f"Command: `{summary['command']}`.")
    same = [r for r in rows if r.get("pgd_minus_autoattack_images") == "same"]
    different = [f"`{r['method']}`" for r in rows if r.get("pgd_minus_autoattack_images") == "different"]
    if same:
        lines.append(f"PGD − AA is the masking gap on the same images: {same[0]['pgd_same_images_attack']} (the "
                     f"sanity checks' strongest PGD) minus AutoAttack, both on the first {summary['n_autoattack']} "
                     "images. A large gap means cross-entropy PGD overstates robustness.")
    if different and summary["n_autoattack"] != summary["n_eval"]:
        lines.append(f"For {', '.join(different)}, PGD − AA subtracts AutoAttack on the first "
                     f"{summary['n_autoattack']} images from PGD on all {summary['n_eval']}, so it carries the "
                     "sampling difference of the two sets (a negative value means the AutoAttack subset is easier, "
                     "not that PGD is stronger).")
    return "\n".join(lines)


def update_readme(readme: Path, table: str) -> bool:
    """Replace the text between the results markers; False (README untouched) when they are absent."""
    if not readme.is_file():
        return False
    text = readme.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        return False
    new = pattern.sub(lambda _: f"{BEGIN}\n{table}\n{END}", text)
    with atomic_path(readme) as tmp:
        Path(tmp).write_text(new)
    return True


def _hardware() -> str:
    import os

    import torch

    if torch.cuda.is_available():
        return f"GPU ({torch.cuda.get_device_name(0)})"
    return f"CPU only ({os.cpu_count()} cores), reduced settings"


def run_results(cfg: ExperimentConfig, *, command: str = "make results", readme: Optional[Path] = None) -> Dict[str, Any]:
    """Run the pipeline for every seed, aggregate, write <run_dir>/summary.json, regenerate the README table."""
    from .pipeline import run_pipeline

    if "evaluate" not in cfg.stages:
        raise ConfigError("results needs the evaluate stage: add 'evaluate' to stages")
    run = check_writable(cfg.run_location())  # a wrong bucket, endpoint or credential fails before any training
    from .raycluster import announce_cluster_or_local

    announce_cluster_or_local(cfg.ray_address)  # "hardware: ..." (once per process)
    per_seed: Dict[int, Dict[str, Any]] = {}
    for seed in cfg.seeds:
        print(f"=== seed {seed} ({cfg.seeds.index(seed) + 1}/{len(cfg.seeds)}): {(run / f'seed{seed}').uri}", flush=True)
        per_seed[seed] = run_pipeline(seed_config(cfg, seed))
    first = next(iter(per_seed.values()))
    summary = {
        "dataset": first["dataset"], "eps": first["eps"], "norm": first["norm"], "n_eval": first["n_eval"],
        "autoattack_version": first.get("autoattack_version", "standard"),
        "n_autoattack": first["n_autoattack"], "pgd_steps": cfg.eval.pgd_steps, "seeds": list(cfg.seeds),
        "attacks": first["attacks"], "rows": aggregate(per_seed), "hardware": _hardware(), "command": command,
        "per_seed": {str(s): (run / f"seed{s}" / "summary.json").uri for s in per_seed},
        "provenance": provenance(config=cfg.to_dict()),
    }
    out = write_json(run / "summary.json", summary)
    table = markdown_table(summary)
    print(table, flush=True)
    print(f"summary: {out.uri}", flush=True)
    if readme is not None:
        print(f"README table {'updated' if update_readme(readme, table) else 'not updated (no results markers)'}: "
              f"{readme}", flush=True)
    from .tune.report import write_report

    summary["report"] = write_report(run).uri  # mean ± std bars, then the first seed in detail
    print(f"report: {summary['report']}", flush=True)
    return summary


__all__ = ["aggregate", "markdown_table", "run_results", "seed_config", "update_readme"]
