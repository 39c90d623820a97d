"""A thin async wrapper over the generated gRPC stubs, shared by the CLI and the web page.

No business logic here: prompts are composed by the generator (ComposePrompt), images are
fetched from the URLs the services announce.
"""

from __future__ import annotations

import asyncio
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.channel import ChannelSecurity
from productinaction.v1 import generator_pb2, generator_pb2_grpc, upscaler_pb2, upscaler_pb2_grpc

GenerateEvent = generator_pb2.GenerateEvent
UpscaleEvent = upscaler_pb2.UpscaleEvent


def describe_error(exc: BaseException) -> str:
    """A one-line, human-readable reason for a failed call."""
    if isinstance(exc, grpc.aio.AioRpcError):
        if exc.code() == grpc.StatusCode.UNAVAILABLE and "connect" in (exc.details() or "").lower():
            return "service unreachable"
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


class _Client:
    def __init__(
        self, address: str, security: ChannelSecurity | None = None, options: list[tuple[str, Any]] | None = None
    ):
        self.address = address
        self.security = security or ChannelSecurity()
        self.channel = self.security.open(address, options=options)

    async def serving(self, service: str = "", timeout: float = 2.0) -> bool:
        """True when the service's health check says SERVING."""
        try:
            reply = await health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def health(self, service: str = "", timeout: float = 2.0) -> str:
        """'SERVING', 'NOT_SERVING' (up, not ready yet: e.g. loading the model) or 'UNREACHABLE'."""
        try:
            reply = await health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.aio.AioRpcError:
            return "UNREACHABLE"
        return "SERVING" if reply.status == health_pb2.HealthCheckResponse.SERVING else "NOT_SERVING"

    async def close(self) -> None:
        await self.channel.close()


class GeneratorClient(_Client):
    def __init__(
        self,
        address: str = "localhost:50051",
        security: ChannelSecurity | None = None,
        options: list[tuple[str, Any]] | None = None,
    ):
        super().__init__(address, security, options)
        self.stub = generator_pb2_grpc.GeneratorStub(self.channel)

    async def products(self, timeout: float = 5.0) -> list[generator_pb2.Product]:
        return list((await self.stub.ListProducts(generator_pb2.ListProductsRequest(), timeout=timeout)).products)

    async def templates(
        self, product_id: str = "", category: str = "", timeout: float = 5.0
    ) -> list[generator_pb2.Template]:
        request = generator_pb2.ListTemplatesRequest(product_id=product_id, category=category)
        return list((await self.stub.ListTemplates(request, timeout=timeout)).templates)

    async def adapters(self, timeout: float = 5.0) -> list[generator_pb2.Adapter]:
        return list((await self.stub.ListAdapters(generator_pb2.ListAdaptersRequest(), timeout=timeout)).adapters)

    async def compose(
        self, request: generator_pb2.GenerateRequest, timeout: float = 5.0
    ) -> generator_pb2.ComposedPrompt:
        return await self.stub.ComposePrompt(request, timeout=timeout)

    def generate(self, request: generator_pb2.GenerateRequest, timeout: float | None = None):
        """The streaming call: iterate it for events; `.cancel()` stops the request server-side."""
        return self.stub.Generate(request, timeout=timeout)


class UpscalerClient(_Client):
    def __init__(self, address: str = "localhost:50052", security: ChannelSecurity | None = None):
        super().__init__(address, security)
        self.stub = upscaler_pb2_grpc.UpscalerStub(self.channel)

    def upscale(self, request: upscaler_pb2.UpscaleRequest, timeout: float | None = None):
        return self.stub.Upscale(request, timeout=timeout)


def generate_request(**fields: Any) -> generator_pb2.GenerateRequest:
    """Build a GenerateRequest; `adapters` may be [(adapter_id, weight), ...]; None values are left unset."""
    adapters = fields.pop("adapters", None) or []
    request = generator_pb2.GenerateRequest(**{k: v for k, v in fields.items() if v is not None})
    for adapter_id, weight in adapters:
        request.adapters.add(adapter_id=adapter_id, weight=weight)
    return request


async def events(call) -> AsyncIterator[Any]:
    async for event in call:
        yield event


def fetch_bytes(url: str, timeout: float = 30.0) -> bytes:
    """Read an announced image: file:// paths directly, http(s) (presigned S3) over HTTP."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path)).read_bytes()
    if parsed.scheme in ("http", "https"):
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    raise ValueError(f"cannot fetch {url!r}")


async def fetch_bytes_async(url: str) -> bytes:
    return await asyncio.to_thread(fetch_bytes, url)
