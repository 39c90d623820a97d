"""Placement mode: the customer's own product pixels, kept exactly, with the scene generated around them.

Pure numpy/PIL/scipy (no torch): the server validates and places the product before a request is
accepted, workers composite after inpainting, and tests run it directly.

1. `load_product`: header checked before decoding (`services.common.images.probe`), then the mask from
   the alpha channel of an RGBA cutout, from a separate mask image, or found on a plain light background
   by `find_mask`.
2. `place`: crop to the mask's box, scale to the placement's height (no resampling when the size is
   already right) and put it at the placement's centre; a product leaving the frame is refused.
3. `composite`: after generation, a contact shadow darkens the scene under the product (`shadow_map`), then
   the placed pixels go back inside the mask. Pixels of the mask eroded by `feather` (3x3 erosions) are the
   placed pixels exactly; the edge is blended by the product's coverage there, with its colour
   *decontaminated* (`decontaminate`: the photo's background taken out of the edge pixels), so a product shot
   on white leaves no light ring on a dark scene. Without a known background the edge blends by a ramp.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image
from scipy import ndimage

from services.common.errors import InvalidArgument
from services.common.images import decode, probe
from services.generator.messages import AdapterSpec, PlacedProduct, Shadow

# Mask finding on a plain light background (catalogue shots).
DEFAULT_TOLERANCE = 24  # max |channel - background colour| still counted as background, in 0..255
MIN_BACKGROUND_LUMA = 170  # the border colour must be at least this light
MIN_PLAIN_BORDER = 0.5  # share of border pixels that must match the background colour
SECOND_OBJECT_SHARE = 0.2  # a second component this large (vs the largest) means "several products"
MIN_HOLE = 4  # pixels; smaller background-coloured specks inside the product stay product
HOLE_WALL = 0.1  # enclosed background behind a wall this thin (share of the product's size) is see-through
MIN_PRODUCT_SHARE = 0.002  # masks below this share of the image are "no product"
MAX_PRODUCT_SHARE = 0.98  # masks above it are "the whole frame"

# Default placement when neither the request nor the template gives one: centred, 60% of the height.
DEFAULT_CENTER = (0.5, 0.5)
DEFAULT_HEIGHT = 0.6
FIT_MARGIN = 0.95  # a default placement shrinks so the product spans at most this much of the width

# Edge decontamination: a background is "plain" around a mask when this share of the band outside it is within
# the tolerance of the band's median colour.
PLAIN_BAND = 0.8
MIN_CONTRAST = 30  # product and background closer than this (max over channels) cannot be told apart at the edge

# Contact shadow (docs/FIDELITY.md, "Composite"): an ellipse under the product's footprint, blurred.
SHADOW_DEPTH = 0.08  # the ellipse's half-height, as a fraction of the product's height
SHADOW_SPREAD = 1.15  # its width against the footprint's
FOOTPRINT_ROWS = 0.15  # the product's bottom rows that make its footprint
SHADOW_BLUR = 0.25  # softness 1: blur sigma of this fraction of the product's height
SHADOW_CORE = 0.9  # the shadow's core (`shadow_band`) is where its shape reaches this share of its peak


@dataclass(frozen=True)
class ProductBox:
    """Where the product goes: its box's centre as fractions of the frame, its height as a fraction."""

    center_x: float
    center_y: float
    height: float


