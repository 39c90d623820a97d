"""The fast path: a compiled UNet, LoRA slots that switch product without recompiling, warm-up, compile cache.

With `--compile` on, the UNet (and with `--compile-vae` the VAE decoder) runs under `torch.compile`. What
keeps one compiled graph valid for every product:

- the UNet's LoRA layers are created once, before compiling: `--lora-slots` fixed PEFT slots, every one
  always active, each covering the union of the UNet layers of the adapters found at start-up, padded to
  one rank (the largest found, or `--hotswap-rank`);
- a product switch hot-swaps the new adapter's tensors into a slot in place (same shapes, same storage)
  and sets the LoRA scalings, which are tensors, in place: a slot not in use has scaling 0;
- the text encoder is not compiled, so its LoRA layers are loaded and deleted the ordinary way.

Warm-up compiles each configured (width, height, batch) shape before the worker reports Ready, so health
stays NOT_SERVING until then; a request for any other shape still renders, after a compile that is logged.
The inductor cache lives in `--compile-cache-dir` (a volume), so a restart or a second replica reuses it.

Runs only inside worker processes and benchmarks (it imports torch).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Provisional: the H200 probe (docs/PERFORMANCE.md) measured reduce-overhead at 0.32 s for batch 1 against
# 1.30 s eager; the other modes are still to be measured (benchmarks/gpu_session.sh).
AUTO_CUDA_MODE = "reduce-overhead"
DTYPES = ("auto", "fp16", "bf16", "fp32")
Shape = tuple[int, int, int]  # width, height, batch


@dataclass(frozen=True)
class CompileOptions:
    """How a worker's pipeline runs; `mode` is resolved (never "auto")."""

    mode: str = "off"
    vae: bool = False
    channels_last: bool = False
    sdpa: bool = True
    dtype: str = "auto"
    lora_slots: int = 2
    target_rank: int = 0
    # Adapter files whose UNet layers the slots must cover (the catalog at start-up).
    layout: tuple[str, ...] = ()
    # () = the model's own size at batch 1 and at `auto_batch`.
    warm_shapes: tuple[Shape, ...] = ()
    auto_batch: int = 1
    cache_dir: str = ""
    # Benchmarks only: diffusers' fused QKV bypasses LoRA on to_q/to_k/to_v, so the service never fuses.
    fuse_qkv: bool = False

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


def resolve_mode(setting: str, device: str) -> str:
    """ "auto" -> AUTO_CUDA_MODE on CUDA, "off" elsewhere; any other value must be one of MODES."""
    if setting == "auto":
        return AUTO_CUDA_MODE if device.startswith("cuda") else "off"
    if setting not in MODES:
        raise ValueError(f"compile: {setting!r} is not one of auto, {', '.join(MODES)}")
    return setting


def parse_shapes(spec: str) -> tuple[Shape, ...]:
    """ "512x512x1,512x512x4" -> ((512, 512, 1), (512, 512, 4)); "" or "auto" -> ()."""
    spec = spec.strip()
    if spec in ("", "auto"):
        return ()
    shapes = []
    for item in spec.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"warm_shapes: {item.strip()!r} is not WIDTHxHEIGHTxBATCH (e.g. 512x512x4)")
        shapes.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return tuple(shapes)


