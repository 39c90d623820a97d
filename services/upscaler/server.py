"""The Upscaler servicer: validates a request, reads its source through the ImageStore, has the
device (or Replicate) upscale it, stores the result next to the source, then announces it.

Results are create-only under a key that names the request (`result_key`), so upscaling an image
again adds a result and never replaces an earlier one.

It translates between protobuf and domain types; queueing lives in runner.py and compute in
engine.py, on the device's worker thread.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import grpc
from PIL import Image

from productinaction.v1 import common_pb2, upscaler_pb2, upscaler_pb2_grpc
from services.common.errors import InvalidArgument, NotFound, ServiceError, Unavailable
from services.common.ids import check_id
from services.common.logs import request_id_var
from services.common.storage import ImageStore, LocalImageStore, S3ImageStore
from services.upscaler import images, metrics
from services.upscaler.messages import JobFailed, Started, TileDone, UpscaleJob, UpscaleResult
from services.upscaler.replicate_backend import SCALE as REPLICATE_SCALE
from services.upscaler.replicate_backend import ReplicateBackend
from services.upscaler.runner import DeviceRunner
from services.upscaler.settings import Backend, UpscalerSettings

BACKENDS: dict[int, Backend] = {
    upscaler_pb2.UPSCALE_BACKEND_LOCAL: "local",
    upscaler_pb2.UPSCALE_BACKEND_REPLICATE: "replicate",
}
SOURCE_SUFFIXES = (".png", ".jpg", ".jpeg")
REQUEST_OVERHEAD_BYTES = 64 * 1024  # every field but the image: a URI, an id, a few numbers


def max_request_bytes(settings: UpscalerSettings) -> int:
    """Largest request worth receiving: the largest input image plus the other fields."""
    return settings.max_input_bytes + REQUEST_OVERHEAD_BYTES


@dataclass(frozen=True)
class Plan:
    """A validated request: where the source is, where the result goes, and how to compute it."""

    request_id: str
    backend: Backend
    scale: int
    tile_size: int
    inline: bool
    result_key: str
    source_uri: str = ""
    source_bytes: bytes = b""

    @property
    def field(self) -> str:
        return "uri" if self.source_uri else "image"


def source_key(store: ImageStore, uri: str) -> str:
    """The store key of a URI this store holds; NOT_FOUND for anything outside it."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme not in ("file", "s3"):
        raise InvalidArgument("uri", f"{uri!r} is not a file:// or s3:// URI")
    if isinstance(store, LocalImageStore) and scheme == "file":
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path)).resolve()
        if path.is_relative_to(store.root) and path != store.root:
            return path.relative_to(store.root).as_posix()
    elif isinstance(store, S3ImageStore) and store.owns(uri):
        key = uri[len(f"s3://{store.bucket}/") :]
        if not store.prefix:
            return key
        if key.startswith(store.prefix + "/"):
            return key[len(store.prefix) + 1 :]
    raise NotFound("image", uri, "it is outside this server's storage")


def result_key(key: str, scale: int, request_id: str) -> str:
    """`req/0.png` upscaled x4 by request `up-1` -> `req/0.x4.up-1.png`: next to its source, one per request."""
    path = PurePosixPath(key)
    stem = path.stem if path.suffix.lower() in SOURCE_SUFFIXES else path.name
    return str(path.with_name(f"{stem}.x{scale}.{request_id}.png"))


