"""The web page: pick a product and a scene, generate, watch each image arrive, upscale one.

    python -m client.web --generator localhost:50051 --upscaler localhost:50052 --port 7860

Every flag is also a PIA_WEB_* environment variable (`--help` lists them). The page talks to the
services only through their gRPC stubs (client.api) and loads even when they are down. What the
controls do lives in client.web_logic; this module is layout and the widget <-> view mapping.
"""

from __future__ import annotations

import hmac
import logging
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, Self

# Before gradio is imported: no telemetry, no version check over the network.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import gradio as gr
from gradio.blocks import Block
from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from client import web_catalogue
from client import web_logic as logic
from client.catalogue.commands import JobOptions
from client.catalogue.jobs import JobRegistry
from client.catalogue.runner import FlowControl
from client.channel import ChannelSettings
from client.web_logic import Backends, Form, Session

log = logging.getLogger(__name__)

FORM_FIELDS = [f.name for f in fields(Form)]

CSS = """
#status-banner { padding: 0.4rem 0.8rem; border-radius: 8px; }
#status-banner.warn { background: #fff4e5; border: 1px solid #f0b35a; }
#status-banner.ok { background: #eef9f0; border: 1px solid #9fd5a8; }
#progress progress { width: 100%; height: 0.9rem; }
#details td:first-child, #technical td:first-child { white-space: nowrap; }
/* Small images are shown enlarged with a pixel-exact filter (their true size is in the caption), never blurred. */
#gallery img, #upscaled img, .pixel-preview img { image-rendering: pixelated; }
/* The upscaled image fills the column: never smaller on screen than the original in the gallery. */
#upscaled img { width: 100%; height: auto; max-height: none; object-fit: contain; }
#upscaled .image-frame, #upscaled .image-container { width: 100%; height: auto; max-height: none; }
.pixel-preview { display: inline-block; margin: 0; }
#cat-detail progress { width: 100%; height: 0.9rem; }
#cat-jobs td, #cat-detail td { padding: 0.15rem 0.5rem; }
.pixel-preview figcaption { font-size: 0.85em; opacity: 0.8; }
"""


class WebSettings(ChannelSettings):  # token and TLS fields (PIA_WEB_TOKEN, ...) come from ChannelSettings
    """Every field is a `--kebab-case` flag and a `PIA_WEB_<NAME>` environment variable."""

    model_config = SettingsConfigDict(
        env_prefix="PIA_WEB_",
        cli_prog_name="python -m client.web",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        extra="ignore",
    )

    host: str = Field(
        "127.0.0.1",
        description="Interface to serve the page on (0.0.0.0 for every interface: turn on a login first; "
        "the container image sets it).",
    )
    port: int = Field(7860, description="HTTP port of the page.")
    generator: str = Field(
        "localhost:50051",
        description="Generator gRPC target: host:port, dns:///name:port (round robin over every replica), "
        "or ipv4:h1:p1,h2:p2.",
    )
    upscaler: str = Field("localhost:50052", description="Upscaler gRPC address (host:port).")
    health_every_s: float = Field(5.0, description="How often the page re-checks the services.")
    preview_every: int = Field(2, description="With 'show previews': a preview every this many steps.")
    upscale_factor: int = Field(4, description="Scale asked of the upscaler (must match its model).")
    max_images: int = Field(16, description="Upper end of the 'number of images' slider.")
    concurrency: int = Field(64, description="Events the page runs at once, across all visitors.")
    files_dir: str | None = Field(
        None, description="Where fetched images are kept for the browser (default: a temp dir)."
    )
    log_level: str = Field("INFO", description="Logging level.")
    auth_users: SecretStr | None = Field(
        None, description="Gradio login for the page: 'user:password', comma-separated (prefer the env variable)."
    )
    auth_file: str | None = Field(None, description="Gradio login: a file of 'user:password' lines.")
    catalogue_dir: str = Field(
        "outputs/web-catalogue",
        description="Catalogue jobs started on the page: one folder per job (index, summary, gallery, zip); "
        "the page lists every job found here, also after a restart.",
    )
    catalogue_concurrency: int = Field(4, description="Requests in flight per generator replica, per catalogue job.")
    catalogue_storage: str = Field(
        "",
        description="The generator's storage (a folder, or s3://bucket/prefix), listed to find what a catalogue job "
        "has stored when it resumes; empty: the generator's ALREADY_EXISTS tells, one request per image.",
    )
    catalogue_s3_endpoint: str | None = Field(None, description="S3 endpoint for catalogue_storage (MinIO, SeaweedFS).")

    def login(self) -> Callable[[str, str], bool] | None:
        """Gradio's auth callable (constant-time check), or None when no login is configured."""
        lines = self.auth_users.get_secret_value().split(",") if self.auth_users else []
        if self.auth_file:
            lines += Path(self.auth_file).read_text().splitlines()
        users = dict(line.strip().split(":", 1) for line in lines if ":" in line and not line.startswith("#"))
        if not users:
            return None

        def check(user: str, password: str) -> bool:
            expected = users.get(user, "")
            return hmac.compare_digest(password.encode(), expected.encode()) and user in users

        return check

    @classmethod
    def from_cli(cls, argv: Sequence[str] | None = None) -> Self:
        """Flags override environment variables, which override defaults; --help lists them all."""
        return cls(_cli_parse_args=list(argv) if argv is not None else True)


