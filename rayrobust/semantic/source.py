"""The images of the semantic stages, named rather than held: every Ray worker loads its own copy.

The driver hands workers an `ImageSource` (dataset name, root, limit), never the images; the extract
stage's actors and the dictionary actors each load the split themselves (once per process) and
take the rows they are given by index. `describe` runs on a Ray worker too, so the driver learns the
size and content hash of the data without loading it.

Example:
    >>> src = ImageSource("fashion_mnist", limit=10000)
    >>> info = describe(src)          # {"n": 10000, "data_sha256": ..., "shape": [1, 28, 28], ...}
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

from ..data import ArrayDataset

_CACHE: Dict["ImageSource", ArrayDataset] = {}  # per worker process: each split is loaded once


@dataclass(frozen=True)
class ImageSource:
    """A split of a registered dataset: `name`'s `split`, its first `limit` images (None: all)."""

    name: str
    split: str = "train"
    root: Optional[str] = None
    download: bool = False
    limit: Optional[int] = None
    stream: bool = False  # read as a Ray Dataset (Parquet or image files on a URI): no process holds the split

    @classmethod
    def from_config(cls, data_cfg: Any, semantic_cfg: Any) -> "ImageSource":
        """The training images of the semantic stages: the first data.train_limit images, then the first
        semantic.extract_limit of those."""
        limits = [v for v in (getattr(data_cfg, "train_limit", None), getattr(semantic_cfg, "extract_limit", None)) if v]
        return cls(data_cfg.name, "train", getattr(data_cfg, "root", None), bool(getattr(data_cfg, "download", False)),
                   min(limits) if limits else None, bool(getattr(data_cfg, "streamed", False)))

    def rows(self):
        """The split as a ray.data.Dataset of rows {index, label, image (C,H,W) uint8} read by the workers."""
        from ..data_ray import image_dataset

        return image_dataset(self.to_dict(), self.split, limit=self.limit)

    def load(self) -> ArrayDataset:
        """The split, loaded in this process on first use."""
        ds = _CACHE.get(self)
        if ds is None:
            from ..data import load_dataset

            ds = load_dataset(self.name, self.split, root=self.root, download=self.download, limit=self.limit)
            _CACHE[self] = ds
        return ds

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _describe_here(source: ImageSource) -> Dict[str, Any]:
    from .artifacts import dataset_sha256

    ds = source.load()
    return {"n": len(ds), "data_sha256": dataset_sha256(ds.x, ds.y), "shape": list(ds.shape),
            "num_classes": ds.num_classes, "name": ds.name}


def describe(source: ImageSource) -> Dict[str, Any]:
    """{n, data_sha256, shape, num_classes, name, scale} of the source, computed on a Ray worker (the driver
    never loads the images); a missing dataset raises its DataError here. A streamed source is described
    by its metadata alone: `data_sha256` then hashes the metadata and the location, not every image."""
    import hashlib
    import json

    import ray

    from ..raycluster import ensure_ray

    ensure_ray()
    if source.stream:
        from ..data_ray import dataset_info

        info = dataset_info(source.to_dict())
        n = min(info["n_train"], source.limit) if source.limit else info["n_train"]
        identity = json.dumps({"root": source.root, "info": info, "n": n}, sort_keys=True, default=str)
        return {"n": n, "data_sha256": hashlib.sha256(identity.encode()).hexdigest(), "shape": list(info["shape"]),
                "num_classes": info["num_classes"], "name": info["name"], "scale": info["scale"]}
    return ray.get(ray.remote(num_cpus=1, max_retries=0)(_describe_here).remote(source))


def describe_data(dataset: Any) -> Dict[str, Any]:
    """{"n", "name", "shape", "num_classes", "data_sha256"} of an ImageSource (computed on a Ray worker, plus
    what `describe` adds) or of an in-memory ArrayDataset; a source's images are never loaded here."""
    if isinstance(dataset, ImageSource):
        return describe(dataset)
    from .artifacts import dataset_sha256

    return {"n": len(dataset), "name": dataset.name, "shape": list(dataset.shape), "num_classes": dataset.num_classes,
            "data_sha256": dataset_sha256(dataset.x, dataset.y)}
