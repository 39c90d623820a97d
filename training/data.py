"""Training data for a product LoRA: an image folder (with optional `.txt` captions and `.mask.png`
masks) or video frames, captions from a template, the random crop/flip augmentation and the background
swap (the product cut out by its mask and put on a random background).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from training import TrainingError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_TEMPLATE = "a photo of {token}"
# Mean absolute difference (0..1) of 16x16 grey thumbnails under which two frames count as the same shot.
DEFAULT_DEDUPE_THRESHOLD = 0.02
MAX_SCALE = 1.25  # random crops take between 1/1.25 and all of the shorter side


MASK_SUFFIX = ".mask.png"


@dataclass
class Example:
    image: Image.Image
    caption: str
    source: str
    mask: Image.Image | None = None  # "L", 255 = product; enables the background swap


def _rgb(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        # Cut-out product shots: put them on white rather than on black.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def read_image_folder(folder: str | Path) -> list[tuple[Image.Image, str | None, Path]]:
    """(image, sidecar caption or None, path) for every image in `folder` (`NAME.mask.png` files are masks,
    not images); errors name every bad file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TrainingError(f"--images: {folder} is not a folder")
    paths = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.lower().endswith(MASK_SUFFIX)
    )
    if not paths:
        raise TrainingError(f"--images: no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)})")
    items, bad = [], []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.load()
                image = _rgb(im)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            bad.append(f"{path.name} ({type(exc).__name__}: {exc})")
            continue
        sidecar = path.with_suffix(".txt")
        caption = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else None
        items.append((image, caption or None, path))
    if bad:
        raise TrainingError(f"--images: cannot read {len(bad)} of {len(paths)} images in {folder}: " + "; ".join(bad))
    return items


def product_mask(path: Path, image: Image.Image) -> tuple[Image.Image | None, str]:
    """The product's mask for one photo and where it came from: `NAME.mask.png` beside it (grey, 255 =
    product), else the photo's own alpha (an RGBA cutout), else found on a plain light background by the
    placement mode's finder; (None, reason) when there is none (a product in a scene)."""
    sidecar = path.with_name(path.stem + MASK_SUFFIX)
    if sidecar.is_file():
        try:
            with Image.open(sidecar) as m:
                mask = m.convert("L")
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise TrainingError(f"--images: cannot read the mask {sidecar.name} ({exc})") from exc
        if mask.size != image.size:
            raise TrainingError(f"--images: {sidecar.name} is {mask.size}, its photo {path.name} is {image.size}")
        return mask, "mask file"
    with Image.open(path) as im:
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            alpha = ImageOps.exif_transpose(im).convert("RGBA").getchannel("A")
            if int(np.asarray(alpha).min()) < 128:  # some of it transparent: a real cutout
                return alpha, "alpha"
    from services.common.errors import InvalidArgument
    from services.generator.placement import find_mask

    try:
        found = find_mask(np.asarray(image))
    except InvalidArgument as exc:
        return None, exc.problem
    return Image.fromarray(found.astype(np.uint8) * 255, "L"), "found"


def swap_background(
    image: Image.Image,
    mask: Image.Image,
    generator: torch.Generator,
    light: tuple[float, float] = (0.0, 1.0),
    colour: float = 1.0,
) -> Image.Image:
    """The product (by its mask) over a random background: a plain colour or a two-colour gradient, its
    brightness in `light` (0 black .. 1 white) and its saturation scaled by `colour` (0: greys only), so the
    adapter sees the product apart from the backgrounds it was photographed on (TRAINING.md)."""
    u = torch.rand(8, generator=generator).tolist()
    w, h = image.size
    lo, hi = light
    a, b = ((lo + (hi - lo) * np.array(u[i : i + 3])) * 255 for i in (0, 3))
    a, b = (x.mean() + colour * (x - x.mean()) for x in (a, b))
    if u[6] < 0.5:
        b = a  # plain
    t = np.linspace(0.0, 1.0, h if u[7] < 0.75 else w, dtype=np.float32)[:, None]
    ramp = a * (1 - t) + b * t
    background = np.broadcast_to(ramp[:, None, :], (h, w, 3)) if u[7] < 0.75 else np.broadcast_to(ramp, (h, w, 3))
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    out = np.asarray(image, dtype=np.float32) * alpha + background * (1 - alpha)
    return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8))


DARK_LUMA = 60.0  # a background darker than this is a dark scene (the demo's black studio ~25, fire ~125)
AUTO_SWAP = 0.3  # share of views swapped when the photos have no dark background (TRAINING.md)
AUTO_DARK_SHARE = 0.05  # photos on dark backgrounds needed to leave the swap off


