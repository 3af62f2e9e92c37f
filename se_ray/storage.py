"""Paths and URIs (local, s3://, gs://) through pyarrow filesystems, and atomic writes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from se_ray.config import StorageConfig

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path


def absolute(location: str) -> str:
    """A local path made absolute (a Tune trial runs in another working directory); URIs as given."""
    return location if is_uri(location) else os.path.abspath(os.path.expanduser(location))


def filesystem(path: str, storage: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``path`` and the path inside it."""
    import pyarrow.fs as pafs

    storage = storage or StorageConfig()
    if path.startswith("s3://"):
        fs = pafs.S3FileSystem(
            endpoint_override=storage.s3_endpoint_override,
            region=storage.s3_region,
            scheme=storage.s3_scheme,
        )
        return fs, path[len("s3://") :].rstrip("/")
    if is_uri(path):
        fs, inner = pafs.FileSystem.from_uri(path)
        return fs, inner.rstrip("/")
    return pafs.LocalFileSystem(), absolute(path)


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_uri(base) else os.path.join(base, *parts)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type != pafs.FileType.NotFound


_COMMIT_CHECKS: list[Callable[[], None]] = []


def on_commit(check: Callable[[], None]) -> None:
    """Run ``check`` before every commit: ``se_ray.lease`` registers the check that raises
    ``LeaseLostError`` once this run's lease on its output was taken."""
    if check not in _COMMIT_CHECKS:
        _COMMIT_CHECKS.append(check)


def before_commit() -> None:
    """Called by every commit of output (atomic writes, a folder cleared or published)."""
    for check in tuple(_COMMIT_CHECKS):
        check()


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write under a hidden temporary name, then move into place: readers see all or nothing.
    A run that lost its output's lease stops before the move (``before_commit``)."""
    parent, name = posixpath.split(path)
    fs.create_dir(parent, recursive=True)
    tmp = posixpath.join(parent, f".{name}.{uuid.uuid4().hex}.tmp")
    with fs.open_output_stream(tmp) as out:
        out.write(data)
    try:
        before_commit()
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise
    fs.move(tmp, path)


def write_text_atomic(fs: pafs.FileSystem, path: str, text: str) -> None:
    write_bytes_atomic(fs, path, text.encode())


def write_json(fs: pafs.FileSystem, path: str, obj: Any) -> None:
    write_text_atomic(fs, path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_text(fs: pafs.FileSystem, path: str) -> str:
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_parquet_atomic(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes_atomic(fs, path, sink.getvalue().to_pybytes())


def list_parquet(fs: pafs.FileSystem, folder: str) -> list[str]:
    """Committed Parquet parts of a folder (hidden and temporary files skipped), in commit
    order: modification time, then name."""
    import pyarrow.fs as pafs

    if not exists(fs, folder):
        return []
    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=False))
    parts = [
        i
        for i in infos
        if i.type == pafs.FileType.File
        and i.base_name.endswith(".parquet")
        and not i.base_name.startswith((".", "_"))
    ]
    return [i.path for i in sorted(parts, key=lambda i: (i.mtime_ns or 0, i.base_name))]


def read_parquet_folder(
    fs: pafs.FileSystem, folder: str, columns: list[str] | None = None, unique_by: str | None = None
) -> pa.Table | None:
    """The parts of a folder as one table. With ``unique_by``, one row per key: the row of the
    part committed first (older versions, a second writer or a hand-copied part may repeat a key)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = list_parquet(fs, folder)
    if not parts:
        return None
    wanted = (
        columns if columns is None or unique_by is None or unique_by in columns else [*columns, unique_by]
    )
    table = pa.concat_tables(
        [pq.read_table(p, filesystem=fs, columns=wanted) for p in parts], promote_options="default"
    )
    if unique_by is None:
        return table
    seen: set[Any] = set()
    keep = [not (k in seen or seen.add(k)) for k in table.column(unique_by).to_pylist()]
    dropped = keep.count(False)
    if dropped:
        logger.warning(
            "%s: %d duplicate %s row(s) dropped (the first committed part wins)", folder, dropped, unique_by
        )
        table = table.filter(pa.array(keep))
    return table if wanted is columns else table.select(columns)


class Store:
    """A folder, local or at a URI, with the filesystem that reaches it: built once from a
    location and the storage config, then passed down instead of (config, location) pairs.

    Pickles as (location, storage), so a store crosses Ray task boundaries and rebuilds its
    filesystem on the other side."""

    def __init__(self, location: str, storage: StorageConfig | None = None):
        self.location = absolute(location)
        self.storage = storage or StorageConfig()
        self.fs, self.path = filesystem(self.location, self.storage)

    def __reduce__(self):
        return (Store, (self.location, self.storage))

    def __repr__(self) -> str:
        return f"Store({self.location!r})"

    def child(self, *parts: str) -> Store:
        return Store(join(self.location, *parts), self.storage)

    def file(self, *parts: str) -> str:
        """The path of a file under this folder, inside ``fs``."""
        return join(self.path, *parts) if parts else self.path

    def uri(self, *parts: str) -> str:
        """The location of a file under this folder, as a user or another job addresses it."""
        return join(self.location, *parts) if parts else self.location

    def exists(self, *parts: str) -> bool:
        return exists(self.fs, self.file(*parts))

    def makedirs(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def clear(self) -> None:
        before_commit()
        self.fs.delete_dir_contents(self.path, missing_dir_ok=True)

    def read_text(self, *parts: str) -> str:
        return read_text(self.fs, self.file(*parts))

    def write_text(self, name: str, text: str) -> None:
        write_text_atomic(self.fs, self.file(name), text)

    def write_json(self, name: str, obj: Any) -> None:
        write_json(self.fs, self.file(name), obj)

    def read_json(self, name: str, default: Any = None) -> Any:
        if not self.exists(name):
            return default
        return json.loads(self.read_text(name))

    def write_jsonl(self, name: str, rows: Any) -> None:
        self.write_text(name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    def read_jsonl(self, name: str) -> list[dict[str, Any]]:
        if not self.exists(name):
            return []
        return [json.loads(line) for line in self.read_text(name).splitlines() if line.strip()]

    def write_parquet(self, name: str, table: pa.Table) -> None:
        write_parquet_atomic(self.fs, self.file(name), table)

    def read_parquet(self, name: str, columns: list[str] | None = None) -> pa.Table:
        import pyarrow.parquet as pq

        return pq.read_table(self.file(name), filesystem=self.fs, columns=columns)
