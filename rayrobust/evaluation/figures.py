"""What the report draws besides the headline numbers: robust accuracy against eps, and a gallery of
AutoAttack's adversarial examples.

Both run on AutoAttack's own images with AutoAttack's own attack objects (pyautoattack), so they are
measured, not illustrated:

- `eps_curve`: APGD-CE then APGD-T (AutoAttack's first two stages) at eps/2, eps, 3eps/2 and 2eps, chunked and
  seeded exactly as AutoAttack is. At eps itself that is the standard AutoAttack run's robust accuracy after its
  APGD-T stage, so that point is read from it instead of being attacked again. A randomized model (AutoAttack's
  "rand" version) gets APGD-CE + APGD-DLR with EOT at every eps. These are upper bounds on robust accuracy that
  are weaker than full AutoAttack at eps/2, 3eps/2 and 2eps; the report says so.
- `gallery`: up to k images that AutoAttack broke (those its earlier attacks broke first), each attacked again
  by the attack that broke it in the main run (one batch per attack, seed `seed`), with the clean and adversarial predictions the model gives. Images are
  stored as base64 uint8 (C, H, W), the perturbation scaled to [0, 255] with 128 = no change.
"""
from __future__ import annotations

import base64
import math
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..attacks.autoattack import attack_label, attacks_for, autoattack_chunk, chunk_plan, chunk_seed, run_autoattack
from ..attacks.pgd import perturbation_norm

CURVE_FACTORS = (0.5, 1.0, 1.5, 2.0)
CURVE_ATTACKS = ["apgd-ce", "apgd-t"]


def curve_eps(eps: float, norm: str, x: torch.Tensor) -> List[float]:
    """eps/2, eps, 3eps/2, 2eps, capped at the input's diameter (1 for L-inf, sqrt(C*H*W) for L2)."""
    cap = 1.0 if norm == "Linf" else math.sqrt(x[0].numel())
    out: List[float] = []
    for f in CURVE_FACTORS:
        e = round(min(f * eps, cap), 10)
        if e not in out:
            out.append(e)
    return out