def torch_dtype(name: str, device_type: str):
    import torch

    if name == "auto":
        return torch.float16 if device_type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype: {name!r} is not one of {', '.join(DTYPES)}")
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def adapter_rank(path: str | Path) -> int:
    """The largest LoRA rank in a .safetensors file, read from its header only (no tensors loaded)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    rank = 0
    for key, info in header.items():
        if key == "__metadata__" or not isinstance(info, dict) or not info.get("shape"):
            continue
        if "lora_A" in key or "lora_down" in key or key.endswith(("down", "down.weight")):
            rank = max(rank, int(info["shape"][0]))
    return rank


def use_cache_dir(path: str) -> None:
    """Point inductor (and triton) at a persistent folder; must run before the first compile."""
    if not path:
        return
    root = Path(path).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(root / "triton")


def compile_counters() -> dict[str, int]:
    """Dynamo/inductor counters that tell a compile, a recompile and a cache hit apart."""
    from torch._dynamo.utils import counters

    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "frames_ok": int(counters["frames"]["ok"]),
        "recompiles": int(sum(counters["recompiles"].values())) if "recompiles" in counters else 0,
        "fxgraph_cache_hit": int(counters["inductor"]["fxgraph_cache_hit"]),
        "fxgraph_cache_miss": int(counters["inductor"]["fxgraph_cache_miss"]),
    }


def prepare(pipe, options: CompileOptions) -> None:
    """Attention kernels and memory layout; before adapters are loaded and before compiling."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    # diffusers picks SDPA by default on torch 2; set it (or the classic path) explicitly so the benchmark's
    # on/off is real.
    processor = AttnProcessor2_0 if options.sdpa else AttnProcessor
    pipe.unet.set_attn_processor(processor())
    pipe.vae.set_attn_processor(processor())
    if options.fuse_qkv:
        if any("lora_A" in n for n, _ in pipe.unet.named_modules()):
            raise ValueError("fuse_qkv: the UNet has LoRA layers, which diffusers' fused to_qkv would bypass")
        pipe.unet.fuse_qkv_projections()
    if options.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)


def compile_modules(pipe, options: CompileOptions) -> None:
    """torch.compile the UNet (and the VAE decoder) in place: module names, and so LoRA keys, stay as they are."""
    import torch

    dynamo = torch._dynamo.config
    # One graph per served shape (dynamic=False: specialised kernels, one CUDA graph each); allow many.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(64, getattr(dynamo, name)))
    kwargs = {"mode": None if options.mode == "default" else options.mode, "dynamic": False}
    pipe.unet.compile(**kwargs)
    if options.vae:
        pipe.vae.decoder.compile(**kwargs)


@dataclass
class _Slot:
    name: str
    key: str | None = None  # adapter key whose UNet tensors the slot holds
    scalings: list = field(default_factory=list)  # (scaling tensor, base scale of the held adapter)
    params: list = field(default_factory=list)  # its lora_A/lora_B weights, in module order (same for every slot)


@dataclass
class _Parsed:
    unet: dict  # diffusers-format UNet keys ("unet.…"), on the device
    text_encoder: dict  # the rest ("text_encoder.…"), loaded the ordinary way
    alphas: dict | None
    embeddings: dict
    # What a slot holds once this adapter is swapped in (padded, zeroed, cast) and its base scalings: later
    # switches copy these in one fused op instead of going through diffusers' hot-swap again.
    snapshot: list | None = None
    bases: list | None = None


