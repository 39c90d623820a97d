"""Runs a job's pending items: one Generate request per image, N in flight, faults retried, stoppable.

What each status means here (docs/CATALOGUE.md, "Faults"):
- RESOURCE_EXHAUSTED with a retry hint (the server's queue is full): every slot waits the hinted time
  (the `retry-after-ms` trailer, else RetryInfo), then the item is sent again; without a hint (an image
  that does not fit in memory) the item fails.
- UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED, or a stream that ended early: sent again, with backoff, up to
  `FlowControl.attempts` times. A replica that answered UNAVAILABLE rests, so the retry goes to another
  one (client/catalogue/replicas.py); the same request id makes the retry exact (the server refuses an id
  whose image is stored).
- ALREADY_EXISTS: the id's image is stored (a run stopped after the server stored it, before the index
  had it): done, recovered. With the reason REQUEST_RUNNING (a stopped run's request still finishing):
  retried.
- anything else (INVALID_ARGUMENT, NOT_FOUND, ...): the item fails with the server's reason.
`stop()` (Ctrl-C) cancels every call in flight; the server then drops their work and the job resumes later.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import logging
import random
import time
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from client.api import UpscalerClient, describe_error
from client.catalogue.plan import Item
from client.catalogue.replicas import Replicas
from productinaction.v1 import generator_pb2, upscaler_pb2
from services.common.pngmeta import read_parameters
from services.common.storage import ImageStore

log = logging.getLogger(__name__)

RETRIED = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,  # the server cancelled (drain, shutdown): ours never reach here, stop() ends first
}


@dataclass(frozen=True)
class FlowControl:
    concurrency: int = 4  # requests in flight on each replica the target names
    attempts: int = 5  # per item, for faults that a retry can fix
    backoff_s: float = 0.5  # before attempt 2; doubles
    max_wait_s: float = 900.0  # per item: how long a full queue may keep it waiting in all
    request_timeout_s: float = 900.0  # deadline of one Generate call


@dataclass(frozen=True)
class Stored:
    """An item whose image is stored."""

    item: Item
    uri: str
    url: str
    parameters: dict[str, Any]
    device: str = ""
    recovered: bool = False  # found stored, not rendered by this run
    upscaled_uri: str = ""  # rows with `upscale`: the upscaler's result, stored next to the image
    upscaled_url: str = ""
    replica: str = ""  # the generator replica (address) that rendered it


@dataclass(frozen=True)
class Failure:
    item: Item
    reason: str


@dataclass(frozen=True)
class Started:
    total: int  # items of the job (this shard)
    done: int  # already stored before this run
    pending: int


@dataclass(frozen=True)
class ImageDone:
    stored: Stored
    done: int
    total: int


@dataclass(frozen=True)
class Upscaled:
    stored: Stored


@dataclass(frozen=True)
class ItemFailed:
    failure: Failure


@dataclass(frozen=True)
class Retrying:
    item: Item
    reason: str
    delay_s: float


@dataclass(frozen=True)
class Finished:
    done: int
    failed: int
    total: int
    seconds: float
    interrupted: bool


Event = Started | ImageDone | Upscaled | ItemFailed | Retrying | Finished


@dataclass
class RunResult:
    stored: list[Stored] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    interrupted: bool = False


class _Retry(Exception):
    def __init__(self, reason: str, delay_s: float | None = None, counts: bool = True):
        super().__init__(reason)
        self.reason = reason
        self.delay_s = delay_s  # None: the runner's backoff
        self.counts = counts  # towards FlowControl.attempts (a full queue does not)


def retry_after_s(exc: grpc.aio.AioRpcError) -> float | None:
    """The server's retry hint: the `retry-after-ms` trailer, else google.rpc.RetryInfo; None without one."""
    for key, value in exc.trailing_metadata() or ():
        if key == "retry-after-ms":
            try:
                return max(0.0, int(value) / 1000)
            except (TypeError, ValueError):
                break
    for detail in _status_details(exc):
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToMilliseconds() / 1000
    return None


