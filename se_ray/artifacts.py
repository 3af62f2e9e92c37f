"""Models, adapters and checkpoints travel between stages and nodes as storage URIs; whoever
loads one materialises it here, into its own node's cache.

A URI (``s3://``, ``gs://``, any pyarrow filesystem) names a folder. ``materialize`` copies it
into ``$SE_RAY_CACHE/artifacts/<key>`` on the node that calls it and returns that local folder;
the caller uses it there and never passes it on (another node has no such path). A local path
is taken to be on a filesystem every node shares and is returned as it is.

* content-keyed: the key hashes the URI with every remote file's relative path, size and
  modification time, so a folder rewritten at the same URI (a rerun trial) gets a fresh copy,
  and an unchanged one is downloaded once per node;
* atomic: files are downloaded into a hidden temporary folder, renamed into place only when
  complete; a folder named by its key is always whole;
* concurrent-safe: a per-key file lock makes processes on one node (engine actors, training
  workers) download once; the rename wins even without it (a loser discards its copy).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from se_ray.config import StorageConfig
from se_ray.storage import Store, is_uri

logger = logging.getLogger(__name__)

ARTIFACTS_DIR = "artifacts"
SOURCE_FILE = ".se-ray-source.json"  # in each cached folder: where it came from, what it held


class ArtifactNotFoundError(FileNotFoundError):
    """The URI names no folder with files in it."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a remote folder: its path relative to the folder, size and modification time."""

    relative: str
    size: int
    mtime_ns: int


def content_key(uri: str, files: Sequence[RemoteFile]) -> str:
    """The cache key of ``uri`` holding ``files``: equal exactly when the URI and every file's
    path, size and modification time are equal (the order of listing does not matter)."""
    entries = sorted((f.relative, f.size, f.mtime_ns) for f in files)
    payload = json.dumps([uri.rstrip("/"), entries], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def is_in_flight(relative: str) -> bool:
    """A hidden ``.name.<uuid>.tmp`` file of an atomic write still under way: not content."""
    name = posixpath.basename(relative)
    return name.startswith(".") and name.endswith(".tmp")


def cache_dir() -> Path:
    """This node's se-ray cache (``SE_RAY_CACHE``, default ``~/.cache/se-ray``): set per node,
    never shared through a path another node would read."""
    return Path(os.environ.get("SE_RAY_CACHE", Path.home() / ".cache" / "se-ray")).expanduser()


def cache_root() -> Path:
    """Where this node keeps its copies of URIs' folders."""
    return cache_dir() / ARTIFACTS_DIR


def list_remote(store: Store) -> list[RemoteFile]:
    """Every file under the folder (recursively), in-flight temporaries left out."""
    import pyarrow.fs as pafs

    infos = store.fs.get_file_info(pafs.FileSelector(store.path, recursive=True, allow_not_found=True))
    prefix = store.path.rstrip("/") + "/"
    files = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        relative = info.path[len(prefix) :] if info.path.startswith(prefix) else info.base_name
        if not is_in_flight(relative):
            files.append(RemoteFile(relative, int(info.size or 0), int(info.mtime_ns or 0)))
    return files


def remote_exists(uri: str, name: str, storage: StorageConfig | None = None) -> bool:
    """Whether the folder at ``uri`` holds the file ``name`` (no download)."""
    return Store(uri, storage).exists(name)


def read_remote_json(uri: str, name: str, storage: StorageConfig | None = None) -> dict | None:
    """A small JSON file of the folder at ``uri`` (e.g. ``adapter_config.json``), None if absent."""
    return Store(uri, storage).read_json(name)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download(store: Store, files: Sequence[RemoteFile], into: Path) -> None:
    import pyarrow.fs as pafs

    local = pafs.LocalFileSystem()
    for f in files:
        dest = into / f.relative
        dest.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(
            store.file(f.relative), str(dest), source_filesystem=store.fs, destination_filesystem=local
        )


def _place(tmp: Path, target: Path) -> None:
    """Rename the finished copy into place; if another process got there first, keep theirs."""
    try:
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def materialize(uri: str, storage: StorageConfig | None = None) -> str:
    """A local folder on this node holding the folder at ``uri``: the path itself for a local
    path (a shared filesystem), else this node's cached copy, downloaded if missing."""
    if not is_uri(uri):
        return os.path.abspath(os.path.expanduser(uri))
    store = Store(uri, storage)
    files = list_remote(store)
    if not files:
        raise ArtifactNotFoundError(f"{uri}: no such folder, or it holds no files")
    key = content_key(uri, files)
    root = cache_root()
    target = root / key
    if target.is_dir():
        return str(target)
    with _locked(root / f".{key}.lock"):
        if target.is_dir():  # another process on this node finished it while we waited
            return str(target)
        tmp = root / f".{key}.{uuid.uuid4().hex}.tmp"
        try:
            _download(store, files, tmp)
            source = {"uri": uri, "files": [[f.relative, f.size, f.mtime_ns] for f in files]}
            (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n")
            _place(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("materialised %s (%d files) at %s", uri, len(files), target)
    return str(target)
