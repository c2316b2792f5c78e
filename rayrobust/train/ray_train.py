"""Ray Train (V2) wrapper around the training loop, persisted by Ray Train to the run's storage.

`fit(cfg, run_dir, method=...)` runs `TorchTrainer` with `cfg.train.num_workers` workers and
`RunConfig(storage_path=<run_dir>, name="checkpoints")`, where `run_dir` (the method's directory) is
a local path or a storage URI (s3://, gs://, file://). Every epoch rank 0 reports a
`ray.train.Checkpoint` (`checkpoint.pt` in the safe format + sha256 sidecar) with
`ray.train.report(..., checkpoint_dir_name="epoch_003")`; Ray Train uploads it to
`<run_dir>/checkpoints/epoch_003/`. Every (re)start of the worker function — a Ray Train restart after
a lost worker, or a resubmitted job, on any node — continues from `ray.train.get_checkpoint()` (Ray
Train restores it from the run's storage), else from the newest valid checkpoint listed there; epoch
batches, augmentation and RNG are seeded by (seed, epoch), so a resumed run replays an uninterrupted one. No node
needs a shared filesystem. Rank 0 also writes `<run_dir>/metrics.jsonl`; each worker records its pid
and node in `<run_dir>/workers/rank<r>.json` (where to look when a node misbehaves); checkpoints
record the node of every rank in `provenance.worker_nodes`.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..checkpoint import (checkpoint_name, load_checkpoint, load_latest_checkpoint, save_checkpoint,
                          selected_checkpoint)
from ..config import ExperimentConfig, config_from_dict
from ..errors import CheckpointError, ConfigError, RayRobustError
from ..io import provenance, write_json, write_jsonl
from ..layout import CHECKPOINTS
from ..location import Location, Where, as_location, check_writable
from ..progress import progress_enabled
from ..raycluster import ensure_ray

# What must match for a checkpoint to be continued by a new `fit` call.
_IDENTITY = (("train", "method"), ("model", "name"), ("data", "name"), ("train", "eps"), ("train", "norm"),
             ("train", "seed"))


@dataclass
class TrainResult:
    run_dir: Location
    checkpoint: Location
    epochs: int
    metrics: List[Dict[str, Any]]  # one dict per epoch
    resumed_from: Optional[int]  # epoch the run continued from (None = started fresh)


def check_resumable(run_dir: Location, cfg: ExperimentConfig) -> Optional[Dict[str, Any]]:
    """The newest checkpoint's payload if the run can continue from it; an error if it belongs to another run."""
    found = load_latest_checkpoint(run_dir / CHECKPOINTS)
    if found is None:
        return None
    check_identity(found[1], cfg, run_dir)
    return found[1]


def check_identity(payload: Dict[str, Any], cfg: ExperimentConfig, run_dir: Location) -> None:
    """A ConfigError when `payload` is a checkpoint of another run (method, model, data, eps or seed differ)."""
    old, new = payload["config"], cfg.to_dict()
    for section, key in _IDENTITY:
        if old[section].get(key, "Linf" if key == "norm" else None) != new[section][key]:  # older runs: L-inf
            raise ConfigError(
                f"{run_dir} holds a run with {section}.{key}={old[section][key]!r}, not {new[section][key]!r}; "
                "use another run_dir (--set run_dir=...) or delete the old one"
            )


def _resume_payload(run_dir: Location, log) -> Optional[Dict[str, Any]]:
    """What a (re)started worker continues from: Ray Train's latest checkpoint (restored from the run's
    storage after a failure or a resubmission) when it verifies, else the newest valid one listed there."""
    import ray.train

    ours = load_latest_checkpoint(run_dir / CHECKPOINTS)
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        try:
            with ckpt.as_directory() as d:
                theirs = load_checkpoint(Path(d))
            # A checkpoint removed from storage by hand stays in Ray Train's record: the newest valid one wins.
            if ours is None or int(theirs["epoch"]) >= int(ours[1]["epoch"]):
                return theirs
        except Exception as e:  # CheckpointError, or a directory that is gone from storage
            if log:
                log(f"Ray Train's latest checkpoint is unusable ({str(e).splitlines()[0][:200]}); "
                    "continuing from the newest valid one in the run's storage")
    return ours[1] if ours else None


