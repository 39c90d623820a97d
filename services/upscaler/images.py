"""Untrusted image bytes in, checked pixels out (`services.common.images`); PNG bytes out with provenance."""

from __future__ import annotations

from PIL import Image

from services.common.images import FORMATS, Header, decode, probe
from services.common.pngmeta import encode_png

__all__ = ["FORMATS", "Header", "decode", "probe", "restore_alpha", "to_png"]


def to_png(image: Image.Image, text: dict[str, str] | None = None) -> bytes:
    return encode_png(image, extra={k: v for k, v in (text or {}).items() if v})


def restore_alpha(upscaled: Image.Image, source: Image.Image) -> Image.Image:
    """Put the source's alpha, upscaled with bicubic, on an upscaled RGB image (models are RGB-only)."""
    if source.mode != "RGBA":
        return upscaled
    result = upscaled.convert("RGB")
    result.putalpha(source.getchannel("A").resize(result.size, Image.Resampling.BICUBIC))
    return result
