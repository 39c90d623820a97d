"""Every adapter switch equals a fresh load of that adapter, in any order of ranks, components and dtypes.

Adapters here differ in what a hot-swap must get right: rank (4 vs 8), components (UNet only vs UNet +
text encoder) and file dtype (fp16 file on an fp32 model). The cache has one slot, so every switch
evicts, and runs with hot-swap on and off.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.generator.messages import AdapterSpec, RenderSettings
from tests.helpers import ORDERS, write_adapter_set


@pytest.fixture(scope="module")
def adapters(tiny_world, tmp_path_factory) -> dict[str, AdapterSpec]:
    return write_adapter_set(tiny_world, tmp_path_factory.mktemp("hotswap-adapters"))


def _settings(spec: AdapterSpec) -> RenderSettings:
    return RenderSettings("a photo on the beach", "", 3, 5.0, 64, 64, "", (spec,))


def _render(pipe, spec: AdapterSpec) -> np.ndarray:
    return np.asarray(pipe(_settings(spec), (3,))[0]).astype(np.int16)


@pytest.fixture(scope="module")
def fresh_renders(tiny_world, adapters) -> dict[str, np.ndarray]:
    """Each adapter loaded alone into its own new pipeline: what every switch must reproduce."""
    from services.generator.pipeline import ProductPipeline

    out = {}
    for name, spec in adapters.items():
        out[name] = _render(ProductPipeline(str(tiny_world / "tiny-sd"), "cpu", adapter_cache_size=1), spec)
    return out


@pytest.mark.parametrize("hotswap_rank", [0, 8], ids=["reload", "hotswap"])
@pytest.mark.parametrize("order", list(ORDERS), ids=list(ORDERS))
def test_every_switch_equals_a_fresh_load(tiny_world, adapters, fresh_renders, order, hotswap_rank):
    from services.generator.pipeline import ProductPipeline

    pipe = ProductPipeline(str(tiny_world / "tiny-sd"), "cpu", adapter_cache_size=1, hotswap_rank=hotswap_rank)
    assert len({fresh_renders[n].tobytes() for n in ORDERS[order]}) == len(set(ORDERS[order]))  # they differ
    for name in ORDERS[order]:
        got = _render(pipe, adapters[name])
        diff = np.abs(got - fresh_renders[name])
        assert diff.max() <= 1, f"{name} after a switch differs from its fresh load by up to {diff.max()} levels"
    # Swapped-in weights take the model's dtype, not the file's.
    lora_dtypes = {p.dtype for n, p in pipe.pipe.unet.named_parameters() if "lora_" in n}
    assert lora_dtypes == {torch.float32}
