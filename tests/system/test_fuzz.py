"""Property-based fuzzing of both services' requests: every field of GenerateRequest and
UpscaleRequest (read from the descriptors, so new fields are fuzzed too), and raw malformed bytes.

Only documented statuses may come back, never UNKNOWN or INTERNAL, and the servers still answer
afterwards. The servers run on their own event loop in a thread, so hypothesis drives plain
synchronous calls. `PIA_FUZZ_EXAMPLES` scales the case counts (default: 1,050 cases in all).
"""

from __future__ import annotations

import asyncio
import io
import os
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from productinaction.v1 import generator_pb2, generator_pb2_grpc, upscaler_pb2, upscaler_pb2_grpc
from services.generator.messages import SCHEDULERS
from tests.fixtures_upscaler import upscaler_settings
from tests.helpers import STANDIN, generator_settings

SCALE = float(os.environ.get("PIA_FUZZ_EXAMPLES", "1"))
# The statuses the protos and docs promise; anything else (UNKNOWN, INTERNAL) is a bug.
DOCUMENTED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAVAILABLE,
}
settings.register_profile(
    "fuzz",
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


def examples(n: int) -> settings:
    return settings(settings.get_profile("fuzz"), max_examples=max(1, int(n * SCALE)))


def _png(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 40, 90)).save(out, "PNG")
    return out.getvalue()


# Field-aware values where a uniform draw would almost never reach the interesting cases.
TEXT = st.text(max_size=40)
IDS = st.sampled_from(["", "tiny-star", "tiny-mug", "tiny-sunset", "nope", "../x", "a\n", ".hidden", "-x", "a" * 65])
HINTS = {
    "product_id": IDS | TEXT,
    "template_id": st.sampled_from(["", "beach", "custom", "studio", "nope"]) | TEXT,
    "adapter_id": IDS | TEXT,
    "request_id": IDS | TEXT | st.uuids().map(lambda u: u.hex),
    "scheduler": st.sampled_from(["", *SCHEDULERS]) | TEXT,
    "prompt": TEXT | st.sampled_from(["{product} on a table", "x" * 2001, "fail", "{product}"]),
    "width": st.sampled_from([0, 8, 16, 18, 24, 32, 64, 65, 128, 4096, 2**32 - 1]) | st.integers(0, 2**32 - 1),
    "height": st.sampled_from([0, 8, 16, 18, 24, 32, 64, 65, 128, 4096, 2**32 - 1]) | st.integers(0, 2**32 - 1),
    "num_images": st.integers(0, 6) | st.sampled_from([16, 17, 2**32 - 1]),
    "steps": st.integers(0, 10) | st.sampled_from([150, 151, 2**32 - 1]),
    "preview_every": st.integers(0, 4) | st.sampled_from([151, 2**32 - 1]),
    "tile_size": st.sampled_from([0, 1, 15, 16, 64, 1024, 2**32 - 1]) | st.integers(0, 2**32 - 1),
    "scale": st.sampled_from([0, 1, 2, 3, 4, 8, 2**32 - 1]),
    "image": st.sampled_from([_png((12, 9)), _png((600, 600)), b"", b"\x89PNG\r\n\x1a\n", b"GIF89a"])
    | st.binary(max_size=64),
    "uri": st.sampled_from(["", "file:///etc/passwd", "s3://pia-test/a/0.png", "https://example.com/0.png", "file://"])
    | TEXT,
}
FLOATS = st.floats(width=32) | st.sampled_from([0.0, -4.0, 4.0, 4.0001, 7.5, 50.0, 51.0])
INTEGERS = {
    "TYPE_INT32": st.integers(-(2**31), 2**31 - 1),
    "TYPE_INT64": st.integers(-(2**63), 2**63 - 1),
    "TYPE_UINT32": st.integers(0, 2**32 - 1),
    "TYPE_UINT64": st.integers(0, 2**64 - 1),
}


