"""What the web page's controls do, without Gradio: widget values in, plain views out.

`client/web.py` lays the page out and maps these views onto components. Everything here talks to
the services through `client.api`; prompts, defaults and validation stay in the services.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import html
import io
import re
import shutil
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from PIL import Image

from client.api import GeneratorClient, UpscalerClient, describe_error, fetch_bytes_async, generate_request
from client.balancing import interrupted_stream_message, replicas_banner
from client.channel import ChannelSecurity
from productinaction.v1 import generator_pb2, upscaler_pb2

# Only fills the menu; the generator validates the name.
SCHEDULERS = ("dpm++", "dpm++_karras", "euler", "euler_a", "ddim", "pndm", "unipc", "heun")

SERVING, NOT_SERVING, UNREACHABLE = "SERVING", "NOT_SERVING", "UNREACHABLE"


class Backends:
    """Service addresses, and the clients for them.

    grpc.aio channels belong to the event loop that made them, so there is one client per loop
    (Gradio's server loop in production, the test's loop in tests).
    """

    def __init__(self, generator: str, upscaler: str, files_dir: str | Path, security: ChannelSecurity | None = None):
        self.generator_address = generator
        self.security = security
        self.upscaler_address = upscaler
        self.files_dir = Path(files_dir)
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self._clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _for_loop(self) -> tuple[GeneratorClient, UpscalerClient]:
        loop = asyncio.get_running_loop()
        if loop not in self._clients:
            self._clients[loop] = (
                GeneratorClient(self.generator_address, self.security),
                UpscalerClient(self.upscaler_address, self.security),
            )
        return self._clients[loop]

    def generator(self) -> GeneratorClient:
        return self._for_loop()[0]

    def upscaler(self) -> UpscalerClient:
        return self._for_loop()[1]

    async def close(self) -> None:
        clients = self._clients.pop(asyncio.get_running_loop(), None)
        for client in clients or ():
            await client.close()


@dataclass
class Form:
    """The generation form, one field per widget (web.py passes the widgets by these names)."""

    product_id: str | None = None
    template_id: str | None = None
    text: str | None = ""
    num_images: int = 1
    show_previews: bool = False
    random_seed: bool = True
    seed: float | None = None
    steps: float | None = None
    guidance: float | None = None
    width: float | None = None
    height: float | None = None
    negative_prompt: str | None = ""
    scheduler: str | None = ""
    style_id: str | None = ""
    style_weight: float | None = 0.0
    background_id: str | None = ""
    background_weight: float | None = 0.0
    # Placement mode: "keep my exact product" and the uploaded photo's file (see placement_image).
    keep_product: bool = False
    product_photo: str | None = None
    # Its contact shadow: off, or on at the scene's own default (strength 0) or at the strength given (0..1).
    shadow: bool = True
    shadow_strength: float | None = 0.0


@dataclass
class ImageEntry:
    """One image in the gallery: where the service stored it and what produced it."""

    uri: str
    path: str
    seed: int
    device: str
    parameters: generator_pb2.GenerationParameters
    width: int = 0
    height: int = 0
    # Display names at the time it was made (the menus may change afterwards): product, scene, {adapter id: name}.
    product_name: str = ""
    scene_name: str = ""
    adapter_names: dict[str, str] = field(default_factory=dict)

    @property
    def caption(self) -> str:
        size = f" · {self.width} × {self.height} px" if self.width else ""
        return f"seed {self.seed}{size}"


@dataclass
class Session:
    """Per browser tab (a gr.State). Holds the running calls so Stop can cancel them."""

    images: list[ImageEntry] = field(default_factory=list)
    selected: int | None = None
    generator_health: str = ""
    upscaler_health: str = ""
    products: dict[str, generator_pb2.Product] = field(default_factory=dict)
    templates: dict[str, generator_pb2.Template] = field(default_factory=dict)
    adapters: dict[str, generator_pb2.Adapter] = field(default_factory=dict)
    calls: set[Any] = field(default_factory=set)
    # Set by Stop (or a closed tab); the running Generate sees it, cancels its call and reports.
    stop_requested: bool = False
    generating: bool = False
    # Folders of fetched images, removed when the tab's state is dropped (see `forget`).
    folders: set[str] = field(default_factory=set)

    def gallery(self) -> list[tuple[str, str]]:
        return [(entry.path, f"#{i + 1} · {entry.caption}") for i, entry in enumerate(self.images)]


@dataclass
class Choices:
    """A dropdown's options as (label, value) pairs, and its value."""

    choices: list[tuple[str, str]] = field(default_factory=list)
    value: str | None = None


