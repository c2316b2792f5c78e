"""The report's per-model evaluation sections, drawn from each model's eval.json.

- `numbers_section`: the same-image PGD − AutoAttack gap, a purifier's adaptive / BPDA / non-adaptive
  accuracies, ClusTR's certified accuracy at its radii;
- `checks_section`: every sanity check of every model with what it measured and what it means;
- `eps_section`: robust accuracy against eps (APGD-CE + APGD-T at eps/2 .. 2eps, AutoAttack at eps);
- `gallery_section`: AutoAttack's adversarial examples with the perturbation magnified;
- `seeds_section`: mean ± std across seeds for a `rayrobust results` run.
"""
from __future__ import annotations

import base64
import html
import io
from typing import Any, Dict, List, Optional

from .report import _figure, _fmt, _plt, _svg  # the report's own formatting and plotting helpers

# What a raised flag means and what to do (docs/evaluation.md, "Reading a flag").
CHECK_MEANINGS = {
    "robust_above_clean": "An attack left more examples correct than no attack: an attack or evaluation bug, or a "
                          "random model. The evaluation is invalid as it stands.",
    "square_beats_whitebox": "Square, a black-box attack, broke points the gradient attacks missed: the gradients "
                             "mislead (gradient masking), so white-box numbers overstate robustness. AutoAttack's "
                             "final number already includes Square.",
    "adaptive_gap": "The non-adaptive attack (crafted on the bare classifier) leaves more accuracy than the adaptive "
                    "attacks through the purifier: report the adaptive number, never the non-adaptive one.",
    "certificate_violated": "An attack found a misclassified point inside a certified radius: the certificate or its "
                            "Lipschitz bound is wrong for this model, and the certified accuracy is invalid.",
    "autoattack_skipped": "eval.n_autoattack is 0: there is no AutoAttack number, only weaker attacks.",
    "zero_gradients": "Some examples have an all-zero input gradient: cross-entropy attacks stall there (saturated "
                      "softmax or vanishing gradients). Trust AutoAttack, not PGD on cross-entropy.",
    "softmax_output": "The model returns probabilities, not logits: cross-entropy on probabilities masks gradients. "
                      "AutoAttack also attacked their logarithm and reports the lower number.",
    "nondeterministic": "Forward passes disagree: the model is random. AutoAttack ran its rand version (EOT, majority "
                        "votes); the PGD column did not and is weaker still.",
    "not_monotone_in_eps": "Accuracy rose with a larger budget, which contains every smaller one: masked gradients or "
                           "a failing optimisation. Treat every robust number of the model as an upper bound.",
    "robust_at_large_eps": "At a budget that can reach the all-grey image, accuracy should be ~0; what is left means "
                           "the attack cannot follow the gradient. Treat every robust number as an upper bound.",
    "more_steps_raise_accuracy": "More PGD steps and restarts raised accuracy: the attack has not converged or the "
                                 "loss surface is noisy. The lower number stands.",
    "pgd_ce_above_apgd": "(search) PGD on cross-entropy beats APGD by more than tune.masking_gap: the trial is "
                         "excluded from selection.",
}


# ----------------------------------------------------------------------------------- numbers


