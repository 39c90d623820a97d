"""Placement mode: the product's words and adapter act inside its mask only; outside it, the scene prompt.

Inpainting around a placed product with the product's prompt ("a photo of <split-star> on the beach") and
its adapter asks the model to draw the product, and it does: a second, larger star around the exact
pixels, or a product-coloured blob beside them (docs/FIDELITY.md, "Composite"). The product is already
in the picture, so outside its mask nothing should ask for it. Each denoising step therefore takes two
noise predictions:

- `product`: the request's prompt and adapters (the product adapter at its weight; scene-only styles off);
- `scene`: the scene prompt (`RenderSettings.scene_prompt`: the template's scene without the product's
  words) with the product adapter at weight 0 and the stacked adapters as requested,

and blends them with the product's mask at the latent's size (a latent pixel counts as product when any of
its image pixels does): `mask * product + (1 - mask) * scene`. Inside the kept pixels the inpainting
replaces the latents anyway; on the edge the product's prediction lets the scene meet it.

Cost: two UNet evaluations per step for placement requests (the scene-only-styles blend of regional.py is
not needed on top: the mask is known, and styles act on the scene prediction only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from services.generator.messages import AdapterSpec, PlacedProduct

Switch = Callable[[tuple[AdapterSpec, ...]], None]


def adapter_sets(adapters: tuple[AdapterSpec, ...]) -> tuple[tuple[AdapterSpec, ...], tuple[AdapterSpec, ...]]:
    """(inside the mask, outside it): the product adapter on and scene-only styles off inside; the product
    adapter at weight 0 outside. Without a product adapter both are the request's adapters."""
    if not adapters or adapters[0].kind != "product":
        return adapters, adapters
    product, stacked = adapters[0], adapters[1:]
    inside = (product, *(replace(a, weight=0.0) if a.scene_only else a for a in stacked))
    return inside, (replace(product, weight=0.0), *stacked)


def latent_mask(placed: PlacedProduct, factor: int, device, dtype) -> torch.Tensor:
    """(1, 1, h, w): 1 where a latent pixel covers any of the product's pixels."""
    mask = np.frombuffer(placed.mask, np.uint8).reshape(placed.height, placed.width).astype(np.float32)
    tensor = torch.from_numpy(mask)[None, None]
    return F.max_pool2d(tensor, factor, stride=factor).to(device=device, dtype=dtype)


class ProductRegion(torch.nn.Module):
    """Stands in for the pipeline's UNet during one placement job; everything but `forward` is the real UNet's."""

    def __init__(
        self,
        unet: torch.nn.Module,
        switch: Switch,
        adapters: tuple[AdapterSpec, ...],
        scene_states: torch.Tensor,
        mask: torch.Tensor,
    ):
        super().__init__()
        self.unet = unet
        self._switch = switch
        self._requested = adapters
        self._inside, self._outside = adapter_sets(adapters)
        self._scene_states = scene_states
        self._mask = mask

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["unet"], name)

    def forward(self, sample, timestep, encoder_hidden_states, *args, return_dict: bool = True, **kwargs):
        try:
            self._switch(self._inside)
            product = self.unet(sample, timestep, encoder_hidden_states, *args, return_dict=False, **kwargs)[0]
            self._switch(self._outside)
            scene = self.unet(sample, timestep, self._scene_states, *args, return_dict=False, **kwargs)[0]
        finally:  # the adapter cache believes the request's weights are set: leave them so
            self._switch(self._requested)
        mask = self._mask.to(product.dtype)
        out = mask * product + (1 - mask) * scene
        if return_dict:
            return UNet2DConditionOutput(sample=out)
        return (out,)


def scene_states(pipe, prompt: str, negative: str | None, images: int, cfg: bool, device) -> torch.Tensor:
    """The scene prompt's text states, stacked as diffusers stacks the UNet's batch ([negative, prompt])."""
    positive, negative_states = pipe.encode_prompt(prompt, device, images, cfg, negative)
    return torch.cat([negative_states, positive]) if cfg else positive


@contextmanager
def product_region(
    pipe, switch: Switch, adapters: tuple[AdapterSpec, ...], states: torch.Tensor, mask: torch.Tensor
) -> Iterator[None]:
    """While the block runs, `pipe` denoises with the product's prompt and adapter inside `mask` only."""
    unet = pipe.unet
    # object.__setattr__: diffusers' own __setattr__ would re-register the component in the pipeline config.
    object.__setattr__(pipe, "unet", ProductRegion(unet, switch, adapters, states, mask))
    try:
        yield
    finally:
        object.__setattr__(pipe, "unet", unet)