def curve_images(n_autoattack: int, chunk_size: int, limit: int = 0) -> int:
    """How many of AutoAttack's images the curve attacks: all, or the first `limit` rounded down to whole chunks
    (so its chunks, and their seeds, are AutoAttack's), at least one chunk's worth."""
    if not limit or limit >= n_autoattack:
        return n_autoattack
    return max(min(limit, chunk_size), (limit // chunk_size) * chunk_size)


def robust_after(broken_by: Sequence[Optional[str]], version: str) -> Optional[float]:
    """The fraction of `broken_by` (AutoAttack's per-image outcomes) still robust after its APGD-CE and APGD-T
    stages (standard) or after all of its attacks (rand); None for the other versions, whose first two attacks
    are not APGD-CE then APGD-T."""
    if version == "standard":
        return sum(b not in ("clean", "apgd-ce", "apgd-t") for b in broken_by) / len(broken_by)
    if version == "rand":
        return broken_by.count(None) / len(broken_by)
    return None


def eps_curve(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "Linf",
              version: str = "standard", seed: int = 0, chunk_size: int = 100,
              at_eps: Optional[float] = None) -> Dict[str, Any]:
    """Robust accuracy of `model` on (x, y) at eps/2, eps, 3eps/2, 2eps under APGD-CE + APGD-T (AutoAttack's
    chunks and seeds); `at_eps` is the AutoAttack run's accuracy after those two stages, reused at eps.
    With version "rand" (a randomized model) the attacks are the rand version's (APGD-CE + APGD-DLR, EOT)."""
    t0 = time.perf_counter()
    from .adaptive import apgd_chunk

    if version == "rand":
        attack = f"{attack_label('rand')}: APGD-CE + APGD-DLR with EOT"
    else:
        attack = ("APGD-CE + APGD-T with AutoAttack standard's settings (its first two attacks; weaker than full "
                  "AutoAttack)")
    points = []
    for e in curve_eps(eps, norm, x):
        if e == eps and at_eps is not None:
            points.append({"eps": e, "robust": at_eps, "source": "the AutoAttack run at eps"})
            continue
        if version == "rand":
            broken = run_autoattack(model, x, y, eps=e, norm=norm, version="rand", seed=seed, chunk_size=chunk_size,
                                    bar=False)
        else:  # chunk by chunk, seeded as AutoAttack seeds its chunks: at eps this is its APGD-T stage exactly
            broken = []
            for i, (start, stop) in enumerate(chunk_plan(len(x), chunk_size)):
                broken += apgd_chunk(model, x[start:stop], y[start:stop], eps=e, norm=norm, attacks=CURVE_ATTACKS,
                                     seed=chunk_seed(seed, i))[0]
        points.append({"eps": e, "robust": broken.count(None) / len(broken), "source": "attacked"})
    return {"attack": attack, "norm": norm, "n": len(x), "seed": seed, "chunk_size": chunk_size,
            "points": points, "seconds": time.perf_counter() - t0}


def _u8(t: torch.Tensor) -> str:
    return base64.b64encode((t.clamp(0, 1) * 255).round().to(torch.uint8).contiguous().numpy().tobytes()).decode()


def gallery(model: nn.Module, x: torch.Tensor, y: torch.Tensor, broken_by: Sequence[Optional[str]], *, eps: float,
            norm: str = "Linf", version: str = "standard", seed: int = 0, k: int = 8,
            class_names: Sequence[str] = ()) -> Dict[str, Any]:
    """Up to `k` of AutoAttack's adversarial examples: images an attack broke in the main run (APGD-CE's first,
    then the next attack's, ...), each attacked again (with `seed`) by that attack alone. Returns {"attack", "eps", "norm", "examples": [...]};
    an example whose attack does not find it again is kept with "found": false and its clean image."""
    t0 = time.perf_counter()
    attacks = attacks_for(version)
    # the first k broken images, those broken by an earlier (cheaper to rerun) attack first
    order = {name: j for j, name in enumerate(attacks)}
    picked = sorted((i for i, b in enumerate(broken_by) if b not in (None, "clean")),
                    key=lambda i: (order.get(broken_by[i], len(order)), i))[:k]
    by_attack: Dict[str, List[int]] = {}
    for i in picked:
        by_attack.setdefault(broken_by[i], []).append(i)
    device = next((p.device for p in model.parameters()), x.device)
    adv = {}
    for name, idx in by_attack.items():
        kw = {"version": "custom", "attacks": [name]} if version != "rand" else {"version": "rand"}
        bb, xa = autoattack_chunk(model, x[idx], y[idx], eps=eps, norm=norm, seed=seed, device=device,
                                  return_adv=True, **kw)
        for j, i in enumerate(idx):
            adv[i] = (bb[j], xa[j])
    examples = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in picked:
            found_by, xa = adv[i]
            xc = x[i].cpu()
            found = found_by not in (None, "clean")
            if not found:
                xa = xc
            preds = model(torch.stack([xc, xa]).to(device)).argmax(1).tolist()
            delta = xa - xc
            scale = eps if norm == "Linf" else max(delta.abs().max().item(), 1e-12)
            examples.append({
                "index": i, "label": int(y[i]), "clean_pred": preds[0], "adv_pred": preds[1],
                "broken_by": broken_by[i], "found": found,
                "size": perturbation_norm(delta.unsqueeze(0), norm).item(), "shape": list(xc.shape),
                "clean": _u8(xc), "adv": _u8(xa), "delta": _u8(delta / (2 * scale) + 0.5),
                "delta_scale": scale})
    model.train(was_training)
    return {"attack": f"{attack_label(version)}: the attack that broke each image in the main run, run again on it "
                      f"(seed {seed})", "eps": eps, "norm": norm, "attacks": attacks, "class_names": list(class_names),
            "examples": examples, "seconds": time.perf_counter() - t0}


__all__ = ["CURVE_FACTORS", "curve_eps", "eps_curve", "gallery"]
