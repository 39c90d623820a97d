"""Stacked style and background adapters act on the scene, not on the product.

Stacked at full weight on a product adapter, a style repaints the product as well (the night style dims
it); at a weight that spares the product it hardly changes the scene (docs/FIDELITY.md, night). So, for
requests that stack a scene-only adapter (a style or background whose manifest says `scope: scene`, the
default) on a product, each denoising step blends three noise predictions:

- `styled`: every adapter at its weight (what plain stacking gives);
- `product`: the product adapter, without the scene-only adapters;
- `base`: neither (adapters with `scope: image` stay on in all three: they restyle the product too).

The product is where its adapter changes the prediction most: |product - base| per latent pixel (the
conditional branch's, for both branches), smoothed over 3x3 and divided by its maximum per image, the
idea of DiffEdit's mask (Couairon et al., 2022) with the adapter in place of a second prompt. The mask
ramps from 0 at `MASK_LOW` of that maximum to 1 at `MASK_HIGH`, and the step's prediction is
`mask * product + (1 - mask) * styled`: the scene gets the style, the product keeps its adapter's look.

Cost: three UNet evaluations per step, for those requests only; between passes `switcher` sets only the
UNet's LoRA scales (docs/PERFORMANCE.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.nn.functional as F
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from services.generator.messages import AdapterSpec

# Chosen on validation seeds 100-105 (docs/FIDELITY.md): 0.2/0.5 let the night style dim the split star's edges
# (fidelity 0.88 on black); 0.1/0.3 kept every demo cell >= 0.94 with the scene's light at most halved.
MASK_LOW = 0.1
MASK_HIGH = 0.3


def applies(adapters: tuple[AdapterSpec, ...]) -> bool:
    """A product adapter (first, weight != 0) with at least one scene-only adapter stacked on it."""
    if not adapters or adapters[0].kind != "product" or adapters[0].weight == 0:
        return False
    return any(a.scene_only and a.weight != 0 for a in adapters[1:])


def product_mask(product: torch.Tensor, base: torch.Tensor, cfg: bool) -> torch.Tensor:
    """(batch, 1, h, w) in [0, 1]: where the product adapter moves the noise prediction."""
    effect = (product.float() - base.float()).pow(2).sum(1, keepdim=True).sqrt()
    effect = F.avg_pool2d(effect, 3, stride=1, padding=1, count_include_pad=False)
    if cfg:  # diffusers stacks [unconditional, conditional]: the conditional branch locates the product
        half = effect.shape[0] // 2
        effect = torch.cat([effect[half:], effect[half:]])
    relative = effect / effect.amax(dim=(2, 3), keepdim=True).clamp_min(1e-8)
    return ((relative - MASK_LOW) / (MASK_HIGH - MASK_LOW)).clamp(0, 1)


class SceneOnlyStyles(torch.nn.Module):
    """Stands in for the pipeline's UNet during one job; everything but `forward` is the real UNet's."""

    def __init__(self, unet: torch.nn.Module, switch, adapters: tuple[AdapterSpec, ...], cfg: bool):
        super().__init__()
        self.unet = unet
        self._switch = switch
        self._cfg = cfg
        product, stacked = adapters[0], adapters[1:]
        kept = tuple(replace(a, weight=0.0) if a.scene_only else a for a in stacked)
        self._styled = adapters
        self._product = (product, *kept)
        self._base = (replace(product, weight=0.0), *kept)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["unet"], name)

    def forward(self, sample, timestep, *args, return_dict: bool = True, **kwargs):
        def predict(adapters):
            self._switch(adapters)
            return self.unet(sample, timestep, *args, return_dict=False, **kwargs)[0]

        try:
            styled = predict(self._styled)
            product = predict(self._product)
            base = predict(self._base)
        finally:  # the cache believes the job's weights are set: leave them so, whatever happened
            self._switch(self._styled)
        mask = product_mask(product, base, self._cfg).to(styled.dtype)
        out = mask * product + (1 - mask) * styled
        if return_dict:
            return UNet2DConditionOutput(sample=out)
        return (out,)


@contextmanager
def scene_only_styles(pipe, switch, adapters: tuple[AdapterSpec, ...], cfg: bool) -> Iterator[None]:
    """While the block runs, `pipe` denoises with the style kept off the product (see the module doc).
    `switch(adapters)` sets the active adapters' weights (the adapter cache's `switcher`)."""
    unet = pipe.unet
    # object.__setattr__: diffusers' own __setattr__ would re-register the component in the pipeline config.
    object.__setattr__(pipe, "unet", SceneOnlyStyles(unet, switch, adapters, cfg))
    try:
        yield
    finally:
        object.__setattr__(pipe, "unet", unet)
