"""`rayrobust report <run_dir>`: one self-contained `report.html` (inline SVG, no scripts, fonts or
network) and `summary.json` for a search run (`rayrobust tune`), a `rayrobust pipeline` run or a
`rayrobust results` run over several seeds. The run directory may be a local path or a storage URI
(s3://, gs://, file://): everything is read and written through `rayrobust.location`, the Optuna study
from the run's journal or database.

Sections: mean ± std across seeds (results runs), the final AutoAttack table, the same-image PGD −
AutoAttack gap with a purifier's adaptive / BPDA / non-adaptive accuracies and a certificate's certified
accuracy at its radii, every sanity check with what it measured and what a flag means, the
clean-vs-robust Pareto front of the trials, robust accuracy against eps (APGD-CE + APGD-T at eps/2 ..
2eps), a gallery of AutoAttack's adversarial examples, per-trial (or per-method) learning curves,
Optuna parameter importances, and every trial with its flags (rayrobust.tune.report_eval draws the
per-model sections). Raised flags are shown in red. Sections that need a search say "no search in this
run" for a pipeline run. Every accuracy names its attack.
"""
from __future__ import annotations

import html
import io
import json
import re
from typing import Any, Dict, List, Optional, Tuple

from ..errors import ConfigError, StorageError
from ..io import read_json, write_json
from ..location import Location, Where, as_location

NO_SEARCH = "no search in this run"
_CSS = """
body{font-family:sans-serif;margin:2em;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
td.l,th.l{text-align:left}.flag{color:#b00020;font-weight:bold}.ok{color:#2e7d32}
.note{color:#555;font-size:.9em}figure{margin:.5em 0}figure svg{max-width:100%;height:auto}
.grid{display:flex;flex-wrap:wrap;gap:1em}.grid figure{width:340px}
.gallery{display:flex;flex-wrap:wrap;gap:.8em}.ex{border:1px solid #ddd;padding:.3em;width:270px}
.ex img{width:84px;height:84px;image-rendering:pixelated;margin-right:3px;border:1px solid #eee}h3{font-size:1em}
"""


# ------------------------------------------------------------------------------------------ data


def _read_json(path: Where) -> Optional[Any]:
    try:
        return read_json(path)
    except (OSError, ValueError, StorageError):  # absent, not JSON, or a path that names nothing readable
        return None


def _read_jsonl(path: Location) -> List[Dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return html.escape(str(v))


def _flags_html(flags: List[str]) -> str:
    if not flags:
        return '<span class="ok">none</span>'
    return ", ".join(f'<span class="flag">{html.escape(f)}</span>' for f in flags)


# ----------------------------------------------------------------------------------------- plots


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)  # creator/date RDF block
    return text[text.index("<svg"):]  # drop the XML prolog and doctype: inline in HTML


def _figure(fig_id: str, svg: str, caption: str) -> str:
    return f'<figure id="{fig_id}">{svg}<figcaption class="note">{html.escape(caption)}</figcaption></figure>'


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "path", "font.size": 9})  # glyphs as paths: no fonts needed
    return plt


