"""Product LoRA training (`python -m training.lora`) on the tiny test model: loss, the product folder,
resuming, video frames, the generator picking the product up, and every bad input failing cleanly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import grpc
import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from productinaction.v1 import generator_pb2 as pb
from productinaction.v1 import generator_pb2_grpc
from tests.helpers import ROOT, generator_settings, render_product
from tests.training.helpers import config, square
from training import TrainingError
from training.data import drop_near_duplicates, extract_video_frames, make_caption
from training.lora import TrainConfig, build_parser, diffusion_target, main, train


def write_video(path: Path, frames: list[Image.Image], fps: int = 8) -> Path:
    """An H.264 clip through imageio-ffmpeg's bundled ffmpeg."""
    import imageio.v2 as imageio

    os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")  # vfork beside gRPC, as training.data does
    # One retry: on this shared machine the pipe into ffmpeg broke in 2 of about 10 full runs, with no
    # ffmpeg error output and never when run alone; reading, the code under test, is not retried.
    for attempt in (1, 2):
        try:
            with imageio.get_writer(path, fps=fps, codec="libx264", quality=8, macro_block_size=16) as writer:
                for frame in frames:
                    writer.append_data(np.asarray(frame))
            return path
        except OSError:
            if attempt == 2:
                raise
    return path


def leftovers(products: Path) -> list[str]:
    """Hidden temp folders a failed or finished run might have left in a products dir."""
    return sorted(p.name for p in products.iterdir() if p.name.startswith(".")) if products.exists() else []


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a shared 2-core machine, one torch thread is several times faster than two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i in range(4):
        square(8 + 9 * i, 12 + 5 * i).save(folder / f"shot{i}.png")
    (folder / "shot0.txt").write_text("a photo of {token} on a grey table")
    return folder


@pytest.fixture(scope="module")
def products(tiny_world, tmp_path_factory) -> Path:
    """A products dir that already holds another product (tiny-star, token <tiny-star>)."""
    folder = tmp_path_factory.mktemp("products")
    shutil.copytree(tiny_world / "products" / "tiny-star", folder / "tiny-star")
    return folder


@pytest.fixture(scope="module")
def trained(tiny_world, photos, products, tmp_path_factory) -> SimpleNamespace:
    """20 steps with every option on: pivotal tuning, text-encoder LoRA, checkpoints, validation images."""
    work = tmp_path_factory.mktemp("work")
    cfg = config(
        products / "red-square",
        tiny_world / "tiny-sd",
        photos,
        work,
        learn_token=True,
        init_word="square",
        train_text_encoder=True,
        checkpoint_every=10,
        validate_every=20,
        validation_steps=2,
        display_name="Red square",
        category="demo",
    )
    return SimpleNamespace(cfg=cfg, result=train(cfg), work=work)


def test_training_lowers_the_loss_and_writes_a_ready_product(trained, products):
    result, folder = trained.result, products / "red-square"
    print(f"eval loss {result.eval_loss_start:.4f} -> {result.eval_loss_end:.4f} in {result.seconds:.1f}s")
    assert result.eval_loss_end < 0.8 * result.eval_loss_start
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    assert sorted(p.name for p in folder.iterdir()) == [
        "embeddings.safetensors",
        "manifest.yaml",
        "pytorch_lora_weights.safetensors",
        "training.json",
    ]
    manifest = yaml.safe_load((folder / "manifest.yaml").read_text())
    assert manifest == {
        "display_name": "Red square",
        "kind": "product",
        "category": "demo",
        "tokens": ["<red-square>"],
        "prompt_phrase": "<red-square>",
        "adapter": "pytorch_lora_weights.safetensors",
        "embeddings": "embeddings.safetensors",
        "default_scale": 1.0,
        "base_model": trained.cfg.base,
    }
    weights = load_file(folder / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("unet.") and "conv1.lora_A" in k for k in weights)
    assert any(k.startswith("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A") for k in weights)
    assert list(load_file(folder / "embeddings.safetensors")) == ["<red-square>"]
    summary = json.loads((folder / "training.json").read_text())
    assert summary["prediction_type"] == "epsilon" and len(summary["examples"]) == 4
    assert summary["examples"][0]["caption"] == "a photo of <red-square> on a grey table"
    assert summary["examples"][1]["caption"] == "a photo of <red-square>"
    assert sorted(p.name for p in trained.work.iterdir()) == [
        "checkpoint-000010",
        "checkpoint-000020",
        "validation-000020.png",
    ]
    assert Image.open(trained.work / "validation-000020.png").size == (32, 32)
    assert leftovers(products) == []


