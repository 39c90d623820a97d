"""The web page's callbacks (client.web_logic) against real servers on free ports, with the tiny model."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image

from client import web_logic as logic
from client.web_logic import Backends, Form, Session
from tests.helpers import free_port

# Tiny images and few steps keep each image well under a second of compute on an idle CPU.
FAST = dict(steps=3, width=64, height=64)


@pytest.fixture
def closed() -> str:
    return f"127.0.0.1:{free_port()}"


@pytest.fixture
async def backends(generator, closed, tmp_path) -> AsyncIterator[Backends]:
    """Generator up; upscaler address closed (tests that upscale use `backends_up`)."""
    backends = Backends(f"127.0.0.1:{generator.port}", closed, tmp_path / "files")
    yield backends
    await backends.close()


@pytest.fixture
async def backends_up(generator, upscaler, tmp_path) -> AsyncIterator[Backends]:
    backends = Backends(f"127.0.0.1:{generator.port}", f"127.0.0.1:{upscaler.port}", tmp_path / "files")
    yield backends
    await backends.close()


@pytest.fixture(scope="module")
async def made(generator, closed_module, tmp_path_factory) -> AsyncIterator[tuple[Form, Session]]:
    """Two images made once, with settings away from the defaults, for tests that start from a gallery."""
    backends = Backends(f"127.0.0.1:{generator.port}", closed_module, tmp_path_factory.mktemp("made"))
    session = Session()
    form = await form_for(backends, session, num_images=2, template_id="custom", text="a red table", seed=77)
    form.random_seed, form.scheduler, form.guidance = False, "euler", 5.0
    form.style_id, form.style_weight = "tiny-sunset", 0.5
    await run(logic.generate(backends, session, form))
    yield form, session
    await backends.close()


@pytest.fixture(scope="module")
def closed_module() -> str:
    return f"127.0.0.1:{free_port()}"


def with_gallery(made: tuple[Form, Session]) -> Session:
    """A new tab's session holding the made images."""
    return Session(images=list(made[1].images), adapters=dict(made[1].adapters))


async def form_for(backends: Backends, session: Session, **fields) -> Form:
    """The form as the page fills it on load (first product, first scene), then `fields`."""
    view = await logic.load_catalog(backends, session)
    form = Form(product_id=view.products.value, template_id=view.templates.value, **FAST)
    for name, value in fields.items():
        setattr(form, name, value)
    return form


async def run(agen) -> list[logic.GenerateView]:
    return [view async for view in agen]


async def test_catalog_loads_products_templates_and_adapters(backends):
    session = Session()
    health = await logic.check_health(backends, session)
    assert health.reload and "upscaler is unreachable" in health.banner
    assert "generator" not in health.banner.split("upscaler")[0].lower()

    view = await logic.load_catalog(backends, session)
    assert view.message == ""
    assert ("Tiny Mug · tiny", "tiny-mug") in view.products.choices
    assert ("Tiny Star · tiny", "tiny-star") in view.products.choices
    template_ids = [value for _, value in view.templates.choices]
    assert {"beach", "flowers", "custom"} <= set(template_ids)
    assert view.templates.value != "custom", "the default scene must not need typing"
    assert ("Sunset light", "tiny-sunset") in view.styles.choices and view.styles.value == ""
    assert view.text_label == "Extra details (optional)"
    assert logic.text_label(session, "custom") == "Describe the scene"
    assert logic.adapter_weight(session, "tiny-sunset") == 1.0

    # A choice that still exists survives a reload (the health timer's refresh).
    again = await logic.load_catalog(backends, session, "tiny-mug", "beach")
    assert (again.products.value, again.templates.value) == ("tiny-mug", "beach")
    assert (await logic.check_health(backends, session)).reload is False
    # Back after an outage (the page's timer sees the flip): reload once.
    session.generator_health = logic.UNREACHABLE
    assert (await logic.check_health(backends, session)).reload is True