@dataclass(frozen=True)
class Cutout:
    """The product: RGB pixels and a boolean mask, cropped to the mask's bounding box.

    Outside the mask `rgb` holds the nearest product colour (so resampling pulls no background into the
    edge); on the mask's edge it is decontaminated when the photo's background is known (`edge`)."""

    rgb: np.ndarray  # (h, w, 3) uint8
    mask: np.ndarray  # (h, w) bool
    origin: tuple[int, int]  # the box's top-left corner in the uploaded image
    image_size: tuple[int, int]  # the uploaded image's (width, height)
    source: str  # "alpha", "mask" or "found"
    coverage: np.ndarray | None = None  # (h, w) float32 in [0, 1]: the product's share of each pixel; None: unknown
    edge: str = "feather"  # "decontaminated" (background known), "alpha" (the cutout's own) or "feather" (a ramp)


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
        background = plain_background(rgb, found, tolerance or DEFAULT_TOLERANCE)
    elif picture.mode == "RGBA" and np.asarray(picture.getchannel("A")).min() < 255:
        alpha_channel = np.asarray(picture.getchannel("A"))
        found, source = alpha_channel >= 128, "alpha"
        _check_share(found, image_field, "the alpha channel")
        background = None
    else:
        found, source = find_mask(rgb, tolerance or DEFAULT_TOLERANCE, image_field), "found"
        background = border_colour(rgb)
    ys, xs = np.nonzero(found)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    crop, mask_crop = rgb[y0:y1, x0:x1], found[y0:y1, x0:x1]
    coverage, edge = None, "feather"
    soft_alpha = source == "alpha" and ((alpha_channel > 0) & (alpha_channel < 255)).any()
    if soft_alpha:  # a matte with soft edges: its own coverage (a hard one gets the feather ramp)
        coverage, edge = alpha_channel[y0:y1, x0:x1].astype(np.float32) / 255, "alpha"
    elif background is not None:
        crop, coverage = decontaminate(crop, mask_crop, background)
        edge = "decontaminated"
    return Cutout(
        rgb=np.ascontiguousarray(extend_colours(crop, mask_crop)),
        mask=np.ascontiguousarray(mask_crop),
        origin=(x0, y0),
        image_size=picture.size,
        source=source,
        coverage=coverage,
        edge=edge,
    )


def border_colour(rgb: np.ndarray) -> np.ndarray:
    """The median colour of the image's border pixels (the background of a catalogue shot)."""
    a = rgb.astype(np.int16)
    return np.median(np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]]), axis=0)


def plain_background(rgb: np.ndarray, mask: np.ndarray, tolerance: int) -> np.ndarray | None:
    """The background colour right outside `mask` when it is plain there (a 2-px band), else None."""
    band = ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=2) & ~mask
    if not band.any():
        return None
    pixels = rgb[band].astype(np.int16)
    median = np.median(pixels, axis=0)
    plain = (np.abs(pixels - median).max(axis=-1) <= tolerance).mean()
    return median if plain >= PLAIN_BAND else None