class UpscalerService(upscaler_pb2_grpc.UpscalerServicer):
    def __init__(
        self, settings: UpscalerSettings, store: ImageStore, runner: DeviceRunner, replicate: ReplicateBackend
    ):
        self.settings = settings
        self.store = store
        self.runner = runner
        self.replicate = replicate

    # Validation

    def plan(self, request: upscaler_pb2.UpscaleRequest) -> Plan:
        s = self.settings
        # 1. Source and identity
        source = request.WhichOneof("source")
        if source is None:
            raise InvalidArgument("source", "give a uri (file:// or s3://) or the image bytes")
        if source == "uri" and not request.uri.strip():
            raise InvalidArgument("uri", "is empty")
        if source == "image" and len(request.image) > s.max_input_bytes:
            raise InvalidArgument("image", f"{len(request.image)} bytes; this server takes at most {s.max_input_bytes}")
        request_id = request.request_id or uuid.uuid4().hex[:16]
        check_id(request_id, "request_id")

        # 2. Backend and scale
        if request.backend == upscaler_pb2.UPSCALE_BACKEND_UNSPECIFIED:
            backend = s.default_backend
        elif request.backend in BACKENDS:
            backend = BACKENDS[request.backend]
        else:
            raise InvalidArgument("backend", f"unknown backend {request.backend}; use LOCAL or REPLICATE")
        if backend == "local" and not self.runner.ready:
            raise Unavailable("the model is still loading; retry shortly")
        native = self.runner.scale if backend == "local" else REPLICATE_SCALE
        scale = request.scale or native
        if scale != native:
            raise InvalidArgument("scale", f"the {backend} backend upscales x{native}; ask for {native} (or 0)")
        tile_size = request.tile_size or s.tile_size
        if not s.min_tile_size <= tile_size <= s.max_tile_size:
            raise InvalidArgument("tile_size", f"must be 0 or between {s.min_tile_size} and {s.max_tile_size}")

        # 3. Where the result goes
        if source == "uri":
            key = result_key(source_key(self.store, request.uri), scale, request_id)
            return Plan(request_id, backend, scale, tile_size, request.inline_image, key, source_uri=request.uri)
        key = f"{request_id}/upscaled.x{scale}.png"
        return Plan(request_id, backend, scale, tile_size, request.inline_image, key, source_bytes=request.image)

    async def _load_source(self, plan: Plan) -> tuple[Image.Image, dict[str, str]]:
        """Read (through the store) and decode the source: (image, its PNG text chunks)."""
        data = await self._read_uri(plan.source_uri) if plan.source_uri else plan.source_bytes
        if len(data) > self.settings.max_input_bytes:
            raise InvalidArgument(
                plan.field, f"{len(data)} bytes; this server takes at most {self.settings.max_input_bytes}"
            )
        # The header check is cheap and refuses bombs before the full decode, which runs off the loop.
        images.probe(data, self.settings.max_pixels, plan.field)
        return await asyncio.to_thread(images.decode, data, self.settings.max_pixels, plan.field)

    async def _read_uri(self, uri: str) -> bytes:
        try:
            return await self.store.get(uri)
        except OSError:
            # A folder or an unreadable file at that path: there is no image there.
            raise NotFound("image", uri, "it is not a readable file") from None

    def _provenance(self, plan: Plan, model: str, **extra: str) -> dict[str, str]:
        """PNG text linking the result to its source and saying how it was made."""
        info = {
            "request_id": plan.request_id,
            "source_uri": plan.source_uri,
            "scale": plan.scale,
            "backend": plan.backend,
            "model": model,
            **extra,
        }
        return {"upscaler": json.dumps(info, sort_keys=True), "source-uri": plan.source_uri}

    # Upscale

    async def Upscale(
        self, request: upscaler_pb2.UpscaleRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[upscaler_pb2.UpscaleEvent]:
        accepted_at = time.perf_counter()
        plan = self.plan(request)
        request_id_var.set(plan.request_id)
        if plan.backend == "replicate":
            self.replicate.token()  # FAILED_PRECONDITION before anything is read
        image, source_text = await self._load_source(plan)
        stream = self._local if plan.backend == "local" else self._replicate
        outcome = "error"
        try:
            async for event in stream(plan, image, source_text, context, accepted_at):
                yield event
            outcome = "ok"
            metrics.LATENCY.labels(plan.backend).observe(time.perf_counter() - accepted_at)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except ServiceError as exc:
            outcome = exc.code.name.lower()
            raise
        finally:
            metrics.REQUESTS.labels(plan.backend, outcome).inc()

    async def _local(
        self, plan: Plan, image: Image.Image, source_text: dict[str, str], context, accepted_at: float
    ) -> AsyncIterator[upscaler_pb2.UpscaleEvent]:
        remaining = context.time_remaining()
        job = UpscaleJob(
            request_id=plan.request_id,
            image=image,
            tile_size=plan.tile_size,
            tile_overlap=self.settings.tile_overlap,
            text={**source_text, **self._provenance(plan, self.runner.engine.model_name)},
            deadline=time.monotonic() + remaining if remaining is not None else None,
        )
        ticket = self.runner.submit(job)
        try:
            yield self._accepted(plan, self.runner.position_of(ticket))
            while True:
                msg = await ticket.events.get()
                if isinstance(msg, JobFailed):
                    raise msg.error
                if isinstance(msg, Started):
                    yield _progress(0, msg.tiles_total)
                elif isinstance(msg, TileDone):
                    yield _progress(msg.tiles_done, msg.tiles_total)
                elif isinstance(msg, UpscaleResult):
                    break
        finally:
            # Client gone, deadline passed or the stream failed: free the device and the queue slot.
            self.runner.cancel(ticket)
        started_at = ticket.started_at or accepted_at
        async for event in self._announce(plan, msg, accepted_at, started_at):
            yield event

    async def _replicate(
        self, plan: Plan, image: Image.Image, source_text: dict[str, str], context, accepted_at: float
    ) -> AsyncIterator[upscaler_pb2.UpscaleEvent]:
        self.replicate.reserve()
        try:
            yield self._accepted(plan, 0)
            yield _progress(0, 1)
            started = time.perf_counter()
            png = await asyncio.to_thread(images.to_png, image.convert("RGB"))
            output = await self.replicate.upscale(png, plan.request_id)
            s = self.settings
            model = f"replicate:{s.replicate_model}:{s.replicate_version}"
            text = {**source_text, **self._provenance(plan, model, task=s.replicate_task)}
            result = await asyncio.to_thread(self._replicate_result, plan, output, image, text, started)
            yield _progress(1, 1)
        finally:
            self.replicate.release()
        async for event in self._announce(plan, result, accepted_at, started):
            yield event

    def _replicate_result(
        self, plan: Plan, output: bytes, source: Image.Image, text: dict[str, str], started: float
    ) -> UpscaleResult:
        """Check Replicate's output, give it the source's alpha and our metadata, encode it."""
        try:
            upscaled, _ = images.decode(output, self.settings.max_pixels * REPLICATE_SCALE**2, "replicate_output")
        except InvalidArgument as exc:
            raise Unavailable(f"Replicate returned an unusable image: {exc.problem}") from None
        upscaled = images.restore_alpha(upscaled, source)
        png = images.to_png(upscaled, text)
        seconds = time.perf_counter() - started
        return UpscaleResult(plan.request_id, png, upscaled.width, upscaled.height, seconds, "replicate")

    def _accepted(self, plan: Plan, position: int) -> upscaler_pb2.UpscaleEvent:
        return upscaler_pb2.UpscaleEvent(
            accepted=upscaler_pb2.UpscaleAccepted(
                request_id=plan.request_id, uri=self.store.uri_for(plan.result_key), queue_position=position
            )
        )

    async def _announce(
        self, plan: Plan, result: UpscaleResult, accepted_at: float, started_at: float
    ) -> AsyncIterator[upscaler_pb2.UpscaleEvent]:
        """Store, then announce: an announced URI is always readable."""
        stored_at = time.perf_counter()
        metadata = {
            "source-uri": plan.source_uri,
            "request-id": plan.request_id,
            "scale": str(plan.scale),
            "backend": plan.backend,
        }
        metadata = {k: v for k, v in metadata.items() if v}
        try:
            # Create-only: a request id used again with other bytes is ALREADY_EXISTS, never a replaced result.
            obj = await self.store.put(plan.result_key, result.png, metadata, overwrite=False)
        except ServiceError:
            raise
        except Exception as exc:
            raise Unavailable(f"storage write failed: {type(exc).__name__}: {exc}") from exc
        done = time.perf_counter()
        yield upscaler_pb2.UpscaleEvent(
            image_ready=upscaler_pb2.UpscaleImageReady(
                image=common_pb2.StoredImage(
                    uri=obj.uri,
                    url=obj.url,
                    width=result.width,
                    height=result.height,
                    png=result.png if plan.inline else b"",
                ),
                source_uri=plan.source_uri,
                scale=plan.scale,
                backend=plan.backend,
            )
        )
        yield upscaler_pb2.UpscaleEvent(
            completed=upscaler_pb2.UpscaleCompleted(
                request_id=plan.request_id,
                timings=common_pb2.Timings(
                    queued_seconds=started_at - accepted_at,
                    first_image_seconds=done - accepted_at,
                    total_seconds=done - accepted_at,
                    compute_seconds=result.compute_seconds,
                    storage_seconds=done - stored_at,
                ),
            )
        )


def _progress(done: int, total: int) -> upscaler_pb2.UpscaleEvent:
    return upscaler_pb2.UpscaleEvent(progress=upscaler_pb2.UpscaleProgress(tiles_done=done, tiles_total=total))
