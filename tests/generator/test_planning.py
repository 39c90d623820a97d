"""Request planning (services/generator/planning.py): every limit a request can break is refused before
`accepted`, from the limits the workers really have; cheap checks run before expensive ones; the catalog
is rescanned once per request, whatever the request's kind."""

from __future__ import annotations

import io
import shutil

import grpc
import numpy as np
import pytest
from PIL import Image

from client.api import generate_request
from productinaction.v1 import generator_pb2 as pb
from services.generator.options import CompileOptions, WorkerConfig
from services.generator.planning import adapter_limit
from tests.helpers import images, request, run, standin_server, until


def cutout_png(size: int = 24) -> bytes:
    """A red square on a transparent ground: a product photo for placement mode."""
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[4:-4, 4:-4] = (200, 30, 30, 255)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def second_style(world, tmp_path, name: str = "tiny-dusk"):
    """A copy of the world's adapters plus one more style adapter (a copy of tiny-sunset under `name`)."""
    adapters = tmp_path / "adapters"
    shutil.copytree(world / "adapters", adapters)
    return adapters, lambda: shutil.copytree(adapters / "tiny-sunset", adapters / name)


def test_the_adapter_limit_is_the_workers_own():
    eager = WorkerConfig("m", "cpu:0", adapter_cache_size=8)
    compiled = WorkerConfig("m", "cuda:0", adapter_cache_size=8, compile=CompileOptions(mode="default", lora_slots=2))
    assert adapter_limit([eager]) == (8, "8 adapters per worker (--adapter-cache-size)")
    assert adapter_limit([eager, compiled]) == (2, "2 LoRA slots with compile on (--lora-slots)")


async def test_too_many_adapters_for_the_compiled_slots_are_refused_before_accepted(tiny_world, tmp_path):
    adapters, add = second_style(tiny_world, tmp_path)
    add()
    # compile=default on the CPU: the workers' real limit is --lora-slots (the stand-in renders, the limit is
    # the one the service computes from the settings the workers get).
    async with standin_server(tiny_world, tmp_path, compile="default", lora_slots=2, adapters_dir=str(adapters)) as (
        app,
        stub,
        _h,
    ):
        two = [("tiny-sunset", 0.0), ("tiny-dusk", 0.0)]
        events = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for event in stub.Generate(request(adapters=two), timeout=30):
                events.append(event)
        assert not events  # not even `accepted`
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "adapters: at most 1 can be stacked on a product, got 2 (2 LoRA slots" in err.value.details()
        ok = images(await run(stub, request(adapters=two[:1])))
        assert len(ok) == 1
        # The stream has ended; its ticket goes once the dispatcher has seen the end (a moment later).
        await until(lambda: not app.dispatcher.tickets, 10, "every ticket released")


async def test_a_new_style_adapter_is_served_without_a_product_request_first(tiny_world, tmp_path):
    adapters, add = second_style(tiny_world, tmp_path)
    async with standin_server(tiny_world, tmp_path, adapters_dir=str(adapters)) as (_app, stub, _h):
        add()  # after start-up, and no product request or listing since
        req = pb.GenerateRequest(
            template_id="beach",
            num_images=1,
            steps=2,
            adapters=[pb.AdapterWeight(adapter_id="tiny-dusk", weight=0.5)],
            product_image=pb.ProductImage(image=cutout_png()),
        )
        ready = images(await run(stub, req))
    assert len(ready) == 1 and ready[0].parameters.adapters[0].adapter_id == "tiny-dusk"


async def test_a_scene_made_for_another_category_is_refused_by_name(generator_stub):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await run(generator_stub, generate_request(product_id="tiny-star", template_id="demo-beach", num_images=1))
    details = err.value.details()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("template_id:")
    assert "'demo-beach'" in details and "'tiny-star'" in details and "'tiny'" in details


