"""LoRA formats the generator loads: diffusers/PEFT, Kohya, cloneofsimo/lora (both module orders and the
extended conv variant), and the refusals (pickle, broken files, adapters for another base model).

Files are written by the helpers below in each format's own layout from random tensors; the expected
weight delta of every module is computed from the file, independently of services/generator/lora_formats.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import grpc
import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml
from safetensors.torch import save_file

from demo.sd15 import SD15_TEXT, SD15_UNET
from productinaction.v1 import generator_pb2 as pb
from productinaction.v1 import generator_pb2_grpc
from services.generator.embeddings import set_token_embeddings
from services.generator.lora_formats import cloneofsimo_module_names, read_adapter
from tests.helpers import generator_settings, render_product

UNET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj")
TE_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")
ATTN = ("to_q", "to_k", "to_v", "to_out.0")
TOL = 1e-5


# Helpers: files in each format's own layout


def _shape(module: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    module = getattr(module, "base_layer", module)
    if isinstance(module, nn.Conv2d):
        return module.out_channels, module.in_channels, tuple(module.kernel_size)
    return module.out_features, module.in_features, ()


def random_pairs(pipe, seed: int, std: float = 0.3) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """(component, module) -> (up [out, r], down [r, in]) with ranks 2..4, for attention, GEGLU and CLIP layers."""
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for group, suffixes in (("unet", UNET_MODULES), ("text_encoder", TE_MODULES)):
        for i, (name, module) in enumerate(getattr(pipe, group).named_modules()):
            # After an earlier test's adapter is deleted, PEFT's wrapper stays: look through it.
            if name.endswith(suffixes) and isinstance(getattr(module, "base_layer", module), nn.Linear):
                out, inp, _ = _shape(module)
                r = 2 + i % 3
                pairs[(group, name)] = (torch.randn(out, r, generator=g) * std, torch.randn(r, inp, generator=g) * std)
    return pairs


def write_peft(pairs, folder: Path) -> Path:
    from diffusers import StableDiffusionPipeline

    unet = {
        f"{n}.lora_{k}.weight": t
        for (g, n), (up, down) in pairs.items()
        if g == "unet"
        for k, t in (("A", down), ("B", up))
    }
    te = {
        f"text_model.{n}.lora_{k}.weight": t
        for (g, n), (up, down) in pairs.items()
        if g == "text_encoder"
        for k, t in (("A", down), ("B", up))
    }
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=unet, text_encoder_lora_layers=te, safe_serialization=True
    )
    return folder / "pytorch_lora_weights.safetensors"


def write_kohya(pairs, path: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Kohya naming (`lora_unet_down_blocks_1_..._to_q`) with `.alpha` = rank/2, so up carries 2x."""
    tensors = {}
    for (group, name), (up, down) in pairs.items():
        prefix = "lora_unet_" if group == "unet" else "lora_te_text_model_"
        key = prefix + name.replace(".", "_")
        r = down.shape[0]
        tensors[f"{key}.lora_down.weight"] = down.to(dtype)
        tensors[f"{key}.lora_up.weight"] = (up * 2.0).to(dtype)
        tensors[f"{key}.alpha"] = torch.tensor(r / 2.0)
    save_file(tensors, str(path))
    return path


def kohya_pairs(pairs) -> dict:
    """The deltas the Kohya file encodes, after its fp16 rounding: alpha/r * up @ down."""
    return {k: ((up * 2.0).half().float() * 0.5, down.half().float()) for k, (up, down) in pairs.items()}


def cloneofsimo_reference_order(model: nn.Module, ancestor_classes: set[str], extended: bool) -> list[str]:
    """cloneofsimo/lora's `_find_modules_v2`, ported as is: ancestors by class name, then nn.Linear (and
    nn.Conv2d when extended) inside each one, in registration order."""
    search = (nn.Linear, nn.Conv2d) if extended else (nn.Linear,)
    names = []
    for ancestor_name, ancestor in model.named_modules():
        if ancestor.__class__.__name__ in ancestor_classes:
            for fullname, module in ancestor.named_modules():
                if isinstance(module, search):
                    names.append(f"{ancestor_name}.{fullname}")
    return names


def old_order(names: list[str]) -> list[str]:
    """diffusers <= 0.14 order: in each transformer block, ff.net.0.proj right after attn1's four layers."""
    out = list(names)
    for name in names:
        if name.endswith("ff.net.0.proj"):
            block = name.removesuffix("ff.net.0.proj")
            first_attn2 = next(j for j, n in enumerate(out) if n.startswith(block + "attn2."))
            out.remove(name)
            out.insert(first_attn2, name)
    return out


