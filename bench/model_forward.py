"""Attack-workload throughput of `small_cnn`: rayrobust's model against the plain reference model.

Attacks spend their time in two calls: a forward pass (Square, the sanity checks, clean accuracy)
and a forward + input gradient with frozen parameters (PGD, APGD, FAB). This benchmark times both
for rayrobust's `small_cnn` and for `bench/reference_pgd_at.SmallCNN` (the same architecture in the
default channels-first layout) holding the same weights, interleaved round by round in this
process. It checks that the two compute the same logits, then prints `ratio=<ours/reference>`
(images/s of the forward pass; the input-gradient ratio is printed above it).

    python bench/model_forward.py                    # CPU, batch 100, 1 thread (one AutoAttack actor)
    python bench/model_forward.py --threads 2 --batch-size 256
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_pgd_at as ref  # noqa: E402

from rayrobust.models import create_model  # noqa: E402


def copy_weights(ours: torch.nn.Module, theirs: ref.SmallCNN) -> None:
    """Give the reference model rayrobust's weights (conv1, conv2, fc1, fc2 in order)."""
    with torch.no_grad():
        pairs = [(ours.conv[0], theirs.conv1), (ours.conv[3], theirs.conv2), (ours.fc[0], theirs.fc1),
                 (ours.head, theirs.fc2)]
        for a, b in pairs:
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)


def rate(fn, n: int, batch: int, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n * batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch threads (an AutoAttack actor uses 1)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=30, help="calls per round")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.rand(args.batch_size, 1, 28, 28, device=device)

    ours = create_model("small_cnn", num_classes=10, in_channels=1, input_size=28, mean=[0.2860], std=[0.3530])
    theirs = ref.SmallCNN()
    copy_weights(ours, theirs)
    ours, theirs = ours.to(device).eval(), theirs.to(device).eval()
    for prm in [*ours.parameters(), *theirs.parameters()]:
        prm.requires_grad_(False)  # attacks freeze the parameters
    with torch.no_grad():
        gap = (ours(x) - theirs(x)).abs().max().item()
    if gap > 1e-4:
        raise SystemExit(f"the models disagree (max logit difference {gap:.2e}): the benchmark would be meaningless")

    def forward(model):
        with torch.no_grad():
            model(x)

    def input_grad(model):
        xr = x.clone().requires_grad_(True)
        torch.autograd.grad(model(xr).sum(), xr)

    calls = {(kind, name): (lambda f=f, m=m: f(m)) for kind, f in (("forward", forward), ("input_grad", input_grad))
             for name, m in (("reference", theirs), ("rayrobust", ours))}
    for fn in calls.values():  # warm-up
        for _ in range(3):
            fn()
    rates = {k: [] for k in calls}
    for _ in range(args.rounds):
        for k, fn in calls.items():
            rates[k].append(rate(fn, args.iters, args.batch_size, device))
    med = {k: statistics.median(v) for k, v in rates.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{args.threads} thread(s)"
    print(f"device: {name}; batch {args.batch_size}; {args.rounds} rounds x {args.iters} calls; "
          f"max logit difference {gap:.1e}")
    for (kind, who), v in med.items():
        print(f"{kind:>10} {who:>9}: {v:9.0f} images/s (median; min {min(rates[(kind, who)]):.0f}, "
              f"max {max(rates[(kind, who)]):.0f})")
    print(f"input_grad ratio={med[('input_grad', 'rayrobust')] / med[('input_grad', 'reference')]:.3f}")
    print(f"ratio={med[('forward', 'rayrobust')] / med[('forward', 'reference')]:.3f}")


if __name__ == "__main__":
    main()
