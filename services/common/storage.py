"""ImageStore: where generated images live. Local directory (default) or S3 via aioboto3.

Keys look like `{prefix}/{request_id}/{index}.png`. `put` returns only after the object is
durably written, so an `image_ready` announced afterwards is always readable. `put(...,
overwrite=False)` never replaces an existing object (both services' images are create-only).
`list(prefix)` yields the stored keys under a prefix, so that a job can resume from what is stored.

Every call is bounded (`StorageLimits`): a timeout per attempt, a few attempts with backoff, and
one deadline for them all; a listing is bounded page by page. A store that fails or never answers
becomes UNAVAILABLE naming the storage, a log line and `pia_storage_failures_total`, never a
request that hangs.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import random
import tempfile
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge

from services.common.errors import AlreadyExists, InvalidArgument, NotFound, ServiceError, Unavailable
from services.common.pngmeta import read_text_chunks

log = logging.getLogger(__name__)
T = TypeVar("T")

FAILURES = Counter("pia_storage_failures_total", "Storage calls that failed after all their attempts.", ["operation"])
RETRIES = Counter("pia_storage_retries_total", "Storage attempts that failed and were retried.", ["operation"])
HEALTHY = Gauge("pia_storage_ok", "1 if the last storage call succeeded, 0 if it failed.")

TMP_PREFIX = ".tmp-"  # a local write in progress (never a key: ids start with a letter or digit)


@dataclass(frozen=True)
class StorageLimits:
    """Bounds of every storage call."""

    timeout_s: float = 5.0  # one attempt: connect, send and answer
    deadline_s: float = 15.0  # all attempts of one call, backoff included
    attempts: int = 3
    backoff_s: float = 0.25  # before attempt 2; doubles, with jitter


class _Permanent(Exception):
    """A failure that a retry cannot fix (refused, not found, already exists)."""

    def __init__(self, error: ServiceError):
        super().__init__(error.message)
        self.error = error


@dataclass(frozen=True)
class StoredObject:
    uri: str
    url: str


class ImageStore(ABC):
    """Interface of both backends; `_bounded` is the limit every call of theirs runs under."""

    name: str = "storage"
    limits: StorageLimits = StorageLimits()

    async def _bounded(self, operation: str, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """`call()` with a timeout per attempt, retries with backoff, and one overall deadline."""
        limits = self.limits
        deadline = time.monotonic() + limits.deadline_s
        problem = "no attempt made"
        for attempt in range(1, limits.attempts + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                result = await asyncio.wait_for(call(), min(limits.timeout_s, remaining))
            except _Permanent as exc:
                HEALTHY.set(1)  # the storage answered
                raise exc.error from None
            except TimeoutError:
                problem = f"no answer within {min(limits.timeout_s, remaining):.1f}s"
            except ServiceError:
                raise
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                HEALTHY.set(1)
                return result
            if attempt < limits.attempts:
                RETRIES.labels(operation).inc()
                pause = limits.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
                await asyncio.sleep(max(0.0, min(pause, deadline - time.monotonic())))
        FAILURES.labels(operation).inc()
        HEALTHY.set(0)
        log.error(
            "storage %s of %s failed: %s (%d attempts, %.0fs limit)",
            operation,
            what,
            problem,
            attempt,
            limits.deadline_s,
        )
        raise Unavailable(f"storage {self.name} failed to {operation} {what}: {problem}")

    @abstractmethod
    def uri_for(self, key: str) -> str:
        """The URI `key` has (or will have) in this store."""

    @abstractmethod
    async def url_for(self, key: str) -> str:
        """A URL a browser can fetch `key` from now (S3: presigned, for the store's expiry)."""

    @abstractmethod
    def owns(self, uri: str) -> bool:
        """Whether `uri` points into this kind of store (not whether the object exists)."""

    @abstractmethod
    async def put(
        self,
        key: str,
        data: bytes,
        metadata: dict[str, str],
        *,
        overwrite: bool = True,
        content_type: str = "image/png",
    ) -> StoredObject:
        """Store `data` durably under `key`. overwrite=False: create-only, ALREADY_EXISTS if `key` holds other bytes."""

    @abstractmethod
    async def exists(self, prefix: str) -> bool:
        """Whether any object's key starts with `prefix`."""

    @abstractmethod
    def list(self, prefix: str) -> AsyncIterator[str]:
        """The keys that start with `prefix`, in order (an async generator)."""

    @abstractmethod
    async def get(self, uri: str) -> bytes:
        """The bytes at `uri`; NOT_FOUND when there are none."""

    @abstractmethod
    async def metadata(self, uri: str) -> dict[str, str]:
        """The text metadata stored with the object at `uri`."""

    async def close(self) -> None:
        return None


class LocalImageStore(ImageStore):
    def __init__(self, root: str | Path, limits: StorageLimits | None = None):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.name = str(self.root)
        self.limits = limits or StorageLimits()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise InvalidArgument("key", f"{key!r} escapes the storage root")
        return path

    def uri_for(self, key: str) -> str:
        return self._path(key).as_uri()

    async def url_for(self, key: str) -> str:
        return self.uri_for(key)  # as put() answers: the web page and the gallery read file:// URLs

    def owns(self, uri: str) -> bool:
        return uri.startswith("file://")

    def _uri_path(self, uri: str) -> Path:
        parsed = urllib.parse.urlparse(uri)
        if parsed.scheme != "file":
            raise InvalidArgument("uri", f"{uri!r} is not a file:// URI")
        path = Path(urllib.parse.unquote(parsed.path)).resolve()
        if not path.is_relative_to(self.root):
            raise NotFound("image", uri, "it is outside this server's storage")
        return path

    async def put(
        self,
        key: str,
        data: bytes,
        metadata: dict[str, str],
        *,
        overwrite: bool = True,
        content_type: str = "image/png",
    ) -> StoredObject:
        path = self._path(key)

        async def write() -> None:
            try:
                await asyncio.to_thread(_atomic_write, path, data, overwrite)
            except FileExistsError:
                # An earlier attempt of this very put may have finished after its timeout.
                if await asyncio.to_thread(path.read_bytes) != data:
                    raise _Permanent(
                        AlreadyExists(f"{key!r} is already stored; images are never overwritten", "OBJECT_STORED")
                    ) from None

        # A local disk that hangs (a stuck network mount) is bounded too; the thread is left behind.
        await self._bounded("write", key, write)
        uri = path.as_uri()
        return StoredObject(uri=uri, url=uri)

    async def exists(self, prefix: str) -> bool:
        path = self._path(prefix.rstrip("/"))
        # A stuck mount hangs a stat as surely as a write: bounded like every other call.
        return await self._bounded("list", prefix, lambda: asyncio.to_thread(_local_exists, path, prefix.endswith("/")))

    async def list(self, prefix: str) -> AsyncIterator[str]:
        # One bounded call walks the folder the prefix ends in: a local disk has no pages.
        folder = self._path(prefix.rpartition("/")[0])
        keys = await self._bounded("list", prefix, lambda: asyncio.to_thread(_local_keys, self.root, folder, prefix))
        for key in keys:
            yield key

    async def get(self, uri: str) -> bytes:
        path = self._uri_path(uri)

        async def read() -> bytes:
            try:
                return await asyncio.to_thread(path.read_bytes)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
                raise _Permanent(NotFound("image", uri)) from None

        return await self._bounded("read", uri, read)

    async def metadata(self, uri: str) -> dict[str, str]:
        return read_text_chunks(await self.get(uri))


def _local_exists(path: Path, folder: bool) -> bool:
    """`path` exists; for a folder (a prefix ending in "/"), it holds something."""
    if folder:
        return path.is_dir() and any(path.iterdir())
    return path.exists()


def _local_keys(root: Path, folder: Path, prefix: str) -> list[str]:
    """Keys below `folder` that start with `prefix`, sorted as S3 lists them; writes in progress left out."""
    keys = []
    for dirpath, dirs, files in os.walk(folder):
        here = Path(dirpath).relative_to(root).as_posix()
        base = "" if here == "." else here + "/"
        dirs[:] = [d for d in dirs if (base + d + "/").startswith(prefix) or prefix.startswith(base + d + "/")]
        keys += [base + f for f in files if not f.startswith(TMP_PREFIX) and (base + f).startswith(prefix)]
    return sorted(keys)


def _atomic_write(path: Path, data: bytes, overwrite: bool = True) -> None:
    # Write, fsync, then rename: readers never see a partial PNG. Without overwrite, link instead
    # of rename: it fails if the name exists, atomically, so two writers never replace each other.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


class S3ImageStore(ImageStore):
    """S3 (or MinIO/R2) through aioboto3. Credentials come from the standard AWS environment/config."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        presign_expiry_s: int = 3600,
        limits: StorageLimits | None = None,
        page_size: int = 1000,
    ):
        # aioboto3 takes ~0.4 s to import: only a service that stores to S3 pays for it.
        import aioboto3
        from botocore.config import Config  # botocore comes with aioboto3: S3 only, as above

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.presign_expiry_s = presign_expiry_s
        self.limits = limits or StorageLimits()
        self.page_size = page_size  # keys per list call (S3's own cap is 1000)
        self.name = f"s3://{bucket}" + (f" at {endpoint_url}" if endpoint_url else "")
        self._session = aioboto3.Session()
        self._client_kwargs = dict(
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                connect_timeout=self.limits.timeout_s,
                read_timeout=self.limits.timeout_s,
                retries={"total_max_attempts": 1},  # _bounded retries, under one deadline
            ),
        )
        self._client: Any = None
        self._client_cm: Any = None
        self._lock = asyncio.Lock()

    async def _s3(self) -> Any:
        async with self._lock:
            if self._client is None:
                from botocore.handlers import add_expect_header  # botocore comes with aioboto3: S3 only

                self._client_cm = self._session.client("s3", **self._client_kwargs)
                self._client = await self._client_cm.__aenter__()
                # "Expect: 100-continue" waits for the server's go-ahead with no timeout of its own: an
                # endpoint that accepts connections but never answers held a put for over 400 s.
                self._client.meta.events.unregister("before-call.s3", add_expect_header)
        return self._client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _unkey(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def owns(self, uri: str) -> bool:
        return uri.startswith(f"s3://{self.bucket}/")

    async def url_for(self, key: str) -> str:
        # Signed locally (no request to S3): nothing to bound.
        s3 = await self._s3()
        return await s3.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=self.presign_expiry_s
        )

    def _split(self, uri: str) -> str:
        if not self.owns(uri):
            raise NotFound("image", uri, f"this server stores images in s3://{self.bucket}/")
        return uri[len(f"s3://{self.bucket}/") :]

    async def put(
        self,
        key: str,
        data: bytes,
        metadata: dict[str, str],
        *,
        overwrite: bool = True,
        content_type: str = "image/png",
    ) -> StoredObject:
        full = self._key(key)
        # S3 metadata must be ASCII and is capped at 2 KB in all: keep what fits, quoted.
        meta = {k: urllib.parse.quote(v, safe=" ,:=()<>")[:1024] for k, v in metadata.items()}
        # Create-only: S3 refuses the write (412) if the key exists, atomically.
        condition = {} if overwrite else {"IfNoneMatch": "*"}

        async def write() -> str:
            s3 = await self._s3()
            try:
                await s3.put_object(
                    Bucket=self.bucket, Key=full, Body=data, ContentType=content_type, Metadata=meta, **condition
                )
            except s3.exceptions.ClientError as exc:
                code = _error_code(exc)
                if code in ("AccessDenied", "NoSuchBucket", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                    raise _Permanent(Unavailable(f"storage {self.name} refused to write {full}: {code}")) from None
                if code not in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                    raise
                # An earlier attempt of this very put may have finished after its timeout.
                if not await self._holds(s3, full, data):
                    raise _Permanent(
                        AlreadyExists(f"{key!r} is already stored; images are never overwritten", "OBJECT_STORED")
                    ) from None
            return await s3.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": full}, ExpiresIn=self.presign_expiry_s
            )

        url = await self._bounded("write", full, write)
        return StoredObject(uri=f"s3://{self.bucket}/{full}", url=url)

    async def _holds(self, s3: Any, key: str, data: bytes) -> bool:
        """Whether `key` holds exactly `data` (a single-part upload's ETag is its MD5)."""
        head = await s3.head_object(Bucket=self.bucket, Key=key)
        return head.get("ETag", "").strip('"') == hashlib.md5(data, usedforsecurity=False).hexdigest()

    async def exists(self, prefix: str) -> bool:
        async def listing() -> bool:
            s3 = await self._s3()
            reply = await s3.list_objects_v2(Bucket=self.bucket, Prefix=self._key(prefix), MaxKeys=1)
            return reply.get("KeyCount", 0) > 0

        return await self._bounded("list", self._key(prefix), listing)

    async def list(self, prefix: str) -> AsyncIterator[str]:
        full = self._key(prefix)
        params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full, "MaxKeys": self.page_size}
        while True:
            reply = await self._bounded("list", full, functools.partial(self._list_page, params))
            for item in reply.get("Contents", []):
                yield self._unkey(item["Key"])
            if not reply.get("IsTruncated"):
                return
            params = {**params, "ContinuationToken": reply["NextContinuationToken"]}

    async def _list_page(self, params: dict[str, Any]) -> dict[str, Any]:
        s3 = await self._s3()
        return await s3.list_objects_v2(**params)

    async def get(self, uri: str) -> bytes:
        key = self._split(uri)

        async def read() -> bytes:
            s3 = await self._s3()
            try:
                obj = await s3.get_object(Bucket=self.bucket, Key=key)
                async with obj["Body"] as body:
                    return await body.read()
            except s3.exceptions.ClientError as exc:
                if _error_code(exc) in ("NoSuchKey", "404", "NoSuchBucket"):
                    raise _Permanent(NotFound("image", uri)) from None
                raise

        return await self._bounded("read", uri, read)

    async def metadata(self, uri: str) -> dict[str, str]:
        key = self._split(uri)

        async def head() -> dict[str, Any]:
            s3 = await self._s3()
            try:
                return await s3.head_object(Bucket=self.bucket, Key=key)
            except s3.exceptions.ClientError as exc:
                if _error_code(exc) in ("NoSuchKey", "404", "NoSuchBucket", "403"):
                    raise _Permanent(NotFound("image", uri)) from None
                raise

        reply = await self._bounded("read", uri, head)
        return {k: urllib.parse.unquote(v) for k, v in reply.get("Metadata", {}).items()}

    async def close(self) -> None:
        if self._client_cm is not None:
            await self._client_cm.__aexit__(None, None, None)
            self._client = self._client_cm = None


def _error_code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def open_store(
    location: str,
    endpoint_url: str | None = None,
    region: str = "us-east-1",
    presign_expiry_s: int = 3600,
    limits: StorageLimits | None = None,
) -> ImageStore:
    """`s3://bucket/prefix` -> S3ImageStore; a directory or `file:///dir` -> LocalImageStore."""
    if location.startswith("s3://"):
        bucket, _, prefix = location[len("s3://") :].partition("/")
        if len(bucket) < 3:
            raise ValueError(f"storage: bad S3 bucket in {location!r}")
        return S3ImageStore(bucket, prefix, endpoint_url, region, presign_expiry_s, limits)
    if location.startswith("file://"):
        location = urllib.parse.unquote(urllib.parse.urlparse(location).path)
    return LocalImageStore(location, limits)
