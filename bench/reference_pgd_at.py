"""A plain, single-file PGD adversarial training loop in PyTorch: no Ray, no rayrobust.

It is the sanity baseline for accuracy and the anchor `bench/train_step.py` measures rayrobust's
training step against (same model architecture, batch and PGD steps).

    python bench/reference_pgd_at.py --epochs 3 --limit 20000     # trains on Fashion-MNIST
"""
from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class SmallCNN(nn.Module):
    """conv5(16)-ReLU-pool -> conv5(32)-ReLU-pool -> fc(100)-ReLU -> fc(10); normalises inside."""

    def __init__(self, in_channels=1, input_size=28, num_classes=10, mean=0.2860, std=0.3530):
        super().__init__()
        self.register_buffer("mean", torch.full((1, in_channels, 1, 1), mean))
        self.register_buffer("std", torch.full((1, in_channels, 1, 1), std))
        self.conv1 = nn.Conv2d(in_channels, 16, 5, padding=2)
        self.conv2 = nn.Conv2d(16, 32, 5, padding=2)
        self.fc1 = nn.Linear(32 * (input_size // 4) ** 2, 100)
        self.fc2 = nn.Linear(100, num_classes)

    def forward(self, x):
        x = (x - self.mean) / self.std
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def pgd(model, x, y, eps, alpha, steps):
    """L-inf PGD with a uniform random start; eps and alpha in [0,1] pixel units."""
    delta = (torch.rand_like(x) * 2 - 1) * eps
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def train_step(model, opt, x, y, eps=0.1, steps=7):
    model.eval()
    x_adv = pgd(model, x, y, eps, 2.5 * eps / steps, steps)
    model.train()
    loss = F.cross_entropy(model(x_adv), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def load_fashion_mnist(split="train", directory="/usr/share/datasets/fashion-mnist"):
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(Path(directory) / f"{prefix}-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(Path(directory) / f"{prefix}-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    return torch.from_numpy(x.astype(np.float32) / 255), torch.from_numpy(y.astype(np.int64))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--limit", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=7)
    args = p.parse_args()
    torch.manual_seed(0)
    x, y = load_fashion_mnist("train")
    x, y = x[: args.limit], y[: args.limit]
    xt, yt = load_fashion_mnist("test")
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    total = args.epochs * (len(x) // args.batch_size)
    step = 0
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(x))
        for i in range(len(x) // args.batch_size):
            for g in opt.param_groups:  # one-cycle: 30% warm-up, then linear decay
                t = step / total
                g["lr"] = args.lr * (t / 0.3 if t < 0.3 else (1 - t) / 0.7)
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            train_step(model, opt, x[idx], y[idx], args.eps, args.steps)
            step += 1
        model.eval()
        xs, ys = xt[:1000], yt[:1000]
        with torch.no_grad():
            clean = (model(xs).argmax(1) == ys).float().mean().item()
        adv = pgd(model, xs, ys, args.eps, 2.5 * args.eps / 20, 20)
        with torch.no_grad():
            rob = (model(adv).argmax(1) == ys).float().mean().item()
        print(f"epoch {epoch + 1}: clean {clean:.4f}  PGD-20 {rob:.4f}  ({time.perf_counter() - t0:.1f}s)")


if __name__ == "__main__":
    main()
