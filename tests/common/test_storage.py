"""ImageStore on both backends: listing what is stored under a prefix (a local folder, and real S3
through SeaweedFS, page by page), and every call bounded, exists() and list() included."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import pytest

from services.common import storage
from services.common.errors import InvalidArgument, Unavailable

KEYS = ["job-1/0.png", "job-1/1.png", "job-1/sub/2.png", "job-10/0.png", "job-2/0.png", "job-2/1.png"]
FAST = storage.StorageLimits(timeout_s=0.2, deadline_s=0.5, attempts=2, backoff_s=0.01)


@pytest.fixture(params=["local", "s3"])
async def store(request, tmp_path) -> AsyncIterator[storage.ImageStore]:
    """A store holding KEYS: a local folder, or a fresh prefix of the session's bucket listed 2 keys a page."""
    if request.param == "local":
        store: storage.ImageStore = storage.LocalImageStore(tmp_path)
    else:
        s3_bucket, s3_server = request.getfixturevalue("s3_bucket"), request.getfixturevalue("s3_server")
        store = storage.S3ImageStore(s3_bucket, f"list-{uuid.uuid4().hex[:8]}", s3_server.endpoint, page_size=2)
    for key in KEYS:
        await store.put(key, key.encode(), {})
    yield store
    await store.close()


async def _listed(store: storage.ImageStore, prefix: str) -> list[str]:
    return [key async for key in store.list(prefix)]


async def test_list_yields_the_keys_under_a_prefix_in_order(store):
    assert await _listed(store, "job-1/") == ["job-1/0.png", "job-1/1.png", "job-1/sub/2.png"]
    assert await _listed(store, "job-1") == ["job-1/0.png", "job-1/1.png", "job-1/sub/2.png", "job-10/0.png"]
    assert await _listed(store, "job-2/1") == ["job-2/1.png"]
    assert await _listed(store, "") == sorted(KEYS)  # six keys: three pages on S3
    assert await _listed(store, "job-3/") == []
    assert await _listed(store, "nothing-here") == []


async def test_listed_keys_read_back(store):
    for key in [key async for key in store.list("job-")]:
        assert await store.get(store.uri_for(key)) == key.encode()


async def test_s3_list_stays_inside_its_prefix(s3_bucket, s3_server):
    """A neighbour prefix that starts the same (`p` and `p-other`) never shows up."""
    prefix = f"list-{uuid.uuid4().hex[:8]}"
    mine = storage.S3ImageStore(s3_bucket, prefix, s3_server.endpoint, page_size=1)
    other = storage.S3ImageStore(s3_bucket, f"{prefix}-other", s3_server.endpoint)
    try:
        await mine.put("a/0.png", b"mine", {})
        await other.put("a/0.png", b"other", {})
        assert await _listed(mine, "") == ["a/0.png"]
        assert await _listed(other, "a/") == ["a/0.png"]
    finally:
        await mine.close()
        await other.close()


async def test_local_list_leaves_out_writes_in_progress_and_refuses_escapes(tmp_path):
    store = storage.LocalImageStore(tmp_path)
    await store.put("job/0.png", b"done", {})
    (tmp_path / "job" / f"{storage.TMP_PREFIX}abc").write_bytes(b"half")
    assert await _listed(store, "job/") == ["job/0.png"]
    with pytest.raises(InvalidArgument):
        await _listed(store, "../")


def _stuck(*_args) -> None:
    time.sleep(1.5)  # a stuck network mount: the thread is left behind, the caller is not


@pytest.mark.parametrize("call", ["exists-key", "exists-folder", "list"])
async def test_local_lookups_that_hang_are_bounded(tmp_path, monkeypatch, call):
    monkeypatch.setattr(storage, "_local_exists", _stuck)
    monkeypatch.setattr(storage, "_local_keys", _stuck)
    store = storage.LocalImageStore(tmp_path, FAST)
    started = time.monotonic()
    with pytest.raises(Unavailable, match=f"storage {tmp_path} failed to list"):
        if call == "exists-key":
            await store.exists("job/0.png")
        elif call == "exists-folder":
            await store.exists("job/")
        else:
            await _listed(store, "job/")
    assert time.monotonic() - started < 1.0  # the deadline (0.5 s), not the stuck call (1.5 s)


async def test_exists_answers_as_before(tmp_path):
    store = storage.LocalImageStore(tmp_path)
    await store.put("job/0.png", b"x", {})
    (tmp_path / "empty").mkdir()
    assert await store.exists("job/") and await store.exists("job/0.png")
    assert not await store.exists("empty/") and not await store.exists("nope/") and not await store.exists("job/1.png")


async def test_both_backends_are_image_stores_with_a_keyword_only_overwrite(tmp_path):
    import inspect

    with pytest.raises(TypeError):
        storage.ImageStore()  # type: ignore[abstract]  # the interface itself cannot be instantiated
    for backend in (storage.LocalImageStore, storage.S3ImageStore):
        parameter = inspect.signature(backend.put).parameters["overwrite"]
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default is True