BASES = {
    "productinaction.v1.GenerateRequest": generator_pb2.GenerateRequest(
        product_id="tiny-star", template_id="beach", num_images=1, steps=2, width=32, height=32
    ),
    "productinaction.v1.UpscaleRequest": upscaler_pb2.UpscaleRequest(image=_png((12, 9)), tile_size=32),
}


def message_strategy(cls, depth: int = 0) -> st.SearchStrategy:
    """Every field of `cls`, each left unset or drawn: optional, repeated and oneof fields included."""
    from google.protobuf.descriptor import FieldDescriptor

    types = {v: k for k, v in vars(FieldDescriptor).items() if k.startswith("TYPE_")}
    fields = {}
    for fd in cls.DESCRIPTOR.fields:
        kind = types[fd.type]
        if fd.name in HINTS:
            value = HINTS[fd.name]
        elif kind == "TYPE_MESSAGE":
            value = message_strategy(fd.message_type._concrete_class, depth + 1) if depth < 2 else st.nothing()
        elif kind == "TYPE_ENUM":
            value = st.sampled_from([v.number for v in fd.enum_type.values] + [99, -1])
        elif kind in ("TYPE_FLOAT", "TYPE_DOUBLE"):
            value = FLOATS
        elif kind == "TYPE_BOOL":
            value = st.booleans()
        elif kind == "TYPE_STRING":
            value = TEXT
        elif kind == "TYPE_BYTES":
            value = st.binary(max_size=64)
        else:
            value = INTEGERS.get(kind, st.integers(0, 2**31 - 1))
        if fd.is_repeated:
            value = st.lists(value, max_size=9)
        fields[fd.name] = value
    base = BASES.get(cls.DESCRIPTOR.full_name, cls())

    @st.composite
    def build(draw):
        # Either every field drawn freely, or a valid request with a few fields changed: the second
        # reaches past validation, into rendering and storage.
        from_base = draw(st.booleans())
        message = cls()
        if from_base:
            message.CopyFrom(base)
        for name, strategy in fields.items():
            if not (draw(st.integers(0, 5)) == 0 if from_base else draw(st.booleans())):
                continue
            value = draw(strategy)
            field = cls.DESCRIPTOR.fields_by_name[name]
            if field.is_repeated:
                message.ClearField(name)
                getattr(message, name).extend(value)
            elif field.type == field.TYPE_MESSAGE:
                getattr(message, name).CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return build()


