"""Dictionary learning for SRD: rayrobust's torch FISTA + MOD against scikit-learn's
MiniBatchDictionaryLearning, on the same high-frequency patches, measured the same way.

Patches: 4x4 patches (stride 2) of x_high = x - GaussianBlur(x, sigma=1) of Fashion-MNIST training
images of one class (non-flat patches, 20,000 sampled, seeded); held-out patches from the test
images of that class. Both learn 32 atoms with lambda = 0.1 (the same objective:
0.5 ||x - a D||^2 + lambda |a|_1). Every dictionary is then scored with the SAME coder (our FISTA,
30 iterations, what the purifier runs) on the held-out patches: relative reconstruction error
||x - x_hat||^2 / ||x||^2, codes per patch, lasso objective. sklearn's own coder (lasso_cd) is
reported too. One thread each.

    python bench/dictionaries.py                 # class 0 (T-shirt/top), ~1 min on 2 cores
    python bench/dictionaries.py --class-id 8 --device cuda
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch


def patch_sets(class_id: int, n_train: int, n_test: int, seed: int):
    from rayrobust.data import load_dataset
    from rayrobust.semantic.dictionaries import DictionaryParams, patch_set

    params = DictionaryParams(max_images_per_cluster=10 ** 9, max_patches_per_cluster=n_train)
    train = load_dataset("fashion_mnist", "train")
    test = load_dataset("fashion_mnist", "test")
    xtr = train.x[train.y == class_id][:1000]
    xte = test.x[test.y == class_id][:300]
    X = patch_set(xtr, params, seed)  # (n_train, 16)
    Xt = patch_set(xte, DictionaryParams(max_patches_per_cluster=n_test), seed + 1)  # (n_test, 16)
    return X, Xt


def score(D: torch.Tensor, Xt: torch.Tensor, lam: float, iters: int) -> dict:
    from rayrobust.semantic.sparse import fista, objective, relative_error

    A = fista(Xt, D, lam, iters)
    return {"rel_err": relative_error(Xt, A @ D), "codes": float((A != 0).sum(1).float().mean()),
            "objective": objective(Xt, A, D, lam)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--class-id", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--n-test", type=int, default=5000)
    ap.add_argument("--atoms", type=int, default=32)
    ap.add_argument("--lam", type=float, default=0.1)
    ap.add_argument("--fista-iters", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--sk-iters", type=int, default=10, help="sklearn epochs over the patches (max_iter)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from sklearn.decomposition import MiniBatchDictionaryLearning, sparse_encode
    from threadpoolctl import threadpool_limits

    from rayrobust.semantic.sparse import learn_dictionary

    X, Xt = patch_sets(args.class_id, args.n_train, args.n_test, args.seed)
    print(f"patches: Fashion-MNIST class {args.class_id}, 4x4 high-frequency (sigma 1), train {tuple(X.shape)}, "
          f"held-out {tuple(Xt.shape)}; {args.atoms} atoms, lambda {args.lam}; scored with FISTA-{args.fista_iters}")
    rows = []
    with threadpool_limits(1):
        dev = torch.device(args.device)
        t0 = time.perf_counter()
        D, info = learn_dictionary(X.to(dev), args.atoms, lam=args.lam, fista_iters=args.fista_iters,
                                   rounds=args.rounds, seed=args.seed)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        rows.append((f"rayrobust FISTA+MOD ({args.rounds} rounds, {args.device})", time.perf_counter() - t0,
                     score(D.cpu(), Xt, args.lam, args.fista_iters)))
        for rounds in (5, 10):
            t0 = time.perf_counter()
            D5, _ = learn_dictionary(X.to(dev), args.atoms, lam=args.lam, fista_iters=args.fista_iters,
                                     rounds=rounds, seed=args.seed)
            rows.append((f"rayrobust FISTA+MOD ({rounds} rounds, {args.device})", time.perf_counter() - t0,
                         score(D5.cpu(), Xt, args.lam, args.fista_iters)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for fit_algorithm in ("cd", "lars"):
                t0 = time.perf_counter()
                mb = MiniBatchDictionaryLearning(n_components=args.atoms, alpha=args.lam, batch_size=256,
                                                 max_iter=args.sk_iters, fit_algorithm=fit_algorithm,
                                                 random_state=args.seed).fit(X.numpy())
                seconds = time.perf_counter() - t0
                Ds = torch.from_numpy(mb.components_.astype(np.float32))
                Ds = Ds / Ds.norm(dim=1, keepdim=True).clamp_min(1e-12)
                s = score(Ds, Xt, args.lam, args.fista_iters)
                A = sparse_encode(Xt.numpy(), mb.components_, algorithm="lasso_cd", alpha=args.lam)
                s["own_coder_rel_err"] = float(((Xt.numpy() - A @ mb.components_) ** 2).sum() / (Xt.numpy() ** 2).sum())
                rows.append((f"sklearn MiniBatchDL ({fit_algorithm}, {args.sk_iters} epochs)", seconds, s))
    print(f"{'method':<42} {'fit s':>7} {'rel.err':>8} {'codes':>6} {'objective':>10}")
    for name, seconds, s in rows:
        extra = ""
        if "own_coder_rel_err" in s:
            extra = f"   (sklearn's own lasso_cd coder: rel.err {s['own_coder_rel_err']:.4f})"
        print(f"{name:<42} {seconds:7.2f} {s['rel_err']:8.4f} {s['codes']:6.2f} {s['objective']:10.6f}{extra}")
    ours, best_sk = rows[0], min(rows[3:], key=lambda r: r[2]["rel_err"])
    print(f"speedup={best_sk[1] / ours[1]:.2f} rel_err_ours={ours[2]['rel_err']:.4f} "
          f"rel_err_sklearn={best_sk[2]['rel_err']:.4f}")


if __name__ == "__main__":
    main()