class CompiledAdapterCache:
    """Adapters for a compiled UNet: fixed slots, all active, switched by in-place hot-swap.

    Same interface as AdapterCache (`activate`, `stats`). An LRU of parsed adapters (UNet tensors on the
    device) makes a switch between cached products a copy into a slot, with no file read.
    """

    def __init__(self, pipe, capacity: int, options: CompileOptions):
        import torch
        from peft.utils.hotswap import _convert_scalings_to_tensor

        from services.generator.adapter_cache import CacheStats

        self.pipe = pipe
        self.capacity = max(1, capacity)
        self.stats = CacheStats()
        self.parsed: OrderedDict[str, _Parsed] = OrderedDict()  # LRU first
        self.loaded_tokens: dict[str, str] = {}
        self.te_loaded: dict[str, str] = {}  # slot -> adapter key whose text-encoder LoRA it holds
        self.te_active: tuple | None = None
        self.device = pipe.unet.device
        self.dtype = pipe.unet.dtype
        self.slots: list[_Slot] = []
        layout: dict[str, tuple[int, ...]] = {}
        rank = options.target_rank
        for path in options.layout:
            unet, _, _ = self._read_unet(path)
            for key, t in unet.items():
                layout[key] = _pad_rank(layout.get(key), tuple(t.shape), key)
                rank = max(rank, _rank_of(key, t.shape))
        self.rank = rank
        if not layout:
            log.info("no adapters at start-up: the compiled UNet has no LoRA slots")
            return
        zeros = {k: torch.zeros(_with_rank(shape, k, rank), dtype=self.dtype) for k, shape in layout.items()}
        names = [f"slot{i}" for i in range(max(1, options.lora_slots))]
        for name in names:
            # No alphas: scaling 1 until a real adapter is swapped in (then alpha/r of that adapter).
            pipe.load_lora_into_unet(dict(zeros), None, unet=pipe.unet, adapter_name=name)
            self.slots.append(_Slot(name))
        pipe.unet.set_adapters(names, [1.0] * len(names))
        # Scalings as tensors: a switch writes them in place instead of changing a Python float the graph guards.
        _convert_scalings_to_tensor(pipe.unet)
        for slot in self.slots:
            modules = list(self._modules(slot.name))
            slot.scalings = [(m.scaling[slot.name], 0.0) for m in modules]
            slot.params = [w for m in modules for w in (m.lora_A[slot.name].weight, m.lora_B[slot.name].weight)]
            for tensor, _ in slot.scalings:
                tensor.fill_(0.0)
        log.info("%d LoRA slots of rank %d over %d UNet tensors", len(self.slots), rank, len(layout))

    # -- reading
    def _read_unet(self, path: str):
        from services.generator.lora_formats import read_adapter

        adapter = read_adapter(path, self.pipe)
        weights = adapter.weights
        state, alphas = self.pipe.lora_state_dict(dict(weights) if isinstance(weights, dict) else weights)
        from diffusers.utils import convert_unet_state_dict_to_peft

        # One naming (PEFT's lora_A/lora_B) whatever the file's, so the slots' layout has one key per layer.
        unet = convert_unet_state_dict_to_peft({k: v for k, v in state.items() if k.startswith("unet.")})
        rest = {k: v for k, v in state.items() if not k.startswith("unet.")}
        return unet, (rest, alphas), adapter

    def _parse(self, spec) -> _Parsed:
        from services.generator.embeddings import read_token_embeddings

        unet, (rest, alphas), adapter = self._read_unet(spec.path)
        rank = max((_rank_of(k, t.shape) for k, t in unet.items()), default=0)
        if rank > self.rank:
            raise ValueError(f"adapter: rank {rank} is above the compiled slots' rank {self.rank} (--hotswap-rank)")
        embeddings = dict(adapter.embeddings)
        if spec.embeddings:
            embeddings.update(read_token_embeddings(spec.embeddings, spec.tokens))
        unet = {k: v.to(self.device, self.dtype) for k, v in unet.items()}
        return _Parsed(unet, rest, alphas, embeddings)

    def _get(self, spec) -> _Parsed:
        if spec.key in self.parsed:
            self.parsed.move_to_end(spec.key)
            self.stats.hits += 1
            return self.parsed[spec.key]
        self.stats.misses += 1
        parsed = self._parse(spec)
        self.parsed[spec.key] = parsed
        while len(self.parsed) > self.capacity:
            self.parsed.popitem(last=False)
        return parsed

    # -- switching
    def _modules(self, slot: str):
        for _, module in self.pipe.unet.named_modules():
            lora_a = getattr(module, "lora_A", None)
            if isinstance(lora_a, __import__("torch").nn.ModuleDict) and slot in lora_a:
                yield module

    def _swap_in(self, slot: _Slot, key: str, parsed: _Parsed) -> None:
        import torch

        if parsed.snapshot is not None:
            with torch.no_grad():
                torch._foreach_copy_(slot.params, parsed.snapshot)
            slot.scalings = [(t, b) for (t, _), b in zip(slot.scalings, parsed.bases, strict=True)]
            slot.key = key
            return
        try:
            with torch.no_grad():
                # Copies into the slot's tensors (padding a smaller rank with zeros, zeroing layers the adapter
                # lacks) and fills the scalings in place: no module, shape or Python attribute changes.
                self.pipe.load_lora_into_unet(
                    dict(parsed.unet), parsed.alphas, unet=self.pipe.unet, adapter_name=slot.name, hotswap=True
                )
        except (RuntimeError, ValueError) as exc:
            slot.key = None
            raise ValueError(f"adapter: its UNet layers do not fit the compiled LoRA slots ({exc})") from exc
        if not parsed.unet:  # a text-encoder-only adapter: hotswap skips an empty UNet dict
            for module in self._modules(slot.name):
                module.lora_B[slot.name].weight.data.zero_()
        base = torch.stack([t for t, _ in slot.scalings]).tolist() if slot.scalings else []
        slot.scalings = [(t, b) for (t, _), b in zip(slot.scalings, base, strict=True)]
        slot.key = key
        parsed.snapshot, parsed.bases = [w.detach().clone() for w in slot.params], base
        parsed.unet = {}  # the snapshot replaces it

    def _set_text_encoder(self, slot: _Slot, key: str | None, parsed: _Parsed | None) -> None:
        from diffusers.utils.peft_utils import delete_adapter_layers

        if self.te_loaded.get(slot.name) == key:
            return
        te = self.pipe.text_encoder
        if slot.name in self.te_loaded:
            delete_adapter_layers(te, slot.name)
            del self.te_loaded[slot.name]
        if parsed is not None and parsed.text_encoder:
            self.pipe.load_lora_into_text_encoder(
                dict(parsed.text_encoder), parsed.alphas, text_encoder=te, adapter_name=slot.name, _pipeline=self.pipe
            )
            self.te_loaded[slot.name] = key
        self.te_active = None

    def activate(self, adapters: tuple) -> None:
        """Make exactly `adapters` active with their weights, without touching the compiled graph."""
        from services.generator.embeddings import set_token_embeddings

        if adapters and not self.slots:
            raise ValueError("adapters: the compiled UNet has no LoRA slots (no adapters at start-up); restart it")
        if len(adapters) > len(self.slots):
            raise ValueError(f"adapters: at most {len(self.slots)} can be stacked with compile on (--lora-slots)")
        wanted = {spec.key: spec for spec in adapters}
        placed: dict[str, _Slot] = {s.key: s for s in self.slots if s.key in wanted}
        free = [s for s in self.slots if s.key not in wanted]
        for spec in adapters:
            parsed = self._get(spec)
            if spec.key not in placed:
                slot = free.pop(0)
                self._swap_in(slot, spec.key, parsed)
                placed[spec.key] = slot
            self._set_text_encoder(placed[spec.key], spec.key, parsed)
            embeddings = parsed.embeddings
            if embeddings and any(self.loaded_tokens.get(t) != spec.key for t in embeddings):
                set_token_embeddings(self.pipe, embeddings)
                for token in embeddings:
                    self.loaded_tokens[token] = spec.key
        weights = {placed[k].name: spec.weight for k, spec in wanted.items()}
        for slot in self.slots:
            weight = weights.get(slot.name, 0.0)
            for tensor, base in slot.scalings:
                tensor.fill_(base * weight)
        self._activate_text_encoder(weights)

    def switcher(self, adapters: tuple) -> Callable[[tuple], None]:
        """Weights switched within one job (regional.py): `activate` only fills scalings here, cheap enough."""
        return self.activate

    def _activate_text_encoder(self, weights: dict[str, float]) -> None:
        from diffusers.utils.peft_utils import set_adapter_layers, set_weights_and_activate_adapters

        te_weights = tuple((n, w) for n, w in sorted(weights.items()) if n in self.te_loaded)
        if te_weights == self.te_active or (not te_weights and not self.te_loaded):
            return
        te = self.pipe.text_encoder
        if te_weights:
            set_adapter_layers(te, enabled=True)
            set_weights_and_activate_adapters(te, [n for n, _ in te_weights], [w for _, w in te_weights])
        else:
            set_adapter_layers(te, enabled=False)
        self.te_active = te_weights