def pareto_plot(trials: List[Dict[str, Any]], pareto: List[str], selected: List[str]) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    done = [t for t in trials if t.get("clean_acc") is not None]
    ok = [t for t in done if not t["flagged"]]
    bad = [t for t in done if t["flagged"]]
    ax.scatter([t["clean_acc"] for t in ok], [t["robust_acc"] for t in ok], c="#1565c0", label="trial")
    if bad:
        ax.scatter([t["clean_acc"] for t in bad], [t["robust_acc"] for t in bad], c="#b00020", marker="x",
                   label="flagged (never selected)")
    front = sorted([t for t in ok if t["trial_id"] in pareto], key=lambda t: t["clean_acc"])
    if front:
        ax.plot([t["clean_acc"] for t in front], [t["robust_acc"] for t in front], c="#1565c0", lw=1, ls="--",
                label="Pareto front")
    sel = [t for t in ok if t["trial_id"] in selected]
    if sel:
        ax.scatter([t["clean_acc"] for t in sel], [t["robust_acc"] for t in sel], s=160, facecolors="none",
                   edgecolors="#2e7d32", linewidths=2, label="selected (full AutoAttack)")
    for t in done:
        ax.annotate(t["trial_id"][:8], (t["clean_acc"], t["robust_acc"]), fontsize=6, alpha=.7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("clean accuracy (validation subset)")
    ax.set_ylabel("robust accuracy, APGD-CE + APGD-T")
    ax.grid(alpha=.3)
    ax.legend(fontsize=7)
    return _svg(fig)


def eps_plot(curves: Dict[str, Dict[str, Any]]) -> str:
    """curves: label -> {"pgd": {eps: acc}, "pgd_label": str, "aa": (eps, acc) or None, "clean": acc}."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, (label, c) in enumerate(curves.items()):
        color = f"C{i % 10}"
        pts = sorted((float(e), a) for e, a in c["pgd"].items())
        if c.get("clean") is not None:
            pts = [(0.0, c["clean"])] + pts
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color,
                    label=f"{label}: {c['pgd_label']}")
        if c.get("aa"):
            ax.scatter([c["aa"][0]], [c["aa"][1]], marker="*", s=140, color=color,
                       label=f"{label}: AutoAttack {c.get('aa_version') or 'standard'}")
    from ..labels import norm_label

    norms = sorted({c.get("norm") or "Linf" for c in curves.values()}) or ["Linf"]
    ax.set_xlabel(f"eps ({', '.join(norm_label(n) for n in norms)}, [0,1] pixel units)")
    ax.set_ylabel("accuracy under attack")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=.3)
    ax.legend(fontsize=6)
    return _svg(fig)


def curve_plot(title: str, epochs: Dict[str, List[Tuple[int, float]]], loss: List[Tuple[int, float]]) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.6, 2.6))
    for i, (name, pts) in enumerate(epochs.items()):
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i}", label=name)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=.3)
    if loss:
        ax2 = ax.twinx()
        ax2.plot([p[0] for p in loss], [p[1] for p in loss], color="0.5", ls=":", label="train loss")
        ax2.set_ylabel("train loss", color="0.5")
    ax.legend(fontsize=6, loc="lower left")
    return _svg(fig)


def importance_plot(importances: Dict[str, Dict[str, float]]) -> str:
    plt = _plt()
    names = sorted({p for imp in importances.values() for p in imp})
    fig, ax = plt.subplots(figsize=(5.5, 0.6 + 0.5 * len(names) * len(importances)))
    width = 0.8 / max(1, len(importances))
    for i, (objective, imp) in enumerate(importances.items()):
        ax.barh([j + i * width for j in range(len(names))], [imp.get(n, 0.0) for n in names], height=width,
                label=objective, color=f"C{i}")
    ax.set_yticks([j + width * (len(importances) - 1) / 2 for j in range(len(names))], names)
    ax.set_xlabel("importance (Optuna fANOVA, sums to 1 per objective)")
    ax.legend(fontsize=7)
    return _svg(fig)


# ------------------------------------------------------------------------------- importances


def param_importances(run_dir: Where) -> Tuple[Optional[Dict[str, Dict[str, float]]], str]:
    """Optuna's default evaluator (fANOVA) per objective on the completed trials, or (None, why not).
    The study is read from the run's journal (downloaded when the run is in object storage) or from
    the database its tune_config.json names."""
    import optuna

    from .study import JOURNAL, StudyStorage

    study_store = StudyStorage.of_run(run_dir)
    if not study_store.exists():
        return None, f"no Optuna study ({JOURNAL}) in this run"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=study_store.study_name, storage=study_store.storage())
        complete = study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])
        if len(complete) < 2:
            return None, f"needs at least 2 completed trials (has {len(complete)})"
        out = {}
        for i, name in enumerate(("clean accuracy", "robust objective (APGD, 0 if flagged)")):
            out[name] = {k: float(v) for k, v in optuna.importance.get_param_importances(
                study, target=lambda t, i=i: t.values[i], evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)).items()}
        return out, "Optuna FanovaImportanceEvaluator (seed 0) over the completed trials"
    except Exception as e:  # too few distinct values, a single parameter value, ...
        return None, f"not computable: {str(e).splitlines()[0] if str(e) else type(e).__name__}"


# ------------------------------------------------------------------------------------- sections


def _aa_table(rows: List[Dict[str, Any]], label_key: str, pgd_label: str) -> str:
    attacks = []
    for r in rows:
        for k in (r.get("autoattack_per_attack") or {}):
            if k not in ("n", "clean", "robust") and k not in attacks:
                attacks.append(k)
    head = (f'<tr><th class="l">{html.escape(label_key)}</th><th class="l">method</th><th>clean</th>'
            f'<th>{html.escape(pgd_label)}</th>' + "".join(f"<th>after {html.escape(a)}</th>" for a in attacks)
            + '<th>AutoAttack</th><th class="l">flags</th></tr>')
    body = []
    for r in rows:
        per = r.get("autoattack_per_attack") or {}
        body.append(f'<tr><td class="l">{_fmt(r.get(label_key))}</td><td class="l">{_fmt(r.get("method"))}</td>'
                    f'<td>{_fmt(r.get("clean_acc"))}</td><td>{_fmt(r.get("pgd_acc"))}</td>'
                    + "".join(f"<td>{_fmt(per.get(a))}</td>" for a in attacks)
                    + f'<td>{"skipped" if r.get("autoattack_acc") is None else _fmt(r.get("autoattack_acc"))}</td>'
                    f'<td class="l">{_flags_html(r.get("flags") or [])}</td></tr>')
    return f'<table id="autoattack-table">{head}{"".join(body)}</table>'


def _eps_curve(ev: Dict[str, Any]) -> Dict[str, Any]:
    m = ev.get("measurements") or {}
    pgd = dict(m.get("pgd_by_eps") or {})
    aa = (ev["eps"], ev["autoattack_acc"]) if ev.get("autoattack_acc") is not None else None
    return {"pgd": pgd, "pgd_label": f"PGD-{m.get('pgd_steps', '?')} on CE (sanity probe)", "aa": aa,
            "clean": ev.get("clean_acc"), "norm": ev.get("norm", "Linf"),
            "aa_version": ev.get("autoattack_version") or (ev.get("autoattack") or {}).get("version")}


def _trials_table(trials: List[Dict[str, Any]], selected: List[str]) -> str:
    pnames = sorted({k for t in trials for k in (t.get("params") or {})})
    head = ('<tr><th class="l">trial</th>' + "".join(f'<th class="l">{html.escape(p)}</th>' for p in pnames)
            + '<th>epochs</th><th>clean</th><th>APGD-CE + APGD-T</th><th>PGD-20 CE (contrast)</th>'
            '<th>objective</th><th class="l">status</th><th class="l">flags</th></tr>')
    body = []
    for t in trials:
        status = t.get("status", "")
        if t["trial_id"] in selected:
            status += " (selected)"
        body.append(f'<tr><td class="l">{_fmt(t["trial_id"])}</td>'
                    + "".join(f'<td class="l">{_fmt((t.get("params") or {}).get(p))}</td>' for p in pnames)
                    + f'<td>{_fmt(t.get("epoch"))}</td><td>{_fmt(t.get("clean_acc"))}</td><td>{_fmt(t.get("robust_acc"))}</td>'
                    f'<td>{_fmt(t.get("pgd_ce_acc"))}</td><td>{_fmt(t.get("robust_objective"))}</td>'
                    f'<td class="l">{_fmt(status)}</td><td class="l">{_flags_html(t.get("flags") or [])}</td></tr>')
    return f'<table id="trials-table">{head}{"".join(body)}</table>'


def _no_search(section_id: str) -> str:
    return f'<p id="{section_id}" class="note">{NO_SEARCH}.</p>'


def _tune_sections(run_dir: Location, ts: Dict[str, Any]) -> Dict[str, str]:
    trials, pareto, selected = ts.get("trials", []), ts.get("pareto", []), ts.get("selected", [])
    out = {}
    final = ts.get("final", [])
    out["final"] = (_aa_table(final, "trial_id", f"PGD-{ts.get('pgd_steps', '?')}")
                    if final else '<p id="autoattack-table" class="note">no unflagged trial finished: nothing was re-evaluated.</p>')
    done = [t for t in trials if t.get("clean_acc") is not None]
    out["pareto"] = (_figure("plot-pareto", pareto_plot(trials, pareto, selected),
                             f"{len(done)} trials; robust = APGD-CE + APGD-T on {ts.get('val_n')} validation images at "
                             f"{ts.get('norm') or 'Linf'} eps {ts.get('eps')}; flagged trials in red")
                     if done else '<p id="plot-pareto" class="note">no trial reported a result.</p>')
    curves, evals = {}, {}
    for f in final:
        ev = _read_json(run_dir / "trials" / f["trial_id"] / "final_eval.json") or (
            _read_json(f["eval"]) if f.get("eval") else None)
        if ev:
            curves[f["trial_id"]] = _eps_curve(ev)
            evals[f"{f['trial_id']} {f.get('method') or ''}".strip()] = ev
    out["eps"] = (_figure("plot-eps", eps_plot(curves), "selected configurations on the test set")
                  if curves else '<p id="plot-eps" class="note">no selected configuration was evaluated.</p>')
    out.update(_eval_sections(evals, out["eps"]))
    figs = []
    for t in trials:
        tdir = run_dir / "trials" / t["trial_id"]
        graded = [g for g in (_read_json(p) for p in (tdir / "val").iterdir()
                              if p.name.startswith("epoch_") and p.name.endswith(".json")) if g]
        hist = _read_jsonl(tdir / "metrics.jsonl")
        series = {"clean": [(g["epoch"], g["clean_acc"]) for g in graded],
                  "APGD-CE + APGD-T": [(g["epoch"], g["robust_acc"]) for g in graded],
                  "PGD-20 CE": [(g["epoch"], g["pgd_ce_acc"]) for g in graded]}
        loss = [(h["epoch"], h["loss"]) for h in hist if "loss" in h]
        if graded or loss:
            title = f"{t['trial_id']} {t.get('method') or ''}" + (" [FLAGGED]" if t.get("flagged") else "")
            figs.append(_figure(f"curve-{t['trial_id']}", curve_plot(title, series, loss), ", ".join(
                f"{k}={_fmt(v)}" for k, v in (t.get("params") or {}).items())))
    out["curves"] = f'<div id="curves" class="grid">{"".join(figs)}</div>' if figs else '<p id="curves" class="note">no learning curves recorded.</p>'
    imp, how = param_importances(run_dir)
    out["importance"] = (_figure("plot-importance", importance_plot(imp), how) if imp
                         else f'<p id="plot-importance" class="note">{html.escape(how)}</p>')
    out["trials"] = _trials_table(trials, selected)
    return out


def _pipeline_sections(run_dir: Location, summary: Dict[str, Any]) -> Dict[str, str]:
    rows, curves, figs, evals = [], {}, [], {}
    methods = [r["method"] for r in summary.get("rows", [])] or [
        p.name for p in run_dir.iterdir() if p.is_dir() and (p / "eval.json").is_file()]
    pgd_label = "PGD"
    for method in methods:
        ev = _read_json(run_dir / method / "eval.json")
        row = next((dict(r) for r in summary.get("rows", []) if r["method"] == method), {"method": method})
        if ev:
            evals[method] = ev
            row.update({"clean_acc": ev.get("clean_acc"), "pgd_acc": ev.get("pgd_acc"),
                        "autoattack_acc": ev.get("autoattack_acc"), "flags": ev.get("flags", row.get("flags", [])),
                        "autoattack_per_attack": (ev.get("autoattack") or {}).get("per_attack")})
            pgd_label = f"PGD-{(ev.get('pgd') or {}).get('steps', '')}"
            c = _eps_curve(ev)
            if len(c["pgd"]) + (c["aa"] is not None) >= 2:
                curves[method] = c
        row["name"] = method
        rows.append(row)
        hist = _read_jsonl(run_dir / method / "metrics.jsonl")
        if hist:
            keys = sorted({k for h in hist for k in h if k.startswith("val_") and k.endswith("_acc")})
            series = {k.removeprefix("val_").removesuffix("_acc").replace("pgd", "PGD-") + " (validation)":
                      [(h["epoch"], h[k]) for h in hist if k in h] for k in keys}
            loss = [(h["epoch"], h["loss"]) for h in hist if "loss" in h]
            figs.append(_figure(f"curve-{method}", curve_plot(method, series, loss), f"{method}: per-epoch metrics.jsonl"))
    out = {"final": _aa_table(rows, "name", pgd_label) if rows else '<p id="autoattack-table" class="note">no evaluation in this run.</p>',
           "pareto": _no_search("plot-pareto"),
           "eps": (_figure("plot-eps", eps_plot(curves), "each method's eval.json on the test set") if curves
                   else '<p id="plot-eps" class="note">eval.json holds a single eps: no robust-vs-eps curve.</p>'),
           "curves": f'<div id="curves" class="grid">{"".join(figs)}</div>' if figs else '<p id="curves" class="note">no learning curves recorded.</p>',
           "importance": _no_search("plot-importance"),
           "trials": _no_search("trials-table")}
    out.update(_eval_sections(evals, out["eps"]))
    return out


def _eval_sections(evals: Dict[str, Dict[str, Any]], eps_fallback: str) -> Dict[str, str]:
    """The per-model sections (numbers, checks, robust-vs-eps, gallery) from each model's eval.json."""
    from .report_eval import checks_section, eps_section, gallery_section, numbers_section

    with_curve = any((ev.get("eps_curve") or {}).get("points") for ev in evals.values())
    empty = '<p id="{}" class="note">no evaluation in this run.</p>'
    return {"numbers": numbers_section(evals) if evals else empty.format("gap-table"),
            "checks": checks_section(evals),
            "eps": eps_section(evals) if with_curve else eps_fallback,
            "gallery": gallery_section(evals)}


def _results_sections(run_dir: Location, summary: Dict[str, Any]) -> Dict[str, str]:
    """A `rayrobust results` run: mean ± std across seeds, then the first seed's run in detail."""
    from .report_eval import seeds_section

    seed = (summary.get("seeds") or [None])[0]
    seed_dir = run_dir / f"seed{seed}"
    seed_summary = _read_json(seed_dir / "summary.json") or {"rows": []}
    out = _pipeline_sections(seed_dir, seed_summary)
    out["seeds"] = seeds_section(summary)
    out["detail_note"] = (f'<p class="note">The sections below show seed {seed} ({html.escape(seed_dir.uri)}); every '
                          "seed's run has its own report data under its seed directory.</p>")
    return out


def write_report(run_dir: Where) -> Location:
    """Write `<run_dir>/report.html` (and `summary.json`, adding a pointer to the report) to a local run
    directory or one in object storage; return the report's Location."""
    run_dir = as_location(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir.uri!r} does not exist; pass the run_dir of a `rayrobust tune` or "
                          "`rayrobust pipeline` run")
    ts = _read_json(run_dir / "tune_summary.json")
    summary = _read_json(run_dir / "summary.json")
    if ts is None and summary is None:
        raise ConfigError(f"{run_dir.uri} holds neither tune_summary.json nor summary.json: run `rayrobust tune` or "
                          "`rayrobust pipeline` there first (or finish an interrupted search with --resume)")
    meta = ts or summary
    if ts:
        kind, sections = "search (rayrobust tune)", _tune_sections(run_dir, ts)
    elif summary.get("per_seed"):
        kind, sections = (f"results over seeds {', '.join(str(s) for s in summary.get('seeds', []))} (rayrobust results)",
                          _results_sections(run_dir, summary))
    else:
        kind, sections = "pipeline (rayrobust pipeline)", _pipeline_sections(run_dir, summary)
    seeds_html = (f"<h2>Across seeds</h2>{sections['seeds']}{sections['detail_note']}" if "seeds" in sections else "")
    attacks = meta.get("attacks") or {}
    legend = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>" for k, v in attacks.items())
    flagged_note = ('<p class="note">Flags (in <span class="flag">red</span>) are failed sanity checks '
                    "(docs/evaluation.md section 4): a flagged number may be gradient masking, and a flagged trial is never selected.</p>")
    body = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,"><title>rayrobust report: {html.escape(run_dir.name)}</title>
