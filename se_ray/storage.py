"""Paths and URIs (local, s3://, gs://) through pyarrow filesystems, and atomic writes."""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import TYPE_CHECKING, Any

from se_ray.config import StorageConfig

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path


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
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_uri(base) else os.path.join(base, *parts)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write under a hidden temporary name, then move into place: readers see all or nothing."""
    parent, name = posixpath.split(path)
    fs.create_dir(parent, recursive=True)
    tmp = posixpath.join(parent, f".{name}.{uuid.uuid4().hex}.tmp")
    with fs.open_output_stream(tmp) as out:
        out.write(data)
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
    """Committed Parquet parts of a folder (hidden and temporary files skipped), sorted."""
    import pyarrow.fs as pafs

    if not exists(fs, folder):
        return []
    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=False))
    return sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and i.base_name.endswith(".parquet")
        and not i.base_name.startswith((".", "_"))
    )


def read_parquet_folder(
    fs: pafs.FileSystem, folder: str, columns: list[str] | None = None
) -> pa.Table | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = list_parquet(fs, folder)
    if not parts:
        return None
    tables = [pq.read_table(p, filesystem=fs, columns=columns) for p in parts]
    return pa.concat_tables(tables, promote_options="default")
