"""The worker-side diffusers pipeline with the tiny real model: adapter cache, hot-swap, batching."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from services.generator.catalog import scan_folder
from services.generator.messages import AdapterSpec, RenderSettings


@pytest.fixture(scope="module")
def specs(tiny_world):
    entries = {**scan_folder(tiny_world / "products", ("product",)), **scan_folder(tiny_world / "adapters", ("style",))}
    return {k: AdapterSpec(key=e.version, path=str(e.adapter_path), weight=1.0) for k, e in entries.items()}


def settings(*adapters: AdapterSpec, steps: int = 4) -> RenderSettings:
    return RenderSettings("a photo on the beach", "blurry", steps, 5.0, 64, 64, "", tuple(adapters))


def render(pipe, s: RenderSettings, seeds=(3,)) -> list[np.ndarray]:
    return [np.asarray(im) for im in pipe(s, seeds)]


@pytest.mark.parametrize("hotswap_rank", [0, 8], ids=["reload", "hotswap"])
def test_cached_adapter_gives_the_fresh_load_image(tiny_world, specs, hotswap_rank):
    from services.generator.pipeline import ProductPipeline

    model = str(tiny_world / "tiny-sd")
    fresh = ProductPipeline(model, "cpu", adapter_cache_size=8)
    expected = {k: render(fresh, settings(spec))[0] for k, spec in specs.items()}
    assert not np.array_equal(expected["tiny-star"], expected["tiny-mug"])

    # A cache of 2 slots: cycling 3 adapters evicts and reuses slots (hot-swapping when enabled).
    pipe = ProductPipeline(model, "cpu", adapter_cache_size=2, hotswap_rank=hotswap_rank)
    base_unet = pipe.pipe.unet
    for name in ["tiny-star", "tiny-mug", "tiny-sunset", "tiny-star", "tiny-star", "tiny-mug"]:
        np.testing.assert_array_equal(render(pipe, settings(specs[name]))[0], expected[name], err_msg=name)
    assert pipe.pipe.unet is base_unet  # never reloaded the base model
    assert pipe.adapters.stats.hits == 1 and pipe.adapters.stats.misses == 5
    assert len(pipe.adapters.slots) == 2


def test_stacked_adapters_use_their_weights(tiny_world, specs):
    from services.generator.pipeline import ProductPipeline

    pipe = ProductPipeline(str(tiny_world / "tiny-sd"), "cpu")
    star = specs["tiny-star"]
    sunset = specs["tiny-sunset"]
    alone = render(pipe, settings(star))[0]
    light = render(pipe, settings(star, AdapterSpec(sunset.key, sunset.path, 0.3)))[0]
    strong = render(pipe, settings(star, AdapterSpec(sunset.key, sunset.path, 1.0)))[0]
    zero = render(pipe, settings(star, AdapterSpec(sunset.key, sunset.path, 0.0)))[0]
    assert not np.array_equal(alone, light) and not np.array_equal(light, strong)
    np.testing.assert_allclose(zero, alone, atol=1)
    # Diff grows with the style weight.
    assert np.abs(strong.astype(int) - alone).mean() > np.abs(light.astype(int) - alone).mean()
    assert render(pipe, settings())[0].shape == (64, 64, 3)  # no adapters: LoRA disabled


def test_batched_images_equal_single_images(tiny_world, specs):
    from services.generator.pipeline import ProductPipeline

    pipe = ProductPipeline(str(tiny_world / "tiny-sd"), "cpu")
    s = settings(specs["tiny-mug"])
    batch = render(pipe, s, seeds=(10, 11, 12))
    singles = [render(pipe, s, seeds=(seed,))[0] for seed in (10, 11, 12)]
    # Per-image generators make a batch reproduce single runs; CPU matmuls of another batch size
    # may still round differently in the last bit, so a pixel can move by one level.
    for b, single in zip(batch, singles, strict=True):
        diff = np.abs(b.astype(int) - single)
        assert diff.max() <= 2 and diff.mean() < 0.01


def test_step_hook_previews_and_cancel(tiny_world, specs):
    from services.generator.pipeline import JobCancelled, ProductPipeline

    pipe = ProductPipeline(str(tiny_world / "tiny-sd"), "cpu")
    seen = []
    pipe(
        settings(steps=4),
        (1, 2),
        on_step=lambda step, total, previews: seen.append((step, total, previews)),
        preview_every=2,
    )
    assert [(s, t) for s, t, _ in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert seen[0][2] is None and len(seen[1][2]) == 2
    previews = seen[1][2].images()
    assert [im.size for im in previews] == [(32, 32)] * 2 and previews[0].tobytes() != previews[1].tobytes()
    calls = []
    with pytest.raises(JobCancelled):
        pipe(settings(steps=10), (1,), on_step=lambda *a: calls.append(a), should_stop=lambda: len(calls) >= 3)
    assert len(calls) == 3


def test_scene_only_styles_blend_and_leave_the_pipeline_as_it_was(tiny_world, specs):
    # services/generator/regional.py: a style stacked on a product is kept off the product; the demo-level
    # effect (night halves every scene, the products kept) is in tests/demo/test_demo_products.py.
    from services.generator.pipeline import JobCancelled, ProductPipeline

    pipe = ProductPipeline(str(tiny_world / "tiny-sd"), "cpu")
    real_unet = pipe.pipe.unet
    star = specs["tiny-star"]
    sunset = dataclasses.replace(specs["tiny-sunset"], kind="style", phrases=("at sunset",), scene_only=True)
    stacked = settings(star, sunset)
    plain = render(pipe, dataclasses.replace(stacked, scene_only_styles=False))[0]
    scene_only = render(pipe, stacked)[0]
    assert np.abs(scene_only.astype(int) - plain).mean() > 1  # the blend changed the picture
    assert pipe.pipe.unet is real_unet and all(v.unet is real_unet for v in pipe.views.values())
    assert pipe.adapters.active == ((pipe.adapters.slots[star.key], 1.0), (pipe.adapters.slots[sunset.key], 1.0))
    # Deterministic, and nothing changes for a product alone or for two products stacked.
    np.testing.assert_array_equal(render(pipe, stacked)[0], scene_only)
    repaint = dataclasses.replace(sunset, scene_only=False)  # a style with `scope: image`
    for adapters in ((star,), (star, specs["tiny-mug"]), (star, repaint)):
        a, b = (render(pipe, dataclasses.replace(settings(*adapters), scene_only_styles=f))[0] for f in (True, False))
        np.testing.assert_array_equal(a, b)
    # A job cancelled mid-way leaves the real UNet in place.
    with pytest.raises(JobCancelled):
        pipe(stacked, (1,), on_step=lambda *a: None, should_stop=lambda: True)
    assert all(v.unet is real_unet for v in pipe.views.values())
    np.testing.assert_array_equal(render(pipe, stacked)[0], scene_only)


def test_product_mask_follows_the_product_adapter_effect():
    import torch

    from services.generator.messages import AdapterSpec
    from services.generator.regional import applies, product_mask

    base = torch.zeros(2, 4, 16, 16)
    product = base.clone()
    product[1, :, 4:8, 4:8] = 1.0  # the conditional branch: the product adapter acts on one square
    product[0, :, 10:14, 10:14] = 5.0  # the unconditional branch does not decide where the product is
    mask = product_mask(product, base, cfg=True)
    assert mask.shape == (2, 1, 16, 16) and torch.equal(mask[0], mask[1])
    assert mask[1, 0, 5:7, 5:7].min() == 1 and mask[1, 0, 12:, 12:].max() == 0

    p, s = AdapterSpec("p", "p", 1.0), AdapterSpec("s", "s", 1.0, kind="style", scene_only=True)
    assert applies((p, s)) and not applies((p,)) and not applies((s, p)) and not applies((p, p))
    assert not applies((AdapterSpec("p", "p", 0.0), s)) and not applies((p, dataclasses.replace(s, weight=0.0)))
    assert not applies((p, dataclasses.replace(s, scene_only=False)))  # scope: image


def test_sdxl_pipeline_serves_with_a_product_lora(tmp_path):
    from demo.tiny import build_tiny_sdxl, write_random_lora
    from services.generator.pipeline import ProductPipeline

    xl = build_tiny_sdxl(tmp_path / "tiny-sdxl")
    lora = write_random_lora(xl, tmp_path / "xl-product", seed=5, strength=3.0)
    pipe = ProductPipeline(str(tmp_path / "tiny-sdxl"), "cpu")
    assert type(pipe.pipe).__name__ == "StableDiffusionXLPipeline"
    s = RenderSettings("a photo of a shoe", "", 3, 5.0, 64, 64, "euler_a", ())
    plain = render(pipe, s)[0]
    product = AdapterSpec(key="xl@1", path=str(lora), weight=1.0)
    with_lora = render(pipe, dataclasses.replace(s, adapters=(product,)))[0]
    assert plain.shape == with_lora.shape == (64, 64, 3)
    assert not np.array_equal(plain, with_lora)


def test_a_placement_job_asks_for_the_scene_only(tiny_world, specs):
    """Placement mode: the scene prompt, the product adapter off (placement.scene_adapters). The same job with
    or without the product adapter gives the same pixels; with the request's prompt and adapter it differs."""
    from demo.placement_eval import png_bytes, product_photo
    from services.generator import placement
    from services.generator.pipeline import ProductPipeline

    pipe = ProductPipeline(str(tiny_world / "tiny-sd"), "cpu")
    photo, _ = product_photo("split-star", "white", size=64)
    placed, _ = placement.place_upload(
        png_bytes(photo), b"", None, placement.ProductBox(0.5, 0.5, 0.5), 64, 64, max_pixels=1 << 20
    )
    star = specs["tiny-star"]
    job = dataclasses.replace(settings(star), placement=placed, scene_prompt="on the beach")
    with_adapter = render(pipe, job)[0]
    without = render(pipe, dataclasses.replace(job, adapters=()))[0]
    assert np.array_equal(with_adapter, without)
    product_everywhere = render(pipe, dataclasses.replace(job, scene_prompt=""))[0]
    assert not np.array_equal(with_adapter, product_everywhere)
    assert [a.weight for a in placement.scene_adapters((star, specs["tiny-sunset"]))] == [0.0, 1.0]
