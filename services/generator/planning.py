"""From a GenerateRequest to a `Plan`: every check and lookup, each once, cheap ones first.

Order: identity, the catalog (one rescan: product, template), numbers and stacked adapters, the prompt,
then the request-id reuse check (one storage call), and last the product image of placement mode (a
download and a decode). A request that breaks any limit the workers would enforce (their adapter slots,
sizes) is refused here, before `accepted`, with INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.json_format import ParseDict

from productinaction.v1 import generator_pb2
from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.common.ids import check_id
from services.common.storage import ImageStore
from services.generator import placement
from services.generator.catalog import (
    Catalog,
    ComposedPrompt,
    Entry,
    Template,
    compose_prompt,
    compose_scene_prompt,
    default_guidance,
)
from services.generator.messages import SCHEDULERS, AdapterSpec, PlacedProduct, Ready, RenderSettings
from services.generator.options import WorkerConfig
from services.generator.settings import GeneratorSettings

MAX_PROMPT_CHARS = 2000
PIPELINE_SIZE_MULTIPLE = 8
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


def finite(field: str, value: float, low: float, high: float) -> float:
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidArgument(field, f"must be a number in [{low:g}, {high:g}], got {value}")
    return value


class Planner:
    """Validates requests against the settings, the catalog and what the workers reported."""

    def __init__(
        self,
        settings: GeneratorSettings,
        catalog: Catalog,
        store: ImageStore,
        model_info: Callable[[], Ready | None],
        max_adapters: int,
        adapters_why: str = "",
    ):
        self.settings = settings
        self.catalog = catalog
        self.store = store
        self._model_info = model_info  # the workers' report, None until one is ready
        # Adapters one job may activate (product included): the smallest over the workers' real limits.
        self.max_adapters = max_adapters
        self.adapters_why = adapters_why

    def model_info(self) -> Ready:
        info = self._model_info()
        if info is None:
            # Defaults come from the model, which no worker has reported yet: never guess them.
            raise Unavailable("the model is still loading; retry when health reports SERVING")
        return info

    # Pieces the other calls (ComposePrompt, PreviewPlacement) share

    def product(self, request: Any) -> Entry | None:
        # Placement mode: the product's adapter is optional ("instead of, or together with" the photo).
        if request.HasField("product_image") and not request.product_id:
            return None
        return self.catalog.product(request.product_id)

    def template(self, request: Any, product: Entry | None) -> Template | None:
        if not request.template_id:
            return None
        template = self.catalog.template(request.template_id)
        category = product.manifest.category if product is not None else ""
        if product is not None and not self.catalog.templates.suits(template, category):
            # Decided (docs/ARCHITECTURE.md): a scene tested for other categories is refused, not silently used.
            raise InvalidArgument(
                "template_id",
                f"template {template.id!r} is not among the scenes for product {product.id!r} (category "
                f"{category!r}); ListTemplates(product_id={product.id!r}) lists them",
            )
        return template

    def compose(
        self, request: Any, product: Entry | None, template: Template | None, stacked: list[Entry]
    ) -> ComposedPrompt:
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

    def frame(self, request: Any, template: Template | None, info: Ready) -> tuple[int, int]:
        """Image width and height: the request's, else the template's, else the model's."""
        s = self.settings
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

    async def place(
        self, message: generator_pb2.ProductImage, template: Template | None, width: int, height: int
    ) -> tuple[PlacedProduct, generator_pb2.PlacementRecord]:
        """The request's product photo (bytes or a URI in our storage), checked and placed off the event loop."""
        if template is not None and template.placement is None:
            raise InvalidArgument("template_id", f"template {template.id!r} does not suit placement mode")
        default = template.placement if template else self.catalog.templates.defaults.placement
        field = "product_image"
        source = message.WhichOneof("source")
        if source is None:
            raise InvalidArgument(field, "give the product image's bytes (image) or its storage uri")
        if source == "uri":
            uri = message.uri.strip()
            if not uri or not self.store.owns(uri):
                raise InvalidArgument(f"{field}.uri", f"{uri[:200]!r} is not a URI in this server's storage")
            try:
                data = await self.store.get(uri)
            except OSError:
                raise InvalidArgument(f"{field}.uri", "is not a readable file") from None
        else:
            data = message.image
        max_bytes = self.settings.max_product_bytes
        if len(data) + len(message.mask) > max_bytes:
            raise InvalidArgument(
                f"{field}.{source}",
                f"{len(data) + len(message.mask)} bytes with its mask; this server takes at most {max_bytes}",
            )
        if message.tolerance > 255:
            raise InvalidArgument(f"{field}.tolerance", f"must be 0 (default) to 255, got {message.tolerance}")
        p = message.placement
        requested = placement.check_placement(p.center_x, p.center_y, p.height, f"{field}.placement")
        shadow = default.shadow.spec() if default and default.shadow else None
        if message.HasField("shadow"):
            sh = message.shadow
            shadow = placement.check_shadow(sh.strength, sh.softness, sh.offset_x, sh.offset_y, f"{field}.shadow")
        placed, record = await asyncio.to_thread(
            placement.place_upload,
            data,
            message.mask,
            requested,
            placement.ProductBox(**default.box()) if default else None,
            width,
            height,
            max_pixels=self.settings.max_product_pixels,
            tolerance=message.tolerance,
            field_prefix=field,
            ground=default.ground if default else None,
            shadow=shadow,
            scene_first=default.scene_first if default else 0.0,
        )
        return placed, ParseDict(record, generator_pb2.PlacementRecord())

    # The plan

    async def plan(self, request: generator_pb2.GenerateRequest) -> Plan:
        s = self.settings
        # 1. Identity, then the catalog, rescanned once: product and template
        request_id = check_id(request.request_id or uuid.uuid4().hex[:16], "request_id")
        info = self.model_info()
        self.catalog.refresh()
        product = self.product(request)
        template = self.template(request, product)

        # 2. Numbers, then the stacked adapters
        if not 1 <= request.num_images <= s.max_images:
            raise InvalidArgument("num_images", f"must be between 1 and {s.max_images}, got {request.num_images}")
        steps = request.steps or (template.steps if template and template.steps else s.default_steps)
        if not 1 <= steps <= s.max_steps:
            raise InvalidArgument("steps", f"must be between 1 and {s.max_steps}, got {steps}")
        if request.HasField("guidance_scale"):
            guidance = finite("guidance_scale", request.guidance_scale, 0.0, 50.0)
        else:
            guidance = default_guidance(product, template, request.HasField("product_image"), s.default_guidance)
        width, height = self.frame(request, template, info)
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
        if request.HasField("product_scale"):
            product_scale = finite("product_scale", request.product_scale, -MAX_WEIGHT, MAX_WEIGHT)
        else:
            product_scale = product.manifest.default_scale if product else 0.0
        backdrop = self.backdrop(request, template)
        specs, stacked, weights = self._adapters(request, product, product_scale, backdrop)

        # 3. Prompt
        composed = self.compose(request, product, template, stacked)

        # 4. One storage call: a reused request id must not overwrite what it stored
        if request.request_id and await self.store.exists(request_id + "/"):
            raise AlreadyExists(
                f"request_id {request_id!r} was used before and its images are stored; ids are single-use",
                "REQUEST_STORED",
            )

        # 5. Placement mode: download, decode and place the product photo
        placed, record, scene_prompt = None, None, ""
        if request.HasField("product_image"):
            placed, record = await self.place(request.product_image, template, width, height)
            scene_prompt = self.scene_prompt(request, template, stacked, backdrop)

        render = RenderSettings(
            prompt=composed.prompt,
            negative_prompt=composed.negative_prompt,
            steps=steps,
            guidance_scale=float(guidance),
            width=width,
            height=height,
            scheduler=request.scheduler,
            adapters=specs,
            placement=placed,
            scene_only_styles=s.scene_only_styles,
            scene_prompt=scene_prompt,
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
            placement=record,
            scene_prompt=scene_prompt,
        )
        return Plan(request_id, render, seeds, params, request.preview_every, request.inline_images)

    def scene_prompt(
        self, request: Any, template: Template | None, stacked: list[Entry], backdrop: Entry | None
    ) -> str:
        """Placement mode's prompt: the denoising asks for the scene only (placement.scene_adapters), with the
        stacked adapters' phrases and the backdrop's."""
        phrases = [t for a in (*stacked, *([backdrop] if backdrop else [])) for t in a.manifest.tokens]
        return compose_scene_prompt(template, request.prompt, phrases)

    def backdrop(self, request: generator_pb2.GenerateRequest, template: Template | None) -> Entry | None:
        """Placement mode's backdrop adapter (the template's `placement.backdrop`), unless the request stacks it."""
        if template is None or template.placement is None or not template.placement.backdrop:
            return None
        name = template.placement.backdrop
        if not request.HasField("product_image") or name in (a.adapter_id for a in request.adapters):
            return None
        try:
            return self.catalog.adapter(name)
        except NotFound:
            raise FailedPrecondition(
                f"template {template.id!r} places products on the backdrop adapter {name!r}, which this server "
                "does not have (ListAdapters lists what it has)"
            ) from None

    def _adapters(
        self,
        request: generator_pb2.GenerateRequest,
        product: Entry | None,
        product_scale: float,
        backdrop: Entry | None = None,
    ) -> tuple[tuple[AdapterSpec, ...], list[Entry], list[generator_pb2.AdapterWeight]]:
        """The product's adapter first, then the stacked ones, then placement's backdrop, within the workers'
        real limit. The backdrop is recorded with the rest (a rerun that sends them back is not given it twice)."""
        first = (1 if product else 0) + (1 if backdrop else 0)
        if first + len(request.adapters) > self.max_adapters:
            room = self.max_adapters - first
            raise InvalidArgument(
                "adapters",
                f"at most {room} can be stacked{' on a product' if product else ''}"
                f"{f' and the scene backdrop {backdrop.id!r}' if backdrop else ''}, "
                f"got {len(request.adapters)}" + (f" ({self.adapters_why})" if self.adapters_why else ""),
            )
        specs = [product.spec(product_scale)] if product else []
        stacked: list[Entry] = []
        weights: list[generator_pb2.AdapterWeight] = []
        for i, aw in enumerate(request.adapters):
            field = f"adapters[{i}]"
            entry = self.catalog.adapter(aw.adapter_id, field)
            if entry.id in (a.id for a in stacked):
                raise InvalidArgument(f"{field}.adapter_id", f"{entry.id!r} is listed twice")
            weight = finite(f"{field}.weight", aw.weight, -MAX_WEIGHT, MAX_WEIGHT) or entry.manifest.default_scale
            stacked.append(entry)
            specs.append(entry.spec(weight))
            weights.append(generator_pb2.AdapterWeight(adapter_id=entry.id, weight=weight))
        if backdrop:
            weight = backdrop.manifest.default_scale
            specs.append(backdrop.spec(weight))
            weights.append(generator_pb2.AdapterWeight(adapter_id=backdrop.id, weight=weight))
        return tuple(specs), stacked, weights


def adapter_limit(configs: list[WorkerConfig]) -> tuple[int, str]:
    """The adapters one job may activate on every worker, and why (for the error message)."""
    limits = [(c.max_adapters, c) for c in configs]
    limit, config = min(limits, key=lambda item: item[0])
    if config.compile is not None and config.compile.enabled:
        return limit, f"{limit} LoRA slots with compile on (--lora-slots)"
    return limit, f"{limit} adapters per worker (--adapter-cache-size)"
