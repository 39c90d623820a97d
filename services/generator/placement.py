"""Placement mode: the customer's own product pixels, kept exactly, with the scene generated around them.

Pure numpy/PIL/scipy (no torch): the server validates and places the product before a request is
accepted, workers composite after inpainting, and tests run it directly.

1. `load_product`: header checked before decoding (`services.common.images.probe`), then the mask from
   the alpha channel of an RGBA cutout, from a separate mask image, or found on a plain light background
   by `find_mask`.
2. `place`: crop to the mask's box, scale to the placement's height (no resampling when the size is
   already right) and put it at the placement's centre; a product leaving the frame is refused.
3. `composite`: after generation, the placed pixels go back inside the mask. Pixels of the mask eroded
   by `feather` (3x3 erosions) are the placed pixels exactly; the `feather` rings inside the mask's edge
   blend towards the generated scene, so the seam is not a hard cut.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from services.common.errors import InvalidArgument
from services.common.images import decode, probe
from services.generator.messages import PlacedProduct

# Mask finding on a plain light background (catalogue shots).
DEFAULT_TOLERANCE = 24  # max |channel - background colour| still counted as background, in 0..255
MIN_BACKGROUND_LUMA = 170  # the border colour must be at least this light
MIN_PLAIN_BORDER = 0.5  # share of border pixels that must match the background colour
SECOND_OBJECT_SHARE = 0.2  # a second component this large (vs the largest) means "several products"
MIN_PRODUCT_SHARE = 0.002  # masks below this share of the image are "no product"
MAX_PRODUCT_SHARE = 0.98  # masks above it are "the whole frame"

# Default placement when neither the request nor the template gives one: centred, 60% of the height.
DEFAULT_CENTER = (0.5, 0.5)
DEFAULT_HEIGHT = 0.6
FIT_MARGIN = 0.95  # a default placement shrinks so the product spans at most this much of the width


@dataclass(frozen=True)
class Placement:
    """Where the product goes: its box's centre as fractions of the frame, its height as a fraction."""

    center_x: float
    center_y: float
    height: float


@dataclass(frozen=True)
class Cutout:
    """The product: RGB pixels and a boolean mask, cropped to the mask's bounding box."""

    rgb: np.ndarray  # (h, w, 3) uint8
    mask: np.ndarray  # (h, w) bool
    origin: tuple[int, int]  # the box's top-left corner in the uploaded image
    image_size: tuple[int, int]  # the uploaded image's (width, height)
    source: str  # "alpha", "mask" or "found"


def arrays(placed: PlacedProduct) -> tuple[np.ndarray, np.ndarray]:
    """(rgb (h, w, 3) uint8, mask (h, w) bool) of a placed product."""
    rgb = np.frombuffer(placed.rgb, np.uint8).reshape(placed.height, placed.width, 3)
    mask = np.frombuffer(placed.mask, np.uint8).reshape(placed.height, placed.width).astype(bool)
    return rgb, mask


def digest(image: bytes, mask: bytes = b"") -> str:
    """What the PNG parameters record about the product image: a hash, never the bytes."""
    h = hashlib.sha256(image)
    if mask:
        h.update(b"\0mask\0")
        h.update(mask)
    return h.hexdigest()


def default_feather(width: int, height: int) -> int:
    """1 px up to 383 px frames, 2 px at 512, 4 px at 1024: thin against the frame."""
    return max(1, round(min(width, height) / 256))


# 1. Input


def load_product(
    image: bytes,
    mask: bytes = b"",
    *,
    max_pixels: int,
    tolerance: int = 0,
    field_prefix: str = "product_image",
) -> Cutout:
    """Decode an uploaded product (header first) and find its mask; INVALID_ARGUMENT naming the problem."""
    image_field, mask_field = f"{field_prefix}.image", f"{field_prefix}.mask"
    probe(image, max_pixels, image_field)
    picture, _ = decode(image, max_pixels, image_field)
    rgb = np.asarray(picture.convert("RGB"))
    if mask:
        mask_header = probe(mask, max_pixels, mask_field)
        if (mask_header.width, mask_header.height) != picture.size:
            raise InvalidArgument(
                mask_field,
                f"is {mask_header.width}x{mask_header.height}; the image is {picture.width}x{picture.height}",
            )
        mask_image, _ = decode(mask, max_pixels, mask_field)
        # A cutout given as the mask counts by its alpha; any other mask by its grey level.
        channel = mask_image.getchannel("A") if mask_image.mode == "RGBA" else mask_image.convert("L")
        found, source = np.asarray(channel) >= 128, "mask"
        _check_share(found, mask_field, "the mask")
    elif picture.mode == "RGBA" and np.asarray(picture.getchannel("A")).min() < 255:
        found, source = np.asarray(picture.getchannel("A")) >= 128, "alpha"
        _check_share(found, image_field, "the alpha channel")
    else:
        found, source = find_mask(rgb, tolerance or DEFAULT_TOLERANCE, image_field), "found"
    ys, xs = np.nonzero(found)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    return Cutout(
        rgb=np.ascontiguousarray(rgb[y0:y1, x0:x1]),
        mask=np.ascontiguousarray(found[y0:y1, x0:x1]),
        origin=(x0, y0),
        image_size=picture.size,
        source=source,
    )


