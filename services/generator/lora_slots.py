"""The compiled UNet's LoRA adapters: fixed slots, all active, switched by in-place hot-swap.

What keeps one compiled graph valid for every product (compiled.py compiles it):

- the UNet's LoRA layers are created once, before compiling: `--lora-slots` fixed PEFT slots, every one
  always active, each covering the union of the UNet layers of the adapters found at start-up, padded to
  one rank (the largest found, or `--hotswap-rank`);
- a product switch hot-swaps the new adapter's tensors into a slot in place (same shapes, same storage)
  and sets the LoRA scalings, which are tensors, in place: a slot not in use has scaling 0;
- the text encoder is not compiled, so its LoRA layers are loaded and deleted the ordinary way.

"Slot" here is a LoRA slot of the UNet; worker processes are never called slots.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils import convert_unet_state_dict_to_peft
from diffusers.utils.peft_utils import (
    delete_adapter_layers,
    set_adapter_layers,
    set_weights_and_activate_adapters,
)
from peft.utils.hotswap import _convert_scalings_to_tensor

from services.generator.embeddings import read_token_embeddings, set_token_embeddings
from services.generator.interfaces import AdapterSwitch, CacheStats, InvalidJob, stacking_adapters
from services.generator.lora_formats import read_adapter
from services.generator.messages import AdapterSpec
from services.generator.options import CompileOptions

log = logging.getLogger(__name__)


@dataclass
class LoraSlot:
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


class LoraSlotAdapters:
    """Adapters for a compiled UNet: fixed slots, all active, switched by in-place hot-swap.

    An `interfaces.AdapterSet`, like the eager AdapterCache. An LRU of parsed adapters (UNet tensors on the
    device) makes a switch between cached products a copy into a slot, with no file read.
    """

    def __init__(self, pipe: Any, capacity: int, options: CompileOptions):
        self.pipe = pipe
        self.capacity = max(1, capacity)
        self.stats = CacheStats()
        self.parsed: OrderedDict[str, _Parsed] = OrderedDict()  # LRU first
        self.loaded_tokens: dict[str, str] = {}
        self.te_loaded: dict[str, str] = {}  # slot -> adapter key whose text-encoder LoRA it holds
        self.te_active: tuple | None = None
        self.device = pipe.unet.device
        self.dtype = pipe.unet.dtype
        self.slots: list[LoraSlot] = []
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
            with stacking_adapters():
                pipe.load_lora_into_unet(dict(zeros), None, unet=pipe.unet, adapter_name=name)
            self.slots.append(LoraSlot(name))
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
    def _read_unet(self, path: str) -> tuple[dict, tuple[dict, Any], Any]:
        adapter = read_adapter(path, self.pipe)
        weights = adapter.weights
        state, alphas = self.pipe.lora_state_dict(dict(weights) if isinstance(weights, dict) else weights)
        # One naming (PEFT's lora_A/lora_B) whatever the file's, so the slots' layout has one key per layer.
        unet = convert_unet_state_dict_to_peft({k: v for k, v in state.items() if k.startswith("unet.")})
        rest = {k: v for k, v in state.items() if not k.startswith("unet.")}
        return unet, (rest, alphas), adapter

    def _parse(self, spec: AdapterSpec) -> _Parsed:
        unet, (rest, alphas), adapter = self._read_unet(spec.path)
        rank = max((_rank_of(k, t.shape) for k, t in unet.items()), default=0)
        if rank > self.rank:
            raise InvalidJob("adapters", f"rank {rank} is above the compiled slots' rank {self.rank} (--hotswap-rank)")
        embeddings = dict(adapter.embeddings)
        if spec.embeddings:
            embeddings.update(read_token_embeddings(spec.embeddings, spec.tokens))
        unet = {k: v.to(self.device, self.dtype) for k, v in unet.items()}
        return _Parsed(unet, rest, alphas, embeddings)

    def _get(self, spec: AdapterSpec) -> _Parsed:
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
    def _modules(self, slot: str) -> Iterator[Any]:
        for _, module in self.pipe.unet.named_modules():
            lora_a = getattr(module, "lora_A", None)
            if isinstance(lora_a, torch.nn.ModuleDict) and slot in lora_a:
                yield module

    def _swap_in(self, slot: LoraSlot, key: str, parsed: _Parsed) -> None:
        if parsed.snapshot is not None and parsed.bases is not None:
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
            raise InvalidJob("adapters", f"its UNet layers do not fit the compiled LoRA slots ({exc})") from exc
        if not parsed.unet:  # a text-encoder-only adapter: hotswap skips an empty UNet dict
            for module in self._modules(slot.name):
                module.lora_B[slot.name].weight.data.zero_()
        base = torch.stack([t for t, _ in slot.scalings]).tolist() if slot.scalings else []
        slot.scalings = [(t, b) for (t, _), b in zip(slot.scalings, base, strict=True)]
        slot.key = key
        parsed.snapshot, parsed.bases = [w.detach().clone() for w in slot.params], base
        parsed.unet = {}  # the snapshot replaces it

    def _set_text_encoder(self, slot: LoraSlot, key: str | None, parsed: _Parsed | None) -> None:
        if self.te_loaded.get(slot.name) == key:
            return
        te = self.pipe.text_encoder
        if slot.name in self.te_loaded:
            delete_adapter_layers(te, slot.name)
            del self.te_loaded[slot.name]
        if parsed is not None and parsed.text_encoder and key is not None:
            with stacking_adapters():
                self.pipe.load_lora_into_text_encoder(
                    dict(parsed.text_encoder),
                    parsed.alphas,
                    text_encoder=te,
                    adapter_name=slot.name,
                    _pipeline=self.pipe,
                )
            self.te_loaded[slot.name] = key
        self.te_active = None

    def activate(self, adapters: tuple[AdapterSpec, ...]) -> None:
        """Make exactly `adapters` active with their weights, without touching the compiled graph."""
        if adapters and not self.slots:
            raise InvalidJob("adapters", "the compiled UNet has no LoRA slots (no adapters at start-up); restart it")
        if len(adapters) > len(self.slots):
            raise InvalidJob("adapters", f"at most {len(self.slots)} can be active with compile on (--lora-slots)")
        wanted = {spec.key: spec for spec in adapters}
        placed: dict[str, LoraSlot] = {s.key: s for s in self.slots if s.key in wanted}
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
        self._fill_scalings(weights)
        self._activate_text_encoder(weights)

    def _fill_scalings(self, weights: dict[str, float]) -> None:
        for slot in self.slots:
            weight = weights.get(slot.name, 0.0)
            for tensor, base in slot.scalings:
                tensor.fill_(base * weight)

    def unet_switcher(self, adapters: tuple[AdapterSpec, ...]) -> AdapterSwitch:
        """UNet scalings only, for the slots `activate(adapters)` placed: no cache lookup, no text encoder."""
        names = {s.key: s.name for s in self.slots if s.key is not None}
        slots = [names[a.key] for a in adapters]

        def switch(specs: tuple[AdapterSpec, ...]) -> None:
            self._fill_scalings({slot: spec.weight for slot, spec in zip(slots, specs, strict=True)})

        return switch

    def _activate_text_encoder(self, weights: dict[str, float]) -> None:
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


def _rank_of(key: str, shape: Any) -> int:
    return int(shape[0] if _is_down(key) else shape[1])


def _with_rank(shape: tuple[int, ...], key: str, rank: int) -> tuple[int, ...]:
    dims = list(shape)
    dims[0 if _is_down(key) else 1] = rank
    return tuple(dims)


def _pad_rank(old: tuple[int, ...] | None, new: tuple[int, ...], key: str) -> tuple[int, ...]:
    if old is None:
        return new
    if _with_rank(old, key, 0) != _with_rank(new, key, 0):
        raise ValueError(f"adapter layout: {key} has shapes {old} and {new} in different adapters")
    return old if _rank_of(key, old) >= _rank_of(key, new) else new
