"""Placement mode: the mask finder, the contract's errors, and exact product pixels through the real generator."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import struct
import zlib

import grpc
import numpy as np
import pytest
from PIL import Image

from client.api import generate_request
from demo.placement_eval import png_bytes, product_photo
from productinaction.v1 import generator_pb2 as pb
from services.common.errors import InvalidArgument
from services.common.pngmeta import read_parameters
from services.generator import placement as P
from tests.helpers import load_mask_png

LIMIT = 4096 * 4096


def rgba_cutout(size: int = 64) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A split star as an RGBA cutout (transparent around it): PNG bytes, its RGB and its alpha >= 128."""
    photo, mask = product_photo("split-star", "white", size=size)
    rgba = np.dstack([np.asarray(photo), np.where(mask, 255, 0).astype(np.uint8)])
    return png_bytes(Image.fromarray(rgba, "RGBA")), np.asarray(photo), mask


def full_frame(cutout: P.Cutout) -> np.ndarray:
    out = np.zeros(cutout.image_size[::-1], bool)
    x0, y0 = cutout.origin
    h, w = cutout.mask.shape
    out[y0 : y0 + h, x0 : x0 + w] = cutout.mask
    return out


# Mask finder and input


def test_rgba_cutout_mask_is_its_alpha():
    data, _, mask = rgba_cutout()
    cutout = P.load_product(data, max_pixels=LIMIT)
    assert cutout.source == "alpha"
    assert np.array_equal(full_frame(cutout), mask)


@pytest.mark.parametrize("product_id", ["split-star", "striped-mug"])
def test_light_background_mask_is_found_deterministically(product_id):
    photo, exact = product_photo(product_id, "white", size=128)
    # The background seen through the mug's thin handle is not product (the new scene shows there).
    first = P.load_product(png_bytes(photo), max_pixels=LIMIT)
    again = P.load_product(png_bytes(photo), max_pixels=LIMIT)
    assert first.source == "found" and np.array_equal(first.mask, again.mask) and first.origin == again.origin
    found = full_frame(first)
    iou = (found & exact).sum() / (found | exact).sum()
    assert iou > 0.93, iou
    # Only the anti-aliased rim may differ: nothing two pixels away from the product is in the mask.
    assert not (found & P.erode(~exact, 2)).any()


def test_photo_with_mask_uses_the_mask():
    photo, exact = product_photo("striped-mug", "city", size=64)
    cutout = P.load_product(png_bytes(photo), P.mask_png(exact), max_pixels=LIMIT)
    assert cutout.source == "mask" and np.array_equal(full_frame(cutout), exact)


def two_products() -> Image.Image:
    a, _ = product_photo("split-star", "white", size=64, cx=8, cy=16, r=6)
    b, _ = product_photo("split-star", "white", size=64, cx=24, cy=16, r=6)
    return Image.fromarray(np.minimum(np.asarray(a), np.asarray(b)))


@pytest.mark.parametrize(
    ("image", "problem"),
    [
        (lambda: Image.new("RGB", (64, 64), (245, 245, 245)), "found no product"),
        (lambda: product_photo("split-star", "black", size=64)[0], "not light"),
        (lambda: product_photo("split-star", "flowers", size=64)[0], "not light"),
        (two_products, "2 separate objects"),
    ],
)
def test_mask_finder_refuses_what_it_cannot_read(image, problem):
    with pytest.raises(InvalidArgument) as err:
        P.load_product(png_bytes(image()), max_pixels=LIMIT)
    assert err.value.field == "product_image.image" and problem in str(err.value)


