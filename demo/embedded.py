"""Build the embedded default for `make run` when no trained demo model ships:
a tiny random SD pipeline, two products and one style adapter made for it, and a tiny Swin2SR.

    python -m demo.embedded --out .cache/embedded
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from demo.tiny import build_tiny_pipeline, write_random_lora

PRODUCTS = [
    ("tiny-star", "product", "Tiny Star", "tiny", "<tiny-star>", 11),
    ("tiny-mug", "product", "Tiny Mug", "tiny", "<tiny-mug>", 12),
    ("tiny-sunset", "style", "Sunset light", "", "sunset style", 13),
]


def write_manifest(folder: Path, **fields) -> None:
    (folder / "manifest.yaml").write_text(yaml.safe_dump(fields, sort_keys=False))


def write_adapters(pipe, out: Path, entries, rank: int = 4, strength: float = 3.0) -> None:
    """Random LoRAs for `pipe` as product folders (out/products) and style folders (out/adapters)."""
    for ident, kind, name, category, token, seed in entries:
        folder = out / ("products" if kind == "product" else "adapters") / ident
        weights = write_random_lora(pipe, folder, seed=seed, rank=rank, strength=strength)
        fields = dict(display_name=name, kind=kind, adapter=weights.name, default_scale=1.0)
        if kind == "product":
            fields.update(category=category, tokens=[token], prompt_phrase=token)
        else:
            fields.update(tokens=[token])
        write_manifest(folder, **fields)


def build(out: Path) -> None:
    pipe = build_tiny_pipeline(out / "tiny-sd")
    write_adapters(pipe, out, PRODUCTS)
    from demo.tiny_sr import build_tiny_swin2sr

    build_tiny_swin2sr(out / "tiny-sr")
    (out / ".ready").touch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(".cache/embedded"))
    build(parser.parse_args().out)


if __name__ == "__main__":
    main()
