"""Product and style LoRAs held in fixed PEFT slots of one pipeline, least recently used first out.

Switching product is a `set_adapters` call. A miss with every slot taken reuses the least recently
used slot: by hot-swap when enabled and possible (module structure never changes, which is what
`torch.compile` needs), otherwise by delete + load. Either way the slot then renders exactly as a
fresh load of the new adapter would (`tests/generator/test_hotswap.py`, in every order of ranks, components
and file dtypes).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from services.generator.embeddings import read_token_embeddings, set_token_embeddings
from services.generator.interfaces import AdapterSwitch, CacheStats, InvalidJob, stacking_adapters
from services.generator.lora_formats import read_adapter
from services.generator.messages import AdapterSpec

log = logging.getLogger(__name__)

TEXT_ENCODER_KEYS = ("text_encoder", "lora_te", "te_", "text_model")


class AdapterCache:
    """LRU of LoRA adapters held in fixed PEFT slots ("slot0".."slotN-1"): the eager `interfaces.AdapterSet`."""

    def __init__(self, pipe: Any, capacity: int, hotswap_rank: int):
        self.pipe = pipe
        self.capacity = max(1, capacity)
        self.slots: OrderedDict[str, str] = OrderedDict()  # adapter key -> slot name, LRU first
        self.stats = CacheStats()
        self.hotswap = hotswap_rank > 0
        self.hotswap_rank = hotswap_rank
        self.loaded_tokens: dict[str, str] = {}  # token -> key of the adapter whose rows it holds
        self.embeddings: dict[str, dict] = {}  # adapter key -> {token: embedding} it carries
        # What the PEFT layers currently run: ((slot, weight), ...), () for LoRA disabled, None unknown.
        self.active: tuple[tuple[str, float], ...] | None = None
        if self.hotswap:
            pipe.enable_lora_hotswap(target_rank=hotswap_rank)

    def _free_slot(self, keep: set[str]) -> tuple[str, bool]:
        used = set(self.slots.values())
        for i in range(self.capacity):
            if f"slot{i}" not in used:
                return f"slot{i}", False
        for key, slot in self.slots.items():
            if key not in keep:
                del self.slots[key]
                self.embeddings.pop(key, None)
                return slot, True
        raise InvalidJob("adapters", f"a request stacks more adapters than the cache holds ({self.capacity})")

    def _load(self, spec: AdapterSpec, keep: set[str]) -> str:
        # Any supported format arrives in the diffusers/PEFT form, so slots work the same for all.
        adapter = read_adapter(spec.path, self.pipe)
        embeddings = dict(adapter.embeddings)
        if spec.embeddings:
            embeddings.update(read_token_embeddings(spec.embeddings, spec.tokens))
        slot, occupied = self._free_slot(keep)
        if occupied and self.hotswap and self._try_hotswap(slot, adapter.weights):
            self.embeddings[spec.key] = embeddings
            return slot
        with stacking_adapters():
            if occupied:
                self.pipe.delete_adapters(slot)
            self.pipe.load_lora_weights(_fresh(adapter.weights), adapter_name=slot)
        self.embeddings[spec.key] = embeddings
        return slot

    def _try_hotswap(self, slot: str, weights: Any) -> bool:
        """Swap `weights` into `slot` in place; False (slot untouched or to be reloaded) when it cannot."""
        # diffusers cannot hot-swap text-encoder layers, and finds out only after the UNet was swapped.
        if _has_text_encoder_layers(weights):
            return False
        try:
            # A private copy: PEFT exchanges tensors with the dict it is given (torch.utils.swap_tensors),
            # so a dict reused after a failed attempt would hold the evicted adapter's weights.
            with stacking_adapters():
                self.pipe.load_lora_weights(_private_copy(weights), adapter_name=slot, hotswap=True)
        except Exception as exc:  # layout differs from the slot's: the caller reloads the slot
            log.info("hot-swap into %s not possible (%s); reloading the slot", slot, exc)
            return False
        # Files may be fp16 on an fp32 model; swapped-in tensors keep the file's dtype unless cast.
        self._cast_slot(slot)
        # A swap replaces only the layers the new adapter has: the slot's other layers (e.g. the
        # evicted product's text-encoder LoRA) would stay active, so they are silenced.
        self._zero_layers_not_in(slot, weights)
        return True

    def _lora_layers(self, slot: str) -> Iterator[tuple[str, str, Any]]:
        for component in ("unet", "transformer", "text_encoder", "text_encoder_2"):
            model = getattr(self.pipe, component, None)
            if model is None:
                continue
            for name, module in model.named_modules():
                lora_a = getattr(module, "lora_A", None)
                if isinstance(lora_a, torch.nn.ModuleDict) and slot in lora_a:
                    yield component, name, module

    def _cast_slot(self, slot: str) -> None:
        dtype = self.pipe.unet.dtype
        for _, _, module in self._lora_layers(slot):
            module.lora_A[slot].to(dtype)
            module.lora_B[slot].to(dtype)

    def _zero_layers_not_in(self, slot: str, weights: Any) -> None:
        keys = _keys(weights)
        # Module names as they appear inside the file's keys, whatever its naming (PEFT or Kohya).
        present = {k.split(".lora")[0].replace("_", ".").removeprefix("lora.").removeprefix("unet.") for k in keys}
        with torch.no_grad():
            for component, name, module in self._lora_layers(slot):
                if component != "unet" or name.replace("_", ".") not in present:
                    module.lora_B[slot].weight.zero_()

    def _ensure_embeddings(self, spec: AdapterSpec) -> None:
        # Products from older trainers share token names (<s1><s2>): set the rows whenever another
        # product's embeddings currently own them, not only when the adapter is first loaded.
        embeddings = self.embeddings.get(spec.key) or {}
        if embeddings and any(self.loaded_tokens.get(t) != spec.key for t in embeddings):
            set_token_embeddings(self.pipe, embeddings)
            for token in embeddings:
                self.loaded_tokens[token] = spec.key

    def activate(self, adapters: tuple[AdapterSpec, ...]) -> None:
        """Make exactly `adapters` active with their weights."""
        keep = {a.key for a in adapters}
        wanted = []
        for spec in adapters:
            if spec.key in self.slots:
                self.slots.move_to_end(spec.key)
                self.stats.hits += 1
            else:
                self.slots[spec.key] = self._load(spec, keep)
                self.stats.misses += 1
                self.active = None  # loading changes which adapters PEFT runs
            self._ensure_embeddings(spec)
            wanted.append((self.slots[spec.key], spec.weight))
        # set_adapters walks every module of the UNet and text encoder (~10 ms on SD 1.5 on a CPU
        # core): pay it only when the active set or a weight changes, so repeat jobs cost nothing.
        target = tuple(wanted)
        if target == self.active or (not target and not self.slots):
            return
        if target:
            if not self.active:  # disabled or unknown
                self.pipe.enable_lora()
            self.pipe.set_adapters([n for n, _ in target], adapter_weights=[w for _, w in target])
        else:
            self.pipe.disable_lora()
        self.active = target

    def unet_switcher(self, adapters: tuple[AdapterSpec, ...]) -> AdapterSwitch:
        """For switching weights many times within one job (regional.py): `adapters` are active; the returned
        function sets new weights for the same adapters on the UNet's LoRA layers only (the prompt is encoded
        already), about 100x faster than `set_adapters`, which walks every module of UNet and text encoder."""
        slots = [self.slots[a.key] for a in adapters]
        layers = [m for m in self.pipe.unet.modules() if hasattr(m, "set_scale") and any(s in m.scaling for s in slots)]

        def switch(specs: tuple[AdapterSpec, ...]) -> None:
            for layer in layers:
                for slot, spec in zip(slots, specs, strict=True):
                    layer.set_scale(slot, spec.weight)

        return switch


def _fresh(weights: Any) -> Any:
    # diffusers pops keys from state dicts it is given; keep the caller's copy intact for retries.
    return dict(weights) if isinstance(weights, dict) else weights


def _private_copy(weights: Any) -> Any:
    if isinstance(weights, dict):
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in weights.items()}
    return weights


def _keys(weights: Any) -> list[str]:
    if isinstance(weights, dict):
        return list(weights)
    with safe_open(str(Path(weights)), framework="pt") as f:
        return list(f.keys())


def _has_text_encoder_layers(weights: Any) -> bool:
    return any(k.startswith(TEXT_ENCODER_KEYS) for k in _keys(weights))
