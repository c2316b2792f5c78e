"""Results storage: mirror a run directory to S3 (or any pyarrow filesystem URI) and pull it back.

On a cluster without a shared filesystem every node has its own local `run_dir`. With a storage path
(`RAYROBUST_STORAGE_PATH`, or a config's `storage_path` field where the config has one), the run
directory `<run_dir>` is mirrored to `<storage_path>/<name of run_dir>/`:

- training pushes each epoch's checkpoint and `metrics.jsonl` as soon as they are written (rank 0);
- every (re)start of a training worker, and the driver before and after training, pull the newest
  valid checkpoint and the small files (json/jsonl) they lack, so a run resumes on any node;
- `jobs/*.py` pull the run directory before a stage and push it after (also when the stage fails).

Any URI `pyarrow.fs.FileSystem.from_uri` accepts works: `s3://bucket/prefix`, `gs://...`,
`file:///mnt/nfs/...` (what the tests use). Uploads to a local filesystem are atomic (temp + rename);
S3 objects appear whole. Only new or changed files travel, and only the newest valid checkpoint is
pulled. A checkpoint is the same safe format everywhere: pulled files are verified by `load_checkpoint`.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Optional

from .checkpoint import latest_valid_checkpoint, load_checkpoint
from .errors import CheckpointError, ConfigError, RayRobustError

ENV_VAR = "RAYROBUST_STORAGE_PATH"
_SKIP_DIRS = {"ray", "workers"}  # Ray Train's node-local state and per-process worker records, at any depth
_CKPT = re.compile(r"^(?:(.+)/)?checkpoints/epoch_(\d{3,})\.pt$")  # any run's checkpoints/ below the mirror


class StorageError(RayRobustError):
    """The storage path cannot be reached or written."""


@dataclass(frozen=True)
class Mirror:
    """Where one local directory lives in storage: `uri` (root) + `subpath` (posix, may be empty)."""

    uri: str
    subpath: str

    def to_dict(self) -> Dict[str, str]:
        return {"uri": self.uri, "subpath": self.subpath}

    def __str__(self) -> str:
        return self.uri.split("?", 1)[0].rstrip("/") + ("/" + self.subpath if self.subpath else "")


def storage_path(cfg: Any) -> Optional[str]:
    """The configured storage root: cfg.storage_path if the config has that field, else $RAYROBUST_STORAGE_PATH."""
    value = getattr(cfg, "storage_path", None) or os.environ.get(ENV_VAR) or None
    if value and "://" not in value:
        raise ConfigError(f"storage_path={value!r} must be a URI such as s3://bucket/prefix or file:///mnt/nfs/runs; "
                          "for a shared filesystem you can also just put run_dir on it and leave storage_path unset")
    return value


def mirror_for(cfg: Any, local_dir: str | os.PathLike) -> Optional[Mirror]:
    """The mirror of `local_dir` (cfg.run_dir or a directory under it), or None without a storage path."""
    root = storage_path(cfg)
    if root is None:
        return None
    run_dir = Path(cfg.run_dir).resolve()
    local = Path(local_dir).resolve()
    try:
        rel = local.relative_to(run_dir).as_posix()
    except ValueError:  # a directory outside run_dir: keep it apart, under its own name
        rel = local.name
    parts = [run_dir.name] + ([rel] if rel not in ("", ".") else [])
    return Mirror(root, "/".join(parts))


def _fs(mirror: Mirror):
    import pyarrow.fs as pafs

    try:
        fs, base = pafs.FileSystem.from_uri(mirror.uri)
    except Exception as e:  # ArrowInvalid, OSError: bad scheme, no credentials, ...
        raise StorageError(f"cannot open storage path {mirror.uri!r}: {e}") from None
    return fs, str(PurePosixPath(base) / mirror.subpath) if mirror.subpath else base


def _skipped(parts: tuple) -> bool:
    """Temp files (.name.tmp) and node-local directories are not mirrored."""
    return parts[-1].startswith(".") or any(p in _SKIP_DIRS for p in parts[:-1])


def _local_files(local: Path) -> Dict[str, os.stat_result]:
    out = {}
    for p in local.rglob("*"):
        rel = p.relative_to(local)
        if _skipped(rel.parts) or not p.is_file():
            continue
        out[rel.as_posix()] = p.stat()
    return out


def _remote_files(fs, base: str) -> Dict[str, Any]:
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except Exception as e:
        raise StorageError(f"cannot list {base!r} in storage: {e}") from None
    out = {}
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = PurePosixPath(info.path).relative_to(PurePosixPath(base)).as_posix()
        if _skipped(PurePosixPath(rel).parts):
            continue
        out[rel] = info
    return out


def _upload_order(rel: str) -> tuple:
    return (rel.endswith(".sha256"), rel)  # a checkpoint before its sidecar


def push(local_dir: str | os.PathLike, mirror: Mirror, *, attempts: int = 3) -> List[str]:
    """Upload files of `local_dir` that storage lacks or holds older/different; returns their relative paths."""
    import pyarrow.fs as pafs

    local = Path(local_dir)
    if not local.is_dir():
        return []
    fs, base = _fs(mirror)
    for attempt in range(attempts):
        try:
            remote = _remote_files(fs, base)
            sent = []
            for rel, st in sorted(_local_files(local).items(), key=lambda kv: _upload_order(kv[0])):
                info = remote.get(rel)
                if info is not None and info.size == st.st_size and info.mtime_ns is not None and info.mtime_ns >= st.st_mtime_ns:
                    continue
                _upload(fs, local / rel, f"{base}/{rel}", atomic=isinstance(fs, pafs.LocalFileSystem))
                sent.append(rel)
            return sent
        except (OSError, StorageError) as e:
            if attempt == attempts - 1:
                raise StorageError(f"cannot push {local} to {mirror}: {e}") from None
            time.sleep(2 ** attempt)
    return []


def _upload(fs, src: Path, dest: str, *, atomic: bool) -> None:
    fs.create_dir(str(PurePosixPath(dest).parent), recursive=True)
    target = str(PurePosixPath(dest).with_name(f".{PurePosixPath(dest).name}.{os.getpid()}.tmp")) if atomic else dest
    with open(src, "rb") as f, fs.open_output_stream(target) as out:
        while block := f.read(1 << 22):
            out.write(block)
    if atomic:
        fs.move(target, dest)


def _download(fs, src: str, dest: Path, mtime_ns: Optional[int]) -> None:
    """Atomic download that keeps the stored modification time, so the next push sees nothing new."""
    from .io import atomic_path

    with atomic_path(dest) as tmp:
        with fs.open_input_stream(src) as inp, open(tmp, "wb") as out:
            while block := inp.read(1 << 22):
                out.write(block)
        if mtime_ns is not None:
            os.utime(tmp, ns=(time.time_ns(), mtime_ns))


def pull(mirror: Mirror, local_dir: str | os.PathLike) -> List[str]:
    """Download what `local_dir` lacks: small files that are missing or older, and the newest valid checkpoint.

    Older checkpoints stay in storage (a run resumes from the newest); local files newer than their
    stored copy are kept. Returns the relative paths downloaded.
    """
    local = Path(local_dir)
    fs, base = _fs(mirror)
    try:
        remote = _remote_files(fs, base)
        got = []
        ckpts: Dict[str, List[tuple]] = {}  # checkpoints dir -> [(epoch, rel)]
        for rel, info in sorted(remote.items()):
            m = _CKPT.match(rel)
            if m:
                ckpts.setdefault(m.group(1) or "", []).append((int(m.group(2)), rel))
                continue
            if rel.endswith(".pt.sha256") and _CKPT.match(rel[: -len(".sha256")]):
                continue  # fetched with its checkpoint
            dest = local / rel
            if dest.exists():
                st = dest.stat()
                stale = st.st_mtime_ns < info.mtime_ns if info.mtime_ns is not None else st.st_size != info.size
                if not stale:
                    continue
            _download(fs, f"{base}/{rel}", dest, info.mtime_ns)
            got.append(rel)
        for run, found in sorted(ckpts.items()):
            got += _pull_latest_checkpoint(fs, base, remote, sorted(found), local / run if run else local)
        return got
    except OSError as e:
        raise StorageError(f"cannot pull {mirror} into {local}: {e}") from None


def _pull_latest_checkpoint(fs, base: str, remote: Dict[str, Any], ckpts: List[tuple], run_dir: Path) -> List[str]:
    """Fetch the newest stored checkpoint of one run (`ckpts`: (epoch, path in the mirror)) unless `run_dir` has one as new."""
    ckpt_dir = run_dir / "checkpoints"
    have = latest_valid_checkpoint(ckpt_dir)
    have_epoch = int(have.stem.split("_")[1]) if have is not None else 0
    for epoch, rel in reversed(ckpts):
        if epoch <= have_epoch:
            return []
        got = [name for name in (rel, rel + ".sha256") if name in remote]
        for name in got:
            _download(fs, f"{base}/{name}", ckpt_dir / PurePosixPath(name).name, remote[name].mtime_ns)
        try:
            load_checkpoint(ckpt_dir / PurePosixPath(rel).name)
            return got
        except CheckpointError as e:  # a corrupt copy in storage: fall back to the epoch before
            print(f"warning: skipping stored {e}", flush=True)
            for name in got:
                (ckpt_dir / PurePosixPath(name).name).unlink(missing_ok=True)
    return []
