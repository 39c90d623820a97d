"""The generator over real gRPC: event order, storage round trips, determinism, errors."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from client.api import fetch_bytes, generate_request
from productinaction.v1 import generator_pb2 as pb
from services.common.pngmeta import read_parameters, read_text_chunks
from tests.helpers import ROOT

GRPCURL = str(Path(sys.executable).parent / "grpcurl")


async def collect(stub, request, timeout: float = 120) -> list[pb.GenerateEvent]:
    return [event async for event in stub.Generate(request, timeout=timeout)]


def kinds(events) -> list[str]:
    return [e.WhichOneof("event") for e in events]


def ready(events) -> list[pb.ImageReady]:
    return [e.image_ready for e in events if e.WhichOneof("event") == "image_ready"]


async def test_health_reports_serving(generator_stub, generator):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{generator.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "productinaction.v1.Generator"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_lists_products_templates_adapters(generator_stub):
    products = (await generator_stub.ListProducts(pb.ListProductsRequest())).products
    assert {p.id for p in products} == {"tiny-star", "tiny-mug"}
    star = next(p for p in products if p.id == "tiny-star")
    assert star.category == "tiny" and list(star.tokens) == ["<tiny-star>"]

    templates = (await generator_stub.ListTemplates(pb.ListTemplatesRequest(product_id="tiny-star"))).templates
    ids = [t.id for t in templates]
    for scene in ("flowers", "beach", "dogs", "fire", "minimal", "custom"):
        assert scene in ids
    beach = next(t for t in templates if t.id == "beach")
    assert beach.scene == "on the beach, white stones, sunny, ocean, waves, sea, water, sand"
    assert next(t for t in templates if t.id == "custom").free_text

    adapters = (await generator_stub.ListAdapters(pb.ListAdaptersRequest())).adapters
    assert [a.id for a in adapters] == ["tiny-sunset"] and adapters[0].kind == "style"


async def test_compose_prompt_uses_template_token_and_text(generator_stub):
    req = generate_request(product_id="tiny-star", template_id="beach", prompt="golden hour")
    composed = await generator_stub.ComposePrompt(req)
    assert composed.prompt == (
        "a detailed advertising realistic photo of <tiny-star> in the center, best quality, "
        "on the beach, white stones, sunny, ocean, waves, sea, water, sand, golden hour"
    )
    assert composed.negative_prompt.startswith("cheap, distorted, blur")
    custom = await generator_stub.ComposePrompt(
        generate_request(product_id="tiny-star", template_id="custom", prompt="on a marble table", negative_prompt="")
    )
    assert custom.prompt.endswith("best quality, on a marble table") and custom.negative_prompt == ""
    free = await generator_stub.ComposePrompt(generate_request(product_id="tiny-mug", prompt="{product} in snow"))
    assert free.prompt == "<tiny-mug> in snow"
    styled = await generator_stub.ComposePrompt(
        generate_request(product_id="tiny-mug", prompt="{product} in snow", adapters=[("tiny-sunset", 0.5)])
    )
    assert styled.prompt == "<tiny-mug> in snow, sunset style"  # the style adapter's trigger words


async def test_generate_streams_accepted_images_completed(generator_stub, storage_dir):
    n = 3
    req = generate_request(product_id="tiny-star", template_id="beach", num_images=n, seed=7, width=64, height=48)
    events = await collect(generator_stub, req)
    order = [k for k in kinds(events) if k not in ("progress", "queued")]
    assert order == ["accepted"] + ["image_ready"] * n + ["completed"]

    accepted = events[0].accepted
    assert len(accepted.image_uris) == n
    images = ready(events)
    assert sorted(r.index for r in images) == list(range(n))
    for r in images:
        # The announced URI is the future location given in `accepted`.
        assert r.image.uri == accepted.image_uris[r.index]
        assert r.seed == 7 + r.index and r.parameters.seed == r.seed
        assert (r.image.width, r.image.height) == (64, 48)
        assert r.image.png == b""  # not inline unless asked
        data = fetch_bytes(r.image.url)
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG" and im.size == (64, 48)
        params = read_parameters(data)
        assert params["seed"] == r.seed and params["product_id"] == "tiny-star"
        assert params["prompt"] == accepted.parameters.prompt
        a1111 = read_text_chunks(data)["parameters"]
        assert f"Seed: {r.seed}" in a1111 and "Size: 64x48" in a1111 and "Negative prompt: cheap" in a1111
        assert Path(r.image.uri.removeprefix("file://")).is_relative_to(storage_dir)
    done = events[-1].completed
    assert done.num_images == n and done.timings.total_seconds >= done.timings.first_image_seconds > 0


async def test_first_image_arrives_before_last_is_generated(generator_stub):
    # One worker renders images one after another: the first image_ready must come before the
    # last image's final denoising step, i.e. images are streamed, not delivered at the end.
    req = generate_request(product_id="tiny-mug", template_id="fire", num_images=3, seed=3, steps=6)
    events = await collect(generator_stub, req)
    first_ready = kinds(events).index("image_ready")
    last_index = ready(events)[-1].index
    last_step = max(
        i for i, e in enumerate(events) if e.WhichOneof("event") == "progress" and e.progress.index == last_index
    )
    assert first_ready < last_step


async def test_same_seed_gives_identical_bytes_and_inline_matches(generator_stub):
    req = generate_request(product_id="tiny-star", template_id="dogs", num_images=2, seed=1234, inline_images=True)
    a = ready(await collect(generator_stub, req))
    b = ready(await collect(generator_stub, req))
    by_index = {r.index: r for r in b}
    for r in a:
        assert r.image.png and r.image.png == fetch_bytes(r.image.url)
        assert r.image.png == by_index[r.index].image.png
    assert a[0].image.png != a[1].image.png  # seed + i differs per image


async def test_different_products_and_adapters_change_the_image(generator_stub):
    def req(product, **kw):
        return generate_request(
            product_id=product, template_id="beach", num_images=1, seed=99, inline_images=True, **kw
        )

    star = ready(await collect(generator_stub, req("tiny-star")))[0].image.png
    mug = ready(await collect(generator_stub, req("tiny-mug")))[0].image.png
    stacked = ready(await collect(generator_stub, req("tiny-star", adapters=[("tiny-sunset", 1.0)])))[0]
    assert star != mug
    assert stacked.image.png != star
    assert [(a.adapter_id, a.weight) for a in stacked.parameters.adapters] == [("tiny-sunset", 1.0)]
    # Back to the plain product: the cache and set_adapters give the same image again.
    assert ready(await collect(generator_stub, req("tiny-star")))[0].image.png == star


INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
BAD_INPUTS = [
    ("no product", dict(template_id="beach", num_images=1), INVALID, "product_id"),
    ("bad product id", dict(product_id="../etc", template_id="beach", num_images=1), INVALID, "product_id"),
    ("unknown product", dict(product_id="nope", template_id="beach", num_images=1), NOT_FOUND, "nope"),
    ("unknown template", dict(product_id="tiny-star", template_id="moon", num_images=1), NOT_FOUND, "moon"),
    ("no template no prompt", dict(product_id="tiny-star", num_images=1), INVALID, "prompt"),
    ("blank prompt", dict(product_id="tiny-star", prompt="   ", num_images=1), INVALID, "prompt"),
    ("custom without text", dict(product_id="tiny-star", template_id="custom", num_images=1), INVALID, "prompt"),
    ("zero images", dict(product_id="tiny-star", template_id="beach", num_images=0), INVALID, "num_images"),
    ("too many images", dict(product_id="tiny-star", template_id="beach", num_images=17), INVALID, "num_images"),
    ("too many steps", dict(product_id="tiny-star", template_id="beach", num_images=1, steps=151), INVALID, "steps"),
    (
        "negative guidance",
        dict(product_id="tiny-star", template_id="beach", num_images=1, guidance_scale=-1),
        INVALID,
        "guidance_scale",
    ),
    (
        "nan guidance",
        dict(product_id="tiny-star", template_id="beach", num_images=1, guidance_scale=float("nan")),
        INVALID,
        "guidance_scale",
    ),
    ("odd width", dict(product_id="tiny-star", template_id="beach", num_images=1, width=65), INVALID, "width"),
    ("tiny height", dict(product_id="tiny-star", template_id="beach", num_images=1, height=8), INVALID, "height"),
    (
        "too many pixels",
        dict(product_id="tiny-star", template_id="beach", num_images=1, width=4096, height=4096),
        INVALID,
        "width",
    ),
    (
        "unknown scheduler",
        dict(product_id="tiny-star", template_id="beach", num_images=1, scheduler="magic"),
        INVALID,
        "scheduler",
    ),
    ("negative seed", dict(product_id="tiny-star", template_id="beach", num_images=1, seed=-5), INVALID, "seed"),
    ("seed overflow", dict(product_id="tiny-star", template_id="beach", num_images=2, seed=2**63 - 1), INVALID, "seed"),
    (
        "bad request id",
        dict(product_id="tiny-star", template_id="beach", num_images=1, request_id="a/b"),
        INVALID,
        "request_id",
    ),
    (
        "dot-dot request id",
        dict(product_id="tiny-star", template_id="beach", num_images=1, request_id=".."),
        INVALID,
        "request_id",
    ),
    (
        "long prompt",
        dict(product_id="tiny-star", template_id="beach", num_images=1, prompt="x" * 2001),
        INVALID,
        "prompt",
    ),
    (
        "long negative",
        dict(product_id="tiny-star", template_id="beach", num_images=1, negative_prompt="x" * 2001),
        INVALID,
        "negative_prompt",
    ),
    (
        "unknown adapter",
        dict(product_id="tiny-star", template_id="beach", num_images=1, adapters=[("ghost", 1.0)]),
        NOT_FOUND,
        "ghost",
    ),
    (
        "bad adapter id",
        dict(product_id="tiny-star", template_id="beach", num_images=1, adapters=[("", 1.0)]),
        INVALID,
        "adapters[0].adapter_id",
    ),
    (
        "adapter twice",
        dict(
            product_id="tiny-star",
            template_id="beach",
            num_images=1,
            adapters=[("tiny-sunset", 1.0), ("tiny-sunset", 0.5)],
        ),
        INVALID,
        "adapters[1]",
    ),
    (
        "adapter weight",
        dict(product_id="tiny-star", template_id="beach", num_images=1, adapters=[("tiny-sunset", 9)]),
        INVALID,
        "adapters[0].weight",
    ),
    (
        "product scale",
        dict(product_id="tiny-star", template_id="beach", num_images=1, product_scale=float("inf")),
        INVALID,
        "product_scale",
    ),
    (
        "preview too often",
        dict(product_id="tiny-star", template_id="beach", num_images=1, preview_every=10_000),
        INVALID,
        "preview_every",
    ),
]


@pytest.mark.parametrize(("case", "fields", "code", "names"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
async def test_bad_input_gets_exact_status(generator_stub, case, fields, code, names):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(generator_stub, generate_request(**fields))
    assert err.value.code() == code, err.value.details()
    assert names in err.value.details()


async def test_bad_requests_do_not_hurt_the_worker(generator_stub):
    await asyncio.gather(*(test_bad_input_gets_exact_status(generator_stub, *c) for c in BAD_INPUTS[:8]))
    events = await collect(generator_stub, generate_request(product_id="tiny-star", template_id="beach", num_images=1))
    assert kinds(events)[-1] == "completed"


def _http_status(url: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_s3_storage_round_trip_through_a_real_s3_server(tiny_world, s3_server, s3_bucket):
    from services.generator.app import start_generator
    from tests.helpers import generator_settings

    settings = generator_settings(tiny_world, f"s3://{s3_bucket}/renders", s3_endpoint_url=s3_server.endpoint)
    app = await start_generator(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            from productinaction.v1 import generator_pb2_grpc

            stub = generator_pb2_grpc.GeneratorStub(channel)
            req = generate_request(
                product_id="tiny-mug", template_id="minimal", num_images=2, seed=5, request_id="s3req"
            )
            events = await collect(stub, req)
    finally:
        await app.stop()
    images = ready(events)
    assert [e for e in events[0].accepted.image_uris] == [f"s3://{s3_bucket}/renders/s3req/{i}.png" for i in range(2)]
    s3 = s3_server.client()
    for r in images:
        assert r.image.uri == f"s3://{s3_bucket}/renders/s3req/{r.index}.png"
        assert r.image.url.startswith(s3_server.endpoint) and "X-Amz-Signature" in r.image.url
        data = await asyncio.to_thread(fetch_bytes, r.image.url)  # the presigned URL works
        assert read_parameters(data)["seed"] == r.seed
        head = s3.head_object(Bucket=s3_bucket, Key=f"renders/s3req/{r.index}.png")
        assert head["ContentType"] == "image/png"
        assert head["Metadata"]["seed"] == str(r.seed) and "Seed%3A" not in head["Metadata"]["parameters"]

    # A real server checks the signature: tampered, moved to another key, or unsigned gets 403.
    url = images[0].image.url
    signature = url.split("X-Amz-Signature=")[1].split("&")[0]
    tampered = url.replace(signature, ("0" if signature[0] != "0" else "1") + signature[1:])
    other_key = url.replace(f"/s3req/{images[0].index}.png", f"/s3req/{images[1].index}.png")
    unsigned = url.split("?")[0]
    statuses = [await asyncio.to_thread(_http_status, u) for u in (url, tampered, other_key, unsigned)]
    assert statuses == [200, 403, 403, 403]
    key = f"renders/s3req/{images[0].index}.png"
    expired = s3.generate_presigned_url("get_object", Params={"Bucket": s3_bucket, "Key": key}, ExpiresIn=1)
    await asyncio.sleep(2.5)
    assert await asyncio.to_thread(_http_status, expired) == 403


async def run_cmd(*cmd: str, timeout: float = 120) -> tuple[int, str, str]:
    """Run a command without blocking the event loop the in-process servers live on."""
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


async def test_grpcurl_list_describe_and_generate(generator):
    addr = f"127.0.0.1:{generator.port}"

    async def grpcurl(*args: str) -> str:
        code, out, err = await run_cmd(GRPCURL, "-plaintext", *args)
        assert code == 0, err
        return out

    services = (await grpcurl(addr, "list")).split()
    assert {"productinaction.v1.Generator", "grpc.health.v1.Health"} <= set(services)
    described = await grpcurl(addr, "describe", "productinaction.v1.Generator")
    assert (
        "rpc Generate ( .productinaction.v1.GenerateRequest ) returns ( stream .productinaction.v1.GenerateEvent )"
        in (described)
    )
    body = json.dumps({"product_id": "tiny-star", "template_id": "beach", "num_images": 2, "seed": 11})
    stream = await grpcurl("-d", body, addr, "productinaction.v1.Generator/Generate")
    messages = [json.loads(chunk) for chunk in stream.replace("}\n{", "}\x00{").split("\x00")]
    assert "accepted" in messages[0] and "completed" in messages[-1]
    assert sum("imageReady" in m or "image_ready" in m for m in messages) == 2, stream[:2000]
    bad = json.dumps({"product_id": "nope", "prompt": "x", "num_images": 1})
    code, _, err = await run_cmd(GRPCURL, "-plaintext", "-d", bad, addr, "productinaction.v1.Generator/Generate")
    assert code != 0 and "NotFound" in err


async def test_cli_generate_then_rerun_exactly(generator, tmp_path):
    addr = f"127.0.0.1:{generator.port}"
    cli = [sys.executable, "-m", "client.cli", "--generator", addr]

    async def run(*args: str) -> str:
        code, out, err = await run_cmd(*cli, *args)
        assert code == 0, err
        return out

    assert "tiny-star" in await run("products")
    assert "beach" in await run("templates", "--product", "tiny-star")
    log = await run(
        "generate",
        "--product",
        "tiny-star",
        "--template",
        "beach",
        "-n",
        "2",
        "--seed",
        "42",
        "--prompt",
        "at dawn",
        "--adapter",
        "tiny-sunset:0.5",
        "--out",
        str(tmp_path / "a"),
    )
    assert log.index("accepted") < log.index("image 0 ready") and "completed: 2 images" in log
    first = sorted((tmp_path / "a").glob("*.png"))[0]
    rerun = await run("rerun", str(first), "--out", str(tmp_path / "b"))
    assert "warning" not in rerun
    again = next((tmp_path / "b").glob("*.png"))
    assert again.read_bytes() == first.read_bytes()
    code, _, err = await run_cmd(*cli, "generate", "--product", "nope", "--template", "beach")
    assert code == 1 and "product 'nope' not found" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1  # one clear line, as every CLI error