def _dropdown(choices: logic.Choices) -> dict:
    return gr.update(choices=choices.choices, value=choices.value)


def _progress_html(fraction: float, text: str) -> str:
    if not text:
        return ""
    return f'<progress max="1" value="{fraction:.3f}"></progress><div>{text}</div>'


def _placement_widgets() -> tuple[gr.Checkbox, gr.Image, gr.Checkbox, gr.Slider, gr.Image, gr.Markdown]:
    """Placement mode: upload the product's photo, tick "keep my exact product", see the detected mask."""
    with gr.Accordion("Keep my exact product (use a photo)", open=False, elem_id="placement"):
        keep = gr.Checkbox(label="Keep my exact product", value=False, elem_id="keep-product")
        photo = gr.Image(
            label="Product photo: a cutout with transparency, or the product on a plain light background",
            type="filepath",
            image_mode=None,  # keep the transparency of a cutout
            format="png",
            sources=["upload"],
            elem_id="product-photo",
        )
        with gr.Row():
            shadow = gr.Checkbox(label="Contact shadow", value=True, elem_id="shadow")
            strength = gr.Slider(
                label="Shadow strength (0: the scene's default)",
                minimum=0,
                maximum=1,
                step=0.05,
                value=0,
                elem_id="shadow-strength",
            )
        mask = gr.Image(
            label="Where the generator found it, with its shadow (left), and the mask it keeps exactly (right)",
            interactive=False,
            format="png",
            height=340,
            elem_id="product-mask",
        )
        note = gr.Markdown("", elem_id="product-mask-note")
    return keep, photo, shadow, strength, mask, note


def job_registry(settings: WebSettings, backends: Backends) -> JobRegistry:
    """The web process's catalogue jobs: run on the server's loop, in folders under `catalogue_dir`."""
    options = JobOptions(
        flow=FlowControl(concurrency=settings.catalogue_concurrency),
        storage=settings.catalogue_storage,
        s3_endpoint=settings.catalogue_s3_endpoint,
        upscaler=settings.upscaler,
        security=settings.channel_security(),
        zip=True,
    )
    return JobRegistry(Path(settings.catalogue_dir), backends.generator, options)


