"""Where artifacts live: a local path or a storage URI, read and written through `pyarrow.fs`.

`Location("runs/demo")`, `Location("s3://bucket/runs/demo")`, `Location("gs://bucket/x")` and
`Location("file:///mnt/nfs/runs")` all name a file or directory the same way, so every stage reads
and writes its run directory without caring whether it is on this disk or in a bucket, and a
multi-node cluster needs no shared filesystem. S3 and GCS clients are configured the standard way
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`; Google's
application default credentials).

Writes are atomic where the filesystem allows it: a local file is written to a temporary name and
renamed into place; an object store makes an object visible only once it is complete. Artifact
directories (latents, clusters, ...) are committed by their manifest, written last
(`semantic/artifacts.py`).

Without pyarrow installed, local paths (and file:// URIs) still work, through plain file IO; only
object storage needs pyarrow.

Example:
    >>> run = Location("s3://my-bucket/runs/demo")
    >>> (run / "summary.json").write_text("{}")
    >>> [p.name for p in run.iterdir()]
    ['summary.json']
"""
from __future__ import annotations

import enum
import functools
import os
import shutil
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple, Union

from .errors import StorageError

# URI schemes rayrobust accepts (pyarrow filesystems); anything else is refused up front.
SCHEMES = ("s3", "gs", "gcs", "file")
_FS_CACHE: Dict[Tuple[str, str, str], Any] = {}  # (scheme, bucket, query) -> filesystem, one client per bucket
_FS_LOCK = threading.Lock()

Where = Union[str, os.PathLike, "Location"]


def _hint(scheme: str) -> str:
    if scheme == "s3":
        return ("check the bucket name and the AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and "
                "AWS_REGION variables (or the node's IAM role)")
    if scheme in ("gs", "gcs"):
        return "check the bucket name and Google application default credentials (GOOGLE_APPLICATION_CREDENTIALS)"
    return "check that the path exists and is writable"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def check_syntax(text: str) -> Tuple[str, str, str, str]:
    """(scheme, bucket, path, query) of a URI, or ("local", "", text, "") for a path; a StorageError
    naming the problem for an unknown scheme, a URI without a bucket or a relative file:// URI."""
    if "://" not in text:
        if not text:
            raise StorageError("an empty path was given where a directory or URI was expected")
        return "local", "", text, ""
    scheme, rest = text.split("://", 1)
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise StorageError(f"{text!r}: unknown storage scheme {scheme + '://'!r}; use a local path or a "
                           f"URI starting with {', '.join(s + '://' for s in SCHEMES if s != 'gcs')}")
    rest, _, query = rest.partition("?")
    if scheme == "file":
        if not rest.startswith("/"):
            raise StorageError(f"{text!r} is not an absolute file:// URI; write file:///absolute/path")
        return "local", "", str(PurePosixPath(rest)), ""
    bucket = rest.split("/", 1)[0]
    if len(bucket) < 3:
        raise StorageError(f"{text!r} names no bucket (bucket names have 3 or more characters); "
                           f"write {scheme}://BUCKET/path")
    return scheme, bucket, str(PurePosixPath(rest)).rstrip("/"), query


class _FileType(enum.IntEnum):
    """pyarrow.fs.FileType's members and values."""

    NotFound = 0
    Unknown = 1
    File = 2
    Directory = 3


@dataclass(frozen=True)
class _FileInfo:
    path: str
    type: _FileType
    size: Optional[int] = None


@dataclass(frozen=True)
class _FileSelector:
    base_dir: str
    allow_not_found: bool = False
    recursive: bool = False


class _PlainLocalFileSystem:
    """What `Location` uses of pyarrow.fs.LocalFileSystem, in plain file IO (when pyarrow is not installed)."""

    def get_file_info(self, what: Union[str, _FileSelector]) -> Union[_FileInfo, List[_FileInfo]]:
        return self._select(what) if isinstance(what, _FileSelector) else self._info(what)

    @staticmethod
    def _info(path: str) -> _FileInfo:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return _FileInfo(path, _FileType.NotFound)
        if stat.S_ISDIR(st.st_mode):
            return _FileInfo(path, _FileType.Directory)
        if stat.S_ISREG(st.st_mode):
            return _FileInfo(path, _FileType.File, st.st_size)
        return _FileInfo(path, _FileType.Unknown)

    def _select(self, selector: _FileSelector) -> List[_FileInfo]:
        base = selector.base_dir
        if not os.path.isdir(base):
            if selector.allow_not_found and not os.path.exists(base):
                return []
            raise FileNotFoundError(base) if not os.path.exists(base) else NotADirectoryError(base)
        if not selector.recursive:
            return [self._info(os.path.join(base, name)) for name in os.listdir(base)]
        return [self._info(os.path.join(root, name)) for root, dirs, files in os.walk(base) for name in dirs + files]

    def open_input_stream(self, path: str):
        return open(path, "rb")

    def open_input_file(self, path: str):
        return open(path, "rb")

    def open_output_stream(self, path: str):
        return open(path, "wb")

    def create_dir(self, path: str, recursive: bool = True) -> None:
        if recursive:
            os.makedirs(path, exist_ok=True)
        else:
            os.mkdir(path)

    def copy_file(self, src: str, dest: str) -> None:
        shutil.copyfile(src, dest)

    def delete_dir(self, path: str) -> None:
        shutil.rmtree(path)

    def delete_file(self, path: str) -> None:
        os.remove(path)


