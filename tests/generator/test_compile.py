"""The compiled path on the tiny model, with inductor on the CPU (services/generator/compiled.py, lora_slots.py).

Compiling is the expensive part (about 90 CPU-seconds cold for the tiny UNet, about 10 from the cache), so
one compiled pipeline, built and warmed by a real worker loop, serves every check, and the inductor cache
lives in .cache/compile-tests: the first run on a machine compiles cold, later runs reuse it (which is the
feature under test in `test_a_second_process_reuses_the_compile_cache`).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from services.common.errors import FailedPrecondition
from services.generator.catalog import Catalog
from services.generator.compiled import compile_counters
from services.generator.messages import AdapterSpec, Ready, RenderSettings, Shutdown
from services.generator.options import CompileOptions, adapter_rank, parse_shapes, resolve_mode
from tests.helpers import ROOT

# A cold inductor compile on a busy 2-core machine can outlast the suite's 300 s per test (fixture included).
pytestmark = pytest.mark.timeout(900)
CACHE = ROOT / ".cache" / "compile-tests" / torch.__version__
WARM = (32, 32, 1)  # the one warm shape: 32², batch 1 (the UNet sees 2 with classifier-free guidance)
# Compiled and eager fp32 differ by float rounding only: at most this many levels of 255 per pixel.
TOLERANCE = 1
# A fresh process's torch thread count (read at collection, before any test sets one): compiled CPU kernels and
# their cache key depend on it, and dynamo guards on it, so the compile and every check here run with it.
THREADS = torch.get_num_threads()

_built: dict = {}


def keep_pipeline(config):
    """Worker pipeline factory that keeps the pipeline for the checks after warm-up."""
    from services.generator.pipeline import load

    _built["pipe"] = load(config)
    return _built["pipe"]


def _catalog(world: Path) -> Catalog:
    return Catalog(world / "products", world / "adapters", ROOT / "templates" / "catalog.yaml")


@pytest.fixture(scope="module")
def hotswap_adapters(tiny_world, tmp_path_factory) -> dict[str, AdapterSpec]:
    """test_hotswap's adapters: ranks 4 and 8, UNet only or with text-encoder layers, Kohya names, an fp16 file."""
    from tests.helpers import write_adapter_set

    return write_adapter_set(tiny_world, tmp_path_factory.mktemp("compile-adapters"))


def _options(world: Path, extra: dict[str, AdapterSpec]) -> CompileOptions:
    files = [str(e.adapter_path) for e in _catalog(world).entries()] + [s.path for s in extra.values()]
    # The files' names differ between runs (tmp folders), their layout and ranks do not: the graph is the same.
    return CompileOptions(mode="default", layout=tuple(sorted(files)), warm_shapes=(WARM,), cache_dir=str(CACHE))


def _settings(adapters: tuple[AdapterSpec, ...], width: int = 32, guidance: float = 5.0) -> RenderSettings:
    return RenderSettings("a photo on the beach", "", 2, guidance, width, width, "", adapters)


def _render(pipe, adapters: tuple[AdapterSpec, ...], **kw) -> np.ndarray:
    return np.asarray(pipe(_settings(adapters, **kw), (3,))[0]).astype(np.int16)


