"""PNG text metadata: an A1111-compatible `parameters` chunk plus an exact JSON copy.

A1111's format is for humans and other tools; the `productinaction` JSON chunk is what
`client.cli rerun` reads to reproduce an image exactly.
"""

from __future__ import annotations

import io
import json
from typing import Any

from PIL import Image, PngImagePlugin

JSON_KEY = "productinaction"


def _a1111_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:"\n') else text


def a1111_parameters(params: dict[str, Any]) -> str:
    """Format like AUTOMATIC1111: prompt, `Negative prompt:` line, then `Key: value` pairs."""
    lines = [params.get("prompt", "")]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    pairs = {
        "Steps": params.get("steps"),
        "Sampler": params.get("scheduler") or "default",
        "CFG scale": params.get("guidance_scale"),
        "Seed": params.get("seed"),
        "Size": f"{params.get('width')}x{params.get('height')}",
        "Model": params.get("model"),
        "Product": params.get("product_id"),
        "Product scale": params.get("product_scale"),
        "Template": params.get("template_id") or None,
        "Adapters": ";".join(f"{a['adapter_id']}:{a['weight']:g}" for a in params.get("adapters", [])) or None,
    }
    lines.append(", ".join(f"{k}: {_a1111_value(v)}" for k, v in pairs.items() if v not in (None, "")))
    return "\n".join(lines)


def encode_png(
    image: Image.Image,
    params: dict[str, Any] | None = None,
    extra: dict[str, str] | None = None,
    compress_level: int = 4,
) -> bytes:
    info = PngImagePlugin.PngInfo()
    if params is not None:
        info.add_text("parameters", a1111_parameters(params))
        info.add_text(JSON_KEY, json.dumps(params, sort_keys=True))
    for key, value in (extra or {}).items():
        info.add_text(key, value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info, compress_level=compress_level)
    return buf.getvalue()


def read_text_chunks(png: bytes) -> dict[str, str]:
    """The PNG's text chunks ({} for an image of another format)."""
    with Image.open(io.BytesIO(png)) as im:
        text = im.text if isinstance(im, PngImagePlugin.PngImageFile) else {}
        return {k: v for k, v in text.items() if isinstance(v, str)}


def read_parameters(png: bytes) -> dict[str, Any]:
    """The exact generation parameters embedded by `encode_png`."""
    chunks = read_text_chunks(png)
    if JSON_KEY not in chunks:
        raise ValueError("image carries no productinaction parameters")
    return json.loads(chunks[JSON_KEY])