def _check_share(mask: np.ndarray, field: str, what: str) -> None:
    share = float(mask.mean())
    if not mask.any():
        raise InvalidArgument(field, f"{what} is empty: nothing is marked as the product")
    if mask.all() or share > MAX_PRODUCT_SHARE:
        raise InvalidArgument(field, f"{what} covers the whole image ({share:.0%}): nothing is left for the scene")


def find_mask(rgb: np.ndarray, tolerance: int = DEFAULT_TOLERANCE, field: str = "product_image.image") -> np.ndarray:
    """The product on a plain light background (a catalogue shot): a deterministic boolean mask.

    1. The background colour is the median of the border pixels; it must be light, and at least half
       of the border must be within `tolerance` of it (else the background is not plain).
    2. Flood fill from the border: every pixel within `tolerance` of that colour (max over channels)
       and 4-connected to the border is background; everything else is the product, so background
       enclosed by the product (inside a handle) stays with the product.
    3. Cleanup: a 3x3 opening drops specks and noise, then the largest 8-connected component is kept,
       its holes are filled and a 3x3 closing smooths its edge.
    4. Refused (INVALID_ARGUMENT): no product, the whole frame, or a second component at least
       `SECOND_OBJECT_SHARE` of the largest (several products: give a mask).
    """
    a = rgb.astype(np.int16)
    border = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
    background = np.median(border, axis=0)
    luma = float(background @ np.array([0.299, 0.587, 0.114]))
    if luma < MIN_BACKGROUND_LUMA:
        raise InvalidArgument(
            field,
            f"the background is not light (border colour {tuple(int(c) for c in background)}): "
            "give an RGBA cutout or a mask",
        )
    close = np.abs(a - background).max(axis=-1) <= tolerance
    plain = np.concatenate([close[0], close[-1], close[1:-1, 0], close[1:-1, -1]]).mean()
    if plain < MIN_PLAIN_BORDER:
        raise InvalidArgument(
            field, f"the background is not plain (only {plain:.0%} of the border matches it): give a cutout or a mask"
        )
    labels, _ = ndimage.label(close)  # 4-connected
    edge_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    background_mask = np.isin(labels, edge_labels[edge_labels > 0])
    product = ndimage.binary_opening(~background_mask, structure=np.ones((3, 3), bool))
    parts, count = ndimage.label(product, structure=np.ones((3, 3), bool))
    if count == 0 or not product.any():
        raise InvalidArgument(field, "found no product on the background (is the product as light as the background?)")
    sizes = np.bincount(parts.ravel())[1:]
    order = np.argsort(sizes)[::-1]
    if count > 1 and sizes[order[1]] >= SECOND_OBJECT_SHARE * sizes[order[0]]:
        raise InvalidArgument(
            field, f"found {int((sizes >= SECOND_OBJECT_SHARE * sizes[order[0]]).sum())} separate objects; give a mask"
        )
    kept = ndimage.binary_fill_holes(parts == order[0] + 1)
    kept = ndimage.binary_closing(kept, structure=np.ones((3, 3), bool), border_value=0) | kept
    share = float(kept.mean())
    if share < MIN_PRODUCT_SHARE:
        raise InvalidArgument(field, f"found no product: the largest object covers only {share:.2%} of the image")
    if share > MAX_PRODUCT_SHARE:
        raise InvalidArgument(field, f"the product seems to fill the whole image ({share:.0%}): give a mask")
    return kept