def _report_checkpoint(metrics: Dict[str, Any], payload: Dict[str, Any], epoch: int) -> None:
    """rank 0: `ray.train.report` with this epoch's checkpoint directory (uploaded to the run's storage)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="rayrobust-ckpt-") as d:
        save_checkpoint(Path(d), payload)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=checkpoint_name(epoch))


def _worker_loop(loop_config: Dict[str, Any]) -> None:
    """One Ray Train worker: set up, build (or resume) the run, then train, validate and checkpoint each epoch."""
    import ray.train.torch

    from .loop import validate

    w = _worker_setup(loop_config)
    method, model, optimizer = _build_run(w, loop_config.get("init"))
    history, start_epoch = _resume(w, model, optimizer, method)

    model = ray.train.torch.prepare_model(model)  # moves to device; DDP when world > 1
    if w.tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    w.amp_dtype = torch.bfloat16 if w.tc.amp and w.device.type == "cuda" else None
    bare = getattr(model, "module", model)
    for epoch in range(start_epoch, w.tc.epochs):
        if _stop_requested(w):
            if w.log:
                w.log(f"stop requested ({w.stop.uri}): ending after {epoch} of {w.tc.epochs} epoch(s)")
            return
        _record_worker(w.run_dir, w.rank, w.nodes[w.rank] if len(w.nodes) == w.world else w.nodes[-1], epoch + 1,
                       start_epoch)
        if epoch == start_epoch:  # later epochs were prepared at the end of the previous one (below)
            method.begin_epoch(bare, w.data.x_train, w.data.y_train, epoch, w.device)
        torch.manual_seed(w.tc.seed * 1_000 + epoch * 10 + w.rank)  # attack random starts replay on resume
        t0 = time.perf_counter()
        stats = _train_one_epoch(w, model, method, optimizer, epoch)
        # Prepare the next epoch from these weights (those it starts from) before validation and the
        # checkpoint, so the checkpoint's method_state (ClusTR's clusters) matches its weights.
        method.begin_epoch(bare, w.data.x_train, w.data.y_train, epoch + 1, w.device)
        metrics = {"epoch": epoch + 1, **stats, "lr": optimizer.param_groups[0]["lr"]}
        if w.rank == 0 and len(w.data.x_val):
            metrics.update(validate(method.decision(bare), w.data.x_val.to(w.device), w.data.y_val.to(w.device),
                                    eps=w.tc.eps, pgd_steps=w.tc.val_pgd_steps, seed=w.tc.seed, norm=w.tc.norm))
        metrics["seconds"] = time.perf_counter() - t0
        _checkpoint_epoch(w, bare, optimizer, method, history, metrics)


def _stop_requested(w: "_Worker") -> bool:
    """Whether the run was asked to end (its stop file exists), agreed by every rank at the same epoch
    boundary: ranks that read the file at different moments must not part ways before a collective."""
    if w.stop is None:
        return False
    flag = w.stop.exists()
    import torch.distributed as dist

    if w.world > 1 and dist.is_available() and dist.is_initialized():
        t = torch.tensor([1.0 if flag else 0.0], device=w.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = bool(t.item() > 0)
    return flag


class _Worker:
    """What one Ray Train worker knows about its run (built by `_worker_setup`)."""


def _worker_setup(loop_config: Dict[str, Any]) -> "_Worker":
    """This rank's config, device, peers' nodes, data (in memory or a streamed plan), augmentation and schedule."""
    import os

    import ray
    import ray.train

    from ..config import check_budget, resolve_augment
    from .augment import Augment
    from .devices import bind_device, data_on_device, worker_device
    from .loop import Schedule

    w = _Worker()
    w.cfg = cfg = config_from_dict(loop_config["config"])
    w.run_dir = Location(loop_config["run_dir"])
    w.stop = Location(loop_config["stop"]) if loop_config.get("stop") else None
    w.tc = tc = cfg.train
    ctx = ray.train.get_context()
    w.rank, w.world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(tc.cpus_per_worker)
    # This rank's own GPU (the rule of ray.train.torch.get_device()), made the current CUDA device so kernels,
    # NCCL and CUDA generators do not default to cuda:0; the CPU when Ray assigned no GPU.
    w.device = bind_device(worker_device(ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"),
                                         device_count=torch.cuda.device_count()))
    w.nodes = _worker_nodes(w.world, w.device)  # node id of every rank, for provenance
    w.log = (lambda msg: print(f"[{tc.method}] {msg}", flush=True)) if w.rank == 0 else None
    w.progress = bool(loop_config.get("progress")) and w.rank == 0  # the driver's terminal draws rank 0's bar
    w.plan = loop_config.get("stream")  # streamed (rayrobust.train.stream): images come from the "train" shard
    w.ds, w.data = _worker_data(cfg, w.plan, w.rank)
    w.data = data_on_device(w.data, w.device)
    check_budget("train.eps", tc.eps, tc.norm, w.ds.shape)  # an L2 budget no longer than the input's diameter
    w.augment = Augment(pad=cfg.data.augment_pad, padding=cfg.data.augment_padding) \
        if resolve_augment(cfg.data.augment, w.ds.shape) else None
    w.schedule = Schedule(tc.lr_schedule, tuple(tc.lr_milestones), tc.lr_decay)
    if w.log:
        w.log(f"augmentation: {w.augment.describe() if w.augment else 'none'}; lr schedule: {tc.lr_schedule}; "
              f"train {tc.norm} eps={tc.eps:g}")
    return w


def _worker_data(cfg, plan: Optional[Dict[str, Any]], rank: int):
    """(dataset description, train/validation split): the images themselves, or for a streamed run only the
    validation images (rank 0) and the description the plan carries."""
    from ..data import load_dataset
    from .loop import Split, train_val_split
    from .stream import load_validation

    if plan is None:
        ds = load_dataset(cfg.data.name, "train", root=cfg.data.root, download=cfg.data.download,
                          limit=cfg.data.train_limit)
        return ds, train_val_split(ds.x, ds.y, cfg.data.val_size, seed=cfg.train.seed)
    from types import SimpleNamespace

    ds = SimpleNamespace(shape=tuple(plan["shape"]), num_classes=plan["num_classes"], mean=tuple(plan["mean"]),
                         std=tuple(plan["std"]))
    x_val, y_val = load_validation(plan) if rank == 0 else (torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    return ds, Split(None, None, x_val, y_val)


def _build_run(w: "_Worker", init: Optional[Dict[str, Any]]):
    """(method, model, optimizer) of a fresh run: the method prepared on the data (and given the driver's
    `prepare_run` state), the model seeded by train.seed (or the driver's initial weights)."""
    from ..methods import create_method, method_kwargs
    from ..models import create_model
    from .loop import make_optimizer
    from .stream import check_streamable

    tc, ds = w.tc, w.ds
    # Every TrainConfig field reaches the method; it uses what it needs. No global RNG is drawn here.
    method = create_method(tc.method, num_classes=ds.num_classes, **method_kwargs(tc))
    if w.plan is not None:
        check_streamable(method, tc.method)
    out_dim = method.output_dim(ds.num_classes)  # DRP: the prototype dimension
    method.fit(w.data.x_train, w.data.y_train)  # data-level preparation (SPAT's weight map), deterministic
    if init and init.get("method_state"):  # prepared on the driver by the method's `prepare_run` (srd)
        method.load_state_dict(init["method_state"])
    torch.manual_seed(tc.seed)  # the initial weights: runs with the same seed are the same run
    model = create_model(w.cfg.model.name, num_classes=out_dim, in_channels=ds.shape[0],
                         input_size=ds.shape[1], mean=ds.mean, std=ds.std)
    if init and init.get("model") is not None:  # initial weights from another checkpoint (srd: the source model)
        model.load_state_dict(init["model"])
    # num_classes: the model's output width (what rebuilds it); num_labels: the dataset's classes
    w.meta = {"name": w.cfg.model.name, "num_classes": out_dim, "num_labels": ds.num_classes,
              "in_channels": ds.shape[0], "input_size": ds.shape[1], "mean": list(ds.mean), "std": list(ds.std)}
    return method, model, make_optimizer(model, tc.lr, tc.momentum, tc.weight_decay, nesterov=tc.nesterov)


def _resume(w: "_Worker", model, optimizer, method) -> tuple:
    """(history, first epoch to train): the latest checkpoint's weights, optimizer and method state when the run
    has one, else ([], 0)."""
    payload = _resume_payload(w.run_dir, w.log)
    if payload is None:
        return [], 0
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    if payload.get("method_state"):
        method.load_state_dict(payload["method_state"])
    start_epoch = int(payload["epoch"])
    if w.log:
        w.log(f"resuming from {checkpoint_name(start_epoch)} (epoch {start_epoch}/{w.tc.epochs})")
    return list(payload["history"]), start_epoch


def _train_one_epoch(w: "_Worker", model, method, optimizer, epoch: int) -> Dict[str, Any]:
    """One epoch over this rank's batches: from memory, or from its Ray Data shard when streamed."""
    import ray.train

    from .loop import stream_batches, train_epoch, train_epoch_stream

    tc = w.tc
    common = {"epochs": tc.epochs, "batch_size": tc.batch_size, "lr": tc.lr, "device": w.device,
              "amp_dtype": w.amp_dtype, "channels_last": tc.channels_last, "log": w.log, "progress": w.progress,
              "augment": w.augment, "schedule": w.schedule, "seed": tc.seed, "rank": w.rank}
    if w.plan is None:
        return train_epoch(model, method, optimizer, w.data, epoch=epoch, world=w.world, **common)
    batches = stream_batches(ray.train.get_dataset_shard("train"), tc.batch_size, epoch=epoch, seed=tc.seed,
                             world=w.world, pin_memory=w.device.type == "cuda")
    return train_epoch_stream(model, method, optimizer, batches, epoch=epoch, steps=w.plan["steps"],
                              scale=w.plan["scale"], **common)


def _checkpoint_epoch(w: "_Worker", bare, optimizer, method, history: List[Dict[str, Any]],
                      metrics: Dict[str, Any]) -> None:
    """Rank 0: append the metrics, write metrics.jsonl, report the epoch's checkpoint; other ranks: report the
    scalars (every rank reports each epoch: a barrier)."""
    import ray.train

    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if w.rank != 0:
        ray.train.report(scalars)
        return
    history.append(metrics)
    write_jsonl(w.run_dir / "metrics.jsonl", history)
    w.log(_epoch_line(metrics, w.tc.epochs))
    _report_checkpoint(scalars, {
        "model": {k: v.detach().cpu() for k, v in bare.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "epoch": metrics["epoch"],
        "history": history,
        "config": w.cfg.to_dict(),
        "model_meta": w.meta,
        "method_state": {k: v.detach().cpu() for k, v in method.state_dict().items()},
        "provenance": provenance(seed=w.tc.seed, world_size=w.world, device=str(w.device), worker_nodes=w.nodes,
                                 augment=w.augment.describe() if w.augment else "none"),
    }, metrics["epoch"])


def _worker_nodes(world: int, device: torch.device) -> List[Optional[str]]:
    """The Ray node id of every rank (all-gathered), or just this one's when there is no process group."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if world > 1 and dist.is_available() and dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL gathers through the current device: this rank's own GPU
        nodes: List[Optional[str]] = [None] * world
        dist.all_gather_object(nodes, node)
        return nodes
    return [node]


def _record_worker(run_dir: Location, rank: int, node: Optional[str], epoch: int, start_epoch: int) -> None:
    """`<run_dir>/workers/rank<r>.json`: which process on which node trains which epoch (ops and fault tests)."""
    import os
    import socket

    write_json(run_dir / "workers" / f"rank{rank}.json", {
        "rank": rank, "pid": os.getpid(), "node_id": node, "host": socket.gethostname(),
        "epoch": epoch, "start_epoch": start_epoch, "updated": time.time()})


def _epoch_line(m: Dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {m['epoch']}/{epochs}", f"loss {m['loss']:.4f}"]
    parts += [f"{k.removeprefix('val_').removesuffix('_acc')} {v:.3f}" for k, v in m.items() if k.startswith("val_")]
    parts += [f"{m['images_per_s']:.0f} img/s", f"{m['seconds']:.1f}s"]
    return "  ".join(parts)


def _trainer(cfg: ExperimentConfig, run_dir: Location, init: Optional[Dict[str, Any]], stop: Optional[Where]):
    """The TorchTrainer of one run: `cfg.train.num_workers` workers running `_worker_loop`, the run's checkpoints
    persisted by Ray Train in `<run_dir>/checkpoints/`, images from memory or streamed through Ray Data."""
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = _use_gpu(cfg)
    plan, datasets, dataset_config = None, None, None
    if cfg.data.streamed:  # the workers read the images (Ray Data); the driver reads only metadata
        from .stream import stream_plan, trainer_datasets

        plan = stream_plan(cfg)
        datasets, dataset_config = trainer_datasets(cfg, plan)
    return TorchTrainer(
        _worker_loop,
        train_loop_config={"config": cfg.to_dict(), "run_dir": run_dir.uri, "init": init, "stream": plan,
                           "progress": progress_enabled(), "stop": as_location(stop).uri if stop else None},
        datasets=datasets, dataset_config=dataset_config,
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        # Ray Train persists every reported checkpoint to <run_dir>/checkpoints/epoch_XXX/ and restores
        # the latest one from there on a restart or a resubmission.
        run_config=RunConfig(name=CHECKPOINTS, storage_path=run_dir.uri,
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             logging_config=LoggingConfig(log_level="WARNING"),  # our own per-epoch lines suffice
                             # worker prints go to the driver once, not also through Train's logger
                             worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}),
    )


def fit(cfg: ExperimentConfig, run_dir: Optional[Where] = None, *, method: Optional[str] = None,
        stop: Optional[Where] = None) -> TrainResult:
    """Train `method` (default cfg.train.method) on Ray Train in `run_dir` (default: the method's directory
    of the config's run, `<run_dir>/<method>`; a local path or a storage URI); continue the run there if
    one is. `stop`: a file (local or storage URI) whose appearance ends the run at the next epoch boundary:
    the workers return, Ray Train shuts its worker group down and removes its placement group, and this
    call returns with the epochs done so far (how a Tune trial that ASHA stops frees its resources)."""
    if method is not None:
        cfg = cfg.for_method(method)
    from ..data import DATASETS
    from ..methods import METHODS
    from ..models import MODELS

    METHODS.get(cfg.train.method), MODELS.get(cfg.model.name), DATASETS.get(cfg.data.name)  # fail fast on names
    run_dir = as_location(run_dir) if run_dir is not None else cfg.layout().method_dir(cfg.train.method)
    check_writable(run_dir)  # a wrong bucket, endpoint or credential fails here, before any work
    payload = check_resumable(run_dir, cfg)
    resumed_from = int(payload["epoch"]) if payload else None
    if payload and resumed_from >= cfg.train.epochs:
        print(f"[{cfg.train.method}] {run_dir} already holds {resumed_from} epoch(s); reusing its checkpoint", flush=True)
    else:
        # A method's driver-side preparation (srd: semantic artifacts + source weights) fails here, before
        # Ray starts, with its own one-line error; a resumed run takes that state from its checkpoint.
        init = _method_init(cfg) if payload is None else None
        _drop_stale_ray_record(run_dir / CHECKPOINTS)
        if not cfg.data.streamed:
            preflight_data(cfg)
        ensure_ray(cfg.ray_address)
        trainer = _trainer(cfg, run_dir, init, stop)
        try:
            trainer.fit()
        except Exception as e:  # surface a user error from inside a worker as itself
            raise _unwrap(e) from None
    found = load_latest_checkpoint(run_dir / CHECKPOINTS)
    if found is None:
        raise RayRobustError(f"training finished but no checkpoint is in {run_dir / CHECKPOINTS}")
    latest, payload = found
    # What is evaluated: the last epoch, or under train.early_stopping the best validation-PGD epoch
    chosen, selection = selected_checkpoint(run_dir / CHECKPOINTS)
    if chosen != latest:
        print(f"[{cfg.train.method}] {selection['rule']}: epoch {selection['epoch']} "
              f"({selection['metric']} {selection['value']:.4f}) of {payload['epoch']}", flush=True)
    write_json(run_dir / "train.json", {"checkpoint": chosen.uri, "selection": selection,
                                        "last_checkpoint": latest.uri, "epochs": payload["epoch"],
                                        "metrics": payload["history"], "provenance": payload["provenance"],
                                        "config": payload["config"]})
    return TrainResult(run_dir, chosen, int(payload["epoch"]), list(payload["history"]), resumed_from)


RAY_RECORD = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's reported checkpoints


def _drop_stale_ray_record(checkpoints: Location) -> None:
    """Remove Ray Train's record of the run when it names a checkpoint that is no longer in storage (one
    deleted by hand): Ray Train would refuse to start from it. The run then continues from the newest valid
    checkpoint listed in storage (`_resume_payload`)."""
    import json

    record = checkpoints / RAY_RECORD
    try:
        text = record.read_text()
    except FileNotFoundError:
        return
    names = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "checkpoint_dir_name" and isinstance(value, str):
                    names.add(value)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    try:
        walk(json.loads(text))
    except ValueError:
        names.add("")  # unreadable: stale by definition
    if any(not name or not (checkpoints / name).exists() for name in names):
        record.delete()


def _method_init(cfg: ExperimentConfig) -> Optional[Dict[str, Any]]:
    """The method class's `prepare_run(cfg)` result ({"method_state", "model"}) when it has one, else None."""
    from ..methods import METHODS

    return METHODS.get(cfg.train.method).prepare_run(cfg)


def preflight_data(cfg: ExperimentConfig) -> None:
    """Load the dataset once on the driver so a missing dataset is a clear error, not a worker crash."""
    from ..data import load_dataset

    from ..config import check_budget

    ds = load_dataset(cfg.data.name, "train", root=cfg.data.root, download=cfg.data.download, limit=1)
    check_budget("train.eps", cfg.train.eps, cfg.train.norm, ds.shape)


def _use_gpu(cfg: ExperimentConfig) -> bool:
    from ..raycluster import resolve_use_gpu

    return resolve_use_gpu(cfg.train.use_gpu)[0]


def _unwrap(e: BaseException) -> BaseException:
    seen = set()
    cur: Optional[BaseException] = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, RayRobustError):
            return cur
        for attr in ("cause", "error", "_error"):
            inner = getattr(cur, attr, None)
            if isinstance(inner, BaseException):
                cur = inner
                break
        else:
            cur = cur.__cause__ or cur.__context__
    text = str(e)
    for cls in (CheckpointError, ConfigError):
        marker = cls.__name__ + ": "
        if marker in text:
            return cls(text.split(marker, 1)[1].splitlines()[0])
    return e