def bomb_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with no pixel data worth the name."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("image", "mask", "field", "problem"),
    [
        (b"not an image", b"", "product_image.image", "not a PNG or JPEG"),
        (bomb_header(100_000, 100_000), b"", "product_image.image", "decompression bomb"),
        (bomb_header(5000, 5000), b"", "product_image.image", "at most 16777216"),
        ("photo", lambda m: np.zeros_like(m), "product_image.mask", "the mask is empty"),
        ("photo", lambda m: np.ones_like(m), "product_image.mask", "covers the whole image"),
        ("photo", lambda m: m[:10], "product_image.mask", "the image is 64x64"),
        ("photo", "garbage", "product_image.mask", "not a PNG or JPEG"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(image, mask, field, problem):
    photo, exact = product_photo("split-star", "beach", size=64)
    if image == "photo":
        image = png_bytes(photo)
        mask = b"garbage" if mask == "garbage" else P.mask_png(mask(exact))
    with pytest.raises(InvalidArgument) as err:
        P.load_product(image, mask, max_pixels=LIMIT)
    assert err.value.field == field and problem in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ((0.95, 0.5, 0.6), "leaves the 64x64 frame"),
        ((0.5, 0.5, 1.0), "leaves the 64x64 frame"),  # 100% high, but wider than high
        ((0.5, 0.5, 1.5), "in [0, 1]"),
        ((float("nan"), 0.5, 0.5), "in [0, 1]"),
        ((0.5, 0.5, 0.0), "must be > 0"),
    ],
)
def test_placement_outside_the_frame_is_refused(values, problem):
    data, _, _ = rgba_cutout()
    with pytest.raises(InvalidArgument) as err:
        P.place_upload(data, b"", P.check_placement(*values, "product_image.placement"), None, 64, 64, max_pixels=LIMIT)
    assert err.value.field.startswith("product_image.placement") and problem in str(err.value), str(err.value)


def test_placement_scales_and_positions_the_product():
    data, _, _ = rgba_cutout(size=128)  # not the frame's size: placed at the default, centred, 60% high
    placed, record = P.place_upload(data, b"", None, None, 64, 48, max_pixels=LIMIT)
    x0, y0, x1, y1 = placed.box
    assert y1 - y0 == round(0.6 * 48) and abs((x0 + x1) / 2 - 32) <= 0.5 and abs((y0 + y1) / 2 - 24) <= 0.5
    assert record["mask_source"] == "alpha" and record["product_image_sha256"] == hashlib.sha256(data).hexdigest()
    # Passing the recorded placement back gives the same box.
    again, _ = P.place_upload(data, b"", P.ProductBox(**record["placement"]), None, 64, 48, max_pixels=LIMIT)
    assert again.box == placed.box and again.rgb == placed.rgb


def test_composite_keeps_inner_pixels_and_feathers_the_edge():
    data, photo, mask = rgba_cutout()
    placed, _ = P.place_upload(data, b"", None, None, 64, 64, max_pixels=LIMIT, feather=2)
    scene = Image.new("RGB", (64, 64), (0, 200, 0))
    out = np.asarray(P.composite(scene, placed))
    inner = P.inner_mask(mask, 2)
    assert inner.sum() > 100 and np.array_equal(out[inner], photo[inner])
    assert (out[~mask] == (0, 200, 0)).all()
    edge = mask & ~inner
    assert edge.any() and not (out[edge] == photo[edge]).all(axis=-1).all()


# Through the real generator (tiny model)


async def test_templates_say_which_suit_placement(generator_stub):
    templates = (await generator_stub.ListTemplates(pb.ListTemplatesRequest())).templates
    dogs = next(t for t in templates if t.id == "dogs")
    assert dogs.supports_placement and dogs.default_placement.height == pytest.approx(0.5)
    assert all(t.supports_placement and t.default_placement.height > 0 for t in templates)