def _is_down(key: str) -> bool:
    # PEFT names (lora_A) or the older diffusers/kohya ones (lora.down, lora_down).
    return ".lora_A." in key or "lora.down." in key or "lora_down." in key


def _rank_of(key: str, shape) -> int:
    return int(shape[0] if _is_down(key) else shape[1])


def _with_rank(shape: tuple[int, ...], key: str, rank: int) -> tuple[int, ...]:
    shape = list(shape)
    shape[0 if _is_down(key) else 1] = rank
    return tuple(shape)


def _pad_rank(old: tuple[int, ...] | None, new: tuple[int, ...], key: str) -> tuple[int, ...]:
    if old is None:
        return new
    if _with_rank(old, key, 0) != _with_rank(new, key, 0):
        raise ValueError(f"adapter layout: {key} has shapes {old} and {new} in different adapters")
    return old if _rank_of(key, old) >= _rank_of(key, new) else new


class Accelerator:
    """The hooks ProductPipeline calls: dtype, preparation, adapter cache, compile, warm-up, cold-shape log."""

    def __init__(self, options: CompileOptions):
        self.options = options
        self.warmed: set[tuple] = set()
        self.warming = False
        self.compile_seconds = 0.0
        if options.enabled:
            use_cache_dir(options.cache_dir)

    def dtype(self, device_type: str):
        return torch_dtype(self.options.dtype, device_type)

    def setup(self, pipe, adapter_cache_size: int):
        """Prepare and compile `pipe`; return the adapter cache to use (None: the eager AdapterCache)."""
        prepare(pipe, self.options)
        if not self.options.enabled:
            return None
        cache = CompiledAdapterCache(pipe, adapter_cache_size, self.options)
        compile_modules(pipe, self.options)
        return cache

    @contextmanager
    def watch(self, width: int, height: int, batch: int, cfg: bool) -> Iterator[None]:
        """Log the compile a request causes (a shape that was not warmed up)."""
        if not self.options.enabled:
            yield
            return
        before = compile_counters()["graphs"]
        started = time.perf_counter()
        yield
        compiled = compile_counters()["graphs"] - before
        shape = (width, height, batch, cfg)
        if compiled and not self.warming:
            log.warning(
                "cold shape %dx%dx%d%s: this request compiled %d graph(s), %.1fs in all; add it to --warm-shapes",
                width,
                height,
                batch,
                "" if cfg else " (no CFG)",
                compiled,
                time.perf_counter() - started,
            )
        self.warmed.add(shape)

    def warm_up(self, pipeline, steps: int = 3) -> float:
        """Render each warm shape once (a compile per shape); returns the seconds it took."""
        from services.generator.messages import RenderSettings

        shapes = self.options.warm_shapes or tuple(
            (pipeline.default_size, pipeline.default_size, b) for b in sorted({1, self.options.auto_batch})
        )
        started = time.perf_counter()
        self.warming = True
        try:
            for width, height, batch in shapes:
                begun = time.perf_counter()
                # Guidance > 1, as served: classifier-free guidance doubles the UNet's batch.
                settings = RenderSettings("warm-up", "", steps, 7.0, width, height, "", ())
                pipeline(settings, tuple(range(batch)))
                log.info("warmed %dx%dx%d in %.1fs", width, height, batch, time.perf_counter() - begun)
        finally:
            self.warming = False
        self.compile_seconds = time.perf_counter() - started
        return self.compile_seconds