async def test_prompt_preview_is_the_generators_compose_prompt(backends, generator_stub, tmp_path):
    session = Session()
    for fields in (
        dict(template_id="beach"),
        dict(template_id="beach", text="golden hour", negative_prompt="blurry"),
        dict(template_id="custom", text="on a marble kitchen counter"),
        dict(template_id="beach", style_id="tiny-sunset", style_weight=0.5),
    ):
        form = await form_for(backends, session, **fields)
        prompt, negative = await logic.preview_prompt(backends, form)
        expected = await generator_stub.ComposePrompt(logic.build_request(form))
        assert (prompt, negative) == (expected.prompt, expected.negative_prompt)
        assert "<tiny-" in prompt

    # With a style adapter the preview ends with its tokens, exactly as the stored image's prompt does.
    form = await form_for(backends, session, template_id="beach", style_id="tiny-sunset", style_weight=0.5)
    form.num_images = 1000  # a number out of range does not change the prompt: the preview still shows it
    prompt, _ = await logic.preview_prompt(backends, form)
    assert prompt.endswith(", sunset style"), prompt
    form.num_images = 1
    await run(logic.generate(backends, session, form))
    assert session.images[0].parameters.prompt == prompt

    # Keeping the exact product, the preview is what the scene around it is drawn from (no product token),
    # as the stored image's parameters record it.
    from demo.placement_eval import product_photo

    photo = tmp_path / "star.png"
    product_photo("split-star", "white", size=64)[0].save(photo)
    form = await form_for(backends, session, template_id="beach", keep_product=True, product_photo=str(photo))
    prompt, _ = await logic.preview_prompt(backends, form)
    assert prompt.startswith("Around your exact product: ") and "<tiny-" not in prompt, prompt
    await run(logic.generate(backends, session, form))
    assert prompt.endswith(session.images[-1].parameters.scene_prompt)

    # The free-text scene without text: the generator's reason, for people, not a status code or an id.
    form = await form_for(backends, session, template_id="custom", text="")
    prompt, negative = await logic.preview_prompt(backends, form)
    assert prompt == "Describe the scene for 'Custom'." and negative == ""


def test_build_request_leaves_blank_fields_to_the_server():
    request = logic.build_request(Form(product_id="p", template_id="beach", num_images=2))
    assert not request.HasField("seed") and not request.HasField("negative_prompt")
    assert not request.HasField("guidance_scale") and request.steps == 0 and request.width == 0
    # Gradio's number boxes say 0 for "empty": 0 means the server default too.
    zeros = logic.build_request(Form(product_id="p", steps=0, guidance=0, width=0, height=0, seed=0))
    assert not zeros.HasField("guidance_scale") and not zeros.HasField("seed") and zeros.steps == zeros.width == 0
    assert request.inline_images and request.preview_every == 0 and not request.adapters

    form = Form(
        product_id="p", seed=7, random_seed=False, steps=9, guidance=1.5, scheduler="euler_a", show_previews=True
    )
    form.style_id, form.style_weight = "tiny-sunset", 0.5
    request = logic.build_request(form, preview_every=3)
    assert request.seed == 7 and request.steps == 9 and request.HasField("guidance_scale")
    assert request.guidance_scale == 1.5 and request.scheduler == "euler_a" and request.preview_every == 3
    assert [(a.adapter_id, a.weight) for a in request.adapters] == [("tiny-sunset", 0.5)]
    with pytest.raises(ValueError, match="Choose a product"):
        logic.build_request(Form())


async def test_generate_streams_each_image_as_it_arrives(backends, made):
    session = with_gallery(made)  # "Generate" starts a new gallery
    logic.select_image(session, 1)
    form = await form_for(backends, session, num_images=3, seed=1234, random_seed=False, show_previews=True)
    views = await run(logic.generate(backends, session, form, preview_every=1))

    # The old gallery stays until the generator accepts; then a new one grows image by image.
    sizes = [len(v.gallery) for v in views]
    assert sizes[0] == 2 and sorted(set(sizes[1:])) == [0, 1, 2, 3] and sizes[1:] == sorted(sizes[1:]), sizes
    assert session.selected is None
    first = next(v for v in views if len(v.gallery) == 1)
    assert first.running and 0 < first.progress < 1, "image 1 must be shown while the request still runs"
    assert any(v.preview is not None for v in views), "previews were asked for"
    assert any("step" in v.status for v in views)
    last = views[-1]
    assert not last.running and last.progress == 1.0 and last.status.startswith("Done: 3 image(s)")
    assert not session.calls

    assert [e.seed for e in session.images] == [1234, 1235, 1236]
    assert [v.new_gallery for v in views].count(True) == 1 and views[-1].seed == 1234
    for (path, caption), entry in zip(last.gallery, session.images, strict=True):
        assert caption.endswith(f"seed {entry.seed} · 64 × 64 px")
        assert Image.open(path).size == (64, 64) and Path(path).read_bytes().startswith(b"\x89PNG")
        assert entry.uri.startswith("file://") and entry.parameters.steps == FAST["steps"]

    # "Generate more" appends; with "Random seed" the seed it drew is shown afterwards.
    more = await run(logic.generate(backends, session, await form_for(backends, session), append=True))
    assert len(more[0].gallery) == 3 and len(more[-1].gallery) == 4
    assert not any(v.new_gallery for v in more) and more[-1].seed == session.images[3].seed
    assert [e.seed for e in session.images][:3] == [1234, 1235, 1236]

    # A closed tab's images go with its state.
    assert len(session.folders) == 2
    logic.forget(session)
    assert not session.folders and not any(Path(path).exists() for path, _ in more[-1].gallery)