def sd15_reference_order(old: bool) -> list[str]:
    """SD 1.x UNet numbering as the brief gives it: 16 blocks of 9 layers."""
    blocks = [f"down_blocks.{b}.attentions.{a}" for b in (0, 1, 2) for a in (0, 1)]
    blocks += [f"up_blocks.{b}.attentions.{a}" for b in (1, 2, 3) for a in (0, 1, 2)]
    blocks += ["mid_block.attentions.0"]
    attn1 = [f"attn1.{m}" for m in ATTN]
    attn2 = [f"attn2.{m}" for m in ATTN]
    inner = [*attn1, "ff.net.0.proj", *attn2] if old else [*attn1, *attn2, "ff.net.0.proj"]
    return [f"{b}.transformer_blocks.0.{m}" for b in blocks for m in inner]


def write_cloneofsimo(
    pipe,
    path: Path,
    unet_order: list[str],
    te_order: list[str] | None,
    seed: int,
    extended: bool = False,
    tokens: tuple[str, ...] = ("<s1>", "<s2>"),
    dtype: torch.dtype = torch.float16,
) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """A cloneofsimo/lora file: `{group}:{i}:up/down`, ranks and targets in the metadata, `<embed>` tokens.

    Returns (group, module) -> (up, down) as stored (so after the fp16 rounding)."""
    g = torch.Generator().manual_seed(seed)
    tensors, metadata, pairs = {}, {}, {}
    unet_targets = ["CrossAttention", "Attention", "GEGLU"] + (["ResnetBlock2D"] if extended else [])
    groups = [("unet", unet_order, unet_targets)]
    if te_order is not None:
        groups.append(("text_encoder", te_order, ["CLIPAttention"]))
    for group, order, targets in groups:
        metadata[group] = json.dumps(targets)
        modules = dict(getattr(pipe, group).named_modules())
        for i, name in enumerate(order):
            out, inp, kernel = _shape(modules[name])
            r = 1 + (i * 7) % 4
            if kernel:
                down = torch.randn(r, inp, *kernel, generator=g) * 0.2
                up = torch.randn(out, r, 1, 1, generator=g) * 0.2
            else:
                down = torch.randn(r, inp, generator=g) * 0.2
                up = torch.randn(out, r, generator=g) * 0.2
            tensors[f"{group}:{i}:up"], tensors[f"{group}:{i}:down"] = up.to(dtype), down.to(dtype)
            metadata[f"{group}:{i}:rank"] = str(r)
            pairs[(group, name)] = (up.to(dtype).float(), down.to(dtype).float())
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    for t in tokens:
        tensors[t] = torch.randn(width, generator=g)
        metadata[t] = "<embed>"
    save_file(tensors, str(path), metadata=metadata)
    return pairs


def expected_delta(up: torch.Tensor, down: torch.Tensor, shape) -> torch.Tensor:
    return (up.float().flatten(1) @ down.float().flatten(1)).reshape(shape)


def max_delta_error(pipe, adapter_name: str, pairs, scale: float) -> float:
    """Largest |loaded delta - scale * up @ down| over every module in `pairs`; every module must carry the adapter."""
    worst = 0.0
    with torch.no_grad():
        for (group, name), (up, down) in pairs.items():
            module = getattr(pipe, group).get_submodule(name)
            assert adapter_name in module.lora_A, f"{group}.{name} has no LoRA {adapter_name}"
            delta = module.get_delta_weight(adapter_name)
            worst = max(worst, (delta - scale * expected_delta(up, down, delta.shape)).abs().max().item())
    return worst


def load(pipe, path: Path, name: str):
    adapter = read_adapter(path, pipe)
    if adapter.embeddings:
        set_token_embeddings(pipe, adapter.embeddings)
    pipe.load_lora_weights(
        dict(adapter.weights) if isinstance(adapter.weights, dict) else adapter.weights, adapter_name=name
    )
    return adapter


# Fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a shared 2-core machine, one torch thread is several times faster than two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_world):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_world / "tiny-sd"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def orders(tiny_world) -> dict[str, list[str]]:
    """Reference numberings, from a clean copy of the tiny model (PEFT wrappers would add layers)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_world / "tiny-sd"), subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(str(tiny_world / "tiny-sd"), subfolder="text_encoder")
    default = cloneofsimo_reference_order(unet, {"CrossAttention", "Attention", "GEGLU"}, False)
    return {
        "new": default,
        "old": old_order(default),
        "extended": cloneofsimo_reference_order(unet, {"CrossAttention", "Attention", "GEGLU", "ResnetBlock2D"}, True),
        "text_encoder": cloneofsimo_reference_order(text_encoder, {"CLIPAttention"}, False),
    }


@pytest.fixture
def fresh(tiny_pipe):
    """The module's tiny pipeline, with every adapter loaded by the test removed afterwards."""
    yield tiny_pipe
    names = {n for c in (tiny_pipe.unet, tiny_pipe.text_encoder) for n in (getattr(c, "peft_config", None) or {})}
    if names:
        tiny_pipe.delete_adapters(sorted(names))


# In-process: each format loads with exact deltas


def test_peft_file_passes_through_and_loads_exactly(fresh, tmp_path):
    pairs = random_pairs(fresh, seed=1)
    path = write_peft(pairs, tmp_path)
    adapter = load(fresh, path, "peft")
    assert adapter.format == "diffusers" and adapter.weights == str(path)
    assert max_delta_error(fresh, "peft", pairs, 1.0) < TOL


def test_kohya_file_loads_with_alpha_folded(fresh, tmp_path):
    pairs = random_pairs(fresh, seed=2)
    adapter = load(fresh, write_kohya(pairs, tmp_path / "kohya.safetensors"), "kohya")
    assert adapter.format == "kohya"
    # Ranks differ per module (2..4) and alpha != rank: diffusers alone gets some attention layers wrong.
    assert max_delta_error(fresh, "kohya", kohya_pairs(pairs), 1.0) < TOL


@pytest.mark.parametrize("order", ["new", "old"])
def test_cloneofsimo_file_loads_with_exact_deltas_and_tokens(fresh, orders, tmp_path, order):
    unet_order, te_order = orders[order], orders["text_encoder"]
    assert unet_order.index("down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj") == (
        4 if order == "old" else 8
    )
    path = tmp_path / "clone.safetensors"
    pairs = write_cloneofsimo(fresh, path, unet_order, te_order, seed=3, tokens=(f"<{order}1>", f"<{order}2>"))
    adapter = load(fresh, path, f"clone-{order}")
    assert adapter.format == "cloneofsimo"
    fresh.set_adapters([f"clone-{order}"], adapter_weights=[0.6])
    assert max_delta_error(fresh, f"clone-{order}", pairs, 0.6) < TOL
    for token, row in adapter.embeddings.items():
        ids = fresh.tokenizer(token, add_special_tokens=False).input_ids
        assert len(ids) == 1
        assert torch.equal(fresh.text_encoder.get_input_embeddings().weight[ids[0]], row)


def test_cloneofsimo_extended_conv_variant(fresh, orders, tmp_path):
    unet_order = orders["extended"]
    assert any(n.endswith("conv1") for n in unet_order) and any(n.endswith("conv_shortcut") for n in unet_order)
    path = tmp_path / "extended.safetensors"
    pairs = write_cloneofsimo(fresh, path, unet_order, None, seed=4, extended=True, tokens=(), dtype=torch.float32)
    load(fresh, path, "extended")
    assert max_delta_error(fresh, "extended", pairs, 1.0) < TOL


def test_module_order_follows_the_reference_trainer(tiny_pipe, orders):
    # Also on the shared pipeline, which may hold PEFT wrappers from earlier tests by now.
    unet, targets = tiny_pipe.unet, {"Attention", "GEGLU"}
    assert cloneofsimo_module_names(unet, targets, False) == orders["new"]
    assert cloneofsimo_module_names(unet, targets, False, old_order=True) == orders["old"]
    assert cloneofsimo_module_names(unet, targets | {"ResnetBlock2D"}, True) == orders["extended"]
    assert cloneofsimo_module_names(tiny_pipe.text_encoder, {"CLIPAttention"}, False) == orders["text_encoder"]
    blocks = [
        "down_blocks.1.attentions.0",
        "up_blocks.0.attentions.0",
        "up_blocks.0.attentions.1",
        "mid_block.attentions.0",
    ]
    assert [n.split(".transformer_blocks")[0] for n in orders["new"][::9]] == blocks


# Refusals