def numbers_section(evals: Dict[str, Dict[str, Any]]) -> str:
    """The same-image PGD − AA gap for every model, then purifier and certificate tables where present."""
    rows = []
    for name, ev in evals.items():
        m = ev.get("measurements") or {}
        aa = ev.get("autoattack_acc")
        same = m.get("pgd_many") if (m.get("n") == ev.get("n_autoattack") and aa is not None) else None
        attack = (f"PGD-{m.get('pgd_many_steps')} on CE, {m.get('pgd_many_restarts')} restarts"
                  if same is not None else "no PGD ran on AutoAttack's images")
        gap = None if same is None else same - aa
        rows.append(f'<tr><td class="l">{html.escape(name)}</td><td>{_fmt(aa)}</td><td>{_fmt(same)}</td>'
                    f'<td>{"-" if gap is None else f"{gap:+.4f}"}</td><td class="l">{html.escape(attack)}</td></tr>')
    out = ['<table id="gap-table"><tr><th class="l">model</th><th>AutoAttack</th><th>PGD, same images</th>'
           '<th>PGD − AA</th><th class="l">PGD attack</th></tr>' + "".join(rows) + "</table>",
           '<p class="note">PGD − AA on the same images is the gradient-masking gap: a large positive value means '
           "cross-entropy PGD overstates robustness.</p>"]
    pur = {k: ev for k, ev in evals.items() if ev.get("bpda") or ev.get("non_adaptive")}
    if pur:
        body = "".join(
            f'<tr><td class="l">{html.escape(k)}</td><td>{_fmt(ev.get("autoattack_acc"))}</td>'
            f'<td>{_fmt((ev.get("bpda") or {}).get("robust_acc"))}</td><td><b>{_fmt(ev.get("adaptive_acc"))}</b></td>'
            f'<td class="l">{_fmt(ev.get("adaptive_attack"))}</td><td>{_fmt(ev.get("nonadaptive_acc"))}</td></tr>'
            for k, ev in pur.items())
        out.append('<h3>Purifier defenses: adaptive and non-adaptive attacks</h3><table id="purifier-table"><tr>'
                   '<th class="l">model</th><th>AutoAttack through the purifier</th><th>APGD BPDA + EOT</th>'
                   '<th>adaptive (minimum)</th><th class="l">from</th><th>non-adaptive (transferred; weaker)</th></tr>'
                   + body + '</table><p class="note">The defense\'s robust accuracy is the adaptive minimum. The '
                   "non-adaptive number attacks the bare classifier and is shown only to expose the gap.</p>")
    cert = {k: ev["certificate"] for k, ev in evals.items() if ev.get("certificate")}
    if cert:
        radii = sorted({r for c in cert.values() for r in (c.get("certified_acc") or {})}, key=float)
        head = "".join(f"<th>certified at L2 r={html.escape(r)}</th>" for r in radii)
        body = ""
        for k, c in cert.items():
            chk = c.get("check") or {}
            body += (f'<tr><td class="l">{html.escape(k)}</td><td>{_fmt(c.get("clean_acc"))}</td>'
                     + "".join(f"<td>{_fmt((c.get('certified_acc') or {}).get(r))}</td>" for r in radii)
                     + f'<td>{_fmt((c.get("lipschitz") or {}).get("bound"))}</td>'
                     f'<td>{_fmt((c.get("certified_radius") or {}).get("median"))}</td>'
                     f'<td class="l">{_fmt(chk.get("violations"))} of {_fmt(chk.get("n"))}</td></tr>')
        out.append('<h3>Certificates</h3><table id="certificate-table"><tr><th class="l">model</th><th>clean</th>'
                   + head + '<th>Lipschitz bound L</th><th>median certified radius</th>'
                   '<th class="l">attack inside radius: violations</th></tr>' + body + "</table>"
                   '<p class="note">Certified accuracy: correct and certified radius ≥ r (no attack involved); '
                   "the last column is the attack that checks the certificate.</p>")
    return "".join(out)