def error_reason(exc: grpc.aio.AioRpcError) -> str:
    """The server's google.rpc.ErrorInfo reason (ALREADY_EXISTS: REQUEST_RUNNING, REQUEST_STORED); '' if none."""
    for detail in _status_details(exc):
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


def _status_details(exc: grpc.aio.AioRpcError) -> list[Any]:
    try:
        status = rpc_status.from_call(exc)  # an aio error has the trailers from_call reads
    except Exception:
        return []
    return list(status.details) if status else []


def image_key(request_id: str) -> str:
    """The storage key of an item's image (the generator's `{request_id}/{index}.png`, num_images=1)."""
    return f"{request_id}/0.png"


def upscale_id(request_id: str) -> str:
    """The upscale's request id: its result is stored as `{request_id}/0.x{scale}.{upscale id}.png`, one per image."""
    return "up-" + hashlib.sha256(request_id.encode()).hexdigest()[:12]


def request_for(item: Item, photos: Callable[[str], bytes]) -> generator_pb2.GenerateRequest:
    row = item.row
    request = generator_pb2.GenerateRequest(
        request_id=item.request_id,
        product_id=row.product,
        template_id=item.scene,
        prompt=row.prompt,
        num_images=1,
        seed=item.seed,
        width=row.width,
        height=row.height,
    )
    for use in row.adapters:
        request.adapters.add(adapter_id=use.adapter_id, weight=use.weight)
    if row.photo is not None:
        if row.photo.is_uri:
            request.product_image.uri = row.photo.location
        else:
            request.product_image.image = photos(row.photo.location)
    return request