def test_pickle_and_broken_files_are_refused(tmp_path, tiny_pipe):
    for suffix in (".bin", ".pt", ".ckpt"):
        path = tmp_path / f"lora{suffix}"
        torch.save({"x": torch.zeros(1)}, path)
        with pytest.raises(ValueError, match=r"pickle file; only \.safetensors"):
            read_adapter(path, tiny_pipe)
    fake = tmp_path / "fake.safetensors"
    torch.save({"x": torch.zeros(1)}, fake)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        read_adapter(fake, tiny_pipe)
    with pytest.raises(FileNotFoundError):
        read_adapter(tmp_path / "missing.safetensors", tiny_pipe)


def test_adapter_for_another_base_model_is_refused(tmp_path, tiny_pipe):
    # An SD 1.5-sized cross-attention LoRA (768-wide text features) against the 32-wide tiny model.
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    save_file(
        {f"unet.{name}.lora_A.weight": torch.zeros(4, 768), f"unet.{name}.lora_B.weight": torch.zeros(64, 4)},
        str(tmp_path / "peft.safetensors"),
    )
    with pytest.raises(ValueError, match=r"does not fit the base model.*wrong shape"):
        read_adapter(tmp_path / "peft.safetensors", tiny_pipe)
    save_file(
        {
            "lora_unet_down_blocks_3_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 64),
            "lora_unet_down_blocks_3_attentions_0_proj_in.lora_up.weight": torch.zeros(64, 4),
        },
        str(tmp_path / "kohya.safetensors"),
    )
    with pytest.raises(ValueError, match=r"does not fit the base model.*does not have"):
        read_adapter(tmp_path / "kohya.safetensors", tiny_pipe)
    sd15 = sd15_reference_order(old=False)
    skeleton = SimpleNamespace(unet=_sd15_unet(), text_encoder=tiny_pipe.text_encoder)
    write_cloneofsimo(skeleton, tmp_path / "clone.safetensors", sd15, None, seed=5, tokens=())
    with pytest.raises(ValueError, match="does not fit the base model: it has 144 unet LoRA layers, the model has 36"):
        read_adapter(tmp_path / "clone.safetensors", tiny_pipe)


# Offline converter


def test_convert_cli_writes_a_loadable_peft_folder(fresh, orders, tiny_world, tmp_path, capsys):
    from training.convert import main

    src = tmp_path / "clone.safetensors"
    pairs = write_cloneofsimo(fresh, src, orders["old"], orders["text_encoder"], seed=6, tokens=("<c1>", "<c2>"))
    out = tmp_path / "converted"
    assert main([str(src), str(out), "--base", str(tiny_world / "tiny-sd")]) == 0
    assert '"tokens": ["<c1>", "<c2>"]' in capsys.readouterr().out
    adapter = read_adapter(out / "pytorch_lora_weights.safetensors", fresh)
    assert adapter.format == "diffusers"
    fresh.load_lora_weights(adapter.weights, adapter_name="converted")
    assert max_delta_error(fresh, "converted", pairs, 1.0) < TOL

    kohya_pairs_ = random_pairs(fresh, seed=7)
    write_kohya(kohya_pairs_, tmp_path / "kohya.safetensors")
    assert main([str(tmp_path / "kohya.safetensors"), str(tmp_path / "from-kohya")]) == 0
    fresh.load_lora_weights(str(tmp_path / "from-kohya" / "pytorch_lora_weights.safetensors"), adapter_name="k2")
    assert max_delta_error(fresh, "k2", kohya_pairs(kohya_pairs_), 1.0) < TOL

    assert main([str(src), str(tmp_path / "no-base")]) == 1
    assert "needs the base model" in capsys.readouterr().err
    assert not (tmp_path / "no-base").exists()


# The real SD 1.5 module structure