def test_resuming_a_checkpoint_gives_the_same_weights(trained, tmp_path):
    out = tmp_path / "products" / "red-square"
    cfg = config(
        out,
        Path(trained.cfg.base),
        trained.cfg.images,
        trained.work,
        **{
            k: getattr(trained.cfg, k)
            for k in ("learn_token", "init_word", "train_text_encoder", "display_name", "category")
        },
    )
    cfg.resume = str(trained.work / "checkpoint-000010")
    result = train(cfg)
    assert result.resumed_from == 10 and len(result.losses) == 10
    assert result.losses == trained.result.losses[10:]
    for name in ("pytorch_lora_weights.safetensors", "embeddings.safetensors"):
        ours, theirs = load_file(out / name), load_file(trained.cfg.out / name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_video_frames_are_sampled_and_near_duplicates_dropped(tmp_path):
    video = tmp_path / "clip.mp4"
    # 2 s at 8 fps, 64x64: the square stands still for a second, then moves 5 px a frame (thumbnails differ
    # by about 0.03 per move; the codec's noise between still frames is about 0.0001).
    still = [square(2, 16, (64, 64), side=20) for _ in range(8)]
    frames = still + [square(7 + 5 * i, 16, (64, 64), side=20) for i in range(8)]
    write_video(video, frames)
    full = extract_video_frames(video, fps=8, out_dir=tmp_path / "frames")
    assert (full.read, full.sampled, len(full.frames)) == (16, 16, 9)
    assert len(list((tmp_path / "frames").glob("frame-*.png"))) == 9
    half = extract_video_frames(video, fps=4)
    assert (half.sampled, len(half.frames)) == (8, 5)
    assert drop_near_duplicates(frames) == [0, *range(8, 16)]


def test_video_training_on_a_v_prediction_model_at_32px(tiny_world, tmp_path):
    """The demo model's setting: v-prediction, 32x32; here a copy of the tiny model switched to v-prediction."""
    base = tmp_path / "tiny-sd-v"
    shutil.copytree(tiny_world / "tiny-sd", base)
    sched = base / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps(json.loads(sched.read_text()) | {"prediction_type": "v_prediction"}))
    video = write_video(tmp_path / "clip.mp4", [square(4 + 3 * i, 10, (64, 64)) for i in range(8)])
    cfg = config(tmp_path / "products" / "v-square", base, None, tmp_path / "work", video=video, fps=4, steps=3)
    result = train(cfg)
    summary = json.loads((cfg.out / "training.json").read_text())
    assert summary["prediction_type"] == "v_prediction" and summary["resolution"] == 32
    assert result.examples == 4 and np.isfinite(result.eval_loss_end)
    assert len(list((tmp_path / "work" / "frames").glob("*.png"))) == 4


def test_prior_preservation_draws_class_images_once_and_trains_on_them(tiny_world, tmp_path):
    prompts = ("a photo of a square on the beach", "a photo of a square in a city")
    cfg = config(
        tmp_path / "products" / "prior-square",
        tiny_world / "tiny-sd",
        None,
        tmp_path / "work",
        video=write_video(tmp_path / "clip.mp4", [square(4 + 3 * i, 10, (64, 64)) for i in range(4)]),
        fps=8,
        steps=2,
        num_class_images=3,
        class_prompts=prompts,
        validation_steps=2,
    )
    train(cfg)
    (folder,) = (tmp_path / "work").glob("class-images-*")
    assert sorted(p.name for p in folder.glob("*.png")) == ["0000.png", "0001.png", "0002.png"]
    assert json.loads((folder / "captions.json").read_text()) == [prompts[0], prompts[1], prompts[0]]
    summary = json.loads((cfg.out / "training.json").read_text())
    assert summary["class_images"] == {"count": 3, "prompts": list(prompts)}
    # A second run with the same settings reuses them (same files, untouched).
    stamp = (folder / "0000.png").stat().st_mtime_ns
    cfg.overwrite = True
    train(cfg)
    assert list((tmp_path / "work").glob("class-images-*")) == [folder]
    assert (folder / "0000.png").stat().st_mtime_ns == stamp


