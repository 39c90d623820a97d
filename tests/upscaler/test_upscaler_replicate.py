"""The Replicate backend against a stand-in for Replicate's predictions API (stdlib http.server on
127.0.0.1): create, poll, download the output; failures become UNAVAILABLE; no token, FAILED_PRECONDITION.
Nothing here reaches the internet."""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from PIL import Image

from productinaction.v1 import upscaler_pb2, upscaler_pb2_grpc
from services.common.pngmeta import read_text_chunks
from services.upscaler.settings import REPLICATE_VERSION
from tests.fixtures_upscaler import png_bytes, upscale, upscaler_settings

TOKEN = "r8_stand-in-token-never-logged"
REPLICATE = upscaler_pb2.UPSCALE_BACKEND_REPLICATE


class FakeReplicate(ThreadingHTTPServer):
    """Replicate's /v1/predictions, just enough: `mode` picks ok, fail (the prediction fails) or reject (HTTP 422)."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mode = "ok"
        self.predictions: dict[str, dict] = {}
        self.requests: list[dict] = []
        self.base_url = f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeReplicate

    def log_message(self, *args) -> None:
        pass

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if self.path.endswith("/cancel"):
            prediction = self.server.predictions[self.path.split("/")[3]]
            prediction["status"] = "canceled"
            return self._json(200, prediction)
        if self.server.mode == "reject":
            return self._json(422, {"title": "Invalid version", "detail": "version does not exist", "status": 422})
        ident = f"p{len(self.server.predictions)}"
        prediction = {
            "id": ident,
            "model": "mv-lab/swin2sr",
            "version": body["version"],
            "status": "starting",
            "input": body["input"],
            "output": None,
            "logs": "",
            "error": None,
            "metrics": {},
            "created_at": "2026-11-25T00:00:00Z",
            "started_at": None,
            "completed_at": None,
            "urls": {"get": f"{self.server.base_url}/v1/predictions/{ident}"},
            "_polls": 0,
        }
        self.server.predictions[ident] = prediction
        self._json(201, {k: v for k, v in prediction.items() if not k.startswith("_")})

    def do_GET(self) -> None:
        parts = self.path.strip("/").split("/")
        if parts[:2] == ["v1", "predictions"]:
            prediction = self.server.predictions[parts[2]]
            prediction["_polls"] += 1
            if prediction["_polls"] == 1:
                prediction["status"] = "processing"
            elif self.server.mode == "fail":
                prediction.update(status="failed", error="CUDA out of memory (stand-in)")
            else:
                output = f"{self.server.base_url}/files/{parts[2]}.png"
                prediction.update(status="succeeded", output=output)
            return self._json(200, {k: v for k, v in prediction.items() if not k.startswith("_")})
        if parts[0] == "files":
            data_uri = self.server.predictions[parts[1].removesuffix(".png")]["input"]["image"]
            with Image.open(io.BytesIO(base64.b64decode(data_uri.split(",", 1)[1]))) as im:
                out = im.resize((im.width * 4, im.height * 4), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            out.save(buf, format="PNG")
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(buf.tell()))
            self.end_headers()
            self.wfile.write(buf.getvalue())
            return None
        self._json(404, {"detail": "not found"})


@pytest.fixture(scope="module")
def fake_replicate():
    server = FakeReplicate()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def replicate(fake_replicate, monkeypatch):
    fake_replicate.mode = "ok"
    fake_replicate.requests.clear()
    monkeypatch.setenv("REPLICATE_API_TOKEN", TOKEN)
    return fake_replicate


@pytest.fixture(scope="module")
async def replicate_upscaler(fake_replicate, tmp_path_factory):
    from services.upscaler.app import start_upscaler

    storage = tmp_path_factory.mktemp("replicate-images")
    settings = upscaler_settings(
        "bicubic",
        str(storage),
        engine="tests.fixtures_upscaler:BicubicEngine",
        replicate_base_url=fake_replicate.base_url,
    )
    app = await start_upscaler(settings)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield storage, upscaler_pb2_grpc.UpscalerStub(channel)
    await app.stop()


async def test_replicate_creates_polls_downloads_and_stores(replicate, replicate_upscaler, caplog):
    storage, stub = replicate_upscaler
    source = png_bytes((20, 12), mode="RGBA", seed=9)
    with caplog.at_level(logging.DEBUG):
        events = await upscale(
            stub, upscaler_pb2.UpscaleRequest(image=source, backend=REPLICATE, request_id="rep-1", inline_image=True)
        )
    assert [e.WhichOneof("event") for e in events] == [
        "accepted",
        "progress",
        "progress",
        "image_ready",
        "completed",
    ]
    ready = events[3].image_ready
    assert ready.backend == "replicate" and ready.scale == 4
    assert (ready.image.width, ready.image.height) == (80, 48)
    assert ready.image.uri == (storage / "rep-1" / "upscaled.x4.png").as_uri()
    with Image.open(io.BytesIO(ready.image.png)) as im:
        assert im.mode == "RGBA"  # alpha restored locally: Replicate's model is RGB-only

    (create,) = [r for r in replicate.requests if r["path"] == "/v1/predictions"]
    assert create["auth"] == f"Bearer {TOKEN}"
    assert create["body"]["version"] == REPLICATE_VERSION
    assert create["body"]["input"]["task"] == "classical_sr"
    assert create["body"]["input"]["image"].startswith("data:image/png;base64,")
    assert "replicate:mv-lab/swin2sr" in read_text_chunks(ready.image.png)["upscaler"]
    assert TOKEN not in caplog.text


async def test_replicate_failure_is_unavailable_with_its_message(replicate, replicate_upscaler):
    _, stub = replicate_upscaler
    replicate.mode = "fail"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await upscale(stub, upscaler_pb2.UpscaleRequest(image=png_bytes((8, 8)), backend=REPLICATE))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "CUDA out of memory (stand-in)" in info.value.details()


async def test_replicate_rejection_is_unavailable_with_its_message(replicate, replicate_upscaler):
    _, stub = replicate_upscaler
    replicate.mode = "reject"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await upscale(stub, upscaler_pb2.UpscaleRequest(image=png_bytes((8, 8)), backend=REPLICATE))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "version does not exist" in info.value.details() and "422" in info.value.details()


async def test_no_token_is_failed_precondition(replicate, replicate_upscaler, monkeypatch):
    _, stub = replicate_upscaler
    monkeypatch.delenv("REPLICATE_API_TOKEN")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await upscale(stub, upscaler_pb2.UpscaleRequest(image=png_bytes((8, 8)), backend=REPLICATE))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "REPLICATE_API_TOKEN" in info.value.details()
    assert replicate.requests == []  # nothing was sent


async def test_replicate_only_does_x4(replicate, replicate_upscaler):
    _, stub = replicate_upscaler
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await upscale(stub, upscaler_pb2.UpscaleRequest(image=png_bytes((8, 8)), backend=REPLICATE, scale=2))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("scale:")
