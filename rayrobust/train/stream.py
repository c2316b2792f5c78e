"""Streamed training data: what `fit` hands Ray Train when the images are read by Ray Data.

Driver (`stream_plan`, `trainer_datasets`): the dataset's metadata (`dataset_info`, no images), the
validation indices (data.val_size of the first data.train_limit rows, the same seeded choice as
`train_val_split`), the steps per epoch, and two Ray Datasets: "train" (every row but the validation
ones, split across the workers) and "val" (the validation rows, read whole by rank 0 once per start).
Worker (`load_validation`, `check_streamable`): rank 0 materialises the small validation subset; a
method that prepares from the whole training set in memory (SPAT's weight map, ClusTR's clusters)
cannot stream.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch

from ..errors import ConfigError


def stream_plan(cfg: Any) -> Dict[str, Any]:
    """Metadata, validation indices and steps of a streamed run (driver side; reads no image)."""
    from ..data_ray import dataset_info
    from ..methods import METHODS

    check_streamable(METHODS.get(cfg.train.method), cfg.train.method)
    info = dataset_info(cfg.data)
    n = info["n_train"] if cfg.data.train_limit is None else min(info["n_train"], cfg.data.train_limit)
    val_size = min(cfg.data.val_size, n)
    g = torch.Generator().manual_seed(cfg.train.seed)  # train_val_split's choice: same subset in memory or streamed
    val = torch.randperm(n, generator=g)[:val_size].sort().values.tolist()
    steps = (n - val_size) // cfg.train.batch_size
    if steps < 1:
        raise ConfigError(f"data: {n - val_size} training images (after data.val_size={val_size}) are fewer than one "
                          f"batch of train.batch_size={cfg.train.batch_size}")
    return {"shape": list(info["shape"]), "num_classes": info["num_classes"], "mean": list(info["mean"]),
            "std": list(info["std"]), "scale": info["scale"], "n": n, "val": val, "steps": steps}


def trainer_datasets(cfg: Any, plan: Dict[str, Any]) -> Tuple[Dict[str, Any], Any]:
    """(datasets, dataset_config) for TorchTrainer: "train" split across the workers in a fixed block order
    (a 1-worker epoch replays exactly), "val" given whole to every worker (only rank 0 reads it)."""
    import ray.train
    from ray.data import ExecutionOptions

    from ..data_ray import image_dataset

    limit = cfg.data.train_limit
    datasets = {"train": image_dataset(cfg.data, "train", limit=limit, exclude=plan["val"] or None)}
    if plan["val"]:
        datasets["val"] = image_dataset(cfg.data, "train", limit=limit, indices=plan["val"])
    from ..progress import progress_enabled

    for ds in datasets.values():  # Ray Data's own bars when interactive, none in logs
        ds.context.enable_progress_bars = progress_enabled()
    options = ExecutionOptions(preserve_order=True)
    return datasets, ray.train.DataConfig(datasets_to_split=["train"], execution_options=options)


def load_validation(plan: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
    """rank 0: the validation rows as (x (V,C,H,W) in [0,1], y (V,)), in index order."""
    import ray.train

    if not plan["val"]:
        shape = plan["shape"]
        return torch.zeros((0, *shape)), torch.zeros((0,), dtype=torch.int64)
    index, images, labels = [], [], []
    for batch in ray.train.get_dataset_shard("val").iter_torch_batches(batch_size=1024):
        index.append(batch["index"])
        images.append(batch["image"])
        labels.append(batch["label"])
    order = torch.cat(index).argsort()
    x = torch.cat(images)[order].float().div_(float(plan["scale"]))
    return x, torch.cat(labels)[order].long()


def check_streamable(method: Any, name: str) -> None:
    """A ConfigError for a method that prepares from the whole training set in memory."""
    from ..methods.base import Method

    cls = method if isinstance(method, type) else type(method)
    if cls.fit is not Method.fit or cls.begin_epoch is not Method.begin_epoch:
        raise ConfigError(f"train.method={name} prepares from the whole training set in memory; it cannot train on a "
                          "streamed dataset (data.name=parquet or data.stream=true): use an in-memory dataset")