@pytest.fixture(scope="module")
def served(tiny_world, hotswap_adapters):
    """One compiled pipeline, built and warmed up by `worker_main` (on a thread), and what it reported."""
    from services.generator import worker

    # Pinned in this thread and the worker's: an earlier test in this process (tests run in any order under
    # xdist) may have set another count, in this thread or in the default that new threads start from.
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    config = worker.WorkerConfig(
        model=str(tiny_world / "tiny-sd"),
        device="cpu",
        threads=THREADS,
        pipeline=f"{__name__}:keep_pipeline",
        compile=_options(tiny_world, hotswap_adapters),
        log_level="WARNING",
    )
    parent, child = mp.Pipe()
    with pytest.MonkeyPatch.context() as mpatch:
        mpatch.setattr(worker, "configure_logging", lambda *a: None)  # keep pytest's log capture
        mpatch.setenv("OMP_NUM_THREADS", str(THREADS))  # worker_main sets it too; undone after Ready
        thread = threading.Thread(target=worker.worker_main, args=(config, child), daemon=True)
        thread.start()
        assert parent.poll(600), "the worker sent nothing within 10 minutes"
        ready = parent.recv()
        at_ready = {"counters": compile_counters(), "warmed": set(_built["pipe"].accel.warmed)}
    yield {"pipe": _built["pipe"], "ready": ready, "at_ready": at_ready}
    parent.send(Shutdown())
    thread.join(30)
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def specs(tiny_world) -> dict[str, AdapterSpec]:
    catalog = _catalog(tiny_world)
    return {
        "star": catalog.product("tiny-star").spec(1.0),
        "mug": catalog.product("tiny-mug").spec(0.8),
        "sunset": catalog.adapter("tiny-sunset").spec(0.6),
    }


@pytest.fixture(scope="module")
def eager(tiny_world):
    from services.generator.pipeline import ProductPipeline

    return ProductPipeline(str(tiny_world / "tiny-sd"), "cpu")


SWITCHES = [("star",), ("mug", "sunset"), ("star",), (), ("sunset", "star"), ("mug",)]


@pytest.mark.slow
def test_warm_up_compiles_every_shape_before_ready(served):
    # Health turns SERVING only when the pool receives Ready (test_dispatch); Ready comes after warm-up.
    assert isinstance(served["ready"], Ready)
    assert served["at_ready"]["warmed"] == {(*WARM, True)}
    assert served["at_ready"]["counters"]["graphs"] >= 1
    assert served["pipe"].accel.compile_seconds > 0


@pytest.mark.slow
def test_compiled_equals_eager_and_switches_never_recompile(served, eager, specs):
    pipe = served["pipe"]
    before = compile_counters()
    renders = {}
    torch._dynamo.config.error_on_recompile = True  # any recompilation raises
    try:
        for names in SWITCHES:
            adapters = tuple(specs[n] for n in names)
            got, want = _render(pipe, adapters), _render(eager, adapters)
            diff = np.abs(got - want).max()
            assert diff <= TOLERANCE, f"{names}: compiled differs from eager by {diff} levels"
            renders[names] = got
    finally:
        torch._dynamo.config.error_on_recompile = False
    after = compile_counters()
    assert after["graphs"] == before["graphs"] and after["recompiles"] == before["recompiles"]
    # The switches changed the images (adapters really were active), and a return gives the same image back.
    assert len({r.tobytes() for r in renders.values()}) == len(renders)
    assert np.array_equal(renders[("star",)], _render(pipe, (specs["star"],)))


@pytest.mark.slow
def test_every_switch_equals_a_fresh_load_without_recompiling(served, hotswap_adapters, tiny_world):
    """test_hotswap's orders on the compiled path: UNet layers hot-swapped into the slots, text-encoder layers
    loaded beside them (the text encoder is not compiled); every render equals a fresh eager load."""
    from services.generator.pipeline import ProductPipeline
    from tests.helpers import ORDERS

    fresh = {}
    for name, spec in hotswap_adapters.items():
        fresh[name] = _render(ProductPipeline(str(tiny_world / "tiny-sd"), "cpu", adapter_cache_size=1), (spec,))
    assert len({f.tobytes() for f in fresh.values()}) == len(fresh)
    pipe = served["pipe"]
    before = compile_counters()
    torch._dynamo.config.error_on_recompile = True
    try:
        for order, names in ORDERS.items():
            for name in names:
                diff = np.abs(_render(pipe, (hotswap_adapters[name],)) - fresh[name]).max()
                assert diff <= TOLERANCE, f"{order}: {name} differs from its fresh load by {diff} levels"
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert compile_counters()["graphs"] == before["graphs"]
    lora_dtypes = {p.dtype for n, p in pipe.pipe.unet.named_parameters() if "lora_" in n}
    assert lora_dtypes == {torch.float32}