def _sd15_unet():
    from diffusers import UNet2DConditionModel

    # Built on the meta device then given (uninitialised) memory: the LoRA deltas do not depend on
    # the base weights, and this takes a fraction of a second instead of a random init of 860M weights.
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    return unet.to_empty(device="cpu")


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """SD 1.5's UNet and 12-layer CLIP text encoder structure with the real tokenizer, in a pipeline."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from demo.tokenizer import load_clip_tokenizer

    config = CLIPTextConfig(**SD15_TEXT)
    with torch.device("meta"):
        text_encoder = CLIPTextModel(config)
    text_encoder = text_encoder.to_empty(device="cpu")
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight.normal_(0, 0.02)
    pipe = StableDiffusionPipeline(
        vae=None,  # not needed to load LoRAs
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(tmp_path_factory.mktemp("sd15-tokenizer")),
        unet=_sd15_unet(),
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    extended = cloneofsimo_reference_order(pipe.unet, {"CrossAttention", "Attention", "GEGLU", "ResnetBlock2D"}, True)
    return SimpleNamespace(pipe=pipe, extended_order=extended)


@pytest.mark.slow
@pytest.mark.parametrize("order", ["new", "old"])
def test_cloneofsimo_on_sd15_structure(sd15, tmp_path, order):
    sd15 = sd15.pipe
    te_order = [
        f"encoder.layers.{i}.self_attn.{p}" for i in range(12) for p in ("k_proj", "v_proj", "q_proj", "out_proj")
    ]
    unet_order = sd15_reference_order(old=order == "old")
    # The derived numbering is the documented one, in both orders.
    assert cloneofsimo_module_names(sd15.unet, {"Attention", "GEGLU"}, False, old_order=order == "old") == unet_order
    assert cloneofsimo_module_names(sd15.text_encoder, {"CLIPAttention"}, False) == te_order
    # The detection rule: in the old order, layer 9b+4 is GEGLU's projection, 8x the block width.
    path = tmp_path / f"sd15-{order}.safetensors"
    pairs = write_cloneofsimo(sd15, path, unet_order, te_order, seed=8, tokens=(f"<{order}-s1>", f"<{order}-s2>"))
    fourth = pairs[("unet", unet_order[4])][0]
    assert (fourth.shape[0] == 8 * 320) == (order == "old")

    adapter = load(sd15, path, f"sd15-{order}")
    error = max_delta_error(sd15, f"sd15-{order}", pairs, 1.0)
    print(f"SD 1.5 structure, {order} order: {len(pairs)} layers, max abs delta error {error:.2e}")
    assert error < TOL
    tokenizer, weight = sd15.tokenizer, sd15.text_encoder.get_input_embeddings().weight
    for token, row in adapter.embeddings.items():
        ids = tokenizer(f"a photo of {token}", add_special_tokens=False).input_ids
        assert ids[-1] == tokenizer.convert_tokens_to_ids(token) and len(ids) == 4
        assert torch.equal(weight[ids[-1]], row)
    sd15.delete_adapters(f"sd15-{order}")


@pytest.mark.slow
def test_sd15_extended_conv_variant(sd15, tmp_path):
    order, sd15 = sd15.extended_order, sd15.pipe
    # 22 ResnetBlock2D (conv1, time_emb_proj, conv2), 14 of them with a conv_shortcut (channel changes)
    assert sum(n.endswith(("conv1", "conv2", "conv_shortcut", "time_emb_proj")) for n in order) == 22 * 3 + 14
    path = tmp_path / "sd15-ext.safetensors"
    pairs = write_cloneofsimo(sd15, path, order, None, seed=9, extended=True, tokens=())
    load(sd15, path, "sd15-ext")
    error = max_delta_error(sd15, "sd15-ext", pairs, 1.0)
    print(f"SD 1.5 structure, extended: {len(pairs)} layers, max abs delta error {error:.2e}")
    assert error < TOL
    sd15.delete_adapters("sd15-ext")


# Through the real generator


def _manifest(folder: Path, adapter: str, phrase: str, tokens: list[str] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    fields = {
        "display_name": folder.name,
        "kind": "product",
        "category": "test",
        "tokens": tokens or [phrase],
        "prompt_phrase": phrase,
        "adapter": adapter,
    }
    (folder / "manifest.yaml").write_text(yaml.safe_dump(fields))


@pytest.fixture(scope="module")
async def formats_generator(tiny_world, tiny_pipe, orders, tmp_path_factory):
    """A generator whose products are the same random adapter as PEFT, Kohya and cloneofsimo files, plus bad ones."""
    from services.generator.app import start_generator

    products = tmp_path_factory.mktemp("format-products")
    pairs = random_pairs(tiny_pipe, seed=11, std=0.5)
    (products / "fmt-peft").mkdir()
    write_peft(pairs, products / "fmt-peft")
    _manifest(products / "fmt-peft", "pytorch_lora_weights.safetensors", "a red object")
    (products / "fmt-kohya").mkdir()
    # fp32, like the PEFT file, so both hold the same numbers (x2 and alpha/rank = 1/2 are exact).
    write_kohya(pairs, products / "fmt-kohya" / "kohya.safetensors", dtype=torch.float32)
    _manifest(products / "fmt-kohya", "kohya.safetensors", "a red object")
    (products / "fmt-clone").mkdir()
    write_cloneofsimo(
        tiny_pipe, products / "fmt-clone" / "lora.safetensors", orders["old"], orders["text_encoder"], seed=12
    )
    _manifest(products / "fmt-clone", "lora.safetensors", "<s1><s2>", ["<s1>", "<s2>"])
    (products / "fmt-bin").mkdir()
    torch.save({"x": torch.zeros(1)}, products / "fmt-bin" / "lora.bin")
    _manifest(products / "fmt-bin", "lora.bin", "a bin")
    (products / "fmt-fake").mkdir()
    torch.save({"x": torch.zeros(1)}, products / "fmt-fake" / "fake.safetensors")
    _manifest(products / "fmt-fake", "fake.safetensors", "a fake")
    (products / "fmt-misfit").mkdir()
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    save_file(
        {f"unet.{name}.lora_A.weight": torch.zeros(4, 768), f"unet.{name}.lora_B.weight": torch.zeros(64, 4)},
        str(products / "fmt-misfit" / "lora.safetensors"),
    )
    _manifest(products / "fmt-misfit", "lora.safetensors", "a misfit")
    storage = tmp_path_factory.mktemp("format-images")
    # One torch thread in the worker (see one_thread): patch the core count its thread share comes from.
    with mock.patch("os.cpu_count", return_value=1):
        app = await start_generator(generator_settings(tiny_world, str(storage), products_dir=str(products)))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield generator_pb2_grpc.GeneratorStub(channel)
    await app.stop()


async def render(stub, product: str, scale: float | None = None):
    return await render_product(stub, product, scale, seed=5)


async def test_generator_loads_every_format(formats_generator):
    stub = formats_generator
    listed = {p.id for p in (await stub.ListProducts(pb.ListProductsRequest())).products}
    # The .bin product is left out of the listing (logged), never handed to a worker.
    assert listed == {"fmt-peft", "fmt-kohya", "fmt-clone", "fmt-fake", "fmt-misfit"}
    plain = await render(stub, "fmt-peft", scale=0.0)
    peft = await render(stub, "fmt-peft")
    kohya = await render(stub, "fmt-kohya")
    assert np.abs(peft - plain).mean() > 2.0, "the adapter must change the image"
    assert np.abs(kohya - peft).max() <= 1, "Kohya and PEFT forms of one adapter must render alike"
    clone = await render(stub, "fmt-clone")
    assert np.abs(clone - plain).mean() > 2.0 and np.abs(clone - peft).mean() > 2.0


async def test_generator_refuses_bad_adapters_and_keeps_serving(formats_generator):
    cases = [
        ("fmt-bin", grpc.StatusCode.FAILED_PRECONDITION, "lora.bin is a pickle file; only .safetensors are accepted"),
        ("fmt-fake", grpc.StatusCode.INVALID_ARGUMENT, "fake.safetensors is not a valid safetensors file"),
        ("fmt-misfit", grpc.StatusCode.INVALID_ARGUMENT, "lora.safetensors does not fit the base model"),
    ]
    for product, code, message in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await render(formats_generator, product)
        assert err.value.code() == code and message in err.value.details(), (product, err.value.details())
    assert (await render(formats_generator, "fmt-peft")).shape == (32, 32, 3)


def test_adapter_cache_keeps_token_embeddings_per_product(fresh, orders, tmp_path):
    from services.generator.adapter_cache import AdapterCache
    from services.generator.messages import AdapterSpec

    specs = []
    for seed in (14, 15):
        path = tmp_path / f"clone{seed}.safetensors"
        write_cloneofsimo(fresh, path, orders["old"], orders["text_encoder"], seed=seed, tokens=("<p1>",))
        specs.append(AdapterSpec(key=f"clone{seed}", path=str(path), weight=1.0))
    cache = AdapterCache(fresh, capacity=4, hotswap_rank=0)
    rows = []
    for spec in (specs[0], specs[1], specs[0]):
        cache.activate((spec,))
        rows.append(
            fresh.text_encoder.get_input_embeddings().weight[fresh.tokenizer.convert_tokens_to_ids("<p1>")].clone()
        )
    assert not torch.equal(rows[0], rows[1])
    assert torch.equal(rows[0], rows[2]), "a cache hit must bring back the product's own token embedding"
