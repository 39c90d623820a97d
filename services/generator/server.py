"""The Generator servicer: validates requests, composes prompts, hands images to the
scheduler, stores each finished image, then announces it.

It translates between protobuf and domain types; scheduling lives in scheduler.py and
compute in the workers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import secrets
import time
import uuid
from dataclasses import dataclass

import grpc
from google.protobuf.json_format import ParseDict

from productinaction.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from services.common.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    ServiceError,
    Unavailable,
)
from services.common.ids import check_id
from services.common.logs import request_id_var
from services.common.storage import ImageStore
from services.generator import metrics, placement
from services.generator.catalog import Catalog, Entry, Template, compose_prompt, compose_scene_prompt
from services.generator.messages import (
    SCHEDULERS,
    Failed,
    ImageResult,
    Progress,
    QueuePosition,
    RenderSettings,
    Stored,
)
from services.generator.scheduler import Scheduler, Ticket
from services.generator.settings import GeneratorSettings

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 2000
PIPELINE_SIZE_MULTIPLE = 8
INLINE_BACKLOG = 2  # unsent events beyond which a stored image's bytes are not kept for its stream
MAX_SEED = 2**63 - 1
MIN_SIDE = 16
MAX_WEIGHT = 4.0


@dataclass(frozen=True)
class Plan:
    """A validated request: what to render and how to report it."""

    request_id: str
    settings: RenderSettings
    seeds: list[int]
    params: generator_pb2.GenerationParameters
    preview_every: int
    inline: bool


def _finite(field: str, value: float, low: float, high: float) -> float:
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidArgument(field, f"must be a number in [{low:g}, {high:g}], got {value}")
    return value


class GeneratorService(generator_pb2_grpc.GeneratorServicer):
    def __init__(self, settings: GeneratorSettings, catalog: Catalog, scheduler: Scheduler, store: ImageStore):
        self.settings = settings
        self.catalog = catalog
        self.scheduler = scheduler
        self.store = store
        self._uploads: set[asyncio.Task] = set()

    # Listing

    async def ListProducts(self, request, context) -> generator_pb2.ListProductsResponse:
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
                )
                for p in self.catalog.products.values()
            ]
        )

    async def ListTemplates(self, request, context) -> generator_pb2.ListTemplatesResponse:
        category = request.category
        if request.product_id:
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

    async def ListAdapters(self, request, context) -> generator_pb2.ListAdaptersResponse:
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

    async def ComposePrompt(self, request, context) -> generator_pb2.ComposedPrompt:
        product = self._product(request)
        template = self.catalog.template(request.template_id) if request.template_id else None
        stacked = [self.catalog.adapter(a.adapter_id, f"adapters[{i}]") for i, a in enumerate(request.adapters)]
        composed = self._compose(request, product, template, stacked)
        return generator_pb2.ComposedPrompt(prompt=composed.prompt, negative_prompt=composed.negative_prompt)

    # Validation

    def _product(self, request) -> Entry | None:
        # Placement mode: the product's adapter is optional ("instead of, or together with" the photo).
        if request.HasField("product_image") and not request.product_id:
            return None
        return self.catalog.product(request.product_id)

    def _compose(self, request, product: Entry | None, template: Template | None, stacked: list[Entry]):
        if len(request.prompt) > MAX_PROMPT_CHARS:
            raise InvalidArgument("prompt", f"longer than {MAX_PROMPT_CHARS} characters")
        if not template and not request.prompt.strip():
            raise InvalidArgument("prompt", "give a template_id, a prompt, or both")
        if template and template.free_text and not request.prompt.strip():
            # Read by people (the web page shows it as is): the scene's name, not its id.
            raise InvalidArgument("prompt", f"describe the scene for {template.name or template.id!r}")
        negative = request.negative_prompt if request.HasField("negative_prompt") else None
        if negative is not None and len(negative) > MAX_PROMPT_CHARS:
            raise InvalidArgument("negative_prompt", f"longer than {MAX_PROMPT_CHARS} characters")
        extra = [t for a in stacked for t in a.manifest.tokens]
        return compose_prompt(product, template, request.prompt, negative, self.catalog.templates.defaults, extra)

    def _frame(self, request, template: Template | None) -> tuple[int, int]:
        """Image width and height: the request's, else the template's, else the model's."""
        s = self.settings
        info = self.scheduler.model_info
        if info is None:
            raise Unavailable("the model is still loading; retry when health reports SERVING")
        # diffusers' pipelines refuse sizes that are not multiples of 8, whatever the VAE's factor.
        multiple = math.lcm(info.size_multiple, PIPELINE_SIZE_MULTIPLE)
        native = s.default_size or info.default_size
        width = request.width or (template.width if template and template.width else native)
        height = request.height or (template.height if template and template.height else native)
        for name, value in (("width", width), ("height", height)):
            if value < MIN_SIDE or value % multiple:
                raise InvalidArgument(name, f"must be a multiple of {multiple} and at least {MIN_SIDE}, got {value}")
        if width * height > s.max_pixels:
            raise InvalidArgument("width", f"{width}x{height} exceeds the {s.max_pixels}-pixel limit")
        return width, height

    def plan(self, request: generator_pb2.GenerateRequest) -> Plan:
        s = self.settings
        # 1. Identity and catalog lookups
        request_id = check_id(request.request_id or uuid.uuid4().hex[:16], "request_id")
        info = self.scheduler.model_info
        if info is None:
            # Defaults come from the model, which no worker has reported yet: never guess them.
            raise Unavailable("the model is still loading; retry when health reports SERVING")
        product = self._product(request)
        template = self.catalog.template(request.template_id) if request.template_id else None

        # 2. Numbers
        if not 1 <= request.num_images <= s.max_images:
            raise InvalidArgument("num_images", f"must be between 1 and {s.max_images}, got {request.num_images}")
        steps = request.steps or (template.steps if template and template.steps else s.default_steps)
        if not 1 <= steps <= s.max_steps:
            raise InvalidArgument("steps", f"must be between 1 and {s.max_steps}, got {steps}")
        if request.HasField("guidance_scale"):
            guidance = _finite("guidance_scale", request.guidance_scale, 0.0, 50.0)
        else:
            guidance = template.guidance_scale if template and template.guidance_scale else s.default_guidance
        width, height = self._frame(request, template)
        if request.scheduler and request.scheduler not in SCHEDULERS:
            raise InvalidArgument("scheduler", f"unknown {request.scheduler!r}; known: {', '.join(SCHEDULERS)}")
        if request.preview_every > s.max_steps:
            raise InvalidArgument("preview_every", f"must be at most {s.max_steps}")
        if request.HasField("seed"):
            if not 0 <= request.seed <= MAX_SEED - (request.num_images - 1):
                raise InvalidArgument("seed", f"must be in [0, 2^63 - num_images], got {request.seed}")
            seed0 = request.seed
        else:
            seed0 = secrets.randbelow(2**32)
        seeds = [seed0 + i for i in range(request.num_images)]

        # 3. Adapters: the product's first, then the stacked ones
        if request.HasField("product_scale"):
            product_scale = _finite("product_scale", request.product_scale, -MAX_WEIGHT, MAX_WEIGHT)
        else:
            product_scale = product.manifest.default_scale if product else 0.0
        stacked: list[Entry] = []
        specs = [product.spec(product_scale)] if product else []
        weights: list[generator_pb2.AdapterWeight] = []
        if len(request.adapters) >= s.adapter_cache_size:
            raise InvalidArgument("adapters", f"at most {s.adapter_cache_size - 1} adapters can be stacked")
        for i, aw in enumerate(request.adapters):
            field = f"adapters[{i}]"
            entry = self.catalog.adapter(aw.adapter_id, field)
            if entry.id in (a.id for a in stacked):
                raise InvalidArgument(f"{field}.adapter_id", f"{entry.id!r} is listed twice")
            weight = _finite(f"{field}.weight", aw.weight, -MAX_WEIGHT, MAX_WEIGHT) or entry.manifest.default_scale
            stacked.append(entry)
            specs.append(entry.spec(weight))
            weights.append(generator_pb2.AdapterWeight(adapter_id=entry.id, weight=weight))

        # 4. Prompt
        composed = self._compose(request, product, template, stacked)
        render = RenderSettings(
            prompt=composed.prompt,
            negative_prompt=composed.negative_prompt,
            steps=steps,
            guidance_scale=float(guidance),
            width=width,
            height=height,
            scheduler=request.scheduler,
            adapters=tuple(specs),
            scene_only_styles=s.scene_only_styles,
        )
        params = generator_pb2.GenerationParameters(
            product_id=product.id if product else "",
            template_id=request.template_id,
            prompt=composed.prompt,
            negative_prompt=composed.negative_prompt,
            seed=seed0,
            steps=steps,
            guidance_scale=guidance,
            width=width,
            height=height,
            scheduler=request.scheduler,
            product_scale=product_scale,
            adapters=weights,
            model=s.model,
            user_prompt=request.prompt,
        )
        return Plan(request_id, render, seeds, params, request.preview_every, request.inline_images)

    # Placement mode (services/generator/placement.py)

    async def _placed(self, message, template: Template | None, width: int, height: int):
        if template is not None and template.placement is None:
            raise InvalidArgument("template_id", f"template {template.id!r} does not suit placement mode")
        default = template.placement if template else self.catalog.templates.defaults.placement
        return await placement.from_request(
            message,
            self.store,
            width=width,
            height=height,
            default=placement.Placement(**default.box()) if default else None,
            max_bytes=self.settings.max_product_bytes,
            max_pixels=self.settings.max_product_pixels,
            ground=default.ground if default else None,
            default_shadow=default.shadow.spec() if default and default.shadow else None,
        )

    async def _place(self, request: generator_pb2.GenerateRequest, plan: Plan) -> Plan:
        """The plan with the product placed in its frame, when the request carries a product image."""
        if not request.HasField("product_image"):
            return plan
        r = plan.settings
        template = self.catalog.template(request.template_id) if request.template_id else None
        placed, record = await self._placed(request.product_image, template, r.width, r.height)
        plan.params.placement.CopyFrom(ParseDict(record, generator_pb2.PlacementRecord()))
        # Outside the product's mask the scene prompt, without the product's words or adapter (product_region.py).
        scene_prompt = compose_scene_prompt(template, request.prompt)
        return dataclasses.replace(plan, settings=dataclasses.replace(r, placement=placed, scene_prompt=scene_prompt))

    async def PreviewPlacement(self, request, context) -> generator_pb2.PlacementPreview:
        if not request.HasField("product_image"):
            raise InvalidArgument("product_image", "is required")
        template = self.catalog.template(request.template_id) if request.template_id else None
        width, height = self._frame(request, template)
        placed, record = await self._placed(request.product_image, template, width, height)
        mask_png, preview_png = await asyncio.to_thread(placement.preview_pngs, placed)
        return generator_pb2.PlacementPreview(
            mask_png=mask_png,
            preview_png=preview_png,
            width=width,
            height=height,
            placement=ParseDict(record, generator_pb2.PlacementRecord()),
        )

    # Generate

    async def Generate(self, request: generator_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        """Accept, then stream events as the images are stored (a coroutine, not an async generator:
        each write is bounded, so a client that stops reading cannot hold the request forever)."""
        outcome = "error"
        try:
            plan = await self._place(request, self.plan(request))
            request_id_var.set(plan.request_id)
            if request.request_id and await self.store.exists(plan.request_id + "/"):
                raise AlreadyExists(
                    f"request_id {plan.request_id!r} was used before and its images are stored; ids are single-use"
                )
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
            task = asyncio.create_task(self._store(result, plan, ticket))
            uploads.add(task)
            task.add_done_callback(uploads.discard)

        ticket = self.scheduler.submit(
            plan.request_id, plan.settings, plan.seeds, metadata, plan.preview_every, on_image=on_image
        )
        try:
            accepted = generator_pb2.Accepted(
                request_id=plan.request_id,
                image_uris=[self.store.uri_for(_key(plan.request_id, i)) for i in range(len(plan.seeds))],
                queue_position=self.scheduler.position_of(ticket),
                parameters=plan.params,
            )
            await self._write(context, generator_pb2.GenerateEvent(accepted=accepted))
            await self._stream(plan, ticket, context)
        finally:
            self.scheduler.finish(ticket)

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


def _params_dict(params: generator_pb2.GenerationParameters) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(params, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _s3_metadata(plan: Plan, result: ImageResult) -> dict[str, str]:
    from services.common.pngmeta import a1111_parameters

    params = {**_params_dict(plan.params), "seed": result.seed}
    return {
        "parameters": a1111_parameters(params),
        "request-id": plan.request_id,
        "index": str(result.index),
        "seed": str(result.seed),
        "product-id": plan.params.product_id,
    }