<style>{_CSS}</style></head><body>
<h1>rayrobust report: {html.escape(run_dir.name)}</h1>
<p>Run kind: {kind}. Dataset {_fmt(meta.get('dataset'))}, {_fmt(meta.get('norm'))} eps={_fmt(meta.get('eps'))};
test images: n={_fmt(meta.get('n_eval'))} (clean, PGD), AutoAttack on n={_fmt(meta.get('n_autoattack'))}.</p>
<ul>{legend}</ul>{flagged_note}{seeds_html}
<h2>Final AutoAttack (test set)</h2>{sections['final']}
<h2>PGD − AutoAttack, adaptive attacks, certificates</h2>{sections['numbers']}
<h2>Sanity checks</h2>{sections['checks']}
<h2>Clean vs robust: Pareto front of the search</h2>{sections['pareto']}
<h2>Robust accuracy against eps</h2>{sections['eps']}
<h2>Adversarial examples</h2>{sections['gallery']}
<h2>Learning curves</h2>{sections['curves']}
<h2>Parameter importances</h2>{sections['importance']}
<h2>Trials</h2>{sections['trials']}
</body></html>
"""
    out = run_dir / "report.html"
    out.write_text(body)  # atomic: a local temporary file renamed into place, or one complete object
    merged = dict(summary or {"kind": "tune", **{k: ts.get(k) for k in ("dataset", "eps", "norm", "n_eval", "n_autoattack",
                                                                         "attacks")}, "rows": ts.get("final", [])})
    merged["report"] = out.uri
    write_json(run_dir / "summary.json", merged)
    return out
