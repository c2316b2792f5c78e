"""The ℓ2 robustness certificate of a ClusTR model (docs/methods.md §2.5).

**Reconstructed from the paper's statement** (Alfarra et al.; no certificate code is public): a
nearest-centroid classifier on the latent f(x) keeps its prediction while f(x) stays on the own
side of every bisecting hyperplane between the nearest same-class centre μ_i and each other-class
centre μ_j. The distance from f(x) to that hyperplane is

    r_latent(x) = min_j (‖f(x) − μ_j‖² − ‖f(x) − μ_i‖²) / (2‖μ_j − μ_i‖₂),

so if f is L-Lipschitz in ℓ2 (input in [0,1] pixel space), no ‖δ‖₂ ≤ r_latent(x)/L changes the
prediction. A misclassified example has radius 0 (not certified).

L is an upper bound on the ℓ2 Lipschitz constant of `forward_features`, **including the model's
internal normalisation** (a per-channel scaling by 1/std): the product of per-layer bounds.
- Linear operators (convolutions, linear layers, average pooling): the largest singular value of
  the layer's linear part (bias removed), by power iteration on AᵀA in float64 — A and Aᵀ applied
  through autograd (for a convolution, Aᵀ is the transposed convolution) — run until the estimate
  stops changing (relative change < 1e-9, at most 2000 iterations). Power iteration approaches the
  largest singular value from below, so each estimate is multiplied by a safety factor of 1.01
  (our choice).
- BatchNorm in eval mode: a diagonal scaling, exactly max_c |γ_c| / sqrt(var_c + ε).
- ReLU, identity, flatten, dropout (eval): 1. Max-pooling: 1 for non-overlapping windows
  (stride ≥ kernel); with overlapping windows sqrt(m), m = the most windows one input falls in.
- Residual blocks (PreActResNet, WideResNet): L(main path) + L(shortcut).
Any other layer, or a model whose forward we do not know layer by layer, is refused
(`CertificateError`): an unbounded layer would make the certificate meaningless.

Reported: the latent-radius distribution, L with its per-layer factors, certified accuracy at the
given ℓ2 radii, and a check that an L2 PGD attack inside each certified radius never succeeds (a
certificate that an attack breaks is a bug; a failed check raises the flag `certificate_violated`).

Example:
    >>> res = certify(model, method, x_test, y_test, radii=(0.1, 0.25, 0.5))
    >>> res["lipschitz"]["bound"], res["certified_acc"]["0.1"], res["flags"]
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, RayRobustError

SAFETY = 1.01  # multiplies every power-iteration estimate (they approach the true norm from below)
PI_MAX_ITERS = 2000
PI_MIN_ITERS = 30
PI_TOL = 1e-9  # relative change of the estimate that ends the power iteration
DEFAULT_RADII = (0.1, 0.25, 0.5)  # ℓ2, [0,1] pixel units
CERTIFICATE = "ClusTR l2 certificate, reconstructed from the paper's statement (docs/methods.md §2.5)"


class CertificateError(RayRobustError):
    """The certificate cannot be computed for this model or method."""


# ---------------------------------------------------------------------------------------------
# Lipschitz bound


def operator_norm(fn: Callable[[torch.Tensor], torch.Tensor], input_shape: Sequence[int], *,
                  max_iters: int = PI_MAX_ITERS, min_iters: int = PI_MIN_ITERS, tol: float = PI_TOL,
                  seed: int = 0) -> float:
    """Largest singular value of a linear map `fn` on float64 tensors of `input_shape`, by power
    iteration on AᵀA (Aᵀ via autograd). Returns the estimate without the safety factor."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(tuple(input_shape), generator=g, dtype=torch.float64)
    v = v / v.norm()
    sigma = 0.0
    for it in range(max_iters):
        v = v.detach().requires_grad_(True)
        u = fn(v)
        (w,) = torch.autograd.grad(u, v, grad_outputs=u.detach())  # AᵀA v
        norm = w.norm().item()
        if norm == 0.0:
            return 0.0
        est = math.sqrt(norm)  # sqrt(‖AᵀA v‖) for unit v: a lower bound on σ_max, non-decreasing
        v = (w / norm).detach()
        done = it >= min_iters and abs(est - sigma) <= tol * est
        sigma = max(sigma, est)
        if done:
            break
    return sigma