def test_augmentation_never_shifts_hues():
    import colorsys

    from training.data import Augment, augment

    image = Image.new("RGB", (40, 40), (200, 40, 60))
    ImageDraw.Draw(image).rectangle([20, 0, 40, 40], fill=(40, 70, 190))
    g = torch.Generator().manual_seed(0)
    aug = Augment(max_scale=1.25, flip=True, brightness=0.1, contrast=0.1)
    seen = set()
    for _ in range(20):
        x = ((augment(image, 32, g, aug=aug) + 1) * 127.5).permute(1, 2, 0).numpy()
        for rgb in (x[16, 2], x[16, 29]):  # well inside each half (either order, flips are on)
            h = colorsys.rgb_to_hsv(*(rgb / 255))[0]
            ref = min(
                (colorsys.rgb_to_hsv(*(np.array(c) / 255))[0] for c in ((200, 40, 60), (40, 70, 190))),
                key=lambda r: abs(r - h),
            )
            assert abs(h - ref) < 0.01, (rgb, h, ref)
        seen.add(round(float(x.mean()), 1))
    assert len(seen) > 5  # the views do differ


def test_crops_never_cut_a_product_with_a_box():
    from training.data import Augment, augment, mask_box

    # A product near the right edge (a mug's handle): zoomed crops cut it often unless its box is kept. Yellow
    # inside a blue frame: where the yellow reaches the crop's border, the frame on that side was cut off.
    image = Image.new("RGB", (48, 48), (240, 240, 240))
    ImageDraw.Draw(image).rectangle([29, 14, 46, 33], fill=(250, 220, 20), outline=(20, 40, 200), width=3)
    mask = Image.new("L", (48, 48), 0)
    ImageDraw.Draw(mask).rectangle([29, 14, 46, 33], fill=255)
    box = mask_box(mask)
    assert box == (29, 14, 47, 34) and mask_box(None) is None
    aug = Augment(max_scale=1.5, flip=True, brightness=0.0, contrast=0.0)

    def cut(keep) -> int:
        g = torch.Generator().manual_seed(1)
        n = 0
        for _ in range(100):
            x = ((augment(image, 32, g, aug=aug, keep=keep) + 1) * 127.5).permute(1, 2, 0).numpy()
            yellow = (x[..., 2] < 120) & (x[..., 0] > 150)
            n += bool(yellow[0].any() or yellow[-1].any() or yellow[:, 0].any() or yellow[:, -1].any())
        return n

    assert cut(box) == 0
    assert cut(None) > 20  # the same draws without the box: the product runs off the crop


def test_a_crop_margin_keeps_the_product_clear_of_the_frame():
    from training.data import Augment, augment, mask_box

    # Zoomed up to 1.75x, a centred product grazes the crop's edge often; with a margin (2 px of 32) never.
    image = Image.new("RGB", (48, 48), (240, 240, 240))
    ImageDraw.Draw(image).rectangle([10, 12, 37, 35], fill=(250, 220, 20))
    mask = Image.new("L", (48, 48), 0)
    ImageDraw.Draw(mask).rectangle([10, 12, 37, 35], fill=255)

    def closest(margin: float) -> list[int]:
        aug = Augment(max_scale=1.75, flip=False, brightness=0.0, contrast=0.0, margin=margin)
        g = torch.Generator().manual_seed(2)
        gaps = []
        for _ in range(100):
            x = ((augment(image, 32, g, aug=aug, keep=mask_box(mask)) + 1) * 127.5).permute(1, 2, 0).numpy()
            ys, xs = np.nonzero((x[..., 2] < 120) & (x[..., 0] > 150))
            gaps.append(int(min(ys.min(), xs.min(), 31 - ys.max(), 31 - xs.max())))
        return gaps

    assert min(closest(0.0)) == 0  # without: zoomed views put the product against the frame
    with_margin = closest(2 / 32)
    assert min(with_margin) == 2
    assert max(with_margin) > 2  # still zoomed and moved, not pinned to one view