@dataclass
class HealthView:
    banner: str
    ok: bool
    # True when the generator has just become ready: the page should reload the catalog.
    reload: bool


@dataclass
class CatalogView:
    products: Choices
    templates: Choices
    styles: Choices
    backgrounds: Choices
    text_label: str
    message: str = ""


@dataclass
class GenerateView:
    gallery: list[tuple[str, str]]
    progress: float
    progress_text: str
    status: str
    running: bool
    preview: Image.Image | None = None
    warning: str = ""
    # True once, when the generator accepted a "Generate": the old gallery, selection and upscale go.
    new_gallery: bool = False
    # The seed of this run's first image, once known (shown in the Seed box after a random-seed run).
    seed: int | None = None


@dataclass
class Details:
    """The selected image's settings: names in `summary`, ids and machine settings in `technical`."""

    summary: str
    technical: str = ""


@dataclass
class UpscaleView:
    status: str
    running: bool
    path: str | None = None
    warning: str = ""


@dataclass
class ReuseView:
    form: Form | None
    templates: Choices
    text_label: str
    message: str = ""


# Request fields as the page labels them, for the generator's INVALID_ARGUMENT texts ("num_images: must be ...").
FIELD_LABELS = {
    "num_images": "Number of images",
    "steps": "Steps",
    "guidance_scale": "Guidance",
    "width": "Width",
    "height": "Height",
    "seed": "Seed",
    "scheduler": "Scheduler",
    "negative_prompt": "Negative prompt",
    "prompt": "The scene text",
    "product_id": "Product",
    "template_id": "Scene",
    "product_scale": "Product strength",
    "preview_every": "Preview interval",
}
_FIELD = re.compile(r"^(?P<field>[a-z_]+(?:\[\d+\])?(?:\.[a-z_]+)?): (?P<problem>.+)$", re.S)


def _field_sentence(details: str) -> str:
    """'num_images: must be between 1 and 16, got 1000' -> 'Number of images must be between 1 and 16, got 1000.'"""
    match = _FIELD.match(details.strip())
    if not match:
        return _sentence(details)
    name, problem = match["field"], match["problem"].strip()
    label: str | None
    if name.startswith("adapters["):
        label = "Adapter weight" if name.endswith(".weight") else "Adapter"
    else:
        label = FIELD_LABELS.get(name)
    if label is None or not problem.startswith(("must", "is ", "longer", "exceeds", "at most")):
        # Already an instruction ("describe the scene for 'Custom'") or an unknown field: the text alone.
        return _sentence(problem)
    return _sentence(f"{label} {problem}")


def friendly_error(exc: BaseException, service: str, address: str) -> str:
    """What went wrong, in words for the person at the page (no status codes, no traces)."""
    if isinstance(exc, grpc.aio.AioRpcError):
        code, details = exc.code(), exc.details() or ""
        if describe_error(exc) == "service unreachable":
            return f"The {service} is unreachable ({address}). Try again once it is back."
        if code == grpc.StatusCode.UNAVAILABLE:
            return f"The {service} is not ready: {details}"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"The {service} did not answer in time ({address})."
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return f"The {service} is busy: {details}. Try again in a moment."
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return _field_sentence(details)
        if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
            return _sentence(details)
        return f"The {service} failed: {describe_error(exc)}"
    return f"Something went wrong: {describe_error(exc)}"


def _sentence(text: str) -> str:
    text = text.strip()
    if not text:
        return "The request was refused."
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else f"{text}."


# Health and catalog