class Runner:
    """Sends the pending items, `flow.concurrency` at a time on each replica, and reports each outcome."""

    def __init__(
        self,
        replicas: Replicas,
        flow: FlowControl,
        report: Callable[[Event], None],
        on_stored: Callable[[Stored], None],
        store: ImageStore | None = None,
        uri_base: str = "",
        upscaler: UpscalerClient | None = None,
    ):
        self.replicas = replicas
        self.upscaler = upscaler
        self.flow = flow
        self.report = report
        self.on_stored = on_stored
        self.store = store
        # What a key's URI starts with, learned from `accepted` (its image_uris) or from the index.
        self.uri_base = uri_base
        self._resume_at = 0.0  # a full queue pauses every slot, not just the one that was told
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._photos: dict[str, bytes] = {}

    def stop(self) -> None:
        """Cancel every call in flight and send nothing more (Ctrl-C)."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()

    def _photo(self, path: str) -> bytes:
        # Read once per photo, not once per image of the row.
        if path not in self._photos:
            self._photos[path] = Path(path).read_bytes()
        return self._photos[path]

    async def run(self, pending: list[Item], total: int, to_upscale: list[Stored] | None = None) -> RunResult:
        """Render `pending` (and upscale those whose row asks); upscale `to_upscale`, stored already."""
        result = RunResult()
        done = total - len(pending)
        started = time.monotonic()
        self.report(Started(total, done, len(pending)))
        queue: deque[Item | Stored] = deque(to_upscale or [])
        queue.extend(pending)
        unresolved: list[Item] = []

        async def one(work: Item | Stored) -> None:
            nonlocal done
            if isinstance(work, Stored):
                outcome: Stored | Failure | None = work
            else:
                outcome = await self._with_retries(work, self._attempt)
                if isinstance(outcome, Stored):
                    done += 1
                    result.stored.append(outcome)
                    self.on_stored(outcome)
                    self.report(ImageDone(outcome, done, total))
                elif outcome is None:
                    unresolved.append(work)  # stored, its URI not known yet
            if isinstance(outcome, Stored) and outcome.item.row.upscale and self.upscaler is not None:
                outcome = await self._with_retries(outcome.item, functools.partial(self._upscale, outcome))
                if isinstance(outcome, Stored):
                    self.on_stored(outcome)  # the index's later line, with the upscale, wins
                    self.report(Upscaled(outcome))
            if isinstance(outcome, Failure):
                result.failed.append(outcome)
                self.report(ItemFailed(outcome))

        await self.replicas.refresh()
        running = self._tasks
        try:
            while queue or running:
                # As many items at once as the replicas take (it grows when a refresh finds more of them).
                while queue and not self._stopping and len(running) < self.replicas.capacity():
                    running.add(asyncio.create_task(one(queue.popleft())))
                if not running:
                    break
                finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                running.difference_update(finished)
                for task in finished:
                    error = None if task.cancelled() else task.exception()
                    if error is not None:
                        raise error  # e.g. the index could not be written: say so, do not finish quietly
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        for item in unresolved:
            done += 1
            stored = await self.recover(item)
            result.stored.append(stored)
            self.on_stored(stored)
            self.report(ImageDone(stored, done, total))
        result.interrupted = self._stopping
        self.report(Finished(done, len(result.failed), total, time.monotonic() - started, result.interrupted))
        return result

    async def _with_retries(
        self, item: Item, attempt_once: Callable[[Item], Awaitable[Stored | None]]
    ) -> Stored | Failure | None:
        """`attempt_once(item)` under the flow control: the outcome, or why it failed."""
        attempt, waited = 1, 0.0
        while True:
            pause = self._resume_at - time.monotonic()
            if pause > 0:
                waited += pause
                await asyncio.sleep(pause)
            try:
                return await attempt_once(item)
            except _Retry as retry:
                if retry.counts:
                    attempt += 1
                    if attempt > self.flow.attempts:
                        return Failure(item, f"{retry.reason} (after {self.flow.attempts} attempts)")
                if waited > self.flow.max_wait_s:
                    return Failure(item, f"{retry.reason} (waited {waited:.0f}s in all)")
                delay = retry.delay_s
                if delay is None:
                    delay = self.flow.backoff_s * 2 ** (attempt - 2) * random.uniform(0.8, 1.2)
                else:
                    # Everyone waits for a full queue, a little spread so they do not return at once.
                    self._resume_at = max(self._resume_at, time.monotonic() + delay * random.uniform(1.0, 1.2))
                self.report(Retrying(item, retry.reason, delay))
                if retry.delay_s is None:
                    waited += delay
                    await asyncio.sleep(delay)
            except Failed as failed:
                return Failure(item, failed.reason)

    async def _attempt(self, item: Item) -> Stored | None:
        try:
            request = request_for(item, self._photo)
        except OSError as exc:
            raise Failed(f"photo {exc.filename}: {exc.strerror or exc}") from None
        stored: Stored | None = None
        error: grpc.aio.AioRpcError | None = None
        async with self.replicas.lease() as replica:
            call = replica.client.generate(request, timeout=self.flow.request_timeout_s)
            try:
                # Read to the end (`completed`): leaving after the image would count as a cancel on the server.
                async for event in call:
                    kind = event.WhichOneof("event")
                    if kind == "accepted" and event.accepted.image_uris and not self.uri_base:
                        self._learn_base(item, event.accepted.image_uris[0])
                    elif kind == "image_ready":
                        ready = event.image_ready
                        # As the server embeds them in the PNG (server._params_dict): recovered lines read alike.
                        parameters = MessageToDict(
                            ready.parameters,
                            preserving_proto_field_name=True,
                            always_print_fields_with_no_presence=True,
                        )
                        parameters["seed"] = ready.seed  # int64 reads as a string in JSON mapping
                        stored = Stored(
                            item, ready.image.uri, ready.image.url, parameters, ready.device, replica=replica.address
                        )
            except grpc.aio.AioRpcError as exc:
                error = exc
            finally:
                call.cancel()  # a no-op once the call ended; on Ctrl-C it tells the server to drop the work
            if error is not None and error.code() == grpc.StatusCode.UNAVAILABLE and stored is None:
                self.replicas.rest(replica)
            else:
                self.replicas.answered(replica)
        if stored is not None:
            return stored  # announced only once stored: what broke afterwards changes nothing
        if error is not None:
            return await self._refused(item, error)
        raise _Retry("the stream ended without the image")

    async def _upscale(self, stored: Stored, item: Item) -> Stored:
        """Upscale a stored image (the upscaler reads it from the shared storage); create-only, one per image."""
        assert self.upscaler is not None
        request = upscaler_pb2.UpscaleRequest(uri=stored.uri, request_id=upscale_id(item.request_id))
        call = self.upscaler.upscale(request, timeout=self.flow.request_timeout_s)
        accepted_uri = ""
        upscaled: Stored | None = None
        try:
            async for event in call:  # to the end, as for Generate: leaving early reads as a cancel
                kind = event.WhichOneof("event")
                if kind == "accepted":
                    accepted_uri = event.accepted.uri
                elif kind == "image_ready":
                    image = event.image_ready.image
                    upscaled = dataclasses.replace(stored, upscaled_uri=image.uri, upscaled_url=image.url)
        except grpc.aio.AioRpcError as exc:
            if upscaled is not None:
                return upscaled
            if exc.code() == grpc.StatusCode.ALREADY_EXISTS and accepted_uri:
                # A stopped run's upscale is stored under this very key (create-only): done.
                url = accepted_uri if accepted_uri.startswith("file://") else ""
                return dataclasses.replace(stored, upscaled_uri=accepted_uri, upscaled_url=url)
            try:
                await self._refused(item, exc)
            except Failed as failed:
                raise Failed(f"upscale: {failed.reason}") from None
            except _Retry as retry:
                raise _Retry(f"upscale: {retry.reason}", retry.delay_s, retry.counts) from None
        finally:
            call.cancel()
        if upscaled is None:
            raise _Retry("upscale: the stream ended without the image")
        return upscaled

    def _learn_base(self, item: Item, uri: str) -> None:
        key = image_key(item.request_id)
        self.uri_base = uri.removesuffix(key)
        if self.store is not None and self.store.uri_for(key) != uri:
            # Then the listing misses what the generator stores (ALREADY_EXISTS still prevents a second render).
            log.warning("--storage is not where the generator stores: it stores %s at %s", key, uri)

    async def _refused(self, item: Item, exc: grpc.aio.AioRpcError) -> Stored | None:
        code = exc.code()
        reason = describe_error(exc)
        if not reason.startswith(code.name):
            reason = f"{code.name}: {reason}"  # logs and summaries are read by programs too
        if code == grpc.StatusCode.ALREADY_EXISTS:
            if error_reason(exc) == "REQUEST_RUNNING":
                raise _Retry("the same request is still running (a stopped run's)")
            return await self.recover(item) if self.store or self.uri_base else None
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            hint = retry_after_s(exc)
            if hint is not None:
                raise _Retry(reason, hint, counts=False)
        if code in RETRIED:
            raise _Retry(reason)
        raise Failed(reason)

    async def recover(self, item: Item) -> Stored:
        """An item found stored: its URI from the store or the learned base, its parameters from the PNG."""
        key = image_key(item.request_id)
        uri = self.store.uri_for(key) if self.store else (self.uri_base + key if self.uri_base else "")
        url = uri if uri.startswith("file://") else ""
        parameters: dict[str, Any] = {}
        try:
            if self.store is not None and uri:
                url = await self.store.url_for(key)  # S3: a fresh presigned URL, for the gallery
                data = await self.store.get(uri)
            elif url:
                data = await asyncio.to_thread(Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).read_bytes)
            else:
                data = b""
            parameters = read_parameters(data) if data else {}
        except Exception as exc:  # the image is stored either way; its parameters are a nicety here
            log.warning("could not read the parameters of %s: %s", uri, exc)
        return Stored(item, uri, url, parameters, recovered=True)


class Failed(Exception):
    """An item that a retry cannot fix."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