def background_luma(image: Image.Image, mask: Image.Image) -> float:
    """Mean luma (0-255) of the photo outside the product's mask."""
    luma = np.asarray(image.convert("L"), dtype=np.float32)
    outside = np.asarray(mask) < 128
    return float(luma[outside].mean()) if outside.any() else 255.0


def auto_background_swap(examples: list[Example]) -> tuple[float, str]:
    """`--background-swap auto`: swap `AUTO_SWAP` of the views onto dark grey backgrounds when the photos
    (those with a mask) show no dark scene, so the adapter also knows the product in the dark; catalogue
    shots on white are the usual case. Photos that already cover dark scenes are left as they are: there
    the swap measured no better (TRAINING.md)."""
    masked = [(e.image, e.mask) for e in examples if e.mask is not None]
    if not masked:
        return 0.0, "no photo has a product mask"
    dark = sum(background_luma(image, mask) < DARK_LUMA for image, mask in masked)
    why = f"{dark} of {len(masked)} photos with a mask are on a dark background (luma < {DARK_LUMA:g})"
    return (0.0 if dark >= AUTO_DARK_SHARE * len(masked) else AUTO_SWAP), why


def thumbnail(image: Image.Image, size: int = 16) -> np.ndarray:
    """Small grey version of `image` for near-duplicate checks (values 0..1)."""
    return np.asarray(image.convert("L").resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


def drop_near_duplicates(images: list[Image.Image], threshold: float = DEFAULT_DEDUPE_THRESHOLD) -> list[int]:
    """Indices of the images kept: each one differs from every earlier kept one by more than `threshold`."""
    kept: list[int] = []
    thumbs: list[np.ndarray] = []
    for i, image in enumerate(images):
        t = thumbnail(image)
        if all(float(np.abs(t - k).mean()) > threshold for k in thumbs):
            kept.append(i)
            thumbs.append(t)
    return kept


@dataclass
class VideoFrames:
    frames: list[Image.Image]
    read: int  # frames decoded
    sampled: int  # frames taken at the requested fps
    native_fps: float


def extract_video_frames(
    video: str | Path, fps: float, threshold: float = DEFAULT_DEDUPE_THRESHOLD, out_dir: str | Path | None = None
) -> VideoFrames:
    """Frames of `video` at `fps` (imageio + imageio-ffmpeg), near-duplicates dropped; saved to `out_dir` if given."""
    import imageio.v2 as imageio

    # imageio-ffmpeg starts ffmpeg with preexec_fn=os.setpgrp, which forces a full fork() that can hang in
    # gRPC's fork handlers when a channel or server lives in this process (imageio-ffmpeg #58, seen in CI as
    # "Could not load meta information"); without preexec_fn Python spawns it with vfork.
    os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")
    video = Path(video)
    if not video.is_file():
        raise TrainingError(f"--video: {video} is missing")
    if fps <= 0:
        raise TrainingError(f"--fps: must be positive, got {fps}")
    sampled: list[Image.Image] = []
    read = 0
    try:
        # imageio types its readers loosely: the FFMPEG reader has get_meta_data and yields frames.
        with cast(Any, imageio.get_reader(str(video), format="FFMPEG")) as reader:
            native = float(reader.get_meta_data().get("fps") or fps)
            next_t = 0.0
            for i, frame in enumerate(reader):
                read += 1
                # Frame i shows time i/native; take the first frame at or after each 1/fps tick.
                if i / native + 1e-6 >= next_t:
                    sampled.append(Image.fromarray(np.asarray(frame)).convert("RGB"))
                    next_t += 1.0 / fps
    except TrainingError:
        raise
    except Exception as exc:
        raise TrainingError(f"--video: cannot read {video} ({type(exc).__name__}: {exc})") from exc
    if not sampled:
        raise TrainingError(f"--video: no frames in {video}")
    frames = [sampled[i] for i in drop_near_duplicates(sampled, threshold)]
    log.info(
        "video %s: %d frames at %.1f fps, %d sampled at %.1f fps, %d kept",
        video,
        read,
        native,
        len(sampled),
        fps,
        len(frames),
    )
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(frames):
            frame.save(out / f"frame-{i:04d}.png")
    return VideoFrames(frames, read, len(sampled), native)


def make_caption(phrase: str, template: str = DEFAULT_TEMPLATE, sidecar: str | None = None) -> str:
    """One image's caption: its sidecar text, else the template; `{token}` is filled in, or the phrase put first."""
    text = sidecar if sidecar else template
    if "{token}" in text:
        return text.replace("{token}", phrase)
    return text if phrase in text else f"{phrase}, {text}"


def to_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 image -> CHW float in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def center_crop(image: Image.Image, resolution: int) -> torch.Tensor:
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize(
        (max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.Resampling.BICUBIC
    )
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return to_tensor(image.crop((left, top, left + resolution, top + resolution)))


@dataclass(frozen=True)
class Augment:
    """Random views of one photo. Colour-safe: brightness and contrast move every channel together, so
    the product's hue never changes (no hue or per-channel jitter: a red product must stay this red)."""

    max_scale: float = MAX_SCALE  # crops take between 1/max_scale and all of the shorter side
    flip: bool = True  # horizontal flips; off for products with text or a left/right design
    brightness: float = 0.08  # factor drawn from 1 +- this
    contrast: float = 0.08
    # With a product box (`keep`): the share of the crop's side kept clear between the product and each edge.
    # Zoomed views otherwise teach a product that grazes the frame, and the model then draws it cut (TRAINING.md).
    margin: float = 0.0


NO_AUGMENT = Augment(max_scale=1.0, flip=False, brightness=0.0, contrast=0.0)


def mask_box(mask: Image.Image | None) -> tuple[int, int, int, int] | None:
    """The product's bounding box (left, top, right, bottom; exclusive) in its mask, or None without one."""
    if mask is None:
        return None
    return mask.point(lambda v: 255 if v >= 128 else 0).getbbox()


def _offset(u: float, size: int, resolution: int, lo_edge: float | None, hi_edge: float | None) -> int:
    """A random crop start along one axis; with a product span [lo_edge, hi_edge) the crop holds all of it."""
    lo, hi = 0, size - resolution
    if lo_edge is not None and hi_edge is not None:
        lo, hi = max(lo, math.ceil(hi_edge) - resolution), min(hi, math.floor(lo_edge))
        if lo > hi:  # larger than the crop along this axis: centre on it
            return min(max(round((lo_edge + hi_edge - resolution) / 2), 0), size - resolution)
    return lo + int(u * (hi - lo + 1))


@dataclass
class View:
    """One augmented view: pixels CHW in [-1, 1], and the product's mask (1HW in [0, 1]) where the photo has one,
    moved by the same zoom, crop and flip."""

    pixels: torch.Tensor
    mask: torch.Tensor | None = None


def augment_view(
    image: Image.Image,
    resolution: int,
    generator: torch.Generator,
    aug: Augment,
    keep: tuple[int, int, int, int] | None = None,
    mask: Image.Image | None = None,
) -> View:
    """Random scale (1 to `max_scale` x the crop), random crop, random flip (unless off), then colour-safe
    brightness/contrast jitter. With `keep`, the product's box (`mask_box`), the zoom and the crop never cut the
    product (without it 13-15% of the demo products' views cut theirs by a pixel or more, TRAINING.md). The same
    six random draws either way, with or without `mask`."""
    u = torch.rand(6, generator=generator).tolist()
    w, h = image.size
    base = resolution / min(w, h)
    zoom = 1.0 + (aug.max_scale - 1.0) * u[0]
    m = aug.margin * resolution  # crop pixels
    if keep is not None:
        bw, bh = max(keep[2] - keep[0], 1), max(keep[3] - keep[1], 1)
        room = resolution - 2 * m
        zoom = max(1.0, min(zoom, room / (bw * base), room / (bh * base)))
    scale = base * zoom
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    sx, sy = size[0] / w, size[1] / h
    box = (keep[0] * sx - m, keep[1] * sy - m, keep[2] * sx + m, keep[3] * sy + m) if keep is not None else (None,) * 4
    left = _offset(u[1], size[0], resolution, box[0], box[2])
    top = _offset(u[2], size[1], resolution, box[1], box[3])
    flip = aug.flip and u[3] < 0.5

    def place(im: Image.Image, resample: Image.Resampling) -> Image.Image:
        im = im.resize(size, resample).crop((left, top, left + resolution, top + resolution))
        return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else im

    x = to_tensor(place(image, Image.Resampling.BICUBIC))
    if aug.brightness or aug.contrast:
        # On [-1, 1]: contrast about the image mean, brightness as a gain on (x + 1); same for all channels.
        c = 1.0 + aug.contrast * (2 * u[4] - 1)
        b = 1.0 + aug.brightness * (2 * u[5] - 1)
        mean = x.mean()
        x = ((((x - mean) * c + mean) + 1.0) * b - 1.0).clamp(-1.0, 1.0)
    if mask is None:
        return View(x)
    moved = np.asarray(place(mask.convert("L"), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return View(x, torch.from_numpy(moved)[None])


def augment(
    image: Image.Image,
    resolution: int,
    generator: torch.Generator,
    flip: bool = True,
    aug: Augment | None = None,
    keep: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """The pixels of `augment_view` (`flip` is kept for callers that pass only that)."""
    return augment_view(image, resolution, generator, aug or Augment(flip=flip), keep).pixels
