"""How threat models and attacks are named in tables, summaries and reports: every label says the norm in force.

    >>> threat_label("L2", 0.5)
    'L2 eps=0.5'
    >>> autoattack_label("standard")
    'AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square)'
"""
from __future__ import annotations

_NORMS = {"Linf": ("L-inf", "L∞"), "L2": ("L2", "L2")}


def norm_label(norm: str = "Linf", *, unicode: bool = False) -> str:
    """'L-inf' (or 'L∞') for Linf, 'L2' for L2; any other name as given."""
    ascii_name, uni = _NORMS.get(norm, (norm, norm))
    return uni if unicode else ascii_name


def threat_label(norm: str, eps: float, *, unicode: bool = False) -> str:
    """e.g. 'L-inf eps=0.1', 'L2 eps=0.5'."""
    return f"{norm_label(norm, unicode=unicode)} eps={eps}"


def autoattack_label(version: str = "standard") -> str:
    """e.g. 'AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square)', 'AutoAttack rand (APGD-CE, APGD-DLR; EOT)'."""
    attacks = {"standard": "APGD-CE, APGD-T, FAB-T, Square",
               "plus": "APGD-CE, APGD-DLR, FAB, Square, APGD-T, FAB-T",
               "rand": "APGD-CE, APGD-DLR; EOT"}.get(version)
    return f"AutoAttack {version}" + (f" ({attacks})" if attacks else "")
