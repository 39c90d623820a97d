"""Read a LoRA file in any supported format and hand it over in the diffusers/PEFT form.

Supported, all as .safetensors:
- diffusers/PEFT (`pytorch_lora_weights.safetensors`): the path goes through unchanged;
- Kohya (`lora_unet_*` / `lora_te_*` with `.alpha`): each module's alpha/rank is folded into its up
  weight, then diffusers converts the names itself (it mis-scales attention modules whose rank is not
  the file's most common one when alphas are kept, see docs/TRAINING.md);
- cloneofsimo/lora (`unet:{i}:up`, `text_encoder:{i}:down`, token embeddings): numbered modules are
  matched to the base model's own module tree and returned as a PEFT state dict with scale 1.

Pickle-based files (.bin/.pt/.ckpt) are refused: loading them can run arbitrary code.
When a pipeline (or anything with `unet` / `text_encoder` modules) is given, the adapter is checked
against it first, so a LoRA made for another base model fails with a clear message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
from safetensors import safe_open
from safetensors.torch import load_file

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
EMBED_FLAG = "<embed>"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# cloneofsimo/lora's defaults, used when a file's metadata does not name its targets.
CLONEOFSIMO_TARGETS = {
    "unet": {"CrossAttention", "Attention", "GEGLU"},
    "text_encoder": {"CLIPAttention"},
}
# Classes renamed since those files were written (diffusers <= 0.14 called Attention CrossAttention).
CLASS_ALIASES = {"CrossAttention": "Attention"}
CLONEOFSIMO_KEY = re.compile(r"^(unet|text_encoder):(\d+):(up|down)$")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
LORA_ADAPTER_METADATA = "lora_adapter_metadata"


@dataclass
class LoadedAdapter:
    """What `load_lora_weights` takes (a path or a state dict), plus learned token embeddings."""

    weights: Any
    embeddings: dict[str, Any] = field(default_factory=dict)
    format: str = "diffusers"


def read_adapter(path: str | Path, pipe: Any = None) -> LoadedAdapter:
    """Read `path` (any supported format) for `pipe`; raise ValueError with a clear message if it cannot be used."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"adapter: {path.name} is a pickle file; only .safetensors adapters are accepted")
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"adapter: {path.name} is not a .safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} is missing")
    keys, metadata = _header(path)
    fmt = detect_format(keys, metadata)
    if fmt == "cloneofsimo":
        if pipe is None:
            raise ValueError(f"adapter: {path.name} is a cloneofsimo/lora file; converting it needs the base model")
        state, embeddings = convert_cloneofsimo(_load(path), metadata, pipe, source=path.name)
        return LoadedAdapter(weights=state, embeddings=embeddings, format=fmt)
    if fmt == "kohya":
        tensors = _load(path)
        if not all(k.endswith(KOHYA_SUFFIXES) for k in tensors):
            # LoCon/LyCORIS extras: leave the whole file to diffusers, which knows what it supports.
            return LoadedAdapter(weights=str(path), format=fmt)
        folded = fold_kohya_alphas(tensors)
        if pipe is not None:
            check_fit(pipe, peft_layout(pipe, folded), path.name)
        return LoadedAdapter(weights=folded, format=fmt)
    if pipe is None:
        return LoadedAdapter(weights=str(path), format=fmt)
    tensors = _load(path)
    check_fit(pipe, peft_layout(pipe, tensors), path.name)
    if _mixed_unet_naming(keys) and LORA_ADAPTER_METADATA not in metadata:
        # diffusers converts a file's UNet keys only if the first one is not PEFT-named, and silently drops
        # the rest; files saved with convert_state_dict_to_diffusers and non-attention targets mix both.
        return LoadedAdapter(weights=_peft_unet_keys(tensors), format=fmt)
    return LoadedAdapter(weights=str(path), format=fmt)