async def test_generated_images_keep_the_product_pixels_exactly(generator_stub):
    data, photo, mask = rgba_cutout()
    inner = P.inner_mask(mask, P.default_feather(64, 64))
    for product_id in ("", "tiny-star"):  # instead of, and together with, the product adapter
        # Flowers: no surface, so a photo of the frame's size stays where it is (the beach would stand it on the sand).
        req = generate_request(
            product_id=product_id, template_id="flowers", num_images=2, seed=5, steps=3, inline_images=True
        )
        req.product_image.image = data
        events = [e async for e in generator_stub.Generate(req, timeout=120)]
        images = [e.image_ready for e in events if e.WhichOneof("event") == "image_ready"]
        assert len(images) == 2
        for r in images:
            out = np.asarray(Image.open(io.BytesIO(r.image.png)).convert("RGB"))
            assert np.array_equal(out[inner], photo[inner])  # exact, after the PNG round trip
            assert not np.array_equal(out[~mask], photo[~mask])  # the scene was generated
            record = read_parameters(r.image.png)["placement"]
            assert record["product_image_sha256"] == hashlib.sha256(data).hexdigest()
            assert record["mask_source"] == "alpha" and record["box"] and r.parameters.placement.feather == 1
        assert images[0].image.png != images[1].image.png


async def test_contract_errors_over_grpc(generator_stub, storage_dir):
    data, _, _ = rgba_cutout()
    cases = [
        ({"image": b"junk"}, "product_image.image"),
        (
            {"image": data, "placement": pb.Placement(center_x=0.99, center_y=0.5, height=0.5)},
            "product_image.placement",
        ),
        ({"uri": "s3://elsewhere/x.png"}, "product_image.uri"),
        ({}, "product_image"),
    ]
    for fields, field in cases:
        req = generate_request(template_id="beach", num_images=1)
        req.product_image.CopyFrom(pb.ProductImage(**fields))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            [e async for e in generator_stub.Generate(req, timeout=30)]
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details(), fields
    # Without a product image, the product id stays required.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        [e async for e in generator_stub.Generate(generate_request(template_id="beach"), timeout=30)]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "product_id" in err.value.details()
    # A file outside the server's storage is as absent as for the upscaler.
    req = generate_request(template_id="beach", num_images=1)
    req.product_image.uri = "file:///etc/passwd"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        [e async for e in generator_stub.Generate(req, timeout=30)]
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_preview_shows_the_servers_mask_and_reads_storage_uris(generator_stub, storage_dir):
    data, _, mask = rgba_cutout()
    stored = storage_dir / "uploads" / "star.png"
    stored.parent.mkdir(parents=True, exist_ok=True)
    stored.write_bytes(data)
    for source in ({"image": data}, {"uri": stored.as_uri()}):
        reply = await generator_stub.PreviewPlacement(
            pb.PreviewPlacementRequest(product_image=pb.ProductImage(**source), template_id="flowers")
        )
        assert (reply.width, reply.height) == (64, 64) and reply.placement.mask_source == "alpha"
        assert np.array_equal(load_mask_png(reply.mask_png), mask)
        assert Image.open(io.BytesIO(reply.preview_png)).size == (64, 64)


def test_inpainting_shares_the_loaded_weights(tiny_world):
    from services.generator.messages import RenderSettings
    from services.generator.pipeline import ProductPipeline

    pipe = ProductPipeline(str(tiny_world / "tiny-sd"), "cpu")
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        assert getattr(pipe.inpaint, name) is getattr(pipe.pipe, name)
    # A batch (as CUDA workers run them) keeps every image's product exact too, with previews on.
    data, photo, mask = rgba_cutout()
    placed, _ = P.place_upload(data, b"", None, None, 64, 64, max_pixels=LIMIT)
    steps = []
    settings = RenderSettings("a photo on the beach", "", 2, 5.0, 64, 64, "", (), placed)
    images = pipe(settings, (1, 2), on_step=lambda *step: steps.append(step), preview_every=1)
    inner = P.inner_mask(mask, placed.feather)
    assert len(images) == 2 and [s[0] for s in steps] == [1, 2] and len(steps[0][2]) == 2
    for image in images:
        assert np.array_equal(np.asarray(image)[inner], photo[inner])