def checks_section(evals: Dict[str, Dict[str, Any]]) -> str:
    """Every model's sanity checks: name, outcome, what it measured, what a flag means."""
    rows = []
    for name, ev in evals.items():
        for c in ev.get("checks") or []:
            ok = c.get("passed")
            outcome = '<span class="ok">passed</span>' if ok else '<span class="flag">FLAG</span>'
            meaning = CHECK_MEANINGS.get(c.get("name"), "")
            rows.append(f'<tr><td class="l">{html.escape(name)}</td><td class="l">{html.escape(str(c.get("name")))}</td>'
                        f'<td class="l">{outcome}</td><td class="l">{html.escape(str(c.get("detail", "")))}</td>'
                        f'<td class="l note">{html.escape(meaning) if not ok else "-"}</td></tr>')
    if not rows:
        return '<p id="checks" class="note">no sanity checks recorded.</p>'
    return ('<table id="checks"><tr><th class="l">model</th><th class="l">check</th><th class="l">outcome</th>'
            '<th class="l">measured</th><th class="l">what the flag means</th></tr>' + "".join(rows) + "</table>"
            + "<dl class=\"note\">" + "".join(
                f"<dt><b>{html.escape(k)}</b></dt><dd>{html.escape(v)}</dd>" for k, v in CHECK_MEANINGS.items()
                if any(c.get("name") == k for ev in evals.values() for c in ev.get("checks") or [])) + "</dl>")


# ---------------------------------------------------------------------------------- eps curve


def eps_section(evals: Dict[str, Dict[str, Any]]) -> str:
    curves = {k: ev for k, ev in evals.items() if (ev.get("eps_curve") or {}).get("points")}
    if not curves:
        return ('<p id="plot-eps" class="note">no robust-vs-eps curve in these evaluations (eval.eps_curve off, or '
                "AutoAttack skipped).</p>")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    norm, attacks = "Linf", set()
    for i, (name, ev) in enumerate(curves.items()):
        c, color = ev["eps_curve"], f"C{i % 10}"
        norm = c.get("norm", norm)
        attacks.add(c["attack"])
        pts = [(0.0, ev["autoattack"]["per_attack"]["clean"])] if (ev.get("autoattack") or {}).get("per_attack") else []
        pts += sorted((p["eps"], p["robust"]) for p in c["points"])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, label=name)
        if ev.get("autoattack_acc") is not None:
            ax.scatter([ev["eps"]], [ev["autoattack_acc"]], marker="*", s=150, color=color, zorder=3)
    ax.set_xlabel(f"eps ({norm}, [0,1] pixel units)")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=.3)
    ax.legend(fontsize=7, title="line: APGD-CE + APGD-T; star: full AutoAttack at eps", title_fontsize=7)
    n = sorted({ev["eps_curve"]["n"] for ev in curves.values()})
    caption = (f"{'; '.join(sorted(attacks))}, on AutoAttack's first n={', '.join(map(str, n))} test images with its "
               "chunks and seeds; eps 0 is clean accuracy. At eps the line point is AutoAttack's own APGD-CE + APGD-T "
               "stages; the other points are weaker than full AutoAttack.")
    return _figure("plot-eps", _svg(fig), caption)


# ------------------------------------------------------------------------------------ gallery


def _png(b64: str, shape: List[int]) -> str:
    import matplotlib.image as mpimg
    import numpy as np

    arr = np.frombuffer(base64.b64decode(b64), dtype=np.uint8).reshape(shape)
    img = arr[0] if shape[0] == 1 else arr.transpose(1, 2, 0)
    buf = io.BytesIO()
    mpimg.imsave(buf, img, format="png", cmap="gray", vmin=0, vmax=255)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def gallery_section(evals: Dict[str, Dict[str, Any]]) -> str:
    blocks = []
    for name, ev in evals.items():
        g = ev.get("gallery") or {}
        ex = g.get("examples") or []
        if not ex:
            continue
        names = g.get("class_names") or []

        def lab(i: int) -> str:
            return html.escape(f"{names[i]} ({i})" if i < len(names) else str(i))

        cells = []
        for e in ex:
            imgs = "".join(f'<img alt="{kind}" src="{_png(e[kind], e["shape"])}">' for kind in ("clean", "adv", "delta"))
            verdict = (f'<span class="flag">{lab(e["adv_pred"])}</span>' if e["adv_pred"] != e["label"]
                       else lab(e["adv_pred"]))
            cells.append(f'<div class="ex">{imgs}<div class="note">label {lab(e["label"])}<br>clean → {lab(e["clean_pred"])}'
                         f'<br>adversarial → {verdict}<br>by {html.escape(str(e["broken_by"]))}, '
                         f'{g.get("norm", "")} {e["size"]:.3g}{"" if e.get("found", True) else " (not found again)"}'
                         "</div></div>")
        blocks.append(f'<h3>{html.escape(name)}</h3><div class="gallery">{"".join(cells)}</div>')
    if not blocks:
        return ('<p id="gallery" class="note">no adversarial examples recorded (eval.gallery is 0, AutoAttack was '
                "skipped, or it broke no image).</p>")
    some = next(ev["gallery"] for ev in evals.values() if (ev.get("gallery") or {}).get("examples"))
    return (f'<div id="gallery">{"".join(blocks)}<p class="note">Each example: clean image, adversarial image, and '
            "the perturbation magnified (grey = unchanged; L-inf: scaled by 1/(2 eps)). "
            f"{html.escape(some['attack'])}.</p></div>")