def banner(generator: str, upscaler: str, backends: Backends) -> tuple[str, bool]:
    """The status banner's markdown for the two services' health, and whether all is well."""
    gen_addr, up_addr = backends.generator_address, backends.upscaler_address
    if generator == SERVING and upscaler == SERVING:
        return "Generator and upscaler are ready.", True
    if generator == UNREACHABLE and upscaler == UNREACHABLE:
        return (
            f"**Neither the image generator (`{gen_addr}`) nor the upscaler (`{up_addr}`) can be reached.** "
            "The page works, but nothing can be generated or upscaled until they are back; "
            "it checks again by itself.",
            False,
        )
    lines = []
    if generator == UNREACHABLE:
        lines.append(
            f"**The image generator is unreachable** (`{gen_addr}`). Generating is unavailable; "
            "upscaling images already in the gallery still works. Products reload by themselves when it is back."
        )
    elif generator == NOT_SERVING:
        lines.append("**The image generator is starting** (loading its model). Generate will work once it is ready.")
    if upscaler == UNREACHABLE:
        lines.append(
            f"**The upscaler is unreachable** (`{up_addr}`). Generating still works; upscaling does not "
            "until it is back."
        )
    elif upscaler == NOT_SERVING:
        lines.append("**The upscaler is starting.** Generating works; upscaling will once it is ready.")
    return "\n\n".join(lines), False


async def check_health(backends: Backends, session: Session) -> HealthView:
    """Ask both services how they are; flag a reload when the generator has just become ready."""
    generator, upscaler = await asyncio.gather(backends.generator().health(), backends.upscaler().health())
    reload = generator == SERVING and session.generator_health != SERVING
    session.generator_health, session.upscaler_health = generator, upscaler
    text, ok = banner(generator, upscaler, backends)
    # Several generator replicas (dns:///..., ipv4:a,b): which are up (client/balancing.py).
    replicas = await replicas_banner(backends.generator_address, backends.security)
    if replicas:
        text = f"{text}\n\n{replicas}"
    return HealthView(text, ok, reload)


def _product_label(product: generator_pb2.Product) -> str:
    name = product.display_name or product.id
    return f"{name} · {product.category}" if product.category else name


def text_label(session: Session, template_id: str | None) -> str:
    template = session.templates.get(template_id or "")
    if template is not None and template.free_text:
        return "Describe the scene"
    return "Extra details (optional)"


async def load_templates(
    backends: Backends, session: Session, product_id: str | None, template_id: str | None = None
) -> Choices:
    """The scene templates tested for this product's category; keeps `template_id` when it is one of them."""
    if not product_id:
        session.templates = {}
        return Choices()
    templates = await backends.generator().templates(product_id=product_id)
    session.templates = {t.id: t for t in templates}
    if template_id not in session.templates:
        # The first ready-made scene; the free-text one needs typing before it can generate.
        template_id = next((t.id for t in templates if not t.free_text), templates[0].id if templates else None)
    return Choices([(t.name or t.id, t.id) for t in templates], template_id)


async def load_catalog(
    backends: Backends, session: Session, product_id: str | None = None, template_id: str | None = None
) -> CatalogView:
    """Products, their templates and stackable adapters; keeps the current choices where they still exist."""
    try:
        products = await backends.generator().products()
        adapters = await backends.generator().adapters()
        if product_id not in {p.id for p in products}:
            product_id = products[0].id if products else None
        templates = await load_templates(backends, session, product_id, template_id)
    except grpc.aio.AioRpcError as exc:
        message = friendly_error(exc, "generator", backends.generator_address)
        return CatalogView(Choices(), Choices(), Choices(), Choices(), text_label(session, None), message)
    session.adapters = {a.id: a for a in adapters}
    session.products = {p.id: p for p in products}
    message = "" if products else "The generator has no products yet."
    return CatalogView(
        Choices([(_product_label(p), p.id) for p in products], product_id),
        templates,
        _adapter_choices(adapters, "style"),
        _adapter_choices(adapters, "background"),
        text_label(session, templates.value),
        message,
    )


def _adapter_choices(adapters: list[generator_pb2.Adapter], kind: str) -> Choices:
    return Choices([("None", "")] + [(a.display_name or a.id, a.id) for a in adapters if a.kind == kind], "")


def adapter_weight(session: Session, adapter_id: str) -> float:
    """The weight an adapter's author suggests, to put in its slider when it is chosen."""
    adapter = session.adapters.get(adapter_id)
    return round(adapter.default_weight, 2) if adapter and adapter.default_weight else 1.0


# Requests


# Above these the request cannot even be encoded (uint32 / int64 fields); the generator's own limits are lower.
_UINT32, _INT64 = 2**32 - 1, 2**63 - 1