def test_a_views_mask_moves_with_its_product():
    from training.data import Augment, augment, augment_view, mask_box

    # Zoomed, cropped and flipped, the mask must still lie on the product: the loss weights follow it.
    image = Image.new("RGB", (48, 40), (240, 240, 240))
    ImageDraw.Draw(image).polygon([(8, 30), (30, 6), (36, 34)], fill=(250, 220, 20))
    mask = Image.new("L", (48, 40), 0)
    ImageDraw.Draw(mask).polygon([(8, 30), (30, 6), (36, 34)], fill=255)
    aug = Augment(max_scale=1.75, flip=True, brightness=0.0, contrast=0.0)
    g, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    ious = []
    for _ in range(60):
        view = augment_view(image, 32, g, aug, mask_box(mask), mask)
        assert torch.equal(view.pixels, augment(image, 32, g2, aug=aug, keep=mask_box(mask)))  # same draws
        x = ((view.pixels + 1) * 127.5).permute(1, 2, 0).numpy()
        yellow, inside = (x[..., 2] < 120) & (x[..., 0] > 150), view.mask[0].numpy() > 0.5
        ious.append((yellow & inside).sum() / (yellow | inside).sum())
    assert min(ious) > 0.8, min(ious)  # blur on the edges only; a mask left behind by a flip would be ~0.3


def test_the_mask_weight_counts_the_products_latent_pixels():
    from diffusers import DDPMScheduler

    from training.lora import denoise_loss, latent_weights

    # A mask covering the left half at 32 px; latents 4 x 16 x 16. The "UNet" predicts zeros, so the error is
    # the noise itself: 1 on the product's latent pixels, 0 on the background's.
    masks = torch.zeros(2, 1, 32, 32)
    masks[:, :, :, :16] = 1.0
    masks[:, :, :, 15] = 0.5  # an edge pixel, half product
    w = latent_weights(masks, (16, 16), 4.0)
    assert w[0, 0, 0, :7].eq(4.0).all() and w[0, 0, 0, 8:].eq(1.0).all() and w[0, 0, 0, 7].item() == 3.25
    noise = torch.zeros(2, 4, 16, 16)
    noise[..., :8] = 1.0
    base = SimpleNamespace(
        noise_scheduler=DDPMScheduler(),
        unet=lambda x, t, encoder_hidden_states: SimpleNamespace(sample=torch.zeros_like(x)),
    )
    t = torch.tensor([10, 500])
    plain = denoise_loss(base, torch.zeros_like(noise), noise, t, None, None)
    assert plain.item() == pytest.approx(0.5)
    weighted = denoise_loss(
        base, torch.zeros_like(noise), noise, t, None, None, weights=latent_weights(masks, (16, 16), 4.0)
    )
    wsum = w[0, 0].sum().item()
    assert weighted.item() == pytest.approx(w[0, 0, :, :8].sum().item() / wsum)  # about 0.8: the product counts 4x
    ones = denoise_loss(
        base, torch.zeros_like(noise), noise, t, None, None, weights=latent_weights(masks, (16, 16), 1.0)
    )
    assert ones.item() == pytest.approx(plain.item())