_PLAIN_FS = SimpleNamespace(FileType=_FileType, FileSelector=_FileSelector, LocalFileSystem=_PlainLocalFileSystem)


@functools.lru_cache(maxsize=None)
def _fs_module() -> Any:
    """pyarrow.fs, or a plain-file-IO stand-in for local paths when pyarrow is not installed."""
    try:
        import pyarrow.fs as pafs
    except ImportError:
        return _PLAIN_FS
    return pafs


def _remote_fs(uri: str) -> Tuple[Any, str]:
    """(filesystem, path) of a URI, one filesystem object per (scheme, bucket, options)."""
    scheme, bucket, path, query = check_syntax(uri)
    if scheme == "local":
        return _fs_module().LocalFileSystem(), path
    try:
        import pyarrow.fs as pafs
    except ImportError:
        raise StorageError(f"cannot open {uri!r}: object storage needs pyarrow (pip install pyarrow); "
                           f"a local path works without it") from None
    key = (scheme, bucket, query)
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
        if fs is None:
            try:
                fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}" + (f"?{query}" if query else ""))
            except Exception as e:  # ArrowInvalid, OSError: no credentials, unknown region, ...
                raise StorageError(f"cannot open {uri!r}: {_first_line(e)}; {_hint(scheme)}") from None
            _FS_CACHE[key] = fs
    return fs, path