def accelerator_for(options: CompileOptions | None) -> Accelerator:
    return Accelerator(options or CompileOptions())


def describe(options: CompileOptions) -> dict[str, Any]:
    return {k: v for k, v in options.__dict__.items() if k != "layout"} | {"layout_files": len(options.layout)}


def options_for(settings, device: str, adapter_files: list[str], auto_batch: int) -> CompileOptions:
    """A worker's CompileOptions from GeneratorSettings, its device and the adapter files found at start-up."""
    return CompileOptions(
        mode=resolve_mode(settings.compile, device),
        vae=settings.compile_vae,
        channels_last=settings.channels_last,
        sdpa=settings.sdpa,
        dtype=settings.dtype,
        lora_slots=settings.lora_slots,
        target_rank=settings.hotswap_rank,
        layout=tuple(sorted(adapter_files)),
        warm_shapes=parse_shapes(settings.warm_shapes),
        auto_batch=auto_batch,
        cache_dir=settings.compile_cache_dir,
    )


def slot_rank(settings, catalog) -> int:
    """The rank adapters must not exceed: --hotswap-rank, or with compile on the largest found now; 0: no limit."""
    from services.generator.settings import parse_devices

    if settings.hotswap_rank:
        return settings.hotswap_rank
    if all(resolve_mode(settings.compile, device) == "off" for device, _ in parse_devices(settings.devices)):
        return 0
    return max((adapter_rank(e.adapter_path) for e in catalog.entries()), default=0)