def test_product_masks_come_from_a_mask_file_the_alpha_or_a_plain_background(tmp_path):
    from training.data import product_mask, read_image_folder

    square(10, 10).save(tmp_path / "plain.png")  # light plain background: found
    cutout = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    ImageDraw.Draw(cutout).ellipse([5, 5, 30, 30], fill=(20, 20, 200, 255))
    cutout.save(tmp_path / "cutout.png")
    rng = np.random.default_rng(0)
    scene = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))  # a busy scene: none
    scene.save(tmp_path / "scene.png")
    scene.save(tmp_path / "given.png")
    given = Image.new("L", (40, 40), 0)
    ImageDraw.Draw(given).rectangle([0, 0, 19, 39], fill=255)
    given.save(tmp_path / "given.mask.png")
    items = {p.name: (im, p) for im, _, p in read_image_folder(tmp_path)}
    assert sorted(items) == ["cutout.png", "given.png", "plain.png", "scene.png"]  # a mask is not a photo
    masks = {name: product_mask(p, im) for name, (im, p) in items.items()}
    assert [masks[n][1] for n in ("given.png", "cutout.png", "plain.png")] == ["mask file", "alpha", "found"]
    assert np.array_equal(np.asarray(masks["given.png"][0]), np.asarray(given))
    assert np.array_equal(np.asarray(masks["cutout.png"][0]) >= 128, np.asarray(cutout)[..., 3] >= 128)
    found = np.asarray(masks["plain.png"][0]) > 0
    assert found[10:41, 10:41].all() and found.sum() == 31 * 31  # exactly the square
    assert masks["scene.png"][0] is None and "not light" in masks["scene.png"][1]
    (tmp_path / "given.mask.png").write_bytes(Image.new("L", (8, 8)).tobytes())  # not an image
    with pytest.raises(TrainingError, match=r"given\.mask\.png"):
        product_mask(*reversed(items["given.png"]))


def test_background_swap_keeps_the_product_and_varies_the_background():
    from training.data import swap_background

    image = square(20, 20, (64, 64))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle([20, 20, 50, 50], fill=255)
    inside = np.asarray(mask) == 255
    g = torch.Generator().manual_seed(0)
    lumas = []
    for _ in range(40):
        out = np.asarray(swap_background(image, mask, g))
        assert np.array_equal(out[inside], np.asarray(image)[inside])  # the product's own pixels
        lumas.append(out[~inside].mean())
    assert min(lumas) < 60 and max(lumas) > 190  # dark and light backgrounds both come up


def test_auto_background_swap_fills_in_dark_scenes_the_photos_lack():
    from training.data import AUTO_SWAP, Example, auto_background_swap

    mask = Image.new("L", (40, 40), 0)
    ImageDraw.Draw(mask).rectangle([10, 10, 30, 30], fill=255)

    def shot(bg: int, with_mask: bool = True) -> Example:
        image = Image.new("RGB", (40, 40), (bg,) * 3)
        ImageDraw.Draw(image).rectangle([10, 10, 30, 30], fill=(20, 20, 20))  # a dark product: not counted
        return Example(image, "c", "s", mask if with_mask else None)

    light = [shot(235) for _ in range(19)]
    share, why = auto_background_swap(light)
    assert share == AUTO_SWAP and "0 of 19" in why  # catalogue shots on white: swap onto dark greys
    share, why = auto_background_swap([*light, shot(25)])
    assert share == 0.0 and "1 of 20" in why  # 5% of the photos already in the dark
    assert auto_background_swap([shot(235, with_mask=False)]) == (0.0, "no photo has a product mask")
    args = ["--images", "d", "--token", "<n>", "--base", "b", "--out", "o"]
    assert build_parser().parse_args([*args, "--background-swap", "auto"]).background_swap is None
    assert build_parser().parse_args([*args, "--background-swap", "0.2"]).background_swap == 0.2
    assert build_parser().parse_args(args).background_swap is TrainConfig.background_swap is None  # the default


def test_swapped_views_are_captioned_without_the_scene(tiny_world, photos, tmp_path, monkeypatch, caplog):
    """Every view swapped (share 1): the captions the text encoder sees are the scene-free template; with a
    mask weight the loss weights the product's latent pixels (the swapped copies keep the photos' masks)."""
    import training.lora

    calls: list[list[str]] = []
    seen: list[torch.Tensor | None] = []
    real, real_loss = training.lora.encode_text, training.lora.denoise_loss

    def spy(base, captions, device):
        calls.append(list(captions))
        return real(base, captions, device)

    def loss_spy(*args, weights=None, **kwargs):
        seen.append(weights)
        return real_loss(*args, weights=weights, **kwargs)

    monkeypatch.setattr(training.lora, "encode_text", spy)
    monkeypatch.setattr(training.lora, "denoise_loss", loss_spy)
    caplog.set_level("INFO", logger="training.lora")
    cfg = config(
        tmp_path / "p" / "swapped",
        tiny_world / "tiny-sd",
        photos,
        tmp_path / "w",
        steps=3,
        background_swap=1,
        mask_weight=3,
    )
    train(cfg)
    weighted = [w for w in seen if w is not None]  # the evaluation passes before and after: plain loss
    assert len(weighted) == 3
    for w in weighted:  # the red square: about a sixth of each view; the background counts once
        product = (w > 1).float().mean().item()
        assert w.max().item() == pytest.approx(3.0) and w.min().item() == 1.0 and 0.05 < product < 0.5, product
    assert "4 of 4 images have a product mask (found: 4)" in caplog.text
    steps = [c for c in calls if len(c) == 1]  # batch size 1; the evaluation passes encode 8 at a time
    assert steps == [["a photo of <red-square>"]] * 3
    # The evaluation set keeps the photos' own captions, "on a grey table" included.
    assert any("a photo of <red-square> on a grey table" in c for c in calls if len(c) > 1)
    summary = json.loads((cfg.out / "training.json").read_text())
    assert all(e["mask"] for e in summary["examples"])