def detect_format(keys: list[str], metadata: dict[str, str]) -> str:
    """ "cloneofsimo", "kohya" or "diffusers", from a safetensors file's keys and metadata."""
    if any(CLONEOFSIMO_KEY.match(k) for k in keys) or EMBED_FLAG in metadata.values():
        return "cloneofsimo"
    if keys and all(k.startswith(KOHYA_PREFIXES) for k in keys):
        return "kohya"
    return "diffusers"


def _header(path: Path) -> tuple[list[str], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), dict(f.metadata() or {})
    except Exception as exc:  # SafetensorError, or a pickle renamed to .safetensors
        raise ValueError(f"adapter: {path.name} is not a valid safetensors file ({exc})") from exc


def _load(path: Path) -> dict[str, Any]:
    return load_file(str(path))


def _mixed_unet_naming(keys: list[str]) -> bool:
    unet = [k for k in keys if k.startswith("unet.")]
    return any(".lora_A." in k or ".lora_B." in k for k in unet) and any(".lora." in k for k in unet)


def _peft_unet_keys(tensors: dict[str, Any]) -> dict[str, Any]:
    unet = {k.removeprefix("unet."): v for k, v in tensors.items() if k.startswith("unet.")}
    rest = {k: v for k, v in tensors.items() if not k.startswith("unet.")}
    return {**{f"unet.{k}": v for k, v in convert_unet_state_dict_to_peft(unet).items()}, **rest}


# Kohya


def fold_kohya_alphas(tensors: dict[str, Any]) -> dict[str, Any]:
    """Kohya state dict with each module's alpha/rank multiplied into its up weight and the alphas dropped.

    Without alphas diffusers uses scale 1 for every module, whatever its rank, so the deltas are exact.
    """
    out: dict[str, Any] = {}
    for key, value in tensors.items():
        if key.endswith(".alpha"):
            continue
        if key.endswith(".lora_up.weight"):
            name = key.removesuffix(".lora_up.weight")
            alpha = tensors.get(f"{name}.alpha")
            if alpha is not None:
                rank = tensors[f"{name}.lora_down.weight"].shape[0]
                value = value.float() * (float(alpha) / rank)
        out[key] = value
    return out


# cloneofsimo/lora


