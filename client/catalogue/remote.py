"""A job's files away from the machine that runs it: the catalogue read from `s3://` and the job folder
published to a folder or `s3://` prefix (`--publish`). The Kubernetes Job's pods keep nothing of their
own (their job folder is an emptyDir); the stored images stay the truth for resume either way.
"""

from __future__ import annotations

import contextlib
from pathlib import Path, PurePosixPath

from client.catalogue.results import JobDir
from services.common.storage import open_store

# What a job folder holds, with the content type a browser needs to open it from a bucket.
PUBLISHED = {
    "job.json": "application/json",
    "index.jsonl": "application/x-ndjson",
    "summary.json": "application/json",
    "gallery.html": "text/html; charset=utf-8",
    "images.zip": "application/zip",
}


def is_remote(location: str) -> bool:
    return location.startswith("s3://")


async def fetch_catalogue(location: str, folder: Path, endpoint_url: str | None) -> Path:
    """The catalogue at `s3://bucket/key`, copied into the job folder (as `catalogue.csv`/`.yaml`)."""
    bucket, _, key = location.removeprefix("s3://").partition("/")
    suffix = PurePosixPath(key).suffix.lower()
    if not key or suffix not in (".csv", ".yaml", ".yml"):
        raise ValueError(f"{location}: give s3://bucket/key of a .csv, .yaml or .yml catalogue")
    store = open_store(f"s3://{bucket}", endpoint_url=endpoint_url)
    try:
        data = await store.get(location)
    finally:
        await store.close()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"catalogue{suffix}"
    path.write_bytes(data)
    return path


async def publish(folder: JobDir, location: str, endpoint_url: str | None) -> list[str]:
    """Copy the job folder's files to `location` (replacing an earlier copy); their URIs."""
    store = open_store(location, endpoint_url=endpoint_url)
    uris = []
    try:
        catalogue = [p.name for p in folder.path.glob("catalogue.*")]
        for name in [*PUBLISHED, *catalogue]:
            with contextlib.suppress(FileNotFoundError):
                data = (folder.path / name).read_bytes()
                kind = PUBLISHED.get(name, "text/plain; charset=utf-8")
                uris.append((await store.put(name, data, {}, content_type=kind)).uri)
    finally:
        await store.close()
    return uris