def _whole(value: float | None, label: str, low: float, high: float | None = None, limit: float = _UINT32) -> None:
    """Refuse a typed number the page cannot send, in words (the widgets themselves accept anything)."""
    if value is None:
        return
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{label}: type a number.")
    if value < low or (high is not None and value > high):
        bounds = f"between {_num(low)} and {_num(high)}" if high is not None else f"at least {_num(low)}"
        raise ValueError(f"{label} must be {bounds}; you typed {_num(value)}.")
    if value > limit:
        raise ValueError(f"{label} is far too large; you typed {_num(value)}.")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def build_request(
    form: Form, *, preview_every: int = 0, request_id: str = "", max_images: int | None = None, check: bool = True
) -> generator_pb2.GenerateRequest:
    """Widgets -> GenerateRequest. Blank or 0 fields stay unset, so the server's defaults apply.

    Raises ValueError with a sentence for the page when a typed number is out of range; the
    generator checks the rest (its own upper bounds) and says so in its error.
    """
    # Gradio sends None for widgets never shown, and its number boxes show 0 for "empty" once rendered.
    product_image = placement_image(form)
    if not form.product_id and product_image is None:
        raise ValueError("Choose a product first.")
    if check:
        _whole(form.num_images, "Number of images", 1, max_images)
        _whole(form.seed, "Seed", 0, limit=_INT64)
        _whole(form.steps, "Steps", 0)
        _whole(form.guidance, "Guidance", 0)
        _whole(form.width, "Width", 0)
        _whole(form.height, "Height", 0)
        _whole(form.style_weight, "Style weight", -2, 2)
        _whole(form.background_weight, "Background weight", -2, 2)
    adapters = [
        (adapter_id, float(weight))
        for adapter_id, weight in ((form.style_id, form.style_weight), (form.background_id, form.background_weight))
        if adapter_id and weight is not None
    ]
    return generate_request(
        product_id=form.product_id,
        template_id=form.template_id or "",
        prompt=(form.text or "").strip(),
        negative_prompt=(form.negative_prompt or "").strip() or None,
        num_images=int(form.num_images or 1),
        seed=None if form.random_seed or form.seed is None else int(form.seed),
        steps=int(form.steps) if form.steps else None,
        guidance_scale=float(form.guidance) if form.guidance else None,
        width=int(form.width) if form.width else None,
        height=int(form.height) if form.height else None,
        scheduler=form.scheduler or "",
        adapters=adapters,
        preview_every=preview_every if form.show_previews else 0,
        inline_images=True,
        request_id=request_id,
        product_image=product_image,
    )


async def preview_prompt(backends: Backends, form: Form) -> tuple[str, str]:
    """The prompt and negative prompt the generator would use (its ComposePrompt, given the very request
    Generate would send: product, scene, text and the chosen adapters), or why there is none. Keeping the exact
    product, that is the scene prompt the scene around it is drawn from."""
    # Numbers do not change the prompt: one typed out of range is reported on Generate, not here.
    numbers: dict[str, Any] = dict(num_images=1, seed=None, steps=None, guidance=None, width=None, height=None)
    try:
        request = build_request(dataclasses.replace(form, **numbers), check=False)
    except ValueError as exc:
        return str(exc), ""
    try:
        composed = await backends.generator().compose(request)
    except grpc.aio.AioRpcError as exc:
        return friendly_error(exc, "generator", backends.generator_address), ""
    if composed.scene_prompt:
        return f"Around your exact product: {composed.scene_prompt}", composed.negative_prompt
    return composed.prompt, composed.negative_prompt


