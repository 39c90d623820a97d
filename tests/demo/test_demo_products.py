"""The shipped demo products and style adapter, through a real generator on the shipped demo model.

Fidelity (`demo.fidelity`) in every demo scene and on the scenes held out of each product's training,
fixed seeds: the product adapter at its default scale vs the same request with `product_scale=0`; the
judge's scene accuracy with the adapter on; the night style darkening the background while the product
keeps its look.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from client.api import generate_request
from demo.world import HELD_OUT
from productinaction.v1 import generator_pb2 as pb
from tests.helpers import ROOT, generator_settings

MODEL = ROOT / "models" / "demo-sd"
DEMO_PRODUCTS = ("split-star", "striped-mug")
STYLE = "night"
SEEDS = range(3)


@pytest.fixture(scope="module")
async def demo_stub(storage_dir):
    import grpc

    from productinaction.v1 import generator_pb2_grpc
    from services.generator.app import start_generator

    settings = generator_settings(
        ROOT,
        str(storage_dir),
        model=str(MODEL),
        products_dir=str(ROOT / "products"),
        adapters_dir=str(ROOT / "adapters"),
        default_steps=20,
        default_size=0,
        max_batch=16,  # a request's images as one batch, as demo.fidelity renders them (same pixels, faster)
    )
    app = await start_generator(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            yield generator_pb2_grpc.GeneratorStub(channel)
    finally:
        await app.stop()


# The same request renders the same pixels (test_generator_api), so a request made twice in this module is
# rendered once: the night test's plain images are two of the scene test's cells.
_rendered: dict[str, list[np.ndarray]] = {}


async def images(stub, seeds: range = SEEDS, **fields) -> list[np.ndarray]:
    """One image per seed, in requests of at most 16 consecutive seeds (the service's limit)."""
    key = repr((seeds, sorted(fields.items())))
    if key not in _rendered:
        _rendered[key] = await _images(stub, seeds, **fields)
    return _rendered[key]


async def _images(stub, seeds: range, **fields) -> list[np.ndarray]:
    out = []
    for first in seeds[::16]:
        n = min(16, seeds[-1] + 1 - first)
        request = generate_request(num_images=n, seed=first, inline_images=True, **fields)
        async for event in stub.Generate(request, timeout=300):
            if event.WhichOneof("event") == "image_ready":
                out.append(np.asarray(Image.open(io.BytesIO(event.image_ready.image.png)).convert("RGB")))
    assert len(out) == len(seeds)
    return out


async def test_lists_demo_products_and_templates(demo_stub):
    products = {p.id: p for p in (await demo_stub.ListProducts(pb.ListProductsRequest())).products}
    for pid, name in (("split-star", "Split Star"), ("striped-mug", "Striped Mug")):
        assert products[pid].category == "demo" and products[pid].display_name == name
    templates = (await demo_stub.ListTemplates(pb.ListTemplatesRequest(product_id="split-star"))).templates
    ids = {t.id for t in templates}
    assert {"demo-beach", "demo-fire", "demo-flowers", "demo-city", "demo-white", "demo-black"} <= ids
    assert all(i.startswith("demo-") for i in ids)
    adapters = {a.id: a for a in (await demo_stub.ListAdapters(pb.ListAdaptersRequest())).adapters}
    assert adapters[STYLE].kind == "style"


# A floor per held-out cell on 8 seeds (a regression guard); the goal is checked on 32 seeds below.
CELL_FLOOR = 0.8
FLOOR_SEEDS = range(8)
GOAL = 0.9  # issue 11: fidelity per scene
# Issue 11's goal is measured on seeds 0-31 by `python -m demo.fidelity --n 32` (the table in
# docs/FIDELITY.md). The suite guards it on seeds 0-15, half the renders: one failed image in a cell still
# passes (0.94), two fail it (at 8 seeds one failed image already moved a cell by 0.125, below the goal).
GOAL_SEEDS = 16
HELD_OUT_CELLS = [(pid, bg) for pid in DEMO_PRODUCTS for bg in HELD_OUT[pid]]


@pytest.mark.parametrize(("product_id", "scene"), HELD_OUT_CELLS, ids=[f"{p}-{b}" for p, b in HELD_OUT_CELLS])
async def test_product_adapter_raises_fidelity_on_held_out_scenes(demo_stub, product_id, scene):
    from demo.fidelity import fidelity

    template = f"demo-{scene}"
    kw = dict(product_id=product_id, template_id=template)
    with_adapter = fidelity(product_id, await images(demo_stub, FLOOR_SEEDS, **kw))
    without = fidelity(product_id, await images(demo_stub, FLOOR_SEEDS, product_scale=0.0, **kw))
    print(f"{product_id} on {scene} (held out): fidelity {with_adapter:.2f} with adapter, {without:.2f} without")
    assert with_adapter >= CELL_FLOOR and without <= 0.2, (with_adapter, without)


NIGHT_CASES = (("split-star", "demo-beach"), ("striped-mug", "demo-city"))


async def night_effect(stub, product_id: str, template: str, seeds: range = SEEDS) -> tuple[float, float]:
    """(background brightness with the night style / without, product fidelity with it)."""
    from demo.fidelity import background_brightness, fidelity

    kw = dict(product_id=product_id, template_id=template)
    plain = await images(stub, seeds, **kw)
    styled = await images(stub, seeds, adapters=[(STYLE, 0.0)], **kw)  # 0: the style's default weight (1.5)
    ratio = np.mean([background_brightness(im) for im in styled]) / np.mean([background_brightness(im) for im in plain])
    kept = fidelity(product_id, styled)
    print(f"{product_id} {template} + night: background brightness x{ratio:.2f}, fidelity {kept:.2f}")
    return float(ratio), kept


async def test_style_adapter_halves_the_background_and_keeps_the_product(demo_stub):
    # Issue 11's night criterion (demo.fidelity.night_ok). Measured with 32 seeds on the stop-30 model: x0.15 /
    # 0.89 (split-star, beach: one image short of the goal there), x0.32 / 0.95 (mug, city); 8 of 12 cells meet it
    # (docs/FIDELITY.md); guarded here on 16. The style acts on the scene only (regional.py).
    for product_id, template in NIGHT_CASES:
        ratio, kept = await night_effect(demo_stub, product_id, template, range(GOAL_SEEDS))
        assert ratio <= 0.5 and kept >= 0.9, (product_id, ratio, kept)


SCENES = {
    "demo-beach": "beach",
    "demo-fire": "fire",
    "demo-flowers": "flowers",
    "demo-city": "city",
    "demo-white": "white",
    "demo-black": "black",
}


async def test_scene_templates_are_obeyed_and_products_kept_through_the_stack(demo_stub):
    # Issue 6 "through the stack": demo products in every demo scene, judged by the world's classifier;
    # issue 11: and the product itself in every scene (fidelity per cell, not on average).
    from demo.fidelity import fidelity
    from demo.judge import load_judge

    judge = load_judge()
    hits, total, cells = 0, 0, {}
    for template, background in SCENES.items():
        for product in DEMO_PRODUCTS:
            rendered = await images(demo_stub, range(GOAL_SEEDS), product_id=product, template_id=template)
            predicted = judge.predict(np.stack(rendered))["background"]
            hits += sum(p == background for p in predicted)
            total += len(predicted)
            cells[(product, background)] = fidelity(product, rendered)
    print({f"{p}/{b}": round(v, 2) for (p, b), v in cells.items()})
    assert hits / total >= 0.95, f"background matched in {hits}/{total} images"
    # Seeds 0-15 of `demo.fidelity --n 32`'s 0-31: a guard of issue 11's goal on the table in docs/FIDELITY.md.
    low = {k: round(v, 2) for k, v in cells.items() if v < GOAL}
    assert not low, f"fidelity under {GOAL}: {low}"


def test_night_criterion():
    from demo.fidelity import night_ok

    assert night_ok(160, 80, 0.95)  # halved, product kept
    assert not night_ok(160, 81, 0.95)  # not quite half
    assert not night_ok(160, 60, 0.85)  # dark enough, but the product lost
    assert night_ok(25, 24, 0.95) and not night_ok(25, 26, 0.95)  # black by day: not brighter is enough
    assert not night_ok(45, 44, 0.95)  # a dim scene that is not dark still has to halve


def test_stacked_style_words_are_read_without_the_product_text_encoder_lora(monkeypatch):
    # A product's text-encoder LoRA re-read "at night" and weakened the style; the pipeline now encodes the
    # stacked phrase and what follows it with the product at weight 0 (services/generator/pipeline.py).
    import torch

    from demo.fidelity import background_brightness, fidelity
    from services.generator.catalog import scan_folder
    from services.generator.messages import RenderSettings
    from services.generator.pipeline import ProductPipeline, first_phrase_position

    pipe = ProductPipeline(str(MODEL), "cpu")
    star = scan_folder(ROOT / "products", ("product",))["split-star"]
    night = scan_folder(ROOT / "adapters", ("style",))[STYLE]
    prompt = "a photo of <split-star> among flowers, at night"
    guidance = star.manifest.guidance_scale or 6.0  # as served in LoRA mode
    # Plain stacking (scene_only_styles off), so the text encoder's part is measured alone.
    styled = RenderSettings(
        prompt, "", 20, guidance, 32, 32, "", (star.spec(1.0), night.spec(1.0)), scene_only_styles=False
    )
    assert styled.adapters[1].phrases == ("at night",) and styled.adapters[0].kind == "product"
    pipe.adapters.activate(styled.adapters)  # adds the learned <split-star> token to the tokenizer
    tokenizer = pipe.pipe.tokenizer
    start = first_phrase_position(tokenizer, prompt, ["at night"])
    assert tokenizer.decode(tokenizer(prompt).input_ids[start : start + 2]) == "at night"
    assert first_phrase_position(tokenizer, prompt, ["by day"]) is None
    routed = pipe.encode_prompt(styled)["prompt_embeds"]
    plain, _ = pipe.pipe.encode_prompt(prompt, pipe.device, 1, False)
    assert torch.equal(routed[:, :start], plain[:, :start])  # the product and its scene keep the product's LoRA
    assert (routed[:, start:] - plain[:, start:]).abs().max() > 1e-3
    alone = RenderSettings(prompt, "", 20, guidance, 32, 32, "", (star.spec(1.0),))
    assert pipe.encode_prompt(alone) == {}  # nothing stacked: diffusers encodes the prompt itself

    seeds = tuple(range(6))
    day = RenderSettings("a photo of <split-star> among flowers", "", 20, guidance, 32, 32, "", (star.spec(1.0),))
    day_b = np.mean([background_brightness(im) for im in pipe(day, seeds)])
    routed_images = pipe(styled, seeds)
    monkeypatch.setattr(pipe, "encode_prompt", lambda settings: {})
    unrouted_images = pipe(styled, seeds)
    ratio = {
        k: np.mean([background_brightness(im) for im in v]) / day_b
        for k, v in (("routed", routed_images), ("unrouted", unrouted_images))
    }
    print(ratio, fidelity("split-star", routed_images))
    # Measured: x0.67 routed, x0.73 unrouted at the star's guidance 3, the star kept (1.00). On the demo model
    # before stop 30, whose product LoRA read the phrase much more strongly: x0.34 routed, x0.56 unrouted.
    assert ratio["routed"] < ratio["unrouted"] - 0.04 and fidelity("split-star", routed_images) >= 0.8
