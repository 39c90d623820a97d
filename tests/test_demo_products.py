"""The shipped demo products and style adapter, through a real generator on the shipped demo model.

Fidelity (`demo.fidelity`) on scenes held out of each product's training, fixed seeds: the product
adapter at its default scale vs the same request with `product_scale=0`.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.api import generate_request
from productinaction.v1 import generator_pb2 as pb
from tests.conftest import generator_settings

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "demo-sd"
DEMO_PRODUCTS = ("split-star", "striped-mug")
STYLE = "night"
SEEDS = (0, 1, 2)


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
    )
    app = await start_generator(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            yield generator_pb2_grpc.GeneratorStub(channel)
    finally:
        await app.stop()


async def images(stub, **fields) -> list[np.ndarray]:
    out = []
    for seed in SEEDS:
        request = generate_request(num_images=1, seed=seed, inline_images=True, **fields)
        async for event in stub.Generate(request, timeout=120):
            if event.WhichOneof("event") == "image_ready":
                out.append(np.asarray(Image.open(io.BytesIO(event.image_ready.image.png)).convert("RGB")))
    assert len(out) == len(SEEDS)
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


@pytest.mark.parametrize(
    "product_id",
    [
        "split-star",
        "striped-mug",
    ],
)
async def test_product_adapter_raises_fidelity_on_held_out_scenes(demo_stub, product_id):
    from demo.fidelity import fidelity
    from demo.make_products import HELD_OUT

    template = f"demo-{HELD_OUT[product_id][0]}"
    with_adapter = fidelity(product_id, await images(demo_stub, product_id=product_id, template_id=template))
    without = fidelity(
        product_id, await images(demo_stub, product_id=product_id, template_id=template, product_scale=0.0)
    )
    print(f"{product_id}: fidelity {with_adapter:.2f} with adapter, {without:.2f} without")
    assert with_adapter >= 0.4 and with_adapter >= 2 * without and with_adapter - without >= 0.25, (
        with_adapter,
        without,
    )


async def test_style_adapter_changes_the_image(demo_stub):
    kw = dict(product_id="split-star", template_id="demo-beach")
    plain = np.stack(await images(demo_stub, **kw)).astype(np.float32)
    styled = np.stack(await images(demo_stub, adapters=[(STYLE, 1.0)], **kw)).astype(np.float32)
    assert np.abs(plain - styled).mean() > 10  # measured 18 levels
    assert styled.mean() < plain.mean() - 5  # night: darker


SCENES = {
    "demo-beach": "beach",
    "demo-fire": "fire",
    "demo-flowers": "flowers",
    "demo-city": "city",
    "demo-white": "white",
    "demo-black": "black",
}


async def test_scene_templates_are_obeyed_through_the_stack(demo_stub):
    # Issue 6 "through the stack": demo products in every demo scene, judged by the world's classifier.
    from demo.judge import load_judge

    judge = load_judge()
    hits, total = 0, 0
    for template, background in SCENES.items():
        for product in DEMO_PRODUCTS:
            request = generate_request(
                product_id=product, template_id=template, num_images=3, seed=7, inline_images=True
            )
            rendered = [
                np.asarray(Image.open(io.BytesIO(e.image_ready.image.png)).convert("RGB"))
                async for e in demo_stub.Generate(request, timeout=300)
                if e.WhichOneof("event") == "image_ready"
            ]
            predicted = judge.predict(np.stack(rendered))["background"]
            hits += sum(p == background for p in predicted)
            total += len(predicted)
    assert hits / total >= 0.95, f"background matched in {hits}/{total} images"
