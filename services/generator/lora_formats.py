"""Read a LoRA file in any supported format and hand it over in the diffusers/PEFT form.

Supported: diffusers/PEFT and Kohya safetensors (diffusers converts Kohya itself).
Pickle-based files (.bin/.pt/.ckpt) are refused: loading them can run arbitrary code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class LoadedAdapter:
    """What `load_lora_weights` takes (a path or a state dict), plus learned token embeddings."""

    weights: Any
    embeddings: dict[str, Any] = field(default_factory=dict)
    format: str = "diffusers"


def read_adapter(path: str | Path, pipe: Any = None) -> LoadedAdapter:
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"adapter: {path.name} is a pickle file; only .safetensors adapters are accepted")
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"adapter: {path.name} is not a .safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} is missing")
    return LoadedAdapter(weights=str(path))