@pytest.mark.slow
def test_a_cold_shape_renders_and_logs_its_compile(served, specs, caplog):
    pipe = served["pipe"]
    before = compile_counters()["graphs"]
    with caplog.at_level(logging.WARNING, logger="services.generator.compiled"):
        image = pipe(_settings((specs["star"],), guidance=1.0), (3,))[0]  # no CFG: the UNet sees batch 1
    assert image.size == (32, 32)
    assert compile_counters()["graphs"] == before + 1
    lines = [r.getMessage() for r in caplog.records if "cold shape" in r.getMessage()]
    assert len(lines) == 1 and "32x32x1 (no CFG)" in lines[0] and "--warm-shapes" in lines[0], lines
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="services.generator.compiled"):
        pipe(_settings((specs["mug"],), guidance=1.0), (4,))  # now warm: no compile, no log line
    assert not [r for r in caplog.records if "cold shape" in r.getMessage()]


SECOND_PROCESS = """
import json, sys
from services.generator.compiled import compile_counters
from services.generator.options import CompileOptions
from services.generator.pipeline import ProductPipeline
options = CompileOptions(**json.loads(sys.argv[2]))
pipe = ProductPipeline(sys.argv[1], "cpu", compile=options)
pipe.warmup()
print(json.dumps(compile_counters()))
"""