def test_diffusion_target_follows_prediction_type():
    from diffusers import DDPMScheduler

    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    assert torch.equal(diffusion_target(DDPMScheduler(), latents, noise, t), noise)
    v = DDPMScheduler(prediction_type="v_prediction")
    assert torch.equal(diffusion_target(v, latents, noise, t), v.get_velocity(latents, noise, t))


def test_learned_tokens_by_default_only_for_new_names():
    from training.lora import resolve_learn_token

    assert resolve_learn_token(None, ["<my-mug>"]) and resolve_learn_token(None, ["<s1>", "<s2>"])
    assert not resolve_learn_token(None, ["at night"]) and not resolve_learn_token(None, ["sks mug"])
    assert resolve_learn_token(False, ["<my-mug>"]) is False and resolve_learn_token(True, ["mug"]) is True


def test_caption_rules():
    assert make_caption("<m>") == "a photo of <m>"
    assert make_caption("<m>", "{token} on a beach") == "<m> on a beach"
    assert make_caption("<m>", sidecar="studio shot, white background") == "<m>, studio shot, white background"
    assert make_caption("<m>", sidecar="a <m> mug") == "a <m> mug"


# The generator picks the product up


async def render(stub, product: str, scale: float | None = None):
    return await render_product(stub, product, scale, seed=3)


async def test_trained_product_appears_without_restart_and_changes_images(tiny_world, trained, tmp_path):
    from services.generator.app import start_generator

    served = tmp_path / "served"
    shutil.copytree(tiny_world / "products" / "tiny-star", served / "tiny-star")
    # One torch thread in the worker (see one_thread): patch the core count its thread share comes from.
    with mock.patch("os.cpu_count", return_value=1):
        app = await start_generator(generator_settings(tiny_world, str(tmp_path / "images"), products_dir=str(served)))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            before = {p.id for p in (await stub.ListProducts(pb.ListProductsRequest())).products}
            # Publish the way the CLI does: a hidden temp folder, renamed into place.
            shutil.copytree(trained.cfg.out, served / ".red-square.tmp")
            (served / ".red-square.tmp").rename(served / "red-square")
            listed = {p.id: p for p in (await stub.ListProducts(pb.ListProductsRequest())).products}
            assert before == {"tiny-star"} and set(listed) == {"tiny-star", "red-square"}
            assert listed["red-square"].display_name == "Red square" and list(listed["red-square"].tokens) == [
                "<red-square>"
            ]
            ours = await render(stub, "red-square")
            off = await render(stub, "red-square", scale=0.0)
            other = await render(stub, "tiny-star")
            assert np.abs(ours - off).mean() > 1.0, "the trained LoRA must change the image"
            assert np.abs(ours - other).mean() > 1.0
    finally:
        await app.stop()


# Bad inputs: a clear message, a non-zero exit, nothing left in products/


def cli(*args: str) -> list[str]:
    return ["--steps", "2", "--resolution", "32", "--threads", "1", "--quiet", *args]