def convert_cloneofsimo(
    tensors: dict[str, Any], metadata: dict[str, str], pipe: Any, source: str = "adapter"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """cloneofsimo/lora tensors -> (PEFT state dict with `unet.`/`text_encoder.` prefixes, {token: embedding}).

    lora_A = down and lora_B = up; diffusers infers each module's rank from the shapes and, with no
    alphas given, uses alpha = rank, so every delta is exactly up @ down (the trainer's scale is in up).
    """
    state: dict[str, Any] = {}
    for group in ("unet", "text_encoder"):
        count = sum(1 for k in tensors if CLONEOFSIMO_KEY.match(k) and k.startswith(f"{group}:") and k.endswith("up"))
        if not count:
            continue
        model = getattr(pipe, group, None)
        if model is None:
            raise ValueError(f"adapter: {source} has {group} LoRA layers but the base model has no {group}")
        pairs = [(tensors[f"{group}:{i}:up"], tensors[f"{group}:{i}:down"]) for i in range(count)]
        names = _match_cloneofsimo(model, group, pairs, metadata, source)
        for name, (up, down) in zip(names, pairs, strict=True):
            state[f"{group}.{name}.lora_A.weight"] = down
            state[f"{group}.{name}.lora_B.weight"] = up
    tokens = [k for k in tensors if metadata.get(k) == EMBED_FLAG or not CLONEOFSIMO_KEY.match(k)]
    embeddings = {t: tensors[t].reshape(-1) for t in tokens}
    encoder = getattr(pipe, "text_encoder", None)
    if embeddings and encoder is not None:
        width = encoder.get_input_embeddings().weight.shape[1]
        bad = {t: e.numel() for t, e in embeddings.items() if e.numel() != width}
        if bad:
            raise ValueError(f"adapter: {source} does not fit the base model: token embeddings {bad}, expected {width}")
    return state, embeddings


def cloneofsimo_targets(group: str, metadata: dict[str, str]) -> set[str]:
    raw = metadata.get(group)
    targets = set(json.loads(raw)) if raw else set(CLONEOFSIMO_TARGETS[group])
    return {CLASS_ALIASES.get(t, t) for t in targets}


def cloneofsimo_module_names(model: Any, targets: set[str], extended: bool, old_order: bool = False) -> list[str]:
    """The modules cloneofsimo/lora numbers 0, 1, 2, ... in `model`.

    Depth first over the module tree; every module whose class is a target is an ancestor, and the
    Linear (and, in the extended variant, Conv2d) layers inside it are taken in registration order.
    `old_order`: the tree as diffusers <= 0.14 registered it, with `ff` between `attn1` and `attn2`.
    """
    search = (nn.Linear, nn.Conv2d) if extended else (nn.Linear,)
    names = []
    for prefix, module in _walk(model, "", old_order):
        if _is_target(module, targets):
            for sub, child in module.named_modules():
                if sub and isinstance(_base(child), search) and not _inside_lora(sub):
                    names.append(f"{prefix}.{sub}" if prefix else sub)
    return names


def _match_cloneofsimo(model: Any, group: str, pairs: list, metadata: dict[str, str], source: str) -> list[str]:
    targets = cloneofsimo_targets(group, metadata)
    extended = "ResnetBlock2D" in targets
    modules = dict(model.named_modules())
    tried = []
    # Files from diffusers <= 0.14 number ff.net.0.proj before attn2; shapes tell the two orders apart
    # (GEGLU's projection has 8x the block width in rows).
    for old_order in (False, True):
        names = cloneofsimo_module_names(model, targets, extended, old_order)
        if len(names) != len(pairs):
            raise ValueError(
                f"adapter: {source} does not fit the base model: it has {len(pairs)} {group} LoRA layers, "
                f"the model has {len(names)} layers in {sorted(targets)}"
            )
        problems = [_mismatch(modules[n], up, down) for n, (up, down) in zip(names, pairs, strict=True)]
        bad = [(n, p) for n, p in zip(names, problems, strict=True) if p]
        if not bad:
            return names
        tried.append(bad)
    first = min(tried, key=len)
    raise ValueError(
        f"adapter: {source} does not fit the base model: {len(first)} of {len(pairs)} {group} layers differ, "
        f"e.g. {group}.{first[0][0]}: {first[0][1]}"
    )


def _walk(module: Any, prefix: str, old_order: bool) -> Iterator[tuple[str, Any]]:
    yield prefix, module
    children = list(module.named_children())
    names = [n for n, _ in children]
    if old_order and {"attn1", "attn2", "ff"} <= set(names):
        ff = children.pop(names.index("ff"))
        children.insert([n for n, _ in children].index("attn1") + 1, ff)
    for name, child in children:
        yield from _walk(child, f"{prefix}.{name}" if prefix else name, old_order)


def _is_target(module: Any, targets: set[str]) -> bool:
    # By class name through the MRO, so subclasses (e.g. CLIPSdpaAttention) count as their base.
    return any(CLASS_ALIASES.get(c.__name__, c.__name__) in targets for c in type(module).__mro__)


def _base(module: Any) -> Any:
    return getattr(module, "base_layer", module)


def _inside_lora(sub: str) -> bool:
    # Layers PEFT added to a model that already holds adapters are not part of the numbering.
    return any(
        part in ("lora_A", "lora_B", "base_layer", "lora_embedding_A", "lora_embedding_B") for part in sub.split(".")
    )


# Fit checks


def peft_layout(pipe: Any, weights: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """`{component}.{module}.lora_A/B.weight` -> shape, after the same key conversions diffusers applies."""
    loader = getattr(pipe, "lora_state_dict", None)
    if loader is None:
        loader = StableDiffusionPipeline.lora_state_dict
    state = loader(dict(weights))[0]
    if not any(k.startswith(f"{c}.") for c in COMPONENTS for k in state):
        state = {f"unet.{k}": v for k, v in state.items()}  # legacy files without prefixes are UNet-only
    layout: dict[str, tuple[int, ...]] = {}
    for component in COMPONENTS:
        part = {k[len(component) + 1 :]: v for k, v in state.items() if k.startswith(f"{component}.")}
        if not part:
            continue
        if component == "unet":
            part = convert_unet_state_dict_to_peft(part)
        else:
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
            model = getattr(pipe, component, None)
            if model is not None and not hasattr(model, "text_model"):
                part = {k.removeprefix("text_model."): v for k, v in part.items()}
        layout.update({f"{component}.{k}": tuple(v.shape) for k, v in part.items()})
    return layout


def check_fit(pipe: Any, layout: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise ValueError unless every LoRA layer in `layout` has a module of the right shape in `pipe`."""
    modules: dict[str, dict[str, Any]] = {}
    missing, wrong, total = [], [], 0
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in layout.items():
        m = re.match(r"^(\w+)\.(.+)\.(lora_A|lora_B)\.weight$", key)
        if m:
            pairs.setdefault(f"{m[1]}.{m[2]}", {})[m[3]] = shape
    if not pairs:
        raise ValueError(f"adapter: {source} holds no LoRA layers (lora_A/lora_B or up/down pairs)")
    for name, ab in pairs.items():
        component, module_name = name.split(".", 1)
        model = getattr(pipe, component, None)
        total += 1
        if model is None:
            missing.append(name)
            continue
        if component not in modules:
            modules[component] = dict(model.named_modules())
        module = modules[component].get(module_name)
        if module is None:
            missing.append(name)
            continue
        problem = _mismatch(module, ab.get("lora_B"), ab.get("lora_A"))
        if problem:
            wrong.append(f"{name}: {problem}")
    if missing:
        raise ValueError(
            f"adapter: {source} does not fit the base model: {len(missing)} of {total} LoRA layers name "
            f"modules it does not have, e.g. {missing[0]}"
        )
    if wrong:
        raise ValueError(
            f"adapter: {source} does not fit the base model: {len(wrong)} of {total} LoRA layers have the wrong "
            f"shape, e.g. {wrong[0]}"
        )


def _mismatch(module: Any, up: Any, down: Any) -> str:
    """'' if a LoRA with these up/down shapes fits `module`, else what is wrong."""
    base = _base(module)
    up = tuple(getattr(up, "shape", up) or ())
    down = tuple(getattr(down, "shape", down) or ())
    expected_up: tuple[int, ...]
    expected_down: tuple[int, ...]
    if isinstance(base, nn.Linear):
        expected_up, expected_down = (base.out_features,), (base.in_features,)
        got_up, got_down = up[:1], down[1:]
        ok = len(up) == 2 and len(down) == 2
    elif isinstance(base, nn.Conv2d):
        expected_up = (base.out_channels, 1, 1)
        expected_down = (base.in_channels // base.groups, *base.kernel_size)
        got_up, got_down = (up[0], *up[2:]) if up else (), down[1:]
        ok = len(up) == 4 and len(down) == 4
    else:
        return f"{type(base).__name__} is not a Linear or Conv2d layer"
    if ok and got_up == expected_up and got_down == expected_down and up[1] == down[0]:
        return ""
    return f"up {list(up)} / down {list(down)} vs {type(base).__name__} {_describe(base)}"


def _describe(base: Any) -> str:
    if hasattr(base, "in_features"):
        return f"{base.in_features}->{base.out_features}"
    return f"{base.in_channels}->{base.out_channels} k{tuple(base.kernel_size)}"