class Location:
    """A file or directory on a pyarrow filesystem: a local path or an s3://, gs://, file:// URI.

    Paths join with `/`; `name`, `parent`, `suffix` behave like pathlib's. Local paths are made
    absolute. A Location pickles as its URI, so it can be handed to Ray tasks and actors.
    """

    __slots__ = ("fs", "path", "scheme", "_query")

    def __init__(self, where: Where):
        if isinstance(where, Location):
            self.fs, self.path, self.scheme, self._query = where.fs, where.path, where.scheme, where._query
            return
        text = os.fspath(where)
        scheme = check_syntax(text)[0]
        if "://" in text:
            self.fs, self.path = _remote_fs(text)
            self.scheme = scheme
            self._query = text.partition("?")[2] if scheme != "local" else ""
        else:
            self.fs, self.path = _fs_module().LocalFileSystem(), str(Path(text).expanduser().absolute())
            self.scheme, self._query = "local", ""

    @classmethod
    def _child(cls, parent: "Location", path: str) -> "Location":
        loc = cls.__new__(cls)
        loc.fs, loc.path, loc.scheme, loc._query = parent.fs, path, parent.scheme, parent._query
        return loc

    # ---- naming ------------------------------------------------------------------------------
    @property
    def uri(self) -> str:
        """The string to give back to a user or to `Location(...)`: a local path, or scheme://path."""
        if self.is_local:
            return self.path
        return f"{self.scheme}://{self.path}" + (f"?{self._query}" if self._query else "")

    @property
    def is_local(self) -> bool:
        return self.scheme == "local"

    def local_path(self) -> Path:
        """The local path; only for local locations."""
        if not self.is_local:
            raise StorageError(f"{self.uri} is in object storage, not on this machine's disk")
        return Path(self.path)

    def __truediv__(self, part: str) -> "Location":
        return Location._child(self, str(PurePosixPath(self.path) / str(part)))

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def parent(self) -> "Location":
        return Location._child(self, str(PurePosixPath(self.path).parent))

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.path).suffix

    @property
    def stem(self) -> str:
        return PurePosixPath(self.path).stem

    def with_name(self, name: str) -> "Location":
        return Location._child(self, str(PurePosixPath(self.path).with_name(name)))

    def relative_to(self, other: "Location") -> str:
        return PurePosixPath(self.path).relative_to(PurePosixPath(other.path)).as_posix()

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and (self.scheme, self.path) == (other.scheme, other.path)

    def __hash__(self) -> int:
        return hash((self.scheme, self.path))

    def __reduce__(self):
        return (Location, (self.uri if not self.is_local else self.path,))

    # ---- queries -----------------------------------------------------------------------------
    def _info(self):
        try:
            return self.fs.get_file_info(self.path)
        except Exception as e:
            raise self._error("read", e) from None

    def exists(self) -> bool:
        pafs = _fs_module()
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        pafs = _fs_module()
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        pafs = _fs_module()
        return self._info().type == pafs.FileType.Directory

    def size(self) -> int:
        return int(self._info().size or 0)

    def iterdir(self) -> List["Location"]:
        """The entries directly in this directory, sorted by name ([] when it does not exist)."""
        return [Location._child(self, i.path) for i in self._list(recursive=False)]

    def files(self) -> List[Tuple[str, int]]:
        """(path relative to this directory, size) of every file below it, sorted ([] when none)."""
        pafs = _fs_module()
        return [(PurePosixPath(i.path).relative_to(PurePosixPath(self.path)).as_posix(), int(i.size or 0))
                for i in self._list(recursive=True) if i.type == pafs.FileType.File]

    def _list(self, *, recursive: bool) -> list:
        pafs = _fs_module()
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive, allow_not_found=True))
        except Exception as e:
            raise self._error("list", e) from None
        return sorted(infos, key=lambda i: i.path)

    # ---- reading -----------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except Exception as e:
            if not self.exists():
                raise FileNotFoundError(self.uri) from None
            raise self._error("read", e) from None

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def open_input(self):
        """A seekable binary file (Parquet, numpy and torch readers take it)."""
        try:
            return self.fs.open_input_file(self.path)
        except Exception as e:
            if not self.exists():
                raise FileNotFoundError(self.uri) from None
            raise self._error("read", e) from None

    # ---- writing -----------------------------------------------------------------------------
    def mkdir(self) -> None:
        """Create this directory and its parents (object stores have no directories: nothing to do)."""
        try:
            self.fs.create_dir(self.path, recursive=True)
        except Exception as e:
            raise self._error("write", e) from None

    def write_bytes(self, data: bytes) -> None:
        """Write the whole file at once, atomically: readers see the old content or the new, never a part."""
        try:
            if self.is_local:
                local = Path(self.path)
                local.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{local.name}.", suffix=".tmp", dir=local.parent)
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                    os.replace(tmp, local)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            else:  # an object appears whole when its upload completes
                with self.fs.open_output_stream(self.path) as out:
                    out.write(data)
        except Exception as e:
            raise self._error("write", e) from None

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def upload(self, local_file: Union[str, os.PathLike]) -> None:
        """Copy a local file here (atomically, like write_bytes) without holding it in memory twice."""
        if self.is_local:
            import shutil

            dest = Path(self.path)
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
            os.close(fd)
            try:
                shutil.copyfile(local_file, tmp)
                os.replace(tmp, dest)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return
        try:
            with open(local_file, "rb") as src, self.fs.open_output_stream(self.path) as out:
                while block := src.read(1 << 22):
                    out.write(block)
        except Exception as e:
            raise self._error("write", e) from None

    def copy_to(self, dest: "Location") -> None:
        """Copy this file to `dest` (server-side within one object store)."""
        try:
            if dest.fs is self.fs or dest.scheme == self.scheme and dest.scheme != "local":
                if dest.is_local:
                    Path(dest.path).parent.mkdir(parents=True, exist_ok=True)
                self.fs.copy_file(self.path, dest.path)
            else:
                dest.write_bytes(self.read_bytes())
        except StorageError:
            raise
        except Exception as e:
            raise self._error("copy", e) from None

    def delete(self) -> None:
        """Remove this file or directory tree; nothing happens when it does not exist."""
        pafs = _fs_module()
        kind = self._info().type
        try:
            if kind == pafs.FileType.Directory:
                self.fs.delete_dir(self.path)
            elif kind == pafs.FileType.File:
                self.fs.delete_file(self.path)
        except FileNotFoundError:
            pass
        except Exception as e:
            raise self._error("delete", e) from None

    def _error(self, action: str, e: BaseException) -> StorageError:
        return StorageError(f"cannot {action} {self.uri!r}: {_first_line(e)}; {_hint(self.scheme)}")


def as_location(where: Where) -> Location:
    return where if isinstance(where, Location) else Location(where)


def check_writable(where: Where) -> Location:
    """The Location of a run directory after proving it can be written, so a wrong bucket, endpoint or
    credential fails before any work starts: in object storage a small probe object is written and
    removed; on a local disk the nearest existing directory must be writable (nothing is created)."""
    import uuid

    loc = as_location(where)
    if loc.is_local:  # nothing is created: the nearest existing directory must let us create the rest
        path = Path(loc.path)
        while not path.exists():
            path = path.parent
        if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
            raise StorageError(f"cannot write {loc.uri!r}: {str(path)!r} is not a writable directory; "
                               f"{_hint('local')}")
        return loc
    probe = loc / f".rayrobust-probe-{uuid.uuid4().hex[:12]}"
    probe.write_bytes(b"")
    probe.delete()
    return loc
