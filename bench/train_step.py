"""PGD-AT training-step throughput: rayrobust's training loop against the plain reference loop.

Both run in this process on the same model architecture, batch and PGD steps, interleaved round by
round so machine noise hits both alike. The last line is `ratio=<ours/reference>` (images/s);
the target is >= 0.95.

    python bench/train_step.py                      # CPU, batch 128, PGD-7
    python bench/train_step.py --device cuda --amp --channels-last --model small_cnn
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

from rayrobust.methods import create_method  # noqa: E402
from rayrobust.models import create_model  # noqa: E402
from rayrobust.train.loop import make_optimizer, train_step  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(fn, n, device) -> float:
    """Images/s of `n` calls of fn (after it has been warmed up)."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=7, help="PGD steps per training step")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=10, help="training steps per round")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--amp", action="store_true", help="also time rayrobust with bf16 autocast")
    p.add_argument("--channels-last", action="store_true", help="also time rayrobust with channels_last")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.rand(args.batch_size, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)

    ours = create_model("small_cnn", num_classes=10, in_channels=1, input_size=28, mean=[0.2860], std=[0.3530]).to(device)
    theirs = ref.SmallCNN().to(device)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_ref = sum(p.numel() for p in theirs.parameters())
    assert n_ours == n_ref, f"models differ: {n_ours} vs {n_ref} parameters"
    method = create_method("pgd_at", eps=0.1, steps=args.steps)
    opt_ours = make_optimizer(ours, 0.01, 0.9, 5e-4)
    opt_ref = torch.optim.SGD(theirs.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

    runs = {
        "reference": lambda: ref.train_step(theirs, opt_ref, x, y, 0.1, args.steps),
        "rayrobust": lambda: train_step(ours, method, opt_ours, x, y),
    }
    for fn in runs.values():  # warm-up
        for _ in range(3):
            fn()
    rates = {k: [] for k in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            rates[name].append(time_steps(fn, args.iters, device) * args.batch_size)
    med = {k: statistics.median(v) for k, v in rates.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {name}; batch {args.batch_size}; PGD-{args.steps}; {args.rounds} rounds x {args.iters} steps")
    for k, v in med.items():
        print(f"{k:>10}: {v:9.1f} images/s (median; min {min(rates[k]):.1f}, max {max(rates[k]):.1f})")
    if args.amp or args.channels_last:
        fast = ours.to(memory_format=torch.channels_last) if args.channels_last else ours
        xf = x.contiguous(memory_format=torch.channels_last) if args.channels_last else x
        amp = torch.bfloat16 if args.amp else None
        fn = lambda: train_step(fast, method, opt_ours, xf, y, amp_dtype=amp)  # noqa: E731
        for _ in range(3):
            fn()
        r = statistics.median(time_steps(fn, args.iters, device) * args.batch_size for _ in range(args.rounds))
        print(f"rayrobust {'bf16 autocast ' if args.amp else ''}{'channels_last' if args.channels_last else ''}: {r:.1f} images/s")
    print(f"ratio={med['rayrobust'] / med['reference']:.3f}")


if __name__ == "__main__":
    main()