async def test_select_and_reuse_settings_reproduce_an_image(backends, made):
    form, session = made[0], with_gallery(made)

    assert "Click an image" in logic.select_image(session, None).summary
    details = logic.select_image(session, 1)
    # Names in the main view; ids, steps, scheduler, device and storage under "Technical details".
    assert session.selected == 1 and "`78`" in details.summary and "Sunset light × 0.5" in details.summary
    assert "Tiny " in details.summary and "Custom + “a red table”" in details.summary
    assert "64 × 64 px" in details.summary
    for technical in ("euler", "`tiny-sunset` × 0.5", "cpu", "file://", "Steps", "Guidance"):
        assert technical in details.technical and technical not in details.summary, technical

    view = await logic.reuse_settings(backends, session, Form(num_images=1))
    reused = view.form
    assert reused is not None and "image #2" in view.message
    assert (reused.product_id, reused.template_id, reused.text) == (form.product_id, "custom", "a red table")
    assert (reused.seed, reused.random_seed, reused.steps, reused.guidance) == (78, False, FAST["steps"], 5.0)
    assert (reused.scheduler, reused.style_id, reused.style_weight) == ("euler", "tiny-sunset", 0.5)
    assert (reused.width, reused.height, reused.num_images) == (64, 64, 1)
    assert view.templates.value == "custom" and view.text_label == "Describe the scene"

    original = Path(session.images[1].path).read_bytes()
    await run(logic.generate(backends, session, reused))
    assert session.images[0].seed == 78
    assert Image.open(session.images[0].path).tobytes() == Image.open(io.BytesIO(original)).tobytes()


async def test_stop_cancels_the_running_request(backends, generator):
    session = Session()
    form = await form_for(backends, session, num_images=3, steps=60)
    agen = logic.generate(backends, session, form)
    views = []
    async for view in agen:
        views.append(view)
        if "step" in view.status:
            assert len(session.calls) == 1
            assert logic.stop(session) == "Stopping…"
    last = views[-1]
    assert not last.running and last.status.startswith("Stopped after 0 of 3")
    assert not session.calls and logic.stop(session) == "Nothing is running."

    # As the page does it: Stop is its own event, in another task, while Generate waits for the next step.
    async def consume(views: list) -> None:
        async for view in logic.generate(backends, session, form):
            views.append(view)

    for press_at in ("step", "Sending"):  # mid-run, and before the call even exists
        views = []
        task = asyncio.create_task(consume(views))
        while not any(press_at in v.status for v in views):
            await asyncio.sleep(0.01)
        assert logic.stop(session) == "Stopping…"
        await asyncio.wait_for(task, 60)
        assert views[-1].status.startswith("Stopped after 0 of 3") and not views[-1].running, views[-1]

    # Gradio's `cancels=` closes the callback's generator instead: the call is cancelled too.
    agen = logic.generate(backends, session, form)
    async for view in agen:
        if "step" in view.status:
            break
    (call,) = session.calls
    await agen.aclose()
    assert call.cancelled() and not session.calls

    # The server dropped both requests (each stops at its next denoising step), not 2 × 3 × 60 steps later.
    deadline = time.monotonic() + 30
    while generator.dispatcher.tickets and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not generator.dispatcher.tickets


async def test_upscale_returns_the_image_four_times_larger(backends_up, made):
    session = with_gallery(made)
    logic.select_image(session, 0)
    views = [view async for view in logic.upscale(backends_up, session, 4)]
    last = views[-1]
    assert views[0].running and not last.running and last.warning == "", last.status
    assert Image.open(last.path).size == (256, 256)
    assert Path(last.path).name == f"{session.images[0].parameters.product_id}-{session.images[0].seed}-x4.png"
    assert last.status == "Upscaled to 256 × 256 px (from 64 × 64 px)."


