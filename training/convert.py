"""Convert a LoRA file to the diffusers/PEFT form, offline.

    python -m training.convert old/lora.safetensors products/my-mug --base models/demo-sd
    python -m training.convert kohya.safetensors out/ --base runwayml/stable-diffusion-v1-5

OUT is a folder; it receives `pytorch_lora_weights.safetensors` and, when the input holds learned
tokens (cloneofsimo/lora), `embeddings.safetensors`. Accepted inputs are the formats the generator
loads (services/generator/lora_formats.py): diffusers/PEFT (copied as is), Kohya and cloneofsimo/lora.
--base is needed for cloneofsimo files (their layers are numbered in the model's module order) and
checks that the adapter fits; only the model's configs are read, its modules are built without weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from training import TrainingError

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
EMBEDDINGS_FILE = "embeddings.safetensors"


@dataclass
class Converted:
    format: str
    adapter: Path
    embeddings: Path | None = None
    tokens: list[str] = field(default_factory=list)
    layers: int = 0


def skeleton(base: str) -> SimpleNamespace:
    """The base model's UNet and text encoder built from their configs on the meta device (no weights read)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    local = Path(base).expanduser()
    where = str(local) if local.exists() else base
    try:
        unet_config = UNet2DConditionModel.load_config(where, subfolder="unet", local_files_only=local.exists())
        te_config = CLIPTextConfig.from_pretrained(where, subfolder="text_encoder", local_files_only=local.exists())
    except Exception as exc:
        raise TrainingError(f"--base: cannot read the configs of {base} ({type(exc).__name__}: {exc})") from exc
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        text_encoder = CLIPTextModel(te_config)
    return SimpleNamespace(unet=unet, text_encoder=text_encoder)


def split_components(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`unet.X` / `text_encoder.X` keys -> per-component dicts. Text-encoder keys get the `text_model.`
    prefix that older transformers use; diffusers strips it for models without it, not the other way."""
    parts: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        component, rest = key.split(".", 1)
        if component.startswith("text_encoder") and not rest.startswith("text_model."):
            rest = f"text_model.{rest}"
        parts.setdefault(component, {})[rest] = value.contiguous()
    return parts


def convert(src: str | Path, out: str | Path, base: str | None = None) -> Converted:
    """Write `src` to the folder `out` in diffusers/PEFT form; raises TrainingError on any problem."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from services.generator.lora_formats import read_adapter

    src, out = Path(src), Path(out)
    model = skeleton(base) if base else None
    try:
        adapter = read_adapter(src, model)
    except (ValueError, FileNotFoundError) as exc:
        raise TrainingError(str(exc)) from exc
    result = Converted(adapter.format, out / ADAPTER_FILE)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if isinstance(adapter.weights, str):
            # Already diffusers/PEFT (or a Kohya variant only diffusers understands): keep the bytes.
            shutil.copyfile(adapter.weights, tmp / ADAPTER_FILE)
        else:
            state = _kohya_to_peft(adapter.weights) if adapter.format == "kohya" else adapter.weights
            parts = split_components(state)
            extra = set(parts) - {"unet", "text_encoder"}
            if extra:
                raise TrainingError(f"{src.name}: components {sorted(extra)} are not supported by this converter")
            StableDiffusionPipeline.save_lora_weights(
                tmp,
                unet_lora_layers=parts.get("unet"),
                text_encoder_lora_layers=parts.get("text_encoder"),
                safe_serialization=True,
            )
            result.layers = sum(len(p) for p in parts.values()) // 2
        if adapter.embeddings:
            save_file({t: e.float().contiguous() for t, e in adapter.embeddings.items()}, tmp / EMBEDDINGS_FILE)
            result.embeddings = out / EMBEDDINGS_FILE
            result.tokens = list(adapter.embeddings)
        out.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _kohya_to_peft(folded: dict[str, Any]) -> dict[str, Any]:
    """diffusers' own Kohya key conversion, then PEFT naming (the alphas are already folded in)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    state, _ = StableDiffusionPipeline.lora_state_dict(dict(folded))
    unet = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    te = {k.removeprefix("text_encoder."): v for k, v in state.items() if k.startswith("text_encoder.")}
    out = {f"unet.{k}": v for k, v in convert_unet_state_dict_to_peft(unet).items()}
    if te:
        out |= {
            f"text_encoder.{k}": v for k, v in convert_state_dict_to_peft(convert_state_dict_to_diffusers(te)).items()
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", type=Path, help="LoRA file (.safetensors): diffusers/PEFT, Kohya or cloneofsimo/lora")
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--base", help="base model folder or hub id (required for cloneofsimo/lora files)")
    args = parser.parse_args(argv)
    try:
        result = convert(args.src, args.out, args.base)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    manifest: dict[str, Any] = {"adapter": ADAPTER_FILE}
    if result.embeddings:
        manifest |= {"tokens": result.tokens, "embeddings": EMBEDDINGS_FILE}
    print(f"{args.src} ({result.format}) -> {args.out}; manifest fields: {json.dumps(manifest)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
