"""A run's summary rows (`summary_row`: the numbers of one evaluation, each with the attack that produced it)
and the table every command prints (`format_table`)."""
from __future__ import annotations

from typing import Any, Dict, List

from .labels import autoattack_label, threat_label


# Accuracies a method's evaluation may add to the standard ones (SRD: through / around the purifier).
OPTIONAL_ACCURACIES = ("adaptive_acc", "nonadaptive_acc")


def summary_row(res: Dict[str, Any]) -> Dict[str, Any]:
    row = {"method": res["method"], "clean_acc": res["clean_acc"], "pgd_acc": res["pgd_acc"],
           "autoattack_acc": res["autoattack_acc"], "flags": res["flags"]}
    row.update({k: res[k] for k in OPTIONAL_ACCURACIES if res.get(k) is not None})
    attack = (res.get("autoattack") or {}).get("attack")
    if attack and attack != "AutoAttack (standard)":  # a random model (EOT) or probabilities (their log)
        row["autoattack_attack"] = attack
    row.update(same_images_pgd(res))
    return row


def same_images_pgd(res: Dict[str, Any]) -> Dict[str, Any]:
    """The strongest PGD on cross-entropy that ran on exactly AutoAttack's images, if any.

    The sanity checks run PGD with 5x the steps and several restarts on the first
    max(n_autoattack, 200) images; when that is AutoAttack's subset, PGD − AutoAttack on the same
    images measures the gradient-masking gap without the sampling difference of n_eval vs n_autoattack.
    Returns {} when no such measurement exists (checks off, AutoAttack skipped, or other images).
    """
    m = res.get("measurements") or {}
    n_aa = res.get("n_autoattack") or 0
    if not n_aa or res.get("autoattack_acc") is None or m.get("n") != n_aa or m.get("pgd_many") is None:
        return {}
    return {"pgd_same_images_acc": m["pgd_many"],
            "pgd_same_images_attack": f"PGD-{m['pgd_many_steps']} on CE, {m['pgd_many_restarts']} restarts"}


def format_table(rows: List[Dict[str, Any]], *, pgd_steps: int, n_eval: int, n_aa: int, eps: float,
                 norm: str = "Linf", version: str = "standard") -> str:
    """One line per row (method, clean, PGD, AutoAttack, flags) and what produced each column."""
    head = f"{'method':<12} {'clean':>7} {'PGD-' + str(pgd_steps):>8} {'AutoAttack':>11}  flags"
    lines = [head, "-" * len(head)]
    for r in rows:
        aa = "skipped" if r["autoattack_acc"] is None else f"{r['autoattack_acc']:.4f}"
        flags = ", ".join(r["flags"]) if r["flags"] else "-"
        lines.append(f"{r['method']:<12} {r['clean_acc']:>7.4f} {r['pgd_acc']:>8.4f} {aa:>11}  {flags}")
    lines.append(f"{threat_label(norm, eps)}; clean and PGD-{pgd_steps} (weaker than AutoAttack) on n={n_eval} test "
                 f"images; {autoattack_label(version)} on the first n={n_aa}.")
    for r in rows:  # random models (EOT) and probability outputs (attacked on their log too)
        if r.get("autoattack_attack"):
            lines.append(f"{r['method']}: the AutoAttack column is {r['autoattack_attack']}.")
    for r in rows:  # purification defenses: the AutoAttack column is end to end through the purifier
        if r.get("adaptive_acc") is not None:
            lines.append(f"{r['method']}: adaptive {r['adaptive_acc']:.4f} (min of AutoAttack through the unrolled "
                         f"purifier and BPDA APGD-CE + APGD-T); non-adaptive {r.get('nonadaptive_acc', float('nan')):.4f} "
                         "(APGD-CE + APGD-T on the bare classifier, transferred).")
    return "\n".join(lines)