# ------------------------------------------------------------------------------------ seeds


SEED_COLUMNS = (("clean_acc", "clean"), ("pgd_acc", "PGD"), ("autoattack_acc", "AutoAttack"),
                ("adaptive_acc", "adaptive (purifier)"))


def seeds_section(summary: Dict[str, Any]) -> str:
    """Grouped bars (mean ± std across seeds) per method, and the numbers as a table."""
    rows = summary.get("rows") or []
    cols = [(k, t) for k, t in SEED_COLUMNS if any(isinstance(r.get(k), dict) for r in rows)]
    if not rows or not cols:
        return '<p id="plot-seeds" class="note">no per-seed results.</p>'
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.5, 0.9 * len(rows) + 1), 4))
    width = 0.8 / len(cols)
    for j, (k, title) in enumerate(cols):
        xs = [i + j * width for i in range(len(rows))]
        means = [(r.get(k) or {}).get("mean", 0.0) for r in rows]
        stds = [(r.get(k) or {}).get("std", 0.0) for r in rows]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=title, color=f"C{j}")
    ax.set_xticks([i + width * (len(cols) - 1) / 2 for i in range(len(rows))], [r["method"] for r in rows],
                  rotation=30, ha="right")
    ax.set_ylabel("accuracy (mean ± std over seeds)")
    ax.set_ylim(0, 1.02)
    ax.grid(axis="y", alpha=.3)
    ax.legend(fontsize=7)
    seeds = ", ".join(str(s) for s in summary.get("seeds", []))
    fig_html = _figure("plot-seeds", _svg(fig), f"seeds {seeds}; error bars: standard deviation across seeds; "
                                                f"PGD-{summary.get('pgd_steps', '?')} is weaker than AutoAttack")

    def cell(stat: Optional[Dict[str, Any]]) -> str:
        if not isinstance(stat, dict):
            return "-"
        return f"{stat['mean']:.4f} ± {stat['std']:.4f}" if len(stat.get("values", [])) > 1 else f"{stat['mean']:.4f}"

    head = "".join(f"<th>{html.escape(t)}</th>" for _, t in cols)
    body = "".join(f'<tr><td class="l">{html.escape(r["method"])}</td>' + "".join(f"<td>{cell(r.get(k))}</td>" for k, _ in cols)
                   + f'<td>{"-" if r.get("pgd_minus_autoattack") is None else format(r["pgd_minus_autoattack"], "+.4f")}</td>'
                   f'<td class="l">{", ".join(str(s) for s in r.get("seeds", []))}</td></tr>' for r in rows)
    table = (f'<table id="seeds-table"><tr><th class="l">method</th>{head}<th>PGD − AA</th><th class="l">seeds</th></tr>'
             f"{body}</table>")
    return fig_html + table


__all__ = ["CHECK_MEANINGS", "checks_section", "eps_section", "gallery_section", "numbers_section", "seeds_section"]