def load_mask_png(data: bytes) -> np.ndarray:
    """A mask PNG (as `mask_png` writes it) back to booleans."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L")) >= 128


def mask_png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


# 2. Placement


def check_placement(center_x: float, center_y: float, height: float, field: str = "placement") -> Placement | None:
    """A request's placement, validated; None when every value is 0 (the template's default)."""
    values = {"center_x": center_x, "center_y": center_y, "height": height}
    for name, value in values.items():
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise InvalidArgument(f"{field}.{name}", f"must be a fraction of the frame in [0, 1], got {value}")
    if not any(values.values()):
        return None
    if height <= 0:
        raise InvalidArgument(f"{field}.height", "must be > 0 when a placement is given (0 for all: the default)")
    return Placement(center_x or DEFAULT_CENTER[0], center_y or DEFAULT_CENTER[1], height)


def resolve_placement(
    cutout: Cutout, width: int, height: int, requested: Placement | None, default: Placement | None
) -> Placement | None:
    """The placement to use. None keeps the product where it is in an image of exactly the frame's
    size (no resampling); a default placement shrinks to fit the frame's width."""
    if requested is not None:
        return requested
    if cutout.image_size == (width, height):
        return None
    chosen = default or Placement(*DEFAULT_CENTER, DEFAULT_HEIGHT)
    box_h, box_w = cutout.mask.shape
    fit = FIT_MARGIN * width * box_h / (box_w * height)  # the height at which the width spans FIT_MARGIN
    return Placement(chosen.center_x, chosen.center_y, min(chosen.height, fit))


def place(
    cutout: Cutout,
    width: int,
    height: int,
    placement: Placement | None,
    *,
    feather: int | None = None,
    digest_hex: str = "",
    field: str = "placement",
) -> PlacedProduct:
    """Scale and position the cutout in a width x height frame; INVALID_ARGUMENT if it leaves the frame."""
    box_h, box_w = cutout.mask.shape
    rgb, mask = cutout.rgb, cutout.mask
    if placement is None:
        x0, y0 = cutout.origin
        target_w, target_h = box_w, box_h
    else:
        target_h = max(1, round(placement.height * height))
        target_w = max(1, round(box_w * target_h / box_h))
        x0 = round(placement.center_x * width - target_w / 2)
        y0 = round(placement.center_y * height - target_h / 2)
    if x0 < 0 or y0 < 0 or x0 + target_w > width or y0 + target_h > height:
        raise InvalidArgument(
            field,
            f"the product ({target_w}x{target_h} px at {x0},{y0}) leaves the {width}x{height} frame: "
            "move it or make it smaller",
        )
    if (target_w, target_h) != (box_w, box_h):
        rgb = np.asarray(Image.fromarray(rgb).resize((target_w, target_h), Image.Resampling.LANCZOS))
        soft = Image.fromarray(mask.astype(np.uint8) * 255).resize((target_w, target_h), Image.Resampling.BILINEAR)
        mask = np.asarray(soft) >= 128
    if not mask.any():
        raise InvalidArgument(f"{field}.height", f"the product is too small to place at {target_w}x{target_h} px")
    frame = np.zeros((height, width, 3), np.uint8)
    frame_mask = np.zeros((height, width), np.uint8)
    frame[y0 : y0 + target_h, x0 : x0 + target_w][mask] = rgb[mask]
    frame_mask[y0 : y0 + target_h, x0 : x0 + target_w] = mask
    return PlacedProduct(
        width=width,
        height=height,
        box=(x0, y0, x0 + target_w, y0 + target_h),
        feather=default_feather(width, height) if feather is None else feather,
        digest=digest_hex,
        rgb=frame.tobytes(),
        mask=frame_mask.tobytes(),
    )


# 3. Generation inputs and compositing


def erode(mask: np.ndarray, times: int) -> np.ndarray:
    """`times` 3x3 erosions; the frame's edge does not erode (a product may touch it)."""
    if times <= 0:
        return mask.copy()
    return ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), iterations=times, border_value=1)


def inner_mask(mask: np.ndarray, feather: int) -> np.ndarray:
    """The pixels that are kept exactly: the mask less its feathered edge."""
    return erode(mask, feather)


def alpha(mask: np.ndarray, feather: int) -> np.ndarray:
    """uint8 weight of the product: 255 on the inner mask, k*255/(feather+1) on the k-th ring from the
    mask's edge, 0 outside."""
    out = np.zeros(mask.shape, np.uint16)
    current = mask
    for k in range(1, feather + 1):
        inner = erode(current, 1)
        out[current & ~inner] = round(255 * k / (feather + 1))
        current = inner
    out[current] = 255
    return out.astype(np.uint8)


def init_image(placed: PlacedProduct) -> Image.Image:
    """The inpainting input: the product on mid grey (the grey is repainted)."""
    rgb, mask = arrays(placed)
    frame = np.full_like(rgb, 128)
    frame[mask] = rgb[mask]
    return Image.fromarray(frame)


def repaint_mask(placed: PlacedProduct) -> Image.Image:
    """White where the scene is generated: everything but the inner mask, so the feathered edge is
    painted too and blends with the scene."""
    _, mask = arrays(placed)
    return Image.fromarray(np.where(inner_mask(mask, placed.feather), 0, 255).astype(np.uint8))