def _catalogue_tab(demo: gr.Blocks, backends: Backends, registry: JobRegistry) -> None:
    """Products x scenes (or a CSV/YAML file) -> a validated job in the registry; every job, its items,
    its images and its zip, refreshed by a timer. The jobs run in the registry, never in these handlers."""
    gr.Markdown(
        "Render products × scenes as one job (or upload a catalogue file, docs/CATALOGUE.md). "
        "The job runs in the web server: closing or reloading this page does not stop it."
    )
    with gr.Row():
        with gr.Column(scale=2, min_width=320):
            products = gr.Dropdown(label="Products", choices=[], multiselect=True, elem_id="cat-products")
            # Custom values allowed: a scene picked before its product was removed is left out with a note.
            scenes = gr.Dropdown(
                label="Scenes", choices=[], multiselect=True, allow_custom_value=True, elem_id="cat-scenes"
            )
            images = gr.Number(label="Images per scene (1–1000)", value=1, precision=0, elem_id="cat-images")
            upload = gr.File(
                label="…or a catalogue file (CSV or YAML; used instead of the picks)",
                file_types=[".csv", ".yaml", ".yml"],
                type="filepath",
                elem_id="cat-file",
            )
            with gr.Row():
                validate_btn = gr.Button("Validate", elem_id="cat-validate")
                start_btn = gr.Button("Start job", variant="primary", elem_id="cat-start")
            problems = gr.Markdown("", elem_id="cat-problems")
        with gr.Column(scale=3, min_width=360):
            jobs_table = gr.HTML(web_catalogue.jobs_html([]), elem_id="cat-jobs")
            # Custom values allowed: the choices follow the registry, so a tab may briefly hold a newer job.
            job = gr.Dropdown(label="Job", choices=[], allow_custom_value=True, elem_id="cat-job")
            detail = gr.HTML("", elem_id="cat-detail")
            with gr.Row():
                stop_btn = gr.Button("Stop job", variant="stop", interactive=False, elem_id="cat-stop")
                resume_btn = gr.Button("Resume job", interactive=False, elem_id="cat-resume")
                zip_btn = gr.DownloadButton("Download images.zip", visible=False, elem_id="cat-zip")
            job_gallery = gr.Gallery(label="Stored images", format="png", columns=6, elem_id="cat-gallery")
    # What this tab shows now, so a tick sends only what changed (a zip or a gallery is not re-sent each second).
    shown = gr.State({})

    async def on_load() -> dict:
        product_choices, scene_choices, message = await web_catalogue.load_picks(backends)
        return {
            products: gr.update(choices=product_choices.choices),
            scenes: gr.update(choices=scene_choices.choices),
            problems: message,
        }

    demo.load(on_load, outputs=[products, scenes, problems], show_progress="hidden")

    async def on_products(picked: list[str] | None) -> dict:
        # Choices only: the picks stay as the person made them (a pick made meanwhile is not lost).
        scene_choices, message = await web_catalogue.scenes_for(backends, picked or [])
        return {scenes: gr.update(choices=scene_choices.choices), problems: message}

    products.change(on_products, [products], [scenes, problems], show_progress="hidden")

    async def catalogue_file(
        picked: list[str], picked_scenes: list[str], count: float | None, path: str | None
    ) -> tuple[Path | None, list[str]]:
        if path:
            return Path(path), []
        return await web_catalogue.picked_catalogue(backends, picked or [], picked_scenes or [], count)

    async def checked(*values: Any) -> tuple[Path | None, str]:
        path, notes = await catalogue_file(*values)
        if path is None:
            return None, web_catalogue.problems_markdown(notes, [], 0)
        found, count = await web_catalogue.check(registry, backends, path)
        return (None if found else path), web_catalogue.problems_markdown(found, notes, count)

    picks = [products, scenes, images, upload]

    async def on_validate(*values: Any) -> str:
        return (await checked(*values))[1]

    async def on_start(*values: Any) -> dict:
        path, message = await checked(*values)
        if path is None:
            return {problems: message}
        try:
            started = registry.start(path)
        except (OSError, ValueError) as exc:  # e.g. --catalogue-dir not writable
            return {problems: f"{message}\n\nThe job could not start: {exc}"}
        message += f"\n\nJob **{started}** started."
        return {problems: message, job: _dropdown(web_catalogue.job_choices(registry.jobs(), started))}

    validate_btn.click(on_validate, picks, problems, show_progress="hidden")
    start_event = start_btn.click(on_start, picks, [problems, job], show_progress="hidden")

    async def refresh(chosen: str | None, before: dict) -> dict:
        views = registry.jobs()
        choices = web_catalogue.job_choices(views, chosen)
        view = next((v for v in views if v.job == choices.value), None)
        now = dict(before)
        update: dict[Block, Any] = {
            jobs_table: web_catalogue.jobs_html(views),
            detail: web_catalogue.job_html(view),
            stop_btn: gr.update(interactive=web_catalogue.can_stop(view)),
            resume_btn: gr.update(interactive=web_catalogue.can_resume(view)),
        }
        if (now.get("choices"), now.get("job")) != (choices.choices, choices.value):
            update[job] = _dropdown(choices)
            now.update(choices=choices.choices, job=choices.value)
        zip_file = view.zip_file if view is not None else None
        zip_key = f"{zip_file}:{zip_file.stat().st_mtime}" if zip_file else ""
        if now.get("zip") != zip_key:
            update[zip_btn] = gr.update(value=str(zip_file), visible=True) if zip_file else gr.update(visible=False)
            now["zip"] = zip_key
        gallery_key = f"{view.job}:{view.done}" if view else ""
        if now.get("gallery") != gallery_key:
            update[job_gallery] = await web_catalogue.gallery(backends, view)
            now["gallery"] = gallery_key
        update[shown] = now
        return update

    outputs = [jobs_table, job, detail, stop_btn, resume_btn, zip_btn, job_gallery, shown]
    watch: dict[str, Any] = dict(inputs=[job, shown], outputs=outputs, show_progress="hidden")
    gr.Timer(1.0).tick(refresh, **watch)
    start_event.then(refresh, **watch)
    job.input(refresh, **watch)

    async def on_stop(chosen: str | None, before: dict) -> dict:
        if chosen:
            registry.stop(chosen)
        return await refresh(chosen, before)

    async def on_resume(chosen: str | None, before: dict) -> dict:
        if chosen:
            try:
                registry.resume(chosen)
            except ValueError as exc:
                gr.Warning(str(exc))
        return await refresh(chosen, before)

    stop_btn.click(on_stop, **watch)
    resume_btn.click(on_resume, **watch)


