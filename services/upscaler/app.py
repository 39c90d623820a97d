"""Assembly of the upscaler: the gRPC server first (NOT_SERVING), then the model, then SERVING."""

from __future__ import annotations

import asyncio
import importlib
import logging
from dataclasses import dataclass

from productinaction.v1 import upscaler_pb2, upscaler_pb2_grpc
from services.common.auth import ServerSecurity
from services.common.server import HostedServer, Service, serve_until_signal, start_metrics
from services.common.storage import ImageStore, open_store
from services.upscaler.engine import Engine
from services.upscaler.replicate_backend import ReplicateBackend
from services.upscaler.runner import DeviceRunner
from services.upscaler.server import UpscalerService, max_request_bytes
from services.upscaler.settings import UpscalerSettings

log = logging.getLogger(__name__)

SERVICE_NAME = upscaler_pb2.DESCRIPTOR.services_by_name["Upscaler"].full_name


@dataclass
class UpscalerApp:
    settings: UpscalerSettings
    hosted: HostedServer
    runner: DeviceRunner
    replicate: ReplicateBackend
    store: ImageStore
    ready: asyncio.Task
    port: int = 0

    async def stop(self, grace_s: float = 0.0) -> None:
        self.ready.cancel()
        await asyncio.gather(self.ready, return_exceptions=True)
        await self.hosted.set_serving(False)
        await self.runner.drain(grace_s)
        await self.hosted.stop(grace_s)
        await self.runner.stop()
        await self.replicate.aclose()
        await self.store.close()


def build_engine(settings: UpscalerSettings) -> Engine:
    """The engine named by settings.engine ("module:callable"); it loads later, on the device thread."""
    module, _, name = settings.engine.partition(":")
    factory = getattr(importlib.import_module(module), name)
    return factory(model=settings.model, device=settings.device, threads=settings.threads)


async def start_upscaler(
    settings: UpscalerSettings, wait_ready: bool = True, security: ServerSecurity | None = None
) -> UpscalerApp:
    """Start the server (NOT_SERVING), load and warm the model, then report SERVING.

    With wait_ready=False it returns once the port is bound; `app.ready` finishes when SERVING.
    `security`: already read from settings (None: read here).
    """
    if security is None:
        security = ServerSecurity.from_settings(settings)  # refuses an open public port before loading anything
    store = open_store(settings.storage, settings.s3_endpoint_url, settings.s3_region, settings.presign_expiry_s)
    runner = DeviceRunner(build_engine(settings), settings.max_queue)
    replicate = ReplicateBackend(settings)
    servicer = UpscalerService(settings, store, runner, replicate)
    hosted = HostedServer(
        [Service(SERVICE_NAME, servicer, upscaler_pb2_grpc.add_UpscalerServicer_to_server)],
        security=security,
        max_receive_bytes=max_request_bytes(settings),
    )
    port = await hosted.start(settings.host, settings.port)

    async def load() -> None:
        await runner.start(settings.start_timeout_s)
        await hosted.set_serving(True)

    app = UpscalerApp(settings, hosted, runner, replicate, store, asyncio.create_task(load()), port)
    log.info(
        "upscaler on :%d (model %s, device %s, storage %s)", port, settings.model, settings.device, settings.storage
    )
    if wait_ready:
        try:
            await app.ready
        except BaseException:
            await app.stop()
            raise
    return app


async def serve(settings: UpscalerSettings) -> None:
    security = ServerSecurity.from_settings(settings)  # read once: /metrics takes the gRPC port's tokens
    start_metrics(settings.metrics_port, settings.host, security.tokens)
    app = await start_upscaler(settings, security=security)
    log.info("serving")

    async def on_stop() -> None:
        await app.runner.stop()
        await app.replicate.aclose()
        await app.store.close()

    await serve_until_signal(app.hosted, settings.grace_period_s, on_stop=on_stop, drain=app.runner.drain)