def test_cli_product_image_flags(tmp_path):
    from client.cli import CliError, _parser, product_image_from_args

    photo = tmp_path / "photo.png"
    photo.write_bytes(b"png")
    args = _parser().parse_args(["generate", "--product-image", str(photo), "--place", "0.5,0.6,0.4"])
    message = product_image_from_args(args)
    assert message.image == b"png" and message.placement.center_y == pytest.approx(0.6)
    with pytest.raises(CliError, match="three fractions"):
        product_image_from_args(_parser().parse_args(["generate", "--product-image", str(photo), "--place", "1,2"]))
    with pytest.raises(CliError, match="--product-image"):
        product_image_from_args(_parser().parse_args(["generate"]))
    # --shadow: off, a strength, or every setting; the template's default when absent.
    assert not message.HasField("shadow")
    base = ["generate", "--product-image", str(photo), "--shadow"]
    assert product_image_from_args(_parser().parse_args([*base, "0"])).shadow.strength == 0
    full = product_image_from_args(_parser().parse_args([*base, "0.6,0.3,0.1,0"])).shadow
    assert (full.strength, full.softness, full.offset_x) == pytest.approx((0.6, 0.3, 0.1))
    with pytest.raises(CliError, match="STRENGTH"):
        product_image_from_args(_parser().parse_args([*base, "0.6,0.3,0.1"]))
    # A placement image cannot be rerun from its parameters alone (the photo is only hashed): say how.
    from client.cli import rerun_request
    from services.common.pngmeta import encode_png

    record = {
        "product_image_sha256": "ab" * 32,
        "placement": {"center_x": 0.5, "center_y": 0.25, "height": 0.5},
        "shadow": {"strength": 0.45, "softness": 0.5},
    }
    params = {"product_id": "", "template_id": "beach", "prompt": "p", "seed": 9, "placement": record}
    image = tmp_path / "placed.png"
    image.write_bytes(encode_png(Image.new("RGB", (8, 8)), params))
    with pytest.raises(
        CliError, match=re.escape("--template beach --place 0.5,0.25,0.5 --shadow 0.45,0.5,0,0 --seed 9")
    ):
        rerun_request(image)