def decontaminate(rgb: np.ndarray, mask: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Take a known background colour out of the mask's edge pixels: (clean rgb, coverage in [0, 1]).

    An edge pixel is `a * F + (1 - a) * B`, with B the background and F the product's colour there, taken
    from the nearest pixel inside the edge. The coverage `a` is the pixel's projection on the line from B to
    F; the clean colour is `B + (pixel - B) / a`. Blended back with coverage `a` over a new scene, the
    photo's background no longer shows as a light (or dark) ring. Pixels further in than the edge, and
    edge pixels whose product colour is too close to the background to tell, are left as they are."""
    # The crop's own border is the product's edge too (unlike the frame's: a product may touch the frame).
    interior = ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), border_value=0)
    edge = mask & ~interior
    coverage = mask.astype(np.float32)
    out = rgb.copy()
    if not edge.any() or not interior.any():
        return out, coverage
    iy, ix = ndimage.distance_transform_edt(~interior, return_distances=False, return_indices=True)
    pixel = rgb.astype(np.float32)[edge]
    near = rgb.astype(np.float32)[iy[edge], ix[edge]]
    b = np.asarray(background, np.float32)
    span = near - b
    norm = (span**2).sum(-1)
    a = np.clip(((pixel - b) * span).sum(-1) / np.maximum(norm, 1e-6), 0.0, 1.0)
    separable = np.abs(span).max(-1) >= MIN_CONTRAST
    a = np.where(separable, a, 1.0)
    clean = np.where(
        (a >= 0.1)[:, None], b + (pixel - b) / np.maximum(a, 0.1)[:, None], near
    )  # hardly covered: the nearest product colour
    clean = np.where(separable[:, None], clean, pixel)
    out[edge] = np.clip(np.round(clean), 0, 255).astype(np.uint8)
    coverage[edge] = a
    return out, coverage


def extend_colours(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Every pixel outside `mask` takes the nearest mask pixel's colour, so that resampling the cutout does not
    blend the photo's background back into its edge."""
    if mask.all() or not mask.any():
        return rgb
    iy, ix = ndimage.distance_transform_edt(~mask, return_distances=False, return_indices=True)
    return rgb[iy, ix]


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
    largest = parts == order[0] + 1
    kept = ndimage.binary_fill_holes(largest)
    # The closing smooths the edge; it must not take in pixels of the background's own colour (a star's notches).
    kept |= ndimage.binary_closing(kept, structure=np.ones((3, 3), bool), border_value=0) & ~close
    kept &= ~see_through_holes(kept, close)
    share = float(kept.mean())
    if share < MIN_PRODUCT_SHARE:
        raise InvalidArgument(field, f"found no product: the largest object covers only {share:.2%} of the image")
    if share > MAX_PRODUCT_SHARE:
        raise InvalidArgument(field, f"the product seems to fill the whole image ({share:.0%}): give a mask")
    return kept


def see_through_holes(kept: np.ndarray, background_like: np.ndarray) -> np.ndarray:
    """Background enclosed by a *thin* part of the product (inside a mug's handle): it is the background seen
    through the product, so it is left out of the mask and the new scene shows there. An enclosed region
    of the background's colour inside a thick part (a white label on the product) stays product: a region
    counts only if a wall of at most `HOLE_WALL` of the product's size separates it from the outside."""
    holes, count = ndimage.label(kept & background_like)
    if count == 0:
        return np.zeros(kept.shape, bool)
    ys, xs = np.nonzero(kept)
    wall = max(2, round(HOLE_WALL * min(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)))
    sizes = np.bincount(holes.ravel())
    out = np.zeros(kept.shape, bool)
    for k in np.nonzero(sizes[1:] >= MIN_HOLE)[0] + 1:
        hole = holes == k
        reach = ndimage.binary_dilation(hole, structure=np.ones((3, 3), bool), iterations=wall)
        if (reach & ~kept).any():
            out |= hole
    return out


def mask_png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


# 2. Placement


def check_placement(center_x: float, center_y: float, height: float, field: str = "placement") -> ProductBox | None:
    """A request's placement, validated; None when every value is 0 (the template's default)."""
    values = {"center_x": center_x, "center_y": center_y, "height": height}
    for name, value in values.items():
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise InvalidArgument(f"{field}.{name}", f"must be a fraction of the frame in [0, 1], got {value}")
    if not any(values.values()):
        return None
    if height <= 0:
        raise InvalidArgument(f"{field}.height", "must be > 0 when a placement is given (0 for all: the default)")
    return ProductBox(center_x or DEFAULT_CENTER[0], center_y or DEFAULT_CENTER[1], height)


def resolve_placement(
    cutout: Cutout,
    width: int,
    height: int,
    requested: ProductBox | None,
    default: ProductBox | None,
    ground: float | None = None,
) -> ProductBox | None:
    """The placement to use. None keeps the product where it is in an image of exactly the frame's
    size (no resampling); a default placement shrinks to fit the frame's width and, where the template
    has a surface (`ground`, a fraction of the frame's height), stands the product on it."""
    if requested is not None:
        return requested
    box_h, box_w = cutout.mask.shape
    if cutout.image_size == (width, height):
        if ground is None:
            return None
        # A photo of the frame's size is moved, never resampled: onto the surface, at its own size.
        size = box_h / height
        return ProductBox((cutout.origin[0] + box_w / 2) / width, max(size / 2, ground - size / 2), size)
    chosen = default or ProductBox(*DEFAULT_CENTER, DEFAULT_HEIGHT)
    fit = FIT_MARGIN * width * box_h / (box_w * height)  # the height at which the width spans FIT_MARGIN
    size = min(chosen.height, fit)
    center_y = chosen.center_y if ground is None else max(size / 2, ground - size / 2)
    return ProductBox(chosen.center_x, center_y, size)


def place(
    cutout: Cutout,
    width: int,
    height: int,
    placement: ProductBox | None,
    *,
    feather: int | None = None,
    digest_hex: str = "",
    field: str = "placement",
    shadow: Shadow | None = None,
    scene_first: float = 0.0,
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
    coverage = cutout.coverage
    if (target_w, target_h) != (box_w, box_h):
        rgb = np.asarray(Image.fromarray(rgb).resize((target_w, target_h), Image.Resampling.LANCZOS))
        soft = Image.fromarray(mask.astype(np.uint8) * 255).resize((target_w, target_h), Image.Resampling.BILINEAR)
        mask = np.asarray(soft) >= 128
        if coverage is not None:
            resized = Image.fromarray(coverage.astype(np.float32), "F").resize(
                (target_w, target_h), Image.Resampling.BILINEAR
            )
            coverage = np.clip(np.asarray(resized), 0.0, 1.0)
    if not mask.any():
        raise InvalidArgument(f"{field}.height", f"the product is too small to place at {target_w}x{target_h} px")
    frame = np.zeros((height, width, 3), np.uint8)
    frame_mask = np.zeros((height, width), bool)
    frame_coverage = np.zeros((height, width), np.float32)
    window = (slice(y0, y0 + target_h), slice(x0, x0 + target_w))
    frame[window][mask] = rgb[mask]
    frame_mask[window] = mask
    if coverage is not None:
        frame_coverage[window] = np.where(mask, coverage, 0.0)
    feather = default_feather(width, height) if feather is None else feather
    weights = edge_weights(frame_mask, feather, frame_coverage if coverage is not None else None)
    box = (x0, y0, x0 + target_w, y0 + target_h)
    shadow = shadow if shadow is not None and shadow.strength > 0 else None
    return PlacedProduct(
        width=width,
        height=height,
        box=box,
        feather=feather,
        digest=digest_hex,
        rgb=frame.tobytes(),
        mask=frame_mask.astype(np.uint8).tobytes(),
        alpha=weights.tobytes(),
        shadow=shadow,
        shadow_map=shadow_map(frame_mask, box, shadow).tobytes() if shadow else b"",
        scene_first=scene_first,
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
    mask's edge, 0 outside (the ramp, for edges whose coverage is unknown)."""
    out = np.zeros(mask.shape, np.uint16)
    current = mask
    for k in range(1, feather + 1):
        inner = erode(current, 1)
        out[current & ~inner] = round(255 * k / (feather + 1))
        current = inner
    out[current] = 255
    return out.astype(np.uint8)


def edge_weights(mask: np.ndarray, feather: int, coverage: np.ndarray | None) -> np.ndarray:
    """uint8 weight of the product in the composite: 255 on the inner mask (kept exactly); on the edge, the
    product's coverage when known (so the edge blends as it was photographed), else the feather ramp."""
    if coverage is None:
        return alpha(mask, feather)
    out = np.where(mask, np.round(np.clip(coverage, 0.0, 1.0) * 255), 0).astype(np.uint8)
    out[inner_mask(mask, feather)] = 255
    return out


def weights(placed: PlacedProduct) -> np.ndarray:
    """The placed product's composite weights (uint8, the frame's size)."""
    if placed.alpha:
        return np.frombuffer(placed.alpha, np.uint8).reshape(placed.height, placed.width)
    return alpha(arrays(placed)[1], placed.feather)


# Contact shadow and ground


def shadow_map(mask: np.ndarray, box: tuple[int, int, int, int], shadow: Shadow) -> np.ndarray:
    """uint8 (the frame's size): a soft contact shadow under the product, 255 at its core.

    An ellipse as wide as the product's footprint (its bottom rows) x `SHADOW_SPREAD`, `SHADOW_DEPTH` of its
    height deep, centred on its bottom edge and moved by the offsets; blurred by `softness` and scaled so
    its peak is 255. Where the product covers it, the product's pixels are drawn over it."""
    x0, y0, x1, y1 = box
    product_h = max(1, y1 - y0)
    rows = mask[max(y0, y1 - max(1, round(FOOTPRINT_ROWS * product_h))) : y1]
    cols = np.nonzero(rows.any(0))[0] if rows.any() else np.arange(x0, x1)
    half_w = max(1.0, SHADOW_SPREAD * (cols.max() + 1 - cols.min()) / 2)
    half_h = max(1.0, SHADOW_DEPTH * product_h)
    cx = (cols.min() + cols.max() + 1) / 2 + shadow.offset_x * product_h
    cy = y1 + shadow.offset_y * product_h
    ys, xs = np.indices(mask.shape, dtype=np.float32)
    ellipse = (((xs + 0.5 - cx) / half_w) ** 2 + ((ys + 0.5 - cy) / half_h) ** 2 <= 1).astype(np.float32)
    sigma = shadow.softness * SHADOW_BLUR * product_h
    soft = ndimage.gaussian_filter(ellipse, sigma) if sigma >= 0.3 else ellipse
    peak = float(soft.max())
    return np.round(255 * soft / peak).astype(np.uint8) if peak > 0 else np.zeros(mask.shape, np.uint8)


def shadow_band(placed: PlacedProduct) -> np.ndarray:
    """The shadow's core outside the product (bool): where a test measures how much darker the scene got."""
    if not placed.shadow_map:
        return np.zeros((placed.height, placed.width), bool)
    shape = np.frombuffer(placed.shadow_map, np.uint8).reshape(placed.height, placed.width)
    return (shape >= round(SHADOW_CORE * 255)) & ~arrays(placed)[1]


def check_shadow(strength: float, softness: float, offset_x: float, offset_y: float, field: str) -> Shadow:
    """A request's shadow settings, validated (INVALID_ARGUMENT naming the field)."""
    for name, value, low in (("strength", strength, 0.0), ("softness", softness, 0.0)):
        if not math.isfinite(value) or not low <= value <= 1.0:
            raise InvalidArgument(f"{field}.{name}", f"must be in [0, 1] (0: no shadow), got {value}")
    for name, value in (("offset_x", offset_x), ("offset_y", offset_y)):
        if not math.isfinite(value) or not -1.0 <= value <= 1.0:
            raise InvalidArgument(
                f"{field}.{name}", f"must be in [-1, 1] (a fraction of the product's height), got {value}"
            )
    return Shadow(float(strength), float(softness), float(offset_x), float(offset_y))


def init_image(placed: PlacedProduct) -> Image.Image:
    """The inpainting input: the product on mid grey (the grey is repainted)."""
    rgb, mask = arrays(placed)
    frame = np.full_like(rgb, 128)
    frame[mask] = rgb[mask]
    return Image.fromarray(frame)


def scene_adapters(adapters: tuple[AdapterSpec, ...]) -> tuple[AdapterSpec, ...]:
    """A placement job's adapters: the product adapter at weight 0, the stacked ones as requested.

    The product is already in the picture (its exact pixels are kept and composited back), so nothing in
    the denoising asks for it: the prompt is the scene prompt (`RenderSettings.scene_prompt`, the scene and
    the user's words without the product's) and the product adapter is off. Measured (docs/FIDELITY.md,
    "Composite"): with the product's prompt and adapter inside its mask and the scene's outside (two UNet
    passes a step, blended by the mask at the latent's size), the edge latents, part product and part scene,
    still grew product colours past its edge; the scene alone is ghost-free in more cells, in one pass."""
    if not adapters or adapters[0].kind != "product":
        return adapters
    return (replace(adapters[0], weight=0.0), *adapters[1:])


def join_step(steps: int, scene_first: float) -> int:
    """The denoising step from which latent-blend inpainting holds the product's region: 0 holds it from the first
    step, `steps` never (the scene is drawn whole and the product composited over it). Before it the scene is
    drawn without the product, so the product cannot pull the scene's colours its way (docs/FIDELITY.md)."""
    return min(steps, round(scene_first * steps))


def repaint_mask(placed: PlacedProduct, everything: bool = False) -> Image.Image:
    """White where the scene is generated: everything but the inner mask, so the feathered edge is
    painted too and blends with the scene; `everything`: the whole frame (the product joins after)."""
    _, mask = arrays(placed)
    keep = np.zeros_like(mask) if everything else inner_mask(mask, placed.feather)
    return Image.fromarray(np.where(keep, 0, 255).astype(np.uint8))


def composite(generated: Image.Image, placed: PlacedProduct) -> Image.Image:
    """The product back over a generated image: its shadow first, then its pixels, exact inside, blended on
    the edge by the product's weights."""
    rgb, _ = arrays(placed)
    scene = np.asarray(generated.convert("RGB"))
    if scene.shape != rgb.shape:
        raise ValueError(f"placement: generated {scene.shape} but the product frame is {rgb.shape}")
    if placed.shadow is not None and placed.shadow_map:
        shape = np.frombuffer(placed.shadow_map, np.uint8).reshape(placed.height, placed.width)
        darken = 1.0 - placed.shadow.strength * shape.astype(np.float32)[..., None] / 255
        scene = np.clip(np.round(scene * darken), 0, 255).astype(np.uint8)
    a = weights(placed).astype(np.uint32)[..., None]
    blended = (rgb.astype(np.uint32) * a + scene.astype(np.uint32) * (255 - a) + 127) // 255
    return Image.fromarray(blended.astype(np.uint8))


def preview_pngs(placed: PlacedProduct) -> tuple[bytes, bytes]:
    """(the mask in the frame, the placed product over a checkerboard), as PNG bytes."""
    buf = io.BytesIO()
    preview(placed).save(buf, format="PNG")
    return mask_png(arrays(placed)[1]), buf.getvalue()


def preview(placed: PlacedProduct) -> Image.Image:
    """The placed product (and its shadow) over a checkerboard, as a client shows it before generating."""
    ys, xs = np.indices((placed.height, placed.width))
    tile = max(4, min(placed.width, placed.height) // 16)
    checker = np.where(((ys // tile + xs // tile) % 2)[..., None] == 0, 235, 200).astype(np.uint8)
    frame = np.repeat(checker, 3, axis=-1)
    return composite(Image.fromarray(frame), placed)


# 4. Decode, find the mask, place: one upload (planning.py calls this off the event loop)


def place_upload(
    image: bytes,
    mask: bytes,
    requested: ProductBox | None,
    default: ProductBox | None,
    width: int,
    height: int,
    *,
    max_pixels: int,
    tolerance: int = 0,
    feather: int | None = None,
    field_prefix: str = "product_image",
    ground: float | None = None,
    shadow: Shadow | None = None,
    scene_first: float = 0.0,
) -> tuple[PlacedProduct, dict]:
    """Decode, find the mask, place: (the placed product, what the parameters record about it)."""
    cutout = load_product(image, mask, max_pixels=max_pixels, tolerance=tolerance, field_prefix=field_prefix)
    chosen = resolve_placement(cutout, width, height, requested, default, ground)
    placed = place(
        cutout,
        width,
        height,
        chosen,
        feather=feather,
        digest_hex=digest(image, mask),
        field=f"{field_prefix}.placement",
        shadow=shadow,
        scene_first=scene_first,
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
        "edge": cutout.edge,
        # The template's surface the default placement stood the product on (0: none, or a requested placement).
        "ground_line": ground if ground is not None and requested is None and chosen is not None else 0.0,
        "shadow": asdict(placed.shadow) if placed.shadow else {"strength": 0.0},
        "scene_first": scene_first,
    }
    return placed, record
