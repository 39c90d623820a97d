"""ImageStore: where generated images live. Local directory (default) or S3 via aioboto3.

Keys look like `{prefix}/{request_id}/{index}.png`. `put` returns only after the object is
durably written, so an `image_ready` announced afterwards is always readable.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import InvalidArgument, NotFound, Unavailable


@dataclass(frozen=True)
class StoredObject:
    uri: str
    url: str


class ImageStore:
    """Interface of both backends."""

    def uri_for(self, key: str) -> str:
        raise NotImplementedError

    async def put(self, key: str, data: bytes, metadata: dict[str, str]) -> StoredObject:
        raise NotImplementedError

    async def get(self, uri: str) -> bytes:
        raise NotImplementedError

    async def metadata(self, uri: str) -> dict[str, str]:
        raise NotImplementedError

    async def close(self) -> None:
        return None

    def owns(self, uri: str) -> bool:
        raise NotImplementedError


class LocalImageStore(ImageStore):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise InvalidArgument("key", f"{key!r} escapes the storage root")
        return path

    def uri_for(self, key: str) -> str:
        return self._path(key).as_uri()

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

    async def put(self, key: str, data: bytes, metadata: dict[str, str]) -> StoredObject:
        path = self._path(key)
        await asyncio.to_thread(_atomic_write, path, data)
        uri = path.as_uri()
        return StoredObject(uri=uri, url=uri)

    async def get(self, uri: str) -> bytes:
        path = self._uri_path(uri)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
            raise NotFound("image", uri) from None

    async def metadata(self, uri: str) -> dict[str, str]:
        from services.common.pngmeta import read_text_chunks

        return read_text_chunks(await self.get(uri))


def _atomic_write(path: Path, data: bytes) -> None:
    # Write, fsync, then rename: readers never see a partial PNG.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class S3ImageStore(ImageStore):
    """S3 (or MinIO/R2) through aioboto3. Credentials come from the standard AWS environment/config."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        presign_expiry_s: int = 3600,
    ):
        import aioboto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.presign_expiry_s = presign_expiry_s
        self._session = aioboto3.Session()
        self._client_kwargs = dict(
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
        )
        self._client = None
        self._client_cm = None
        self._lock = asyncio.Lock()

    async def _s3(self):
        async with self._lock:
            if self._client is None:
                self._client_cm = self._session.client("s3", **self._client_kwargs)
                self._client = await self._client_cm.__aenter__()
        return self._client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def owns(self, uri: str) -> bool:
        return uri.startswith(f"s3://{self.bucket}/")

    def _split(self, uri: str) -> str:
        if not self.owns(uri):
            raise NotFound("image", uri, f"this server stores images in s3://{self.bucket}/")
        return uri[len(f"s3://{self.bucket}/") :]

    async def put(self, key: str, data: bytes, metadata: dict[str, str]) -> StoredObject:
        from botocore.exceptions import BotoCoreError, ClientError

        s3 = await self._s3()
        full = self._key(key)
        # S3 metadata must be ASCII and is capped at 2 KB in all: keep what fits, quoted.
        meta = {k: urllib.parse.quote(v, safe=" ,:=()<>")[:1024] for k, v in metadata.items()}
        try:
            await s3.put_object(Bucket=self.bucket, Key=full, Body=data, ContentType="image/png", Metadata=meta)
            url = await s3.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": full}, ExpiresIn=self.presign_expiry_s
            )
        except (BotoCoreError, ClientError) as exc:
            raise Unavailable(f"storage write to s3://{self.bucket}/{full} failed: {exc}") from exc
        return StoredObject(uri=f"s3://{self.bucket}/{full}", url=url)

    async def get(self, uri: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        s3 = await self._s3()
        try:
            obj = await s3.get_object(Bucket=self.bucket, Key=self._split(uri))
            async with obj["Body"] as body:
                return await body.read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NoSuchBucket"):
                raise NotFound("image", uri) from None
            raise Unavailable(f"storage read of {uri} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise Unavailable(f"storage read of {uri} failed: {exc}") from exc

    async def metadata(self, uri: str) -> dict[str, str]:
        from botocore.exceptions import ClientError

        s3 = await self._s3()
        try:
            head = await s3.head_object(Bucket=self.bucket, Key=self._split(uri))
        except ClientError:
            raise NotFound("image", uri) from None
        return {k: urllib.parse.unquote(v) for k, v in head.get("Metadata", {}).items()}

    async def close(self) -> None:
        if self._client_cm is not None:
            await self._client_cm.__aexit__(None, None, None)
            self._client = self._client_cm = None


def open_store(
    location: str,
    endpoint_url: str | None = None,
    region: str = "us-east-1",
    presign_expiry_s: int = 3600,
) -> ImageStore:
    """`s3://bucket/prefix` -> S3ImageStore; a directory or `file:///dir` -> LocalImageStore."""
    if location.startswith("s3://"):
        bucket, _, prefix = location[len("s3://") :].partition("/")
        if len(bucket) < 3:
            raise ValueError(f"storage: bad S3 bucket in {location!r}")
        return S3ImageStore(bucket, prefix, endpoint_url, region, presign_expiry_s)
    if location.startswith("file://"):
        location = urllib.parse.unquote(urllib.parse.urlparse(location).path)
    return LocalImageStore(location)