async def test_web_page_sends_the_photo_and_shows_the_servers_mask(generator, tmp_path):
    from client import web_logic as logic

    data, _, mask = rgba_cutout()
    photo = tmp_path / "photo.png"
    photo.write_bytes(data)
    form = logic.Form(template_id="flowers", keep_product=True, product_photo=str(photo))
    assert logic.build_request(form).product_image.image == data  # no product needed with a photo
    with pytest.raises(ValueError, match="Upload a photo"):
        logic.build_request(logic.Form(product_id="tiny-star", keep_product=True))
    # The shadow controls: the scene's default (unset), off (strength 0), or a strength of the user's.
    assert not logic.build_request(form).product_image.HasField("shadow")
    off = logic.build_request(dataclasses.replace(form, shadow=False)).product_image
    assert off.HasField("shadow") and off.shadow.strength == 0
    assert logic.build_request(
        dataclasses.replace(form, shadow_strength=0.7)
    ).product_image.shadow.strength == pytest.approx(0.7)
    backends = logic.Backends(f"127.0.0.1:{generator.port}", "127.0.0.1:1", tmp_path)
    view = await logic.detect_mask(backends, form)
    # Shown enlarged pixel for pixel (readable, not a 64-px strip): the placed product, a gap, the mask.
    k = -(-logic.PREVIEW_SIDE // 64)
    assert view.image.size == (64 * k * 2 + 8, 64 * k) and "transparency" in view.message
    shown_mask = np.asarray(view.image.convert("L"))[:, 64 * k + 8 :][::k, ::k] >= 128
    assert np.array_equal(shown_mask, mask)
    # On the beach the product stands on the sand with its shadow, and the page says so.
    beach = await logic.detect_mask(backends, dataclasses.replace(form, template_id="beach"))
    assert "ground" in beach.message and "contact shadow" in beach.message, beach.message
    # Generate from the page, then "Reuse settings": the photo stays and "keep my exact product" stays ticked.
    session = logic.Session()
    views = [v async for v in logic.generate(backends, session, dataclasses.replace(form, steps=2))]
    assert views[-1].gallery and not views[-1].running, views[-1].status
    logic.select_image(session, 0)
    reused = await logic.reuse_settings(backends, session, form)
    assert reused.form.keep_product and reused.form.product_photo == str(photo) and "upload" not in reused.message
    other = tmp_path / "other.png"
    other.write_bytes(png_bytes(Image.new("RGB", (8, 8))))
    reused = await logic.reuse_settings(backends, session, dataclasses.replace(form, product_photo=str(other)))
    assert "upload that photo again" in reused.message


async def test_beach_stands_the_product_on_the_sand_with_its_shadow_through_grpc(generator_stub):
    data, photo, mask = rgba_cutout()
    beach = next(
        t for t in (await generator_stub.ListTemplates(pb.ListTemplatesRequest())).templates if t.id == "beach"
    )
    assert beach.ground_line == pytest.approx(0.88) and beach.default_shadow.strength > 0
    req = generate_request(template_id="beach", num_images=1, seed=3, steps=2, inline_images=True)
    req.product_image.image = data
    events = [e async for e in generator_stub.Generate(req, timeout=120)]
    (ready,) = [e.image_ready for e in events if e.WhichOneof("event") == "image_ready"]
    record = read_parameters(ready.image.png)["placement"]
    assert record["ground_line"] == pytest.approx(0.88) and record["shadow"]["strength"] == pytest.approx(0.45)
    x0, y0, _x1, y1 = record["box"]
    assert abs(y1 - 0.88 * 64) <= 1 and ready.parameters.placement.shadow.strength == pytest.approx(0.45)
    # Moved onto the sand, never resampled: the kept pixels are the photo's own, one box lower.
    out = np.asarray(Image.open(io.BytesIO(ready.image.png)).convert("RGB"))
    ys, xs = np.nonzero(mask)
    dy, dx = y0 - ys.min(), x0 - xs.min()
    inner = P.inner_mask(mask, 1)
    moved = np.zeros_like(inner)
    moved[ys.min() + dy : ys.max() + 1 + dy, xs.min() + dx : xs.max() + 1 + dx] = inner[
        ys.min() : ys.max() + 1, xs.min() : xs.max() + 1
    ]
    assert dy > 0 and np.array_equal(out[moved], photo[inner])
    # strength 0 turns the shadow off; the record says so.
    req.product_image.shadow.CopyFrom(pb.Shadow(strength=0))
    events = [e async for e in generator_stub.Generate(req, timeout=120)]
    (ready,) = [e.image_ready for e in events if e.WhichOneof("event") == "image_ready"]
    assert read_parameters(ready.image.png)["placement"]["shadow"]["strength"] == 0


@pytest.mark.parametrize(
    ("shadow", "field"),
    [
        ({"strength": 1.5}, "product_image.shadow.strength"),
        ({"strength": 0.5, "softness": -1}, "product_image.shadow.softness"),
        ({"strength": 0.5, "offset_x": 3}, "product_image.shadow.offset_x"),
        ({"strength": 0.5, "offset_y": float("nan")}, "product_image.shadow.offset_y"),
    ],
)
async def test_bad_shadow_settings_are_invalid_argument_over_grpc(generator_stub, shadow, field):
    data, _, _ = rgba_cutout()
    req = generate_request(template_id="beach", num_images=1)
    req.product_image.CopyFrom(pb.ProductImage(image=data, shadow=pb.Shadow(**shadow)))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        [e async for e in generator_stub.Generate(req, timeout=30)]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details(), err.value.details()