def composite(generated: Image.Image, placed: PlacedProduct) -> Image.Image:
    """The product's pixels back over a generated image: exact inside, blended on the feathered edge."""
    rgb, mask = arrays(placed)
    scene = np.asarray(generated.convert("RGB"))
    if scene.shape != rgb.shape:
        raise ValueError(f"placement: generated {scene.shape} but the product frame is {rgb.shape}")
    a = alpha(mask, placed.feather).astype(np.uint32)[..., None]
    blended = (rgb.astype(np.uint32) * a + scene.astype(np.uint32) * (255 - a) + 127) // 255
    return Image.fromarray(blended.astype(np.uint8))


def preview_pngs(placed: PlacedProduct) -> tuple[bytes, bytes]:
    """(the mask in the frame, the placed product over a checkerboard), as PNG bytes."""
    buf = io.BytesIO()
    preview(placed).save(buf, format="PNG")
    return mask_png(arrays(placed)[1]), buf.getvalue()


def preview(placed: PlacedProduct) -> Image.Image:
    """The placed product over a checkerboard, as a client shows it before generating."""
    rgb, mask = arrays(placed)
    ys, xs = np.indices(mask.shape)
    tile = max(4, min(placed.width, placed.height) // 16)
    checker = np.where(((ys // tile + xs // tile) % 2)[..., None] == 0, 235, 200).astype(np.uint8)
    frame = np.repeat(checker, 3, axis=-1)
    a = alpha(mask, placed.feather).astype(np.uint32)[..., None]
    out = (rgb.astype(np.uint32) * a + frame.astype(np.uint32) * (255 - a) + 127) // 255
    return Image.fromarray(out.astype(np.uint8))


# 4. The request side (server.py calls these)


def prepare(
    image: bytes,
    mask: bytes,
    requested: Placement | None,
    default: Placement | None,
    width: int,
    height: int,
    *,
    max_pixels: int,
    tolerance: int = 0,
    feather: int | None = None,
    field_prefix: str = "product_image",
) -> tuple[PlacedProduct, dict]:
    """Decode, find the mask, place: (the placed product, what the parameters record about it)."""
    cutout = load_product(image, mask, max_pixels=max_pixels, tolerance=tolerance, field_prefix=field_prefix)
    chosen = resolve_placement(cutout, width, height, requested, default)
    placed = place(
        cutout,
        width,
        height,
        chosen,
        feather=feather,
        digest_hex=digest(image, mask),
        field=f"{field_prefix}.placement",
    )
    x0, y0, x1, y1 = placed.box
    record = {
        "product_image_sha256": placed.digest,
        "mask_source": cutout.source,
        # The placement that reproduces this box (passing it back gives the same pixels).
        "placement": {
            "center_x": (x0 + x1) / 2 / width,
            "center_y": (y0 + y1) / 2 / height,
            "height": (y1 - y0) / height,
        },
        "box": [x0, y0, x1, y1],
        "feather": placed.feather,
        "tolerance": (tolerance or DEFAULT_TOLERANCE) if cutout.source == "found" else 0,
    }
    return placed, record


async def from_request(
    message,
    store,
    *,
    width: int,
    height: int,
    default: Placement | None,
    max_bytes: int,
    max_pixels: int,
    field: str = "product_image",
) -> tuple[PlacedProduct, dict]:
    """A request's `ProductImage` (bytes or a URI in `store`), checked and placed off the event loop."""
    import asyncio

    source = message.WhichOneof("source")
    if source is None:
        raise InvalidArgument(field, "give the product image's bytes (image) or its storage uri")
    if source == "uri":
        uri = message.uri.strip()
        if not uri or not store.owns(uri):
            raise InvalidArgument(f"{field}.uri", f"{uri[:200]!r} is not a URI in this server's storage")
        try:
            data = await store.get(uri)
        except OSError:
            raise InvalidArgument(f"{field}.uri", "is not a readable file") from None
    else:
        data = message.image
    if len(data) + len(message.mask) > max_bytes:
        raise InvalidArgument(
            f"{field}.{source}",
            f"{len(data) + len(message.mask)} bytes with its mask; this server takes at most {max_bytes}",
        )
    if message.tolerance > 255:
        raise InvalidArgument(f"{field}.tolerance", f"must be 0 (default) to 255, got {message.tolerance}")
    p = message.placement
    requested = check_placement(p.center_x, p.center_y, p.height, f"{field}.placement")
    return await asyncio.to_thread(
        prepare,
        data,
        message.mask,
        requested,
        default,
        width,
        height,
        max_pixels=max_pixels,
        tolerance=message.tolerance,
        field_prefix=field,
    )