def test_empty_folder_fails_in_a_subprocess(tiny_world, tmp_path):
    (tmp_path / "empty").mkdir()
    products = tmp_path / "products"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.lora",
            "--images",
            str(tmp_path / "empty"),
            "--token",
            "<x>",
            "--base",
            str(tiny_world / "tiny-sd"),
            "--out",
            str(products / "x"),
            "--work-dir",
            str(tmp_path / "w"),
            *cli(),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --images: no images in {tmp_path / 'empty'}")
    assert not (products / "x").exists() and leftovers(products) == []


def test_bad_inputs_fail_clearly(tiny_world, photos, products, trained, tmp_path, capsys):
    base = str(tiny_world / "tiny-sd")
    broken = tmp_path / "broken"
    broken.mkdir()
    square(5, 5).save(broken / "good.png")
    (broken / "bad.png").write_bytes(b"not a png at all")
    fake_base = tmp_path / "not-a-model"
    fake_base.mkdir()
    sdxl = tmp_path / "sdxl"
    sdxl.mkdir()
    (sdxl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    elsewhere = tmp_path / "foreign-checkpoint"
    shutil.copytree(trained.work / "checkpoint-000010", elsewhere)
    state = json.loads((elsewhere / "state.json").read_text())
    state["base"], state["fingerprint"]["cross_attention_dim"] = "runwayml/stable-diffusion-v1-5", 768
    (elsewhere / "state.json").write_text(json.dumps(state))

    out = str(products / "new-product")
    cases = [
        (["--images", str(broken), "--token", "<n>"], "cannot read 1 of 2 images", "bad.png"),
        (["--images", str(photos), "--token", "<TINY-star>"], "<TINY-star> is already used by product 'tiny-star'", ""),
        (["--images", str(photos), "--token", "<n>", "--base", str(fake_base)], "no model_index.json", ""),
        (["--images", str(photos), "--token", "<n>", "--base", str(sdxl)], "StableDiffusionXLPipeline", ""),
        (
            [
                "--images",
                str(photos),
                "--token",
                "<n>",
                "--learn-token",
                "--train-text-encoder",
                "--init-word",
                "square",
                "--resume",
                str(elsewhere),
            ],
            "the adapter does not fit",
            "cross_attention_dim': 768",
        ),
        (["--images", str(photos), "--token", "cat", "--learn-token"], "already a word the tokenizer knows", ""),
        (["--images", str(photos), "--token", "<n>", "--resolution", "30"], "not a multiple of 4", ""),
        (["--video", str(tmp_path / "missing.mp4"), "--token", "<n>"], "--video:", "missing"),
        (["--images", str(photos), "--token", "<n>", "--out", str(products / "bad id!")], "not a valid product id", ""),
        (["--images", str(photos), "--token", "<n>", "--background-swap", "1.5"], "--background-swap: a share", "1.5"),
        (["--images", str(photos), "--token", "<n>", "--mask-weight", "0"], "--mask-weight: must be above 0", ""),
    ]
    for args, message, detail in cases:
        # No class images: two of these checks come after prior preservation draws them (100 by default,
        # 10 s here each time), and every case fails before any training step would use them.
        argv = ["--base", base, "--out", out, "--work-dir", str(tmp_path / "w"), "--num-class-images", "0", *cli(*args)]
        assert main(argv) == 1, args
        err = capsys.readouterr().err
        assert message in err and detail in err, (args, err)
    assert sorted(p.name for p in products.iterdir()) == ["red-square", "tiny-star"]


def test_a_failure_while_publishing_leaves_nothing(tiny_world, photos, tmp_path, monkeypatch):
    import training.lora

    def explode(tmp, *args, **kwargs):
        (tmp / "manifest.yaml").write_text("half written")
        raise OSError("disk full")

    monkeypatch.setattr(training.lora, "write_product", explode)
    products = tmp_path / "products"
    with pytest.raises(OSError, match="disk full"):
        train(config(products / "p", tiny_world / "tiny-sd", photos, tmp_path / "w", steps=1))
    assert list(products.iterdir()) == []


def test_pickle_adapters_are_refused_by_the_converter(tmp_path, capsys):
    from training.convert import main as convert

    torch.save({"x": torch.zeros(1)}, tmp_path / "lora.bin")
    assert convert([str(tmp_path / "lora.bin"), str(tmp_path / "out")]) == 1
    assert "lora.bin is a pickle file; only .safetensors adapters are accepted" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
