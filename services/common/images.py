"""Untrusted image bytes in, checked pixels out: what every service that takes user images shares.

`probe` reads only the header, so oversized images and decompression bombs are refused before
any pixel is decoded. PIL's own MAX_IMAGE_PIXELS guard stays on; `max_pixels` is never looser.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps

from services.common.errors import InvalidArgument

# Only what the pipeline produces or users upload; Image.open would otherwise try every plugin.
FORMATS = ("PNG", "JPEG")


@dataclass(frozen=True)
class Header:
    format: str
    width: int
    height: int
    mode: str


def probe(data: bytes, max_pixels: int, field: str) -> Header:
    """Format and size from the header alone; INVALID_ARGUMENT for anything we will not decode."""
    if not data:
        raise InvalidArgument(field, "the image is empty")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            header = Header(im.format or "?", im.width, im.height, im.mode)
    except Image.DecompressionBombError as exc:
        raise InvalidArgument(field, f"refused as a decompression bomb: {exc}") from None
    except Exception:
        raise InvalidArgument(field, "not a PNG or JPEG image (or its header is corrupt)") from None
    pixels = header.width * header.height
    if pixels < 1:
        raise InvalidArgument(field, f"the image is {header.width}x{header.height}")
    limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
    if pixels > limit:
        raise InvalidArgument(
            field, f"{header.width}x{header.height} is {pixels} pixels; this server takes at most {limit}"
        )
    return header


def decode(data: bytes, max_pixels: int, field: str) -> tuple[Image.Image, dict[str, str]]:
    """Fully decode (after `probe`): RGBA if the image has any transparency, else RGB; plus its
    PNG text chunks. JPEG EXIF orientation is applied, as viewers do."""
    probe(data, max_pixels, field)
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            im.load()
            text = {k: v for k, v in getattr(im, "text", {}).items() if isinstance(v, str)}
            upright = ImageOps.exif_transpose(im)
            has_alpha = upright.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in upright.info
            image = upright.convert("RGBA" if has_alpha else "RGB")
    except MemoryError:
        raise
    except Exception as exc:
        raise InvalidArgument(field, f"the image data is corrupt: {type(exc).__name__}: {exc}") from None
    return image, text