def _affine_linear_part(module: nn.Module, shape: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    m = copy.deepcopy(module).double().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        offset = m(torch.zeros(tuple(shape), dtype=torch.float64))
    return lambda v: m(v) - offset


_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
           nn.Linear, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
           nn.AdaptiveAvgPool3d)
_ONE = (nn.ReLU, nn.Identity, nn.Flatten, nn.Dropout, nn.Dropout2d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def layer_bound(module: nn.Module, input_shape: Sequence[int], *, seed: int = 0) -> Tuple[float, str]:
    """(upper bound on the ℓ2 Lipschitz constant of one layer at this input shape, how it was bounded)."""
    if isinstance(module, _LINEAR):
        sigma = operator_norm(_affine_linear_part(module, input_shape), input_shape, seed=seed)
        return SAFETY * sigma, f"power iteration x{SAFETY}"
    if isinstance(module, _BN):
        if module.running_var is None:
            raise CertificateError(f"{type(module).__name__} without running statistics depends on the batch; "
                                   "cannot bound its Lipschitz constant")
        scale = 1.0 / torch.sqrt(module.running_var.double() + module.eps)
        if module.weight is not None:
            scale = scale * module.weight.detach().double().abs()
        return float(scale.max()), "exact (eval-mode BatchNorm is a diagonal scaling)"
    if isinstance(module, _ONE):
        return 1.0, "1-Lipschitz"
    if isinstance(module, nn.MaxPool2d):
        k = _pair(module.kernel_size)
        s = _pair(module.stride if module.stride is not None else module.kernel_size)
        if _pair(module.dilation) != (1, 1):
            raise CertificateError("dilated max-pooling is not supported by the Lipschitz bound")
        m = math.ceil(k[0] / s[0]) * math.ceil(k[1] / s[1])
        return math.sqrt(m), ("1-Lipschitz (non-overlapping windows)" if m == 1 else
                              f"sqrt({m}) (overlapping windows: an input is in up to {m})")
    raise CertificateError(
        f"cannot bound the Lipschitz constant of layer {type(module).__name__}; supported: convolutions, "
        "linear layers, average pooling, eval-mode BatchNorm, ReLU, max-pooling, flatten, identity, dropout")


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _input_shapes(model: nn.Module) -> Dict[nn.Module, Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    """{module: (input shape, output shape)} for one image through forward_features."""
    shapes: Dict[nn.Module, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out: shapes.__setitem__(mod, (tuple(inp[0].shape), tuple(out.shape))))
             for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            x = torch.zeros(1, model.in_channels, model.input_size, model.input_size,
                            dtype=next(model.parameters()).dtype, device=next(model.parameters()).device)
            model.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def lipschitz_bound(model: nn.Module, *, seed: int = 0) -> Dict[str, Any]:
    """Upper bound on the ℓ2 Lipschitz constant of `model.forward_features` on [0,1] inputs.

    Returns {"bound": L, "method": ..., "layers": [{"layer", "type", "bound", "how"}, ...]}.
    Supported: tiny_cnn / small_cnn / small_cnn_wide (SmallCNN), preact_resnet18, wrn_34_10. Runs on a float64
    CPU copy in eval mode; the model itself is untouched.
    """
    from .models.base import RobustModel
    from .models.cnn import SmallCNN
    from .models.resnet import PreActBlock, PreActResNet, WideBlock, WideResNet

    if not isinstance(model, RobustModel) or type(model).forward_features is not RobustModel.forward_features \
            or type(model).normalize is not RobustModel.normalize:
        raise CertificateError(f"cannot bound the Lipschitz constant of {type(model).__name__}: the certificate needs a "
                               "rayrobust model (tiny_cnn, small_cnn, small_cnn_wide, preact_resnet18, wrn_34_10)")
    m = copy.deepcopy(model).cpu().double().eval()
    shapes = _input_shapes(m)
    layers: List[Dict[str, Any]] = []
    names = {mod: name for name, mod in m.named_modules()}

    def bound(mod: nn.Module) -> float:
        if mod not in shapes:
            raise CertificateError(f"layer {names.get(mod, type(mod).__name__)} is not used by forward_features")
        b, how = layer_bound(mod, shapes[mod][0], seed=seed)
        layers.append({"layer": names.get(mod, "?"), "type": type(mod).__name__, "bound": b, "how": how})
        return b

    std = m.std.flatten().abs()
    norm_bound = float((1.0 / std).max())
    layers.append({"layer": "normalize", "type": "(x - mean) / std", "bound": norm_bound,
                   "how": "exact (per-channel scaling by 1/std)"})
    total = norm_bound
    if type(m) is SmallCNN or (isinstance(m, SmallCNN) and type(m).features is SmallCNN.features):
        for mod in list(m.conv) + list(m.fc):  # features: conv -> flatten -> fc, all sequential
            total *= bound(mod)
    elif isinstance(m, (PreActResNet, WideResNet)) and type(m).features in (PreActResNet.features, WideResNet.features):
        total *= bound(m.conv1)
        for block in m.layers:
            if type(block) not in (PreActBlock, WideBlock):
                raise CertificateError(f"cannot bound residual block {type(block).__name__}")
            bn1 = bound(block.bn1)
            main = bn1 * bound(block.conv1) * bound(block.bn2) * bound(block.conv2)  # ReLUs: 1
            skip = 1.0 if block.shortcut is None else bn1 * bound(block.shortcut)
            layers.append({"layer": names[block], "type": type(block).__name__, "bound": main + skip,
                           "how": "residual: L(main path) + L(shortcut)"})
            total *= main + skip
        total *= bound(m.bn)
        _, (_, c, h, w) = shapes[m.bn]
        pool = 1.0 / math.sqrt(h * w)  # mean over h*w positions per channel
        layers.append({"layer": "adaptive_avg_pool2d", "type": "global average pool", "bound": pool,
                       "how": "exact (a mean over h*w values)"})
        total *= pool
    else:
        raise CertificateError(f"cannot bound the Lipschitz constant of {type(model).__name__}: supported models are "
                               "tiny_cnn, small_cnn, small_cnn_wide, preact_resnet18, wrn_34_10")
    return {"bound": total, "layers": layers,
            "method": f"product of per-layer l2 bounds; linear layers by power iteration (x{SAFETY} safety factor), "
                      "input normalisation included"}


# ---------------------------------------------------------------------------------------------
# latent radii and the certificate


def _clusters(method: Any) -> Tuple[torch.Tensor, torch.Tensor, float]:
    if not getattr(method, "certifiable", False) or not hasattr(method, "clusters"):
        raise CertificateError(f"the certificate applies to ClusTR models (train.method clustr or clustr_qtrades), "
                               f"not to method {getattr(method, 'name', type(method).__name__)!r}")
    return method.clusters()


@torch.no_grad()
def latent_radii(model: nn.Module, method: Any, x: torch.Tensor, y: torch.Tensor, *,
                 batch_size: int = 500) -> Tuple[torch.Tensor, torch.Tensor]:
    """(latent radius (N,) float64, prediction (N,)) of each example; radius 0 when misclassified."""
    centroids, cluster_class, _ = _clusters(method)
    device = next(model.parameters()).device
    mu = centroids.double().to(device)  # (K, d)
    cc = cluster_class.to(device)
    pair = 2 * torch.cdist(mu, mu)  # (K, K) 2‖μ_j − μ_i‖
    was = model.training
    model.eval()
    radii, preds = [], []
    try:
        for s in range(0, len(x), batch_size):
            xb, yb = x[s:s + batch_size].to(device), y[s:s + batch_size].to(device)
            f = model.forward_features(xb).double()  # (B, d)
            d2 = (f[:, None, :] - mu[None]).pow(2).sum(-1)  # (B, K)
            own = cc[None] == yb[:, None]
            i = d2.masked_fill(~own, math.inf).argmin(1)  # nearest same-class centre
            num = d2 - d2.gather(1, i[:, None])  # ‖f − μ_j‖² − ‖f − μ_i‖²
            den = pair[i]  # (B, K)
            r = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
            r = r.masked_fill(own, math.inf).amin(1).clamp_min(0.0)  # other-class centres only
            radii.append(r.cpu())
            preds.append(cc[d2.argmin(1)].cpu())
    finally:
        model.train(was)
    return torch.cat(radii), torch.cat(preds)


def certificate_attack(decision: nn.Module, x: torch.Tensor, y: torch.Tensor, radius: torch.Tensor, *,
                       steps: int = 100, restarts: int = 3, seed: int = 0) -> torch.Tensor:
    """L2 PGD with a per-example radius: (N,) bool, True where a misclassified x' in [0,1] with
    ‖x' − x‖₂ ≤ radius was found. Restart 0 starts at x, the others uniformly in the ball;
    step 2.5·radius/steps on the normalised gradient of the margin loss (best wrong logit − true
    logit) of the decision function; projection to the ball and to [0,1] after every step."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    r = radius.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
    step = 2.5 * r / steps
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)

    def project(xa):
        delta = xa - x
        n = delta.flatten(1).norm(dim=1).view_as(r)
        delta = delta * torch.clamp(r / (n + 1e-12), max=1.0)
        return (x + delta).clamp(0, 1)

    def wrong(xa):
        with torch.no_grad():
            return decision(xa).argmax(1) != y

    for k in range(restarts):
        xa = x.clone()
        if k > 0:
            d = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
            d = d / d.flatten(1).norm(dim=1).view_as(r)
            u = torch.rand(len(x), generator=g, device=x.device, dtype=x.dtype).view_as(r)
            xa = project(x + d * r * u.pow(1.0 / x[0].numel()))
        for _ in range(steps):
            xa = xa.detach().requires_grad_(True)
            z = decision(xa)
            true = z.gather(1, y[:, None]).squeeze(1)
            other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), -math.inf).amax(1)
            (grad,) = torch.autograd.grad((other - true).sum(), xa)
            with torch.no_grad():
                gn = grad.flatten(1).norm(dim=1).view_as(r)
                xa = project(xa + step * grad / (gn + 1e-12))
                fooled |= wrong(xa)
        fooled |= wrong(xa)
    return fooled


def _stats(t: torch.Tensor) -> Dict[str, Optional[float]]:
    if t.numel() == 0:
        return {"n": 0, "mean": None, "median": None, "p10": None, "p90": None, "min": None, "max": None}
    t = t.double()
    q = torch.quantile(t, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"n": int(t.numel()), "mean": t.mean().item(), "median": q[1].item(), "p10": q[0].item(),
            "p90": q[2].item(), "min": t.min().item(), "max": t.max().item()}


def certify(model: nn.Module, method: Any, x: torch.Tensor, y: torch.Tensor,
            radii: Sequence[float] = DEFAULT_RADII, *, check: bool = True, check_n: int = 200,
            check_steps: int = 100, check_restarts: int = 3, seed: int = 0, batch_size: int = 500) -> Dict[str, Any]:
    """The ClusTR ℓ2 certificate (reconstructed) of `model` with `method`'s clusters on (x, y).

    Returns latent-radius stats (over correctly classified examples), the Lipschitz bound L with its
    per-layer factors, the certified-radius stats r_latent/L, certified accuracy per radius (the
    fraction of all examples that are correct with r_latent/L ≥ radius), and — when `check` — an
    L2 PGD attack on the first `check_n` certified examples inside their own certified radius,
    whose result is the check `certificate_violated` (listed in `flags` when it fails).
    """
    radii = [float(r) for r in radii]
    if any(not (r >= 0 and math.isfinite(r)) for r in radii):
        raise ConfigError(f"certificate radii {radii} must be finite and >= 0 (l2, [0,1] pixel units; e.g. 0.1,0.25,0.5)")
    if len(x) == 0 or len(x) != len(y):
        raise ConfigError(f"certify needs images and as many labels, got {len(x)} images and {len(y)} labels")
    t0 = time.perf_counter()
    centroids, _, sigma2 = _clusters(method)
    lip = lipschitz_bound(model, seed=seed)
    L = lip["bound"]
    r_latent, pred = latent_radii(model, method, x, y, batch_size=batch_size)
    correct = pred == y.cpu()
    certified = correct & (r_latent > 0)
    r_input = r_latent / L
    result: Dict[str, Any] = {
        "certificate": CERTIFICATE, "norm": "L2", "n": len(x), "num_clusters": len(centroids), "sigma2": sigma2,
        "clean_acc": correct.double().mean().item(),
        "lipschitz": lip,
        "latent_radius": _stats(r_latent[correct]),
        "certified_radius": _stats(r_input[correct]),
        "certified_acc": {f"{r:g}": (certified & (r_input >= r)).double().mean().item() for r in radii},
        "certified_acc_source": "certificate (no attack): correct and r_latent/L >= radius",
    }
    checks = []
    if check:
        idx = certified.nonzero().squeeze(1)[:check_n]
        decision = method.decision(model).eval()
        device = next(model.parameters()).device
        xs, ys = x[idx].to(device), y[idx].to(device)
        fooled = certificate_attack(decision, xs, ys, r_input[idx].float(), steps=check_steps,
                                    restarts=check_restarts, seed=seed).cpu()
        attack = (f"L2 PGD-{check_steps} on the margin of the decision logits, {check_restarts} restart(s), "
                  "per-example radius = its certified radius")
        violations = int(fooled.sum())
        result["check"] = {"attack": attack, "n": len(idx), "violations": violations, "seed": seed}
        checks.append({"name": "certificate_violated", "passed": violations == 0,
                       "detail": f"{attack}: {violations} of {len(idx)} certified examples misclassified inside "
                                 "their certified radius"})
    result["checks"] = checks
    result["flags"] = [c["name"] for c in checks if not c["passed"]]
    result["seconds"] = time.perf_counter() - t0
    return result


def certify_checkpoint(checkpoint: Union[str, Path, "Location"], *, radii: Sequence[float] = DEFAULT_RADII,  # noqa: F821
                       n: int = 1000, out_path: Optional[Union[str, Path, "Location"]] = None, data_root: Optional[str] = None,
                       download: bool = False, seed: int = 0, check: bool = True) -> Dict[str, Any]:
    """Certify a ClusTR checkpoint on the first `n` test images of its dataset; write JSON atomically."""
    from .checkpoint import checkpoint_sha256, load_trained
    from .data import load_dataset
    from .io import provenance, write_json
    from .location import as_location

    checkpoint = as_location(checkpoint)
    if n < 1:
        raise ConfigError(f"--n {n} must be >= 1 (test images to certify)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trained = load_trained(checkpoint, device=device)
    model, method, payload = trained.model, trained.method, trained.payload
    name = payload["config"]["train"]["method"]
    if not method.certifiable:
        raise CertificateError(f"checkpoint {str(checkpoint)!r} was trained with method {name!r}; the certificate "
                               "applies to ClusTR checkpoints only (train.method=clustr or clustr_qtrades)")
    if not payload.get("method_state"):
        raise CertificateError(f"checkpoint {str(checkpoint)!r} holds no ClusTR clusters (empty method_state); retrain it")
    ds = load_dataset(payload["config"]["data"]["name"], "test", root=data_root, download=download, limit=n)
    res = certify(model, method, ds.x, ds.y, radii, check=check, seed=seed)
    res["method"] = name
    res["dataset"] = ds.name
    res["provenance"] = provenance(seed=seed, checkpoint=checkpoint.uri, checkpoint_sha256=checkpoint_sha256(checkpoint),
                                   trained_with=payload["config"])
    if out_path is not None:
        write_json(out_path, res)
    return res