async def test_a_reused_request_id_is_refused_before_the_product_photo_is_read(tiny_world, tmp_path):
    async with standin_server(tiny_world, tmp_path) as (_app, stub, _h):
        await run(stub, request(request_id="once"))
        again = pb.GenerateRequest(
            request_id="once",
            template_id="beach",
            num_images=1,
            steps=2,
            product_image=pb.ProductImage(image=b"not an image at all"),
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await run(stub, again)
    # ALREADY_EXISTS, not the photo's INVALID_ARGUMENT: the storage check ran first and nothing was decoded.
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_fault_injecting_stand_ins_are_refused_outside_tests(monkeypatch):
    from pydantic import ValidationError

    from services.generator.settings import GeneratorSettings
    from tests.helpers import STANDIN

    monkeypatch.delenv("PIA_ALLOW_TEST_PIPELINES", raising=False)
    with pytest.raises(ValidationError, match=r"worker_pipeline: 'testkit\.standin:load' is a test stand-in"):
        GeneratorSettings(worker_pipeline=STANDIN)
    assert GeneratorSettings().worker_pipeline == "services.generator.pipeline:load"
    monkeypatch.setenv("PIA_ALLOW_TEST_PIPELINES", "1")
    assert GeneratorSettings(worker_pipeline=STANDIN).worker_pipeline == STANDIN


def backdrop_templates(tmp_path, backdrop: str):
    """The real template file with `backdrop` as the beach's placement backdrop, the scene drawn first."""
    import yaml

    from tests.helpers import ROOT

    raw = yaml.safe_load((ROOT / "templates" / "catalog.yaml").read_text())
    beach = next(t for t in raw["templates"] if t["id"] == "beach")
    beach["placement"] = {**beach["placement"], "backdrop": backdrop, "scene_first": 1.0}
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


async def accepted(stub, req) -> pb.GenerationParameters:
    async for event in stub.Generate(req, timeout=60):
        if event.WhichOneof("event") == "accepted":
            return event.accepted.parameters
    raise AssertionError("no accepted event")


async def test_a_templates_backdrop_and_scene_first_are_used_in_placement_mode_only_and_recorded(tiny_world, tmp_path):
    templates = backdrop_templates(tmp_path, "tiny-sunset")
    async with standin_server(tiny_world, tmp_path, templates_file=templates) as (_app, stub, _h):
        photo = pb.ProductImage(image=cutout_png())
        placed = await accepted(stub, request(product_image=photo))
        assert [(a.adapter_id, a.weight) for a in placed.adapters] == [("tiny-sunset", 1.0)]  # its default weight
        assert placed.scene_prompt.endswith(", sunset style") and "sunset" not in placed.prompt
        assert "{product}" not in placed.scene_prompt and placed.scene_prompt.startswith("a detailed advertising")
        assert placed.placement.scene_first == 1.0  # recorded: the scene was drawn whole, the product over it

        # LoRA mode (no photo) in the same scene: no backdrop, no scene prompt.
        lora = await accepted(stub, request())
        assert not lora.adapters and not lora.scene_prompt

        # A rerun that sends the recorded adapters back (here at another weight) gets it once, at its weight.
        again = await accepted(stub, request(product_image=photo, adapters=[("tiny-sunset", 0.5)]))
        assert [(a.adapter_id, a.weight) for a in again.adapters] == [("tiny-sunset", 0.5)]


async def test_a_backdrop_the_server_lacks_is_a_failed_precondition_naming_it(tiny_world, tmp_path):
    templates = backdrop_templates(tmp_path, "no-such-backdrop")
    async with standin_server(tiny_world, tmp_path, templates_file=templates) as (_app, stub, _h):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await run(stub, request(product_image=pb.ProductImage(image=cutout_png())))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "'beach' places products on the backdrop adapter 'no-such-backdrop'" in err.value.details()
        assert images(await run(stub, request()))  # LoRA mode in that scene does not need it


async def test_a_products_validated_guidance_is_used_in_lora_mode_unless_the_request_sets_one(tiny_world, tmp_path):
    # demo.make_products chooses a product's guidance with its scale (docs/FIDELITY.md): the manifest's value
    # replaces the template's in LoRA mode only, a request's own value wins, and ListProducts shows it.
    products = tmp_path / "products"
    shutil.copytree(tiny_world / "products", products)
    manifest = products / "tiny-star" / "manifest.yaml"
    manifest.write_text(manifest.read_text() + "guidance_scale: 3.5\n")
    async with standin_server(tiny_world, tmp_path, products_dir=str(products)) as (_app, stub, _h):
        listed = {p.id: p for p in (await stub.ListProducts(pb.ListProductsRequest())).products}
        assert listed["tiny-star"].guidance_scale == 3.5 and not listed["tiny-mug"].HasField("guidance_scale")
        mug = generate_request(product_id="tiny-mug", template_id="beach", num_images=1, steps=5)
        default = (await accepted(stub, mug)).guidance_scale
        assert default != 3.5  # the template's (or the server's) guidance
        assert (await accepted(stub, request())).guidance_scale == 3.5
        assert (await accepted(stub, request(guidance_scale=5.0))).guidance_scale == 5.0
        placed = await accepted(stub, request(product_image=pb.ProductImage(image=cutout_png())))
        assert placed.guidance_scale == default  # placement mode keeps the scene's guidance
