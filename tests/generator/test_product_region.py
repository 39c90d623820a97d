"""Placement mode's denoising (services/generator/product_region.py): the product's prompt and adapter act inside
its mask only; outside it the scene prompt, with the product adapter off."""

from __future__ import annotations

import numpy as np
import torch

from services.generator import product_region as R
from services.generator.catalog import Template, compose_scene_prompt
from services.generator.messages import AdapterSpec, PlacedProduct

PRODUCT = AdapterSpec("p", "p.safetensors", 1.0, kind="product")
NIGHT = AdapterSpec("n", "n.safetensors", 1.5, kind="style", scene_only=True)
GRAIN = AdapterSpec("g", "g.safetensors", 0.7, kind="style", scene_only=False)


class EchoUNet(torch.nn.Module):
    """Returns its text states' mean in every pixel, and records the adapter weights it was called with."""

    def __init__(self):
        super().__init__()
        self.weights: dict[str, float] = {}
        self.calls: list[dict[str, float]] = []

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=False):
        self.calls.append(dict(self.weights))
        value = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return (value.expand_as(sample).clone(),)


def test_adapter_sets_keep_the_product_inside_and_scene_only_styles_outside():
    inside, outside = R.adapter_sets((PRODUCT, NIGHT, GRAIN))
    assert [a.weight for a in inside] == [1.0, 0.0, 0.7]  # the night stays off the product
    assert [a.weight for a in outside] == [0.0, 1.5, 0.7]  # no product adapter around it
    assert R.adapter_sets((NIGHT,)) == ((NIGHT,), (NIGHT,))  # placement without a product adapter


def test_each_step_blends_the_product_prediction_inside_and_the_scene_outside():
    unet = EchoUNet()

    def switch(specs):
        unet.weights = {a.key: a.weight for a in specs}

    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 3:5] = 1
    placed = PlacedProduct(8, 8, (3, 2, 5, 6), 1, "d", rgb=bytes(8 * 8 * 3), mask=mask.tobytes())
    latent = R.latent_mask(placed, 2, "cpu", torch.float32)
    assert latent.shape == (1, 1, 4, 4) and latent[0, 0].tolist() == [
        [0, 0, 0, 0],
        [0, 1, 1, 0],
        [0, 1, 1, 0],
        [0, 0, 0, 0],
    ]
    scene_states = torch.full((2, 3, 5), -1.0)
    region = R.ProductRegion(unet, switch, (PRODUCT, NIGHT), scene_states, latent)
    out = region(torch.zeros(2, 4, 4, 4), 10, torch.full((2, 3, 5), 2.0)).sample
    assert (out[:, :, 1:3, 1:3] == 2.0).all() and out[:, :, 0].eq(-1.0).all()  # product inside, scene outside
    assert unet.calls == [{"p": 1.0, "n": 0.0}, {"p": 0.0, "n": 1.5}]
    assert unet.weights == {"p": 1.0, "n": 1.5}  # the request's weights are back, as the adapter cache believes


def test_the_scene_prompt_leaves_out_the_product():
    demo = Template(
        id="demo-beach",
        name="Beach",
        scene="on the beach",
        prompt="a photo of {product} {scene}",
        scene_prompt="{scene}",
    )
    assert compose_scene_prompt(demo, "") == "on the beach"
    assert compose_scene_prompt(demo, "sunset") == "on the beach, sunset"
    free = Template(id="custom", name="Custom", free_text=True, scene_prompt="a photo, {scene}")
    assert compose_scene_prompt(free, "a marble table") == "a photo, a marble table"
    assert compose_scene_prompt(None, "{product} on a table") == "on a table"