async def test_services_down_give_readable_messages(closed, tmp_path, backends, made):
    down = Backends(closed, f"127.0.0.1:{free_port()}", tmp_path / "down")
    session = Session()
    health = await logic.check_health(down, session)
    assert not health.ok and not health.reload and "Neither the image generator" in health.banner

    view = await logic.load_catalog(down, session)
    assert view.products.choices == [] and view.message.startswith("The generator is unreachable (127.0.0.1:")
    prompt, _ = await logic.preview_prompt(down, Form(product_id="tiny-star", template_id="beach"))
    assert prompt.startswith("The generator is unreachable")

    views = await run(logic.generate(down, session, Form(product_id="tiny-star", template_id="beach")))
    assert not views[-1].running and views[-1].warning.startswith("The generator is unreachable")
    assert views[-1].status == views[-1].warning and "Traceback" not in views[-1].status

    # Generator up, upscaler down: generating works, upscaling says why it cannot.
    health = await logic.check_health(backends, session)
    assert "upscaler is unreachable" in health.banner and "Generating still works" in health.banner
    session = with_gallery(made)
    logic.select_image(session, 0)
    views = [view async for view in logic.upscale(backends, session, 4)]
    assert views[-1].warning.startswith("The upscaler is unreachable") and views[-1].path is None

    # Nothing selected: a hint, no call.
    views = [view async for view in logic.upscale(backends, Session(), 4)]
    assert views == [logic.UpscaleView("Select an image first.", False, warning="Select an image first.")]
    assert (await logic.reuse_settings(backends, Session(), Form())).message == "Select an image first."
    await down.close()


async def test_server_side_errors_are_sentences(backends, made):
    session = with_gallery(made)
    logic.select_image(session, 0)
    form = await form_for(backends, session, width=63)
    views = await run(logic.generate(backends, session, form))
    assert views[-1].warning.startswith("Width must be a multiple of"), views[-1].warning
    # The refused request leaves the gallery and the selection as they were.
    assert len(views[-1].gallery) == 2 and session.selected == 0
    # The generator's own bounds, in the page's words.
    views = await run(logic.generate(backends, session, await form_for(backends, session, steps=1000)))
    assert views[-1].warning == "Steps must be between 1 and 150, got 1000.", views[-1].warning


async def test_numbers_out_of_range_are_refused_in_words(backends, made):
    session = with_gallery(made)
    cases = {
        "num_images": (1000, "Number of images must be between 1 and 16; you typed 1000."),
        "seed": (-5, "Seed must be at least 0; you typed -5."),
        "steps": (-1, "Steps must be at least 0; you typed -1."),
        "width": (1e12, "Width is far too large; you typed 1000000000000."),
        "style_weight": (7, "Style weight must be between -2 and 2; you typed 7."),
    }
    for name, (value, message) in cases.items():
        form = await form_for(backends, session, random_seed=False, seed=1, style_id="tiny-sunset", style_weight=1.0)
        setattr(form, name, value)
        views = await run(logic.generate(backends, session, form, max_images=16))
        assert [(v.status, v.warning, v.running) for v in views] == [(message, message, False)], name
        assert len(views[0].gallery) == 2 and not session.calls


def test_live_preview_frame_is_the_image_scaled_exactly():
    html_ = logic.preview_html(Image.new("RGB", (32, 24)))
    assert 'width="256" height="192"' in html_ and "32 × 24 px, shown ×8" in html_
    assert logic.preview_html(None) == ""


def test_settings_from_flags_and_env(monkeypatch):
    from client.web import WebSettings

    monkeypatch.setenv("PIA_WEB_GENERATOR", "gen:1")
    monkeypatch.setenv("PIA_WEB_PORT", "7000")
    settings = WebSettings.from_cli(["--upscaler", "up:2", "--port", "7001"])
    # Loopback unless told otherwise, like the services (the container image sets PIA_WEB_HOST=0.0.0.0).
    assert (settings.generator, settings.upscaler, settings.port, settings.host) == ("gen:1", "up:2", 7001, "127.0.0.1")
    monkeypatch.setenv("PIA_WEB_HOST", "0.0.0.0")
    assert WebSettings.from_cli([]).host == "0.0.0.0"


def test_page_builds_offline(tmp_path, closed):
    """The layout wires every widget to a callback, with no service reachable."""
    from client.web import FORM_FIELDS, WebSettings, build

    demo = build(WebSettings(generator=closed, upscaler=closed), Backends(closed, closed, tmp_path))
    assert demo.analytics_enabled is False
    names = {fn.name for fn in demo.fns.values()}
    assert {"on_load", "on_tick", "on_generate", "on_generate_more", "on_stop", "on_upscale", "on_reuse"} <= names
    assert "on_unload" in names, "a closed tab must stop its run"
    # The Catalogue tab: validate, start, stop, resume, and a timer's refresh of every job.
    assert {"on_validate", "on_start", "on_stop", "on_resume", "refresh"} <= names
    # Stop must not cancel the Generate event: the handler itself reports "Stopped after N of M images".
    assert all(not fn.cancels for fn in demo.fns.values() if fn.name == "on_stop")
    assert FORM_FIELDS[0] == "product_id"