def build(settings: WebSettings, backends: Backends | None = None, registry: JobRegistry | None = None) -> gr.Blocks:
    """The page; `backends` defaults to the addresses in `settings`, `registry` to its catalogue jobs."""
    if backends is None:
        files_dir = settings.files_dir or tempfile.mkdtemp(prefix="pia-web-")
        backends = Backends(settings.generator, settings.upscaler, files_dir, settings.channel_security())
    if registry is None:
        registry = job_registry(settings, backends)

    # Gradio's own copies of served files: swept hourly once a day old (ours go with each tab's state).
    with gr.Blocks(title="Product in Action", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        # Each tab's Session by Gradio session id, so a closed tab's work can be stopped (see on_unload).
        open_tabs: dict[str, Session] = {}

        def forget(state: Session) -> None:
            for key in [key for key, value in open_tabs.items() if value is state]:
                del open_tabs[key]
            logic.forget(state)

        session = gr.State(Session(), delete_callback=forget)
        gr.Markdown("# Product in Action\nPhotos of your own product in scenes you choose.")
        banner = gr.Markdown("Checking the services…", elem_id="status-banner")

        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Generate", id="generate", elem_id="generate-tab"):
                with gr.Row():
                    with gr.Column(scale=2, min_width=320):
                        product = gr.Dropdown(label="Product", choices=[], elem_id="product")
                        template = gr.Dropdown(label="Scene", choices=[], elem_id="template")
                        text = gr.Textbox(label="Extra details (optional)", lines=2, elem_id="scene-text")
                        prompt_preview = gr.Textbox(
                            label="Final prompt", lines=3, interactive=False, elem_id="prompt-preview"
                        )
                        # No minimum/maximum on number widgets: Gradio would refuse an out-of-range value with a
                        # traceback in the log and no word on the page; web_logic checks them and says why.
                        num_images = gr.Number(
                            label=f"Number of images (1–{settings.max_images})",
                            value=4,
                            precision=0,
                            elem_id="num-images",
                        )
                        show_previews = gr.Checkbox(label="Show step previews while generating", value=False)
                        keep_product, product_photo, shadow, shadow_strength, mask_view, mask_note = (
                            _placement_widgets()
                        )
                        with gr.Accordion("Advanced", open=False):
                            with gr.Row():
                                seed = gr.Number(
                                    label="Seed", value=None, precision=0, placeholder="random", elem_id="seed"
                                )
                                random_seed = gr.Checkbox(label="Random seed", value=True)
                            with gr.Row():
                                steps = gr.Number(
                                    label="Steps (0: default)",
                                    value=None,
                                    precision=0,
                                    placeholder="default",
                                    elem_id="steps",
                                )
                                guidance = gr.Number(
                                    label="Guidance (0: default)",
                                    value=None,
                                    step=0.5,
                                    placeholder="default",
                                    elem_id="guidance",
                                )
                            with gr.Row():
                                width = gr.Number(
                                    label="Width (0: default)", value=None, precision=0, step=8, placeholder="default"
                                )
                                height = gr.Number(
                                    label="Height (0: default)", value=None, precision=0, step=8, placeholder="default"
                                )
                            negative = gr.Textbox(
                                label="Negative prompt (blank: the scene's own)", lines=1, elem_id="negative"
                            )
                            negative_preview = gr.Textbox(
                                label="Final negative prompt", lines=1, interactive=False, elem_id="negative-preview"
                            )
                            scheduler = gr.Dropdown(
                                label="Scheduler",
                                choices=[("Model default", ""), *((name, name) for name in logic.SCHEDULERS)],
                                value="",
                            )
                            with gr.Row():
                                style = gr.Dropdown(
                                    label="Style adapter", choices=[("None", "")], value="", elem_id="style"
                                )
                                style_weight = gr.Number(
                                    label="Style weight (-2 to 2)", value=1.0, step=0.05, elem_id="style-weight"
                                )
                            with gr.Row():
                                background = gr.Dropdown(
                                    label="Background adapter", choices=[("None", "")], value="", elem_id="background"
                                )
                                background_weight = gr.Number(
                                    label="Background weight (-2 to 2)",
                                    value=1.0,
                                    step=0.05,
                                    elem_id="background-weight",
                                )
                        with gr.Row():
                            generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                            more_btn = gr.Button("Generate more", elem_id="generate-more")
                            stop_btn = gr.Button("Stop", variant="stop", interactive=False, elem_id="stop")

                    with gr.Column(scale=3, min_width=360):
                        progress = gr.HTML(_progress_html(0, ""), elem_id="progress")
                        status = gr.Markdown("", elem_id="status")
                        # Plain HTML: the frame takes the preview's own size (shown at a whole-number scale).
                        preview = gr.HTML("", visible=False, elem_id="preview")
                        gallery = gr.Gallery(
                            label="Images",
                            format="png",
                            columns=3,
                            object_fit="contain",
                            elem_id="gallery",
                            preview=False,
                        )
                        details = gr.Markdown(logic.select_image(Session(), None).summary, elem_id="details")
                        with gr.Accordion("Technical details", open=False, elem_id="technical-details"):
                            technical = gr.Markdown("", elem_id="technical")
                        with gr.Row():
                            upscale_btn = gr.Button(
                                f"Upscale ×{settings.upscale_factor}", interactive=False, elem_id="upscale"
                            )
                            reuse_btn = gr.Button("Reuse settings", interactive=False, elem_id="reuse")
                        upscale_status = gr.Markdown("", elem_id="upscale-status")
                        upscaled = gr.Image(
                            label="Upscaled",
                            type="filepath",
                            format="png",
                            interactive=False,
                            buttons=["download", "fullscreen"],
                            elem_id="upscaled",
                        )
                        download = gr.DownloadButton("Download upscaled PNG", visible=False, elem_id="download")
            with gr.Tab("Catalogue", id="catalogue", elem_id="catalogue-tab"):
                _catalogue_tab(demo, backends, registry)

        form: dict[str, Block] = {
            "product_id": product,
            "template_id": template,
            "text": text,
            "num_images": num_images,
            "show_previews": show_previews,
            "random_seed": random_seed,
            "seed": seed,
            "steps": steps,
            "guidance": guidance,
            "width": width,
            "height": height,
            "negative_prompt": negative,
            "scheduler": scheduler,
            "style_id": style,
            "style_weight": style_weight,
            "background_id": background,
            "background_weight": background_weight,
            "keep_product": keep_product,
            "product_photo": product_photo,
            "shadow": shadow,
            "shadow_strength": shadow_strength,
        }
        assert list(form) == FORM_FIELDS, "one widget per web_logic.Form field"
        catalog_outputs = [banner, product, template, text, style, background, status]

        # Services: checked at load and on a timer; the catalog reloads when the generator comes back.

        def catalog_update(view: logic.CatalogView) -> dict:
            return {
                product: _dropdown(view.products),
                template: _dropdown(view.templates),
                text: gr.update(label=view.text_label),
                style: _dropdown(view.styles),
                background: _dropdown(view.backgrounds),
                status: view.message or gr.skip(),
            }

        def banner_update(health: logic.HealthView) -> dict:
            return gr.update(value=health.banner, elem_classes=["ok" if health.ok else "warn"])

        async def refreshed(state: Session, values: dict, force: bool) -> dict:
            health = await logic.check_health(backends, state)
            update: dict[Block, Any] = {banner: banner_update(health)}
            if force or health.reload:
                view = await logic.load_catalog(backends, state, values["product_id"], values["template_id"])
                update.update(catalog_update(view))
                chosen = Form(**{**values, "product_id": view.products.value, "template_id": view.templates.value})
                prompt, negative = await logic.preview_prompt(backends, chosen) if chosen.product_id else ("", "")
                update.update({prompt_preview: prompt, negative_preview: negative})
            return update

        async def on_load(state: Session, request: gr.Request, **values: Any) -> dict:
            if request.session_hash:
                open_tabs[request.session_hash] = state
            return await refreshed(state, values, force=True)

        async def on_tick(state: Session, **values: Any) -> dict:
            return await refreshed(state, values, force=False)

        refresh: dict[str, Any] = dict(
            inputs=[session],
            inputs_kwargs=form,
            outputs=[*catalog_outputs, prompt_preview, negative_preview],
            show_progress="hidden",
        )
        demo.load(on_load, **refresh)
        gr.Timer(settings.health_every_s).tick(on_tick, **refresh)

        # Scene and prompt preview (the generator's ComposePrompt).

        async def on_preview(**values: Any) -> tuple[str, str]:
            return await logic.preview_prompt(backends, Form(**values))

        def refresh_preview(event: Any) -> None:
            event.then(
                on_preview, inputs_kwargs=form, outputs=[prompt_preview, negative_preview], show_progress="hidden"
            )

        async def on_product(state: Session, product_id: str | None, template_id: str | None) -> dict:
            try:
                templates = await logic.load_templates(backends, state, product_id, template_id)
            except Exception as exc:
                message = logic.friendly_error(exc, "generator", backends.generator_address)
                return {template: _dropdown(logic.Choices()), status: message}
            return {template: _dropdown(templates), text: gr.update(label=logic.text_label(state, templates.value))}

        def on_template(state: Session, template_id: str | None) -> dict:
            return gr.update(label=logic.text_label(state, template_id))

        picked = product.input(
            on_product, [session, product, template], [template, text, status], show_progress="hidden"
        )
        refresh_preview(picked)
        refresh_preview(template.input(on_template, [session, template], text, show_progress="hidden"))
        for box in (text, negative):
            box.input(
                on_preview,
                inputs_kwargs=form,
                outputs=[prompt_preview, negative_preview],
                trigger_mode="always_last",
                show_progress="hidden",
            )

        def on_adapter(state: Session, adapter_id: str) -> float:
            return logic.adapter_weight(state, adapter_id)

        # The adapters' own tokens end the prompt (", at night"): the preview follows every adapter change.
        refresh_preview(style.input(on_adapter, [session, style], style_weight, show_progress="hidden"))
        refresh_preview(background.input(on_adapter, [session, background], background_weight, show_progress="hidden"))
        for weight in (style_weight, background_weight):
            weight.input(
                on_preview,
                inputs_kwargs=form,
                outputs=[prompt_preview, negative_preview],
                trigger_mode="always_last",
                show_progress="hidden",
            )
        show_previews.change(lambda on: gr.update(visible=on), show_previews, preview, show_progress="hidden")

        # Placement mode: show the server's own mask as soon as a photo is uploaded or the scene changes.

        async def on_photo(**values: Any) -> tuple[Any, str]:
            view = await logic.detect_mask(backends, Form(**values))
            return view.image, view.message

        for trigger in (product_photo.change, template.change, shadow.change, shadow_strength.release):
            trigger(on_photo, inputs_kwargs=form, outputs=[mask_view, mask_note], show_progress="hidden")
        # Keeping the exact product changes what the scene is drawn from (the scene prompt): say so.
        for trigger in (keep_product.change, product_photo.change):
            trigger(on_preview, inputs_kwargs=form, outputs=[prompt_preview, negative_preview], show_progress="hidden")

        # Generate / Generate more / Stop.

        run_outputs = [
            gallery,
            progress,
            status,
            preview,
            generate_btn,
            more_btn,
            stop_btn,
            upscale_btn,
            reuse_btn,
            details,
            technical,
            seed,
            upscale_status,
            upscaled,
            download,
        ]

        def generate_update(state: Session, view: logic.GenerateView) -> dict:
            if view.warning:
                gr.Warning(view.warning)
            update: dict[Block, Any] = {
                gallery: view.gallery,
                progress: _progress_html(view.progress, view.progress_text),
                status: view.status,
                preview: logic.preview_html(view.preview),
                generate_btn: gr.update(interactive=not view.running),
                more_btn: gr.update(interactive=not view.running),
                stop_btn: gr.update(interactive=view.running),
            }
            if view.seed is not None:
                update[seed] = view.seed  # the seed used, also after a random-seed run
            if view.new_gallery:  # the selection, its details and its upscale went with the old gallery
                chosen = logic.select_image(state, None)
                update.update(
                    {
                        upscale_btn: gr.update(interactive=False),
                        reuse_btn: gr.update(interactive=False),
                        details: chosen.summary,
                        technical: chosen.technical,
                        upscale_status: "",
                        upscaled: None,
                        download: gr.update(value=None, visible=False),
                    }
                )
            return update

        async def on_generate(state: Session, **values: Any) -> AsyncIterator[dict]:
            views = logic.generate(
                backends, state, Form(**values), preview_every=settings.preview_every, max_images=settings.max_images
            )
            async for view in views:
                yield generate_update(state, view)

        async def on_generate_more(state: Session, **values: Any) -> AsyncIterator[dict]:
            views = logic.generate(
                backends,
                state,
                Form(**values),
                append=True,
                preview_every=settings.preview_every,
                max_images=settings.max_images,
            )
            async for view in views:
                yield generate_update(state, view)

        run: dict[str, Any] = dict(inputs=[session], inputs_kwargs=form, outputs=run_outputs, show_progress="hidden")
        generate_btn.click(on_generate, **run)
        more_btn.click(on_generate_more, **run)

        # Selecting, reusing, upscaling.

        def on_select(state: Session, evt: gr.SelectData) -> dict:
            chosen = logic.select_image(state, evt.index)
            selected = state.selected is not None
            return {
                details: chosen.summary,
                technical: chosen.technical,
                upscale_btn: gr.update(interactive=selected),
                reuse_btn: gr.update(interactive=selected),
            }

        gallery.select(on_select, session, [details, technical, upscale_btn, reuse_btn], show_progress="hidden")

        async def on_reuse(state: Session, **values: Any) -> dict:
            view = await logic.reuse_settings(backends, state, Form(**values))
            if view.form is None:
                gr.Warning(view.message)
                return {status: view.message}
            update: dict = {component: getattr(view.form, name) for name, component in form.items()}
            update[template] = _dropdown(view.templates)
            update[text] = gr.update(value=view.form.text, label=view.text_label)
            update[status] = view.message
            return update

        reuse_event = reuse_btn.click(
            on_reuse, inputs=[session], inputs_kwargs=form, outputs=[*form.values(), status], show_progress="hidden"
        )
        refresh_preview(reuse_event)

        async def on_upscale(state: Session) -> AsyncIterator[dict]:
            async for view in logic.upscale(backends, state, settings.upscale_factor):
                if view.warning:
                    gr.Warning(view.warning)
                update = {upscale_status: view.status, upscale_btn: gr.update(interactive=not view.running)}
                if view.path:
                    name = os.path.basename(view.path)
                    update[upscaled] = view.path
                    update[download] = gr.update(value=view.path, visible=True, label=f"Download {name}")
                yield update

        upscale_btn.click(
            on_upscale, session, [upscale_status, upscale_btn, upscaled, download], show_progress="hidden"
        )

        # Stop does not cancel the Generate event (that would kill it before it can report): it flags the
        # tab's session and cancels its gRPC calls; the running handler then says "Stopped after N of M".
        # That handler is then the only one writing the status: a "Stopping…" from here could reach the page
        # after the handler's last view and stay there (seen in about 2 runs of 5).
        def on_stop(state: Session) -> dict:
            message = logic.stop(state)
            if message == "Stopping…":
                return {stop_btn: gr.update(interactive=False)}
            return {
                status: message,
                generate_btn: gr.update(interactive=True),
                more_btn: gr.update(interactive=True),
                stop_btn: gr.update(interactive=False),
            }

        stop_btn.click(
            on_stop, session, [status, generate_btn, more_btn, stop_btn], queue=False, show_progress="hidden"
        )

        # A closed tab: Gradio runs unload (with no inputs) when the tab's heartbeat ends, but keeps the tab's
        # state for an hour; its running calls are cancelled now, so the services stop at their next step.
        def on_unload(request: gr.Request) -> None:
            state = open_tabs.pop(request.session_hash or "", None)
            if state is not None and logic.stop(state) == "Stopping…":
                log.info("a tab closed during a run: cancelling its requests")
            else:
                # Gradio may have cancelled the tab's running handler itself when the page went (its calls
                # with it) before the heartbeat ended: nothing left to stop.
                log.info("a tab closed: nothing running")

        demo.unload(on_unload)
    return demo


def _import_matplotlib_once() -> None:
    """Gradio imports matplotlib inside every event, to switch its backend. Where matplotlib is installed,
    the first import (slow: it may build its font cache) raced between the page's first events fails one of
    them with a traceback ('MatplotlibBackendMananger' has no '_original_backend'). Import it before serving."""
    try:
        import matplotlib  # optional: not in requirements/web.txt, and the page works without it
    except ImportError:
        return
    matplotlib.get_backend()


def launch(settings: WebSettings, backends: Backends | None = None, block: bool = True) -> gr.Blocks:
    """Build and serve the page (queue on, share off); with block=False it returns once serving."""
    _import_matplotlib_once()
    demo = build(settings, backends)
    demo.queue(default_concurrency_limit=settings.concurrency).launch(
        server_name=settings.host,
        server_port=settings.port,
        share=False,
        auth=settings.login(),
        allowed_paths=[str(Path(settings.catalogue_dir).resolve())],  # the jobs' images.zip
        show_error=False,
        prevent_thread_lock=not block,
        quiet=True,
        ssr_mode=False,
        css=CSS,
    )
    return demo


def main(argv: Sequence[str] | None = None) -> None:
    settings = WebSettings.from_cli(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s web %(name)s: %(message)s")
    log.info(
        "web page on http://%s:%d (generator %s, upscaler %s)",
        settings.host,
        settings.port,
        settings.generator,
        settings.upscaler,
    )
    launch(settings)


if __name__ == "__main__":
    main()