def _write(session: Session, path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    session.folders.add(str(path.parent))
    path.write_bytes(data)
    return str(path)


def forget(session: Session) -> None:
    """Drop a closed tab's work: cancel its calls, delete the images fetched for it."""
    stop(session)
    for folder in session.folders:
        shutil.rmtree(folder, ignore_errors=True)
    session.folders.clear()


class _Stopped(Exception):
    """Stop was pressed (or the tab closed): end the stream with what arrived."""


def _progress(steps: dict[int, float], done: int, total: int) -> float:
    if not total:
        return 0.0
    return min(1.0, (done + sum(steps.values())) / total)


async def generate(
    backends: Backends,
    session: Session,
    form: Form,
    *,
    append: bool = False,
    preview_every: int = 0,
    max_images: int | None = None,
) -> AsyncIterator[GenerateView]:
    """Stream a Generate call into views: the gallery grows as each image_ready arrives.

    `append=False` starts a new gallery ("Generate") once the generator accepts the request, so a
    refused request leaves the old one in place; `append=True` adds to it ("Generate more").
    Stop (or a closed tab) sets `session.stop_requested` and cancels the call; this generator then
    reports "Stopped after N of M images" as its last view.
    """
    request_id = f"web-{uuid.uuid4().hex[:12]}"
    session.stop_requested = False
    try:
        request = build_request(form, preview_every=preview_every, request_id=request_id, max_images=max_images)
    except ValueError as exc:
        message = str(exc)
        if session.generator_health == UNREACHABLE and not form.product_id:  # no products to choose from
            message = f"The generator is unreachable ({backends.generator_address}). Try again once it is back."
        yield GenerateView(session.gallery(), 0.0, "", message, False, warning=message)
        return
    total, done, steps = request.num_images, 0, {}
    preview: Image.Image | None = None
    seed: int | None = None
    session.generating = True
    yield GenerateView(session.gallery(), 0.0, f"0 of {total} images", "Sending the request…", True)

    call = backends.generator().generate(request)
    session.calls.add(call)
    status = "Waiting for the generator…"
    try:
        if session.stop_requested:  # Stop pressed while the request was being sent
            call.cancel()
        async for event in call:
            kind = event.WhichOneof("event")
            new_gallery = False
            if kind == "accepted":
                if not append:
                    session.images, session.selected = [], None
                    new_gallery = True
                seed = event.accepted.parameters.seed
                ahead = event.accepted.queue_position
                status = f"Queued: {ahead} job(s) ahead." if ahead else "Generating…"
            elif kind == "queued":
                ahead = event.queued.queue_position
                status = f"Queued: {ahead} job(s) ahead." if ahead else "Generating…"
            elif kind == "progress":
                p = event.progress
                steps[p.index] = p.step / p.total_steps if p.total_steps else 0.0
                status = f"Image {p.index + 1} of {total}: step {p.step} of {p.total_steps}"
                if p.preview_png:
                    preview = Image.open(io.BytesIO(p.preview_png))
            elif kind == "image_ready":
                ready = event.image_ready
                png = ready.image.png or await fetch_bytes_async(ready.image.url)
                path = _write(session, backends.files_dir / request_id / f"{ready.index}.png", png)
                session.images.append(_entry(session, ready, path))
                steps.pop(ready.index, None)
                done += 1
            elif kind == "completed":
                t = event.completed.timings
                status = (
                    f"Done: {event.completed.num_images} image(s) in {t.total_seconds:.1f} s "
                    f"(first after {t.first_image_seconds:.1f} s)."
                )
                yield GenerateView(
                    session.gallery(), 1.0, f"{done} of {total} images", status, False, preview, seed=seed
                )
                return
            else:
                continue
            if session.stop_requested:
                call.cancel()
                raise _Stopped
            progress = _progress(steps, done, total)
            yield GenerateView(
                session.gallery(),
                progress,
                f"{done} of {total} images",
                status,
                True,
                preview,
                new_gallery=new_gallery,
                seed=seed,
            )
        if call.cancelled() or session.stop_requested:
            raise _Stopped
        status = f"The generator ended the request after {done} of {total} images."
        yield GenerateView(session.gallery(), _progress({}, done, total), status, status, False, preview, seed=seed)
    except (asyncio.CancelledError, _Stopped) as exc:
        task = asyncio.current_task()
        if isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling():
            raise  # Gradio cancelled this event: nothing more can be shown.
        # Stop cancelled the call: say so and keep what arrived.
        status = f"Stopped after {done} of {total} images."
        progress = _progress({}, done, total)
        yield GenerateView(session.gallery(), progress, f"{done} of {total} images", status, False, preview, seed=seed)
    except (grpc.aio.AioRpcError, OSError, ValueError) as exc:
        message = (
            friendly_error(exc, "generator", backends.generator_address)
            if isinstance(exc, grpc.aio.AioRpcError)
            else f"Could not read an image: {describe_error(exc)}"
        )
        if isinstance(exc, grpc.aio.AioRpcError) and seed is not None and exc.code() == grpc.StatusCode.UNAVAILABLE:
            # Its replica went away after it had started: not retried (client/balancing.py); say so.
            message = interrupted_stream_message(exc, done, total)
        progress = _progress({}, done, total)
        yield GenerateView(session.gallery(), progress, f"{done} of {total} images", message, False, warning=message)
    finally:
        # Also on a closed generator (Gradio closes it when the event is cancelled): the server stops at its next step.
        call.cancel()
        session.calls.discard(call)
        session.generating = False


def _entry(session: Session, ready: generator_pb2.ImageReady, path: str) -> ImageEntry:
    p = ready.parameters
    product = session.products.get(p.product_id)
    template = session.templates.get(p.template_id)
    return ImageEntry(
        ready.image.uri,
        path,
        ready.seed,
        ready.device,
        p,
        width=ready.image.width or p.width,
        height=ready.image.height or p.height,
        product_name=product.display_name if product and product.display_name else p.product_id,
        scene_name=template.name if template and template.name else p.template_id,
        adapter_names={
            a.adapter_id: session.adapters[a.adapter_id].display_name or a.adapter_id
            for a in p.adapters
            if a.adapter_id in session.adapters
        },
    )


def stop(session: Session) -> str:
    """Ask this tab's running work to stop: the Generate stream sees the flag, the calls are cancelled
    (the services drop the remaining work at their next step) and the stream reports what it kept."""
    running = [call for call in session.calls if not call.done()]
    busy = bool(running) or session.generating
    session.stop_requested = busy
    for call in running:
        call.cancel()
    return "Stopping…" if busy else "Nothing is running."


# After generating


def select_image(session: Session, index: int | None) -> Details:
    """Remember the selected image; its settings in words, and the technical ones apart."""
    if index is None or not 0 <= index < len(session.images):
        session.selected = None
        return Details("Click an image to see its settings, reuse them or upscale it.")
    session.selected = index
    entry = session.images[index]
    p = entry.parameters
    names = entry.adapter_names
    adapters = ", ".join(f"{_cell(names.get(a.adapter_id, a.adapter_id))} × {a.weight:g}" for a in p.adapters)
    scene = _cell(entry.scene_name or p.template_id) or "your own text"
    if p.user_prompt:
        scene += f" + “{_cell(p.user_prompt)}”"
    summary = [
        ("Product", _cell(entry.product_name or p.product_id)),
        ("Scene", scene),
        ("Style", adapters or "none"),
        ("Size", f"{entry.width or p.width} × {entry.height or p.height} px"),
        ("Seed", f"`{entry.seed}`"),
        ("Prompt", _cell(p.prompt)),
    ]
    if p.scene_prompt:  # placement mode: what the scene around the kept product was drawn from
        summary.append(("Scene prompt", _cell(p.scene_prompt)))
    technical = [
        ("Product", f"`{p.product_id}` × {p.product_scale:g}"),
        ("Scene", f"`{p.template_id or 'none'}`"),
        ("Adapters", ", ".join(f"`{a.adapter_id}` × {a.weight:g}" for a in p.adapters) or "none"),
        ("Steps", str(p.steps)),
        ("Guidance", f"{p.guidance_scale:g}"),
        ("Scheduler", p.scheduler or "model default"),
        ("Negative prompt", _cell(p.negative_prompt) or "none"),
        ("Model", _cell(p.model) or "?"),
        ("Device", entry.device or "?"),
        ("Stored at", f"`{entry.uri}`"),
    ]
    return Details(f"**Image #{index + 1}**\n\n{_table(summary)}", _table(technical))


def _table(rows: list[tuple[str, str]]) -> str:
    return "| Setting | Value |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)


def _cell(text: str) -> str:
    # Product tokens look like HTML tags (<tiny-star>): escape them, or Markdown swallows them.
    return html.escape(text).replace("|", "\\|").replace("\n", " ")


async def reuse_settings(backends: Backends, session: Session, form: Form) -> ReuseView:
    """The selected image's parameters, copied into the form (seed fixed, so it can be reproduced)."""
    if session.selected is None:
        return ReuseView(None, Choices(), text_label(session, None), "Select an image first.")
    p = session.images[session.selected].parameters
    try:
        templates = await load_templates(backends, session, p.product_id, p.template_id)
    except grpc.aio.AioRpcError as exc:
        message = friendly_error(exc, "generator", backends.generator_address)
        return ReuseView(None, Choices(), text_label(session, None), message)
    styles = [a for a in p.adapters if _adapter_kind(session, a.adapter_id) != "background"]
    backgrounds = [a for a in p.adapters if _adapter_kind(session, a.adapter_id) == "background"]
    reused = Form(
        product_id=p.product_id,
        template_id=p.template_id,
        text=p.user_prompt,
        num_images=form.num_images,
        show_previews=form.show_previews,
        random_seed=False,
        seed=p.seed,
        steps=p.steps,
        guidance=round(p.guidance_scale, 4),
        width=p.width,
        height=p.height,
        negative_prompt=p.negative_prompt,
        scheduler=p.scheduler,
        style_id=styles[0].adapter_id if styles else "",
        style_weight=round(styles[0].weight, 4) if styles else form.style_weight,
        background_id=backgrounds[0].adapter_id if backgrounds else "",
        background_weight=round(backgrounds[0].weight, 4) if backgrounds else form.background_weight,
        keep_product=p.HasField("placement"),
        product_photo=form.product_photo,
        # The shadow it was made with: off, or on at its strength (softness and offsets are the page's own).
        shadow=p.placement.shadow.strength > 0 if p.HasField("placement") else form.shadow,
        shadow_strength=round(p.placement.shadow.strength, 2) if p.HasField("placement") else form.shadow_strength,
    )
    message = f"Settings of image #{session.selected + 1} copied into the form."
    if p.HasField("placement") and photo_digest(form.product_photo) != p.placement.product_image_sha256:
        message += " It was made from a product photo: upload that photo again."
    return ReuseView(reused, templates, text_label(session, p.template_id), message)


def _adapter_kind(session: Session, adapter_id: str) -> str:
    adapter = session.adapters.get(adapter_id)
    return adapter.kind if adapter else "style"


async def upscale(backends: Backends, session: Session, scale: int = 4) -> AsyncIterator[UpscaleView]:
    """Upscale the selected image from its storage URI; yields progress, then the stored result's local copy."""
    if session.selected is None:
        yield UpscaleView("Select an image first.", False, warning="Select an image first.")
        return
    entry = session.images[session.selected]
    request_id = f"web-up-{uuid.uuid4().hex[:12]}"
    request = upscaler_pb2.UpscaleRequest(uri=entry.uri, scale=scale, inline_image=True, request_id=request_id)
    yield UpscaleView(f"Upscaling image #{session.selected + 1} ×{scale}…", True)
    call = backends.upscaler().upscale(request)
    session.calls.add(call)
    try:
        async for event in call:
            kind = event.WhichOneof("event")
            if kind == "progress" and event.progress.tiles_total:
                p = event.progress
                yield UpscaleView(f"Upscaling: tile {p.tiles_done} of {p.tiles_total}…", True)
            elif kind == "image_ready":
                image = event.image_ready.image
                png = image.png or await fetch_bytes_async(image.url)
                name = f"{_slug(entry.parameters.product_id)}-{entry.seed}-x{event.image_ready.scale or scale}.png"
                path = _write(session, backends.files_dir / request_id / name, png)
                status = f"Upscaled to {image.width} × {image.height} px (from {entry.width} × {entry.height} px)."
                yield UpscaleView(status, False, path)
                return
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        yield UpscaleView("Upscaling stopped.", False)
        return
    except (grpc.aio.AioRpcError, OSError, ValueError) as exc:
        message = (
            friendly_error(exc, "upscaler", backends.upscaler_address)
            if isinstance(exc, grpc.aio.AioRpcError)
            else f"Could not read the upscaled image: {describe_error(exc)}"
        )
        yield UpscaleView(message, False, warning=message)
        return
    finally:
        call.cancel()
        session.calls.discard(call)
    yield UpscaleView("The upscaler finished without an image.", False, warning="The upscaler returned no image.")


def preview_html(image: Image.Image | None, box: int = 256) -> str:
    """The live preview at a whole-number scale with a pixel-exact filter, its frame the image's own size."""
    if image is None:
        return ""
    width, height = image.size
    factor = max(1, box // max(width, height, 1))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    return (
        f'<figure class="pixel-preview"><img src="data:image/png;base64,{data}" width="{width * factor}" '
        f'height="{height * factor}" alt="Live preview">'
        f"<figcaption>Live preview · {width} × {height} px, shown ×{factor}</figcaption></figure>"
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "image"


# Placement mode: the customer's own photo, its pixels kept exactly (docs/FIDELITY.md).


def placement_image(form: Form) -> generator_pb2.ProductImage | None:
    """The request's product image when "keep my exact product" is ticked with a photo uploaded."""
    if not form.keep_product:
        return None
    if not form.product_photo:
        raise ValueError("Upload a photo of the product, or untick “keep my exact product”.")
    try:
        data = Path(form.product_photo).read_bytes()
    except OSError:
        raise ValueError("The uploaded photo is gone; upload it again.") from None
    message = generator_pb2.ProductImage(image=data)
    strength = float(form.shadow_strength or 0.0)
    if not 0.0 <= strength <= 1.0:
        raise ValueError("Shadow strength goes from 0 (the scene's default) to 1.")
    if not form.shadow:
        message.shadow.CopyFrom(generator_pb2.Shadow(strength=0.0))
    elif strength > 0:
        message.shadow.CopyFrom(generator_pb2.Shadow(strength=strength, softness=SHADOW_SOFTNESS))
    return message


SHADOW_SOFTNESS = 0.5  # the page's shadow: as soft as the demo scenes' defaults
PREVIEW_SIDE = 320  # px: the placement preview is enlarged to at least this (pixel-exact), so small frames are readable


def photo_digest(path: str | None) -> str:
    """The hash placement mode records for an uploaded photo ("" when there is none)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else ""
    except OSError:
        return ""


@dataclass(frozen=True)
class MaskView:
    """What the page shows before generating: the server's own mask over the placed product."""

    image: Image.Image | None
    message: str


async def detect_mask(backends: Backends, form: Form) -> MaskView:
    """Ask the generator where it found the product (PreviewPlacement): the mask it will keep exactly."""
    if not form.product_photo:
        return MaskView(None, "")
    try:
        product_image = placement_image(dataclasses.replace(form, keep_product=True))
    except ValueError as exc:
        return MaskView(None, str(exc))
    request = generator_pb2.PreviewPlacementRequest(
        product_image=product_image,
        template_id=form.template_id or "",
        width=int(form.width or 0),
        height=int(form.height or 0),
    )
    try:
        reply = await backends.generator().stub.PreviewPlacement(request, timeout=30)
    except grpc.aio.AioRpcError as exc:
        return MaskView(None, friendly_error(exc, "generator", backends.generator_address))
    # Enlarged pixel for pixel (a 32 x 32 demo frame would be a thin strip otherwise).
    k = max(1, -(-PREVIEW_SIDE // max(reply.width, reply.height)))
    w, h, gap = reply.width * k, reply.height * k, 8
    with Image.open(io.BytesIO(reply.preview_png)) as placed, Image.open(io.BytesIO(reply.mask_png)) as mask:
        # Side by side: the product (and its shadow) as it will sit in the frame, and the mask kept pixel for pixel.
        shown = Image.new("RGB", (w * 2 + gap, h), (255, 255, 255))
        shown.paste(placed.convert("RGB").resize((w, h), Image.Resampling.NEAREST), (0, 0))
        shown.paste(mask.convert("RGB").resize((w, h), Image.Resampling.NEAREST), (w + gap, 0))
    record = reply.placement
    how = {"alpha": "from the photo's transparency", "mask": "from the mask", "found": "found on the light background"}
    where = f"standing on the scene's ground at {record.ground_line:.0%} of the height" if record.ground_line else ""
    shadow = f"a contact shadow of strength {record.shadow.strength:.2f}" if record.shadow.strength else "no shadow"
    return MaskView(
        shown,
        f"Product {how.get(record.mask_source, record.mask_source)}; it will fill {record.placement.height:.0%} "
        f"of the height of a {reply.width} × {reply.height} image{', ' + where if where else ''}, with {shadow}. "
        f"Inside the white mask its pixels are kept exactly (apart from a {record.feather}-pixel blended edge).",
    )