@pytest.mark.slow
def test_a_second_process_reuses_the_compile_cache(served, tiny_world, hotswap_adapters):
    options = _options(tiny_world, hotswap_adapters)
    fields = {**options.__dict__, "warm_shapes": [list(WARM)], "layout": list(options.layout)}
    out = subprocess.run(
        [sys.executable, "-c", SECOND_PROCESS, str(tiny_world / "tiny-sd"), json.dumps(fields)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    counters = json.loads(out.stdout.strip().splitlines()[-1])
    # Inductor found the warm shape's compiled graph in the cache dir instead of compiling it again.
    assert counters["fxgraph_cache_hit"] >= 1 and counters["fxgraph_cache_miss"] == 0, counters


def test_a_larger_rank_is_refused_at_scan_time_by_name(tiny_world, tmp_path):
    import shutil

    from safetensors.torch import save_file

    products = tmp_path / "products"
    shutil.copytree(tiny_world / "products", products)
    big = products / "tiny-big"
    shutil.copytree(products / "tiny-star", big)
    save_file(
        {"unet.x.to_q.lora_A.weight": torch.zeros(16, 8), "unet.x.to_q.lora_B.weight": torch.zeros(8, 16)},
        str(big / "pytorch_lora_weights.safetensors"),
    )
    rank = adapter_rank(products / "tiny-star" / "pytorch_lora_weights.safetensors")
    catalog = Catalog(products, tiny_world / "adapters", ROOT / "templates" / "catalog.yaml", max_rank=rank)
    assert catalog.product("tiny-star")  # within the slots' rank
    with pytest.raises(FailedPrecondition, match=rf"LoRA rank 16 is above the rank {rank}"):
        catalog.product("tiny-big")


def test_slot_rank_comes_from_the_products_or_the_setting(tiny_world):
    from services.generator.settings import GeneratorSettings

    files = [str(e.adapter_path) for e in _catalog(tiny_world).entries()]
    found = max(adapter_rank(f) for f in files)
    assert GeneratorSettings(devices="cpu:1", compile="default").slot_rank(files) == found
    assert GeneratorSettings(devices="cpu:1", compile="default", hotswap_rank=16).slot_rank(files) == 16
    assert GeneratorSettings(devices="cpu:1").slot_rank(files) == 0  # auto is off on the CPU: no limit


def test_settings_and_modes():
    from pydantic import ValidationError

    from services.generator.settings import GeneratorSettings

    assert resolve_mode("auto", "cuda:0") == "reduce-overhead" and resolve_mode("auto", "cpu:0") == "off"
    assert parse_shapes("512x512x1, 512x768x4") == ((512, 512, 1), (512, 768, 4))
    for field, bad in (("compile", "fast"), ("warm_shapes", "512x512"), ("dtype", "fp8")):
        with pytest.raises(ValidationError, match=field):
            GeneratorSettings(**{field: bad})


def test_fused_qkv_would_drop_lora_so_it_is_refused(tiny_world, specs):
    """diffusers' fuse_qkv_projections copies only the base q/k/v weights into to_qkv and its fused processor
    calls to_qkv: LoRA on to_q/to_k/to_v is silently skipped. So the service never fuses, and the benchmark
    that measures fusing refuses a LoRA UNet."""
    from diffusers import StableDiffusionPipeline

    from benchmarks.generator import fuse_qkv

    pipe = StableDiffusionPipeline.from_pretrained(tiny_world / "tiny-sd", local_files_only=True)
    pipe.load_lora_weights(specs["star"].path, adapter_name="star")
    unet = pipe.unet
    torch.manual_seed(0)
    sample = torch.randn(1, unet.config.in_channels, 8, 8)
    text = torch.randn(1, 77, unet.config.cross_attention_dim)

    def out():
        with torch.no_grad():
            return unet(sample, 10, text).sample

    with_lora = out()
    pipe.disable_lora()
    without = out()
    pipe.enable_lora()
    with pytest.raises(ValueError, match="fuse_qkv"):
        fuse_qkv(pipe)
    unet.fuse_qkv_projections()
    fused = out()
    assert not torch.allclose(with_lora, without)
    assert not torch.allclose(fused, with_lora, atol=1e-5)  # the q/k/v LoRA is gone from the fused path


@pytest.mark.slow
def test_scene_only_style_on_the_compiled_path_switches_unet_scalings_only(served, eager, specs, monkeypatch):
    """Product + scene-only style (regional.py: three UNet passes a step, weights switched between them): the
    compiled render equals eager, nothing recompiles, and the per-pass switch touches neither the adapter cache
    nor the text encoder: their work per job does not grow with the number of steps."""
    from services.generator import lora_slots, regional

    pipe = served["pipe"]
    adapters = (specs["mug"], specs["sunset"])
    assert specs["sunset"].scene_only and regional.applies(adapters)
    te_calls = []
    real = lora_slots.set_weights_and_activate_adapters
    monkeypatch.setattr(
        lora_slots, "set_weights_and_activate_adapters", lambda *a, **k: (te_calls.append(1), real(*a, **k))[1]
    )

    def job(steps: int) -> tuple[np.ndarray, int, int]:
        hits, calls = pipe.adapters.stats.hits, len(te_calls)
        settings = RenderSettings("a photo on the beach", "", steps, 5.0, 32, 32, "", adapters)
        image = np.asarray(pipe(settings, (3,))[0]).astype(np.int16)
        return image, pipe.adapters.stats.hits - hits, len(te_calls) - calls

    before = compile_counters()
    torch._dynamo.config.error_on_recompile = True
    try:
        got, hits_2, te_2 = job(2)
        _, hits_4, te_4 = job(4)
    finally:
        torch._dynamo.config.error_on_recompile = False
    want = np.asarray(eager(RenderSettings("a photo on the beach", "", 2, 5.0, 32, 32, "", adapters), (3,))[0])
    diff = np.abs(got - want.astype(np.int16)).max()
    assert diff <= TOLERANCE, f"compiled differs from eager by {diff} levels"
    after = compile_counters()
    assert after["graphs"] == before["graphs"] and after["recompiles"] == before["recompiles"]
    assert hits_4 == hits_2, f"cache lookups grow with steps: {hits_2} for 2 steps, {hits_4} for 4"
    assert te_4 == te_2, f"text-encoder activations grow with steps: {te_2} for 2 steps, {te_4} for 4"