class Servers:
    """A stand-in generator and a tiny upscaler on an event loop of their own (a thread)."""

    def __init__(self, world: Path, swin2sr: Path, tmp: Path):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-servers", daemon=True)
        self.thread.start()
        self.world, self.swin2sr, self.tmp = world, swin2sr, tmp

    def run(self, coro, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def start(self) -> None:
        from services.generator.app import start_generator
        from services.upscaler.app import start_upscaler

        images = str(self.tmp / "images")
        self.generator = await start_generator(
            generator_settings(
                self.world,
                images,
                model="standin:step=0",
                worker_pipeline=STANDIN,
                default_size=0,
                max_images=4,
                max_steps=8,
                max_pixels=128 * 128,
                stall_timeout_s=30,
            )
        )
        self.upscaler = await start_upscaler(upscaler_settings(self.swin2sr, images, max_pixels=64 * 64))

    async def stop(self) -> None:
        await self.generator.stop()
        await self.upscaler.stop()


@pytest.fixture(scope="module")
def servers(tiny_world, tiny_swin2sr, tmp_path_factory):
    s = Servers(tiny_world, tiny_swin2sr, tmp_path_factory.mktemp("fuzz"))
    s.run(s.start())
    gen = grpc.insecure_channel(f"127.0.0.1:{s.generator.port}")
    up = grpc.insecure_channel(f"127.0.0.1:{s.upscaler.port}")
    s.gen_channel, s.up_channel = gen, up
    s.gen_stub, s.up_stub = generator_pb2_grpc.GeneratorStub(gen), upscaler_pb2_grpc.UpscalerStub(up)
    yield s
    gen.close()
    up.close()
    s.run(s.stop())
    s.loop.call_soon_threadsafe(s.loop.stop)
    s.thread.join(10)


def outcome(call) -> grpc.StatusCode:
    """Reads the whole stream; the status it ended with. An OK stream must end with `completed`."""
    try:
        events = list(call)
    except grpc.RpcError as err:
        assert err.code() in DOCUMENTED, (err.code(), err.details())
        assert err.details(), "a refusal must say what is wrong"
        return err.code()
    assert events and events[-1].WhichOneof("event") == "completed", events[-1:]
    return grpc.StatusCode.OK


def still_answers(channel: grpc.Channel) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_fuzz_generate_request_fields(servers):
    seen: set = set()

    @examples(450)
    @given(message_strategy(generator_pb2.GenerateRequest))
    def check(request):
        seen.add(outcome(servers.gen_stub.Generate(request, timeout=60)))

    check()
    still_answers(servers.gen_channel)
    valid = generator_pb2.GenerateRequest(product_id="tiny-star", template_id="beach", num_images=2, steps=2)
    assert outcome(servers.gen_stub.Generate(valid, timeout=60)) == grpc.StatusCode.OK
    # The draws reached past validation as well as into it.
    assert {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND} <= seen, seen


def test_fuzz_upscale_request_fields(servers):
    seen: set = set()

    @examples(300)
    @given(message_strategy(upscaler_pb2.UpscaleRequest))
    def check(request):
        seen.add(outcome(servers.up_stub.Upscale(request, timeout=60)))

    check()
    still_answers(servers.up_channel)
    ok = upscaler_pb2.UpscaleRequest(image=_png((12, 9)))
    assert outcome(servers.up_stub.Upscale(ok, timeout=60)) == grpc.StatusCode.OK
    assert {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT} <= seen, seen


VALID_GENERATE = generator_pb2.GenerateRequest(
    product_id="tiny-star", template_id="beach", prompt="on sand", num_images=1, steps=1, request_id="r1"
).SerializeToString()
VALID_UPSCALE = upscaler_pb2.UpscaleRequest(uri="file:///x.png", request_id="r1", tile_size=32).SerializeToString()


def mangled(valid: bytes) -> st.SearchStrategy[bytes]:
    """Random bytes, and a valid message truncated, bit-flipped or with invalid UTF-8 spliced in."""
    truncated = st.integers(1, len(valid) - 1).map(lambda n: valid[:n])
    flipped = st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 7)).map(
        lambda p: valid[: p[0]] + bytes([valid[p[0]] ^ (1 << p[1])]) + valid[p[0] + 1 :]
    )
    bad_utf8 = st.binary(min_size=1, max_size=8).map(lambda b: b"\x0a" + bytes([len(b) + 2]) + b"\xc3\x28" + b)
    varint = st.just(b"\x28\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff")  # field 5, a varint that never ends
    return st.binary(max_size=80) | truncated | flipped | bad_utf8 | varint


@pytest.mark.parametrize(
    ("service", "method", "valid"),
    [
        ("generator", "/productinaction.v1.Generator/Generate", VALID_GENERATE),
        ("upscaler", "/productinaction.v1.Upscaler/Upscale", VALID_UPSCALE),
    ],
)
def test_fuzz_raw_malformed_bytes(servers, service, method, valid):
    channel = servers.gen_channel if service == "generator" else servers.up_channel
    events = generator_pb2.GenerateEvent if service == "generator" else upscaler_pb2.UpscaleEvent
    # No request serializer: the bytes go on the wire exactly as drawn.
    call = channel.unary_stream(method, response_deserializer=events.FromString)
    seen: set = set()

    @examples(150)
    @given(mangled(valid))
    def check(data):
        seen.add(outcome(call(data, timeout=60)))

    check()
    assert grpc.StatusCode.INVALID_ARGUMENT in seen
    still_answers(channel)
