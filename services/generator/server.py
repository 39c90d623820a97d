"""The Generator servicer: plans requests (planning.py), hands their images to the dispatcher, stores each
finished image, then announces it.

It translates between protobuf and domain types; validation lives in planning.py, dispatch in dispatch.py,
worker processes in workers.py and compute in the workers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from productinaction.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from services.common.errors import Cancelled, DeadlineExceeded, InvalidArgument, ServiceError, Unavailable
from services.common.logs import request_id_var
from services.common.pngmeta import a1111_parameters
from services.common.storage import ImageStore
from services.generator import metrics, placement
from services.generator.catalog import Catalog
from services.generator.dispatch import Dispatcher, Ticket
from services.generator.messages import Failed, ImageResult, Progress, QueuePosition, Stored
from services.generator.planning import Plan, Planner
from services.generator.settings import GeneratorSettings

log = logging.getLogger(__name__)

INLINE_BACKLOG = 2  # unsent events beyond which a stored image's bytes are not kept for its stream


class GeneratorService(generator_pb2_grpc.GeneratorServicer):
    def __init__(
        self, settings: GeneratorSettings, catalog: Catalog, dispatcher: Dispatcher, store: ImageStore, planner: Planner
    ):
        self.settings = settings
        self.catalog = catalog
        self.dispatcher = dispatcher
        self.store = store
        self.planner = planner
        self._uploads: set[asyncio.Task[None]] = set()

    # Listing

    async def ListProducts(self, request: Any, context: Any) -> generator_pb2.ListProductsResponse:
        self.catalog.refresh()
        return generator_pb2.ListProductsResponse(
            products=[
                generator_pb2.Product(
                    id=p.id,
                    display_name=p.manifest.display_name,
                    category=p.manifest.category,
                    tokens=p.manifest.tokens,
                    prompt_phrase=p.phrase,
                    default_scale=p.manifest.default_scale,
                    description=p.manifest.description,
                    guidance_scale=p.manifest.guidance_scale,
                )
                for p in self.catalog.products.values()
            ]
        )

    async def ListTemplates(self, request: Any, context: Any) -> generator_pb2.ListTemplatesResponse:
        category = request.category
        if request.product_id:
            self.catalog.refresh()
            category = self.catalog.product(request.product_id).manifest.category
        return generator_pb2.ListTemplatesResponse(
            templates=[
                generator_pb2.Template(
                    id=t.id,
                    name=t.name,
                    scene=t.scene,
                    prompt=t.prompt,
                    negative_prompt=t.negative_prompt or "",
                    categories=t.categories,
                    free_text=t.free_text,
                    supports_placement=t.placement is not None,
                    default_placement=generator_pb2.Placement(**t.placement.box()) if t.placement else None,
                    ground_line=(t.placement.ground or 0.0) if t.placement else 0.0,
                    default_shadow=(
                        generator_pb2.Shadow(**t.placement.shadow.model_dump())
                        if t.placement and t.placement.shadow
                        else None
                    ),
                )
                for t in self.catalog.templates.for_category(category)
            ]
        )

    async def ListAdapters(self, request: Any, context: Any) -> generator_pb2.ListAdaptersResponse:
        self.catalog.refresh()
        return generator_pb2.ListAdaptersResponse(
            adapters=[
                generator_pb2.Adapter(
                    id=a.id,
                    display_name=a.manifest.display_name,
                    kind=a.manifest.kind,
                    default_weight=a.manifest.default_scale,
                    tokens=a.manifest.tokens,
                    description=a.manifest.description,
                )
                for a in self.catalog.adapters.values()
            ]
        )

    async def ComposePrompt(self, request: Any, context: Any) -> generator_pb2.ComposedPrompt:
        self.catalog.refresh()
        product = self.planner.product(request)
        template = self.planner.template(request, product)
        stacked = [self.catalog.adapter(a.adapter_id, f"adapters[{i}]") for i, a in enumerate(request.adapters)]
        composed = self.planner.compose(request, product, template, stacked)
        scene_prompt = ""
        if request.HasField("product_image"):
            backdrop = self.planner.backdrop(request, template)
            scene_prompt = self.planner.scene_prompt(request, template, stacked, backdrop)
        return generator_pb2.ComposedPrompt(
            prompt=composed.prompt, negative_prompt=composed.negative_prompt, scene_prompt=scene_prompt
        )

    async def PreviewPlacement(self, request: Any, context: Any) -> generator_pb2.PlacementPreview:
        if not request.HasField("product_image"):
            raise InvalidArgument("product_image", "is required")
        info = self.planner.model_info()
        template = self.catalog.template(request.template_id) if request.template_id else None
        width, height = self.planner.frame(request, template, info)
        placed, record = await self.planner.place(request.product_image, template, width, height)
        mask_png, preview_png = await asyncio.to_thread(placement.preview_pngs, placed)
        return generator_pb2.PlacementPreview(
            mask_png=mask_png, preview_png=preview_png, width=width, height=height, placement=record
        )

    # Generate

    async def Generate(self, request: generator_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        """Accept, then stream events as the images are stored (a coroutine, not an async generator:
        each write is bounded, so a client that stops reading cannot hold the request forever)."""
        outcome = "error"
        try:
            plan = await self.planner.plan(request)
            request_id_var.set(plan.request_id)
            await self._generate(plan, context)
            outcome = "ok"
        except asyncio.CancelledError:
            # Cancelled by grpc: the client went away, or its deadline passed.
            outcome = "deadline_exceeded" if _past_deadline(context) else "cancelled"
            raise
        except StreamStalled:
            outcome = "stalled"
            raise
        except ClientGone:
            outcome = "deadline_exceeded" if _past_deadline(context) else "cancelled"
            raise
        except ServiceError as exc:
            outcome = exc.code.name.lower()
            raise
        finally:
            metrics.REQUESTS.labels(outcome).inc()

    async def _generate(self, plan: Plan, context: grpc.aio.ServicerContext) -> None:
        metadata = _params_dict(plan.params)
        uploads = self._uploads
        ticket: Ticket | None = None

        def on_image(result: ImageResult) -> None:
            # Storage is the contract, the stream the notification: store now, whether or not anyone reads.
            assert ticket is not None  # images arrive from the event loop, after submit() returned
            task = asyncio.create_task(self._store(result, plan, ticket))
            uploads.add(task)
            task.add_done_callback(uploads.discard)

        ticket = self.dispatcher.submit(
            plan.request_id, plan.settings, plan.seeds, metadata, plan.preview_every, on_image=on_image
        )
        try:
            accepted = generator_pb2.Accepted(
                request_id=plan.request_id,
                image_uris=[self.store.uri_for(_key(plan.request_id, i)) for i in range(len(plan.seeds))],
                queue_position=self.dispatcher.position_of(ticket),
                parameters=plan.params,
            )
            await self._write(context, generator_pb2.GenerateEvent(accepted=accepted))
            await self._stream(plan, ticket, context)
        finally:
            self.dispatcher.finish(ticket)

    async def _write(self, context: grpc.aio.ServicerContext, event: generator_pb2.GenerateEvent) -> None:
        try:
            await asyncio.wait_for(context.write(event), self.settings.stall_timeout_s)
        except (asyncio.CancelledError, ServiceError):
            raise
        except TimeoutError:
            log.warning("closing the stream: the client read nothing for %gs", self.settings.stall_timeout_s)
            raise StreamStalled(
                f"the client read nothing for {self.settings.stall_timeout_s:g}s; stream closed "
                "(images already rendered are stored at the accepted URIs)"
            ) from None
        except Exception as exc:
            # grpc refuses writes to a call its client has left (ExecuteBatchError): not a server fault.
            raise ClientGone(f"the client left the stream ({type(exc).__name__})") from None

    async def _stream(self, plan: Plan, ticket: Ticket, context: grpc.aio.ServicerContext) -> None:
        stored = 0
        storage_seconds = 0.0
        first_image_at: float | None = None
        while stored < len(plan.seeds):
            msg = await ticket.events.get()
            if isinstance(msg, Failed):
                raise msg.error
            if isinstance(msg, QueuePosition):
                await self._write(
                    context, generator_pb2.GenerateEvent(queued=generator_pb2.Queued(queue_position=msg.position))
                )
            elif isinstance(msg, Progress):
                for n, index in enumerate(msg.indices):
                    preview = msg.previews[n] if n < len(msg.previews) else b""
                    progress = generator_pb2.Progress(
                        index=index, step=msg.step, total_steps=msg.total_steps, preview_png=preview
                    )
                    await self._write(context, generator_pb2.GenerateEvent(progress=progress))
            elif isinstance(msg, Stored):
                stored += 1
                storage_seconds += msg.storage_seconds
                if first_image_at is None:
                    first_image_at = time.perf_counter()
                    metrics.FIRST_IMAGE_LATENCY.observe(first_image_at - ticket.accepted_at)
                png = msg.result.png
                if plan.inline and not png:
                    png = await self.store.get(msg.uri)  # set aside while the client lagged: read it back
                await self._write(context, generator_pb2.GenerateEvent(image_ready=_image_ready(plan, msg, png)))
        done = time.perf_counter()
        metrics.REQUEST_LATENCY.observe(done - ticket.accepted_at)
        completed = generator_pb2.Completed(
            request_id=plan.request_id,
            num_images=stored,
            timings=common_pb2.Timings(
                queued_seconds=(ticket.started_at or done) - ticket.accepted_at,
                first_image_seconds=(first_image_at or done) - ticket.accepted_at,
                total_seconds=done - ticket.accepted_at,
                compute_seconds=ticket.compute_seconds,
                storage_seconds=storage_seconds,
            ),
        )
        await self._write(context, generator_pb2.GenerateEvent(completed=completed))

    async def _store(self, result: ImageResult, plan: Plan, ticket: Ticket) -> None:
        """Store one image (create-only: never over another), then tell the stream: Stored or Failed."""
        started = time.perf_counter()
        try:
            obj = await self.store.put(
                _key(plan.request_id, result.index), result.png, _s3_metadata(plan, result), overwrite=False
            )
        except ServiceError as exc:
            ticket.events.put_nowait(Failed(exc))
            return
        except Exception as exc:
            ticket.events.put_nowait(Failed(Unavailable(f"storage write failed: {type(exc).__name__}: {exc}")))
            return
        if not plan.inline or len(ticket.events) > INLINE_BACKLOG:
            # Stored: a stream that is behind need not hold the bytes; it reads them back when it sends.
            result = dataclasses.replace(result, png=b"")
        ticket.events.put_nowait(Stored(result, obj.uri, obj.url, time.perf_counter() - started))

    async def close(self, timeout: float = 5.0) -> None:
        """Let writes already under way finish (each is bounded by the storage limits anyway)."""
        if self._uploads:
            await asyncio.wait(set(self._uploads), timeout=timeout)


class StreamStalled(DeadlineExceeded):
    """The client stopped reading its stream for longer than the stall timeout."""


class ClientGone(Cancelled):
    """The client cancelled or disconnected while the stream was being written."""


def _past_deadline(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0.05


def _image_ready(plan: Plan, msg: Stored, png: bytes) -> generator_pb2.ImageReady:
    result = msg.result
    params = generator_pb2.GenerationParameters()
    params.CopyFrom(plan.params)
    params.seed = result.seed
    return generator_pb2.ImageReady(
        index=result.index,
        seed=result.seed,
        image=common_pb2.StoredImage(
            uri=msg.uri, url=msg.url, width=result.width, height=result.height, png=png if plan.inline else b""
        ),
        parameters=params,
        device=result.device,
    )


def _key(request_id: str, index: int) -> str:
    return f"{request_id}/{index}.png"


def _params_dict(params: generator_pb2.GenerationParameters) -> dict[str, Any]:
    return MessageToDict(params, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _s3_metadata(plan: Plan, result: ImageResult) -> dict[str, str]:
    params = {**_params_dict(plan.params), "seed": result.seed}
    return {
        "parameters": a1111_parameters(params),
        "request-id": plan.request_id,
        "index": str(result.index),
        "seed": str(result.seed),
        "product-id": plan.params.product_id,
    }
