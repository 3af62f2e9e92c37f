"""Where a lease lives: create it atomically where the store allows it, read it with a version,
replace or delete it only if unchanged. A version is whatever the store compares on: the ETag
on S3, the record's bytes elsewhere."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import time
import uuid
from typing import TYPE_CHECKING, Any

from se_ray.storage import filesystem

if TYPE_CHECKING:
    import pyarrow.fs as pafs

    from se_ray.config import StorageConfig

logger = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"
# How long the read-back check of a store without atomic create waits for a racing writer.
_SETTLE_S = 1.0


class LeaseStoreError(RuntimeError):
    """No safe lease store can be built for this output (one line)."""


class LeaseStore:
    where: str

    def read(self) -> tuple[bytes, str] | None:
        raise NotImplementedError

    def create(self, data: bytes) -> str | None:
        """Write ``data`` if nothing is there; its version, or None when another lease exists."""
        raise NotImplementedError

    def replace(self, data: bytes, version: str) -> str | None:
        """Overwrite the lease if it is still at ``version``; the new version, or None."""
        raise NotImplementedError

    def take_over(self, data: bytes, version: str) -> str | None:
        return self.replace(data, version)

    def delete(self, version: str) -> bool:
        raise NotImplementedError

    def mtime(self) -> float:
        return time.time()


def _bytes_version(data: bytes) -> str:
    return data.hex()


class LocalStore(LeaseStore):
    """A local or shared (NFS) filesystem: ``link`` and ``rename`` are atomic there."""

    def __init__(self, path: str):
        self.path = path
        self.where = path

    def _tmp(self, tag: str) -> str:
        parent, name = os.path.split(self.path)
        return os.path.join(parent, f".{name}.{tag}.{uuid.uuid4().hex}")

    def _write_tmp(self, data: bytes) -> str:
        tmp = self._tmp("tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return tmp

    def read(self) -> tuple[bytes, str] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, _bytes_version(data)

    def mtime(self) -> float:
        try:
            return os.stat(self.path).st_mtime
        except OSError:
            return time.time()

    def create(self, data: bytes) -> str | None:
        tmp = self._write_tmp(data)
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            return self._create_excl(data)  # a filesystem without hard links
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return _bytes_version(data)

    def _create_excl(self, data: bytes) -> str | None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return None
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return _bytes_version(data)

    def _claim(self, version: str) -> bool:
        """Move the lease aside if it is still at ``version``: of two racers only one can move it."""
        aside = self._tmp("old")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        with open(aside, "rb") as f:
            moved = f.read()
        if _bytes_version(moved) == version:
            os.unlink(aside)
            return True
        # Not the lease we judged: it changed hands meanwhile. Put it back unless another
        # lease appeared in its place (that one's owner then wins).
        with contextlib.suppress(OSError):
            os.link(aside, self.path)
        os.unlink(aside)
        return False

    def replace(self, data: bytes, version: str) -> str | None:
        current = self.read()
        if current is None or current[1] != version:
            return None
        tmp = self._write_tmp(data)
        try:
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return _bytes_version(data)

    def take_over(self, data: bytes, version: str) -> str | None:
        if not self._claim(version):
            return None
        return self.create(data)

    def delete(self, version: str) -> bool:
        return self._claim(version)


class S3Store(LeaseStore):
    """S3 through boto3: conditional puts (``If-None-Match: *``, ``If-Match: etag``)."""

    def __init__(self, client: Any, bucket: str, key: str):
        self.client, self.bucket, self.key = client, bucket, key
        self.where = f"s3://{bucket}/{key}"

    @staticmethod
    def _code(e: Exception) -> str:
        return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))

    def _conflict(self, e: Exception) -> bool:
        # 412 PreconditionFailed: the condition did not hold; 409 ConditionalRequestConflict:
        # a concurrent conditional write to the same key won.
        return self._code(e) in {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}

    def read(self) -> tuple[bytes, str] | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None
        return obj["Body"].read(), obj["ETag"]

    def mtime(self) -> float:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.key)["LastModified"].timestamp()
        except Exception:
            return time.time()

    def _put(self, data: bytes, **condition: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            out = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, **condition)
        except ClientError as e:
            if self._conflict(e) or self._code(e) in {"NoSuchKey", "404"}:
                return None
            raise
        # A store that ignores the condition header overwrites silently: read back to see.
        current = self.read()
        if current is None or current[0] != data:
            return None
        return out.get("ETag") or current[1]

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, version: str) -> str | None:
        return self._put(data, IfMatch=version)

    def delete(self, version: str) -> bool:
        from botocore.exceptions import ClientError, ParamValidationError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=version)
            return True
        except ClientError as e:
            if self._conflict(e) or self._code(e) in {"NoSuchKey", "404"}:
                return False
            if self._code(e) not in {"NotImplemented", "501"}:
                raise
        except ParamValidationError:  # an older botocore without conditional deletes
            pass
        current = self.read()
        if current is None or current[1] != version:
            return False
        self.client.delete_object(Bucket=self.bucket, Key=self.key)
        return True


class GenericStore(LeaseStore):
    """Any other pyarrow filesystem (GCS, HDFS, ...): write, pause, read back, compare."""

    def __init__(self, fs: pafs.FileSystem, path: str, settle_s: float = _SETTLE_S):
        self.fs, self.path, self.settle_s = fs, path, settle_s
        self.where = path

    def read(self) -> tuple[bytes, str] | None:
        import pyarrow.fs as pafs

        if self.fs.get_file_info(self.path).type == pafs.FileType.NotFound:
            return None
        try:
            with self.fs.open_input_stream(self.path) as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, _bytes_version(data)

    def mtime(self) -> float:
        info = self.fs.get_file_info(self.path)
        return info.mtime.timestamp() if info.mtime is not None else time.time()

    def _write_and_check(self, data: bytes) -> str | None:
        with self.fs.open_output_stream(self.path) as out:
            out.write(data)
        time.sleep(self.settle_s)
        current = self.read()
        return current[1] if current is not None and current[0] == data else None

    def create(self, data: bytes) -> str | None:
        if self.read() is not None:
            return None
        return self._write_and_check(data)

    def replace(self, data: bytes, version: str) -> str | None:
        current = self.read()
        if current is None or current[1] != version:
            return None
        return self._write_and_check(data)

    def delete(self, version: str) -> bool:
        current = self.read()
        if current is None or current[1] != version:
            return False
        self.fs.delete_file(self.path)
        return True


def _s3_client(storage: StorageConfig | None) -> Any:
    import boto3

    endpoint = getattr(storage, "s3_endpoint_override", None)
    if endpoint and "://" not in endpoint:
        endpoint = f"{getattr(storage, 's3_scheme', None) or 'https'}://{endpoint}"
    return boto3.client("s3", endpoint_url=endpoint, region_name=getattr(storage, "s3_region", None))


def store_for(location: str, storage: StorageConfig | None) -> LeaseStore:
    import pyarrow.fs as pafs

    fs, out = filesystem(location, storage)
    if isinstance(fs, pafs.LocalFileSystem):
        return LocalStore(os.path.join(out, LEASE_FILE))
    path = posixpath.join(out, LEASE_FILE)
    if isinstance(fs, pafs.S3FileSystem):
        try:
            client = _s3_client(storage)
        except ImportError:
            if not getattr(storage, "s3_lease_without_boto3", False):
                raise LeaseStoreError(
                    "boto3 is not installed, and an S3 lease without its conditional puts lets two "
                    "racing runs both write: pip install boto3 (it is in the gpu extra), or set "
                    "storage.s3_lease_without_boto3=true to accept a lease that is written and read back"
                ) from None
            logger.warning("boto3 is not installed: the lease on %s is written and read back", location)
        else:
            bucket, _, key = path.partition("/")
            return S3Store(client, bucket, key)
    return GenericStore(fs, path)
