"""Assembly of the generator: the worker pool first, then the gRPC server, then SERVING once warm."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from productinaction.v1 import generator_pb2, generator_pb2_grpc
from services.common.auth import ServerSecurity
from services.common.server import HostedServer, Service, serve_until_signal, start_metrics
from services.common.storage import ImageStore, open_store
from services.generator.catalog import Catalog
from services.generator.dispatch import Dispatcher
from services.generator.planning import Planner, adapter_limit
from services.generator.server import GeneratorService
from services.generator.settings import GeneratorSettings
from services.generator.workers import WorkerPool

log = logging.getLogger(__name__)

SERVICE_NAME = generator_pb2.DESCRIPTOR.services_by_name["Generator"].full_name


@dataclass
class GeneratorApp:
    settings: GeneratorSettings
    hosted: HostedServer
    pool: WorkerPool
    dispatcher: Dispatcher
    store: ImageStore
    servicer: GeneratorService
    port: int = 0

    async def stop(self, grace_s: float = 0.0) -> None:
        await self.hosted.stop(grace_s)
        await self.pool.stop()
        await self.servicer.close()
        await self.store.close()


async def start_generator(
    settings: GeneratorSettings, wait_ready: bool = True, security: ServerSecurity | None = None
) -> GeneratorApp:
    """Spawn workers, start the server (NOT_SERVING), and, if asked, wait until it is SERVING.
    `security`: already read from settings (None: read here)."""
    if security is None:
        security = ServerSecurity.from_settings(settings)  # refuses an open public port before spawning anything
    catalog = Catalog(settings.products_dir, settings.adapters_dir, settings.templates_file)
    store = open_store(
        settings.storage,
        settings.s3_endpoint_url,
        settings.s3_region,
        settings.presign_expiry_s,
        settings.storage_limits(),
    )
    hosted: HostedServer | None = None

    async def on_health(serving: bool) -> None:
        if hosted is not None:
            await hosted.set_serving(serving)

    # With compile on, the LoRA slots are built over every adapter found now (lora_slots.py); a larger-rank
    # adapter would not fit them, so it is refused by name.
    adapter_files = [str(e.adapter_path) for e in catalog.entries()]
    if rank := settings.slot_rank(adapter_files):
        catalog.limit_rank(rank)
    configs = settings.worker_configs(adapter_files)
    max_batch, batch_pixels = settings.batch_limits([c.device for c in configs])
    pool = WorkerPool(
        configs, policy=settings.worker_policy(), on_health=on_health, start_timeout_s=settings.start_timeout_s
    )
    dispatcher = Dispatcher(
        pool,
        max_queue=settings.max_queue,
        max_batch=max_batch,
        batch_pixels=batch_pixels,
        max_progress=settings.max_buffered_progress,
    )
    pool.spawn_all()
    max_adapters, why = adapter_limit(configs)
    planner = Planner(settings, catalog, store, lambda: pool.model_info, max_adapters, why)
    servicer = GeneratorService(settings, catalog, dispatcher, store, planner)
    hosted = HostedServer(
        [Service(SERVICE_NAME, servicer, generator_pb2_grpc.add_GeneratorServicer_to_server)],
        security=security,
        max_receive_bytes=settings.max_request_bytes,
    )
    app = GeneratorApp(settings, hosted, pool, dispatcher, store, servicer)
    app.port = await hosted.start(settings.host, settings.port)
    log.info(
        "generator on :%d (model %s, devices %s, %d products)",
        app.port,
        settings.model,
        settings.devices,
        len(catalog.products),
    )
    if wait_ready:
        try:
            await pool.wait_ready()
        except BaseException:
            await app.stop()
            raise
    return app


async def serve(settings: GeneratorSettings) -> None:
    security = ServerSecurity.from_settings(settings)  # read once: /metrics takes the gRPC port's tokens
    start_metrics(settings.metrics_port, settings.host, security.tokens)
    app = await start_generator(settings, security=security)
    log.info("serving")
    unrecoverable = asyncio.Event()
    app.pool.on_unrecoverable = lambda _why: unrecoverable.set()

    async def on_stop() -> None:
        await app.servicer.close()
        await app.store.close()

    serving = asyncio.create_task(
        serve_until_signal(app.hosted, settings.grace_period_s, on_stop=on_stop, drain=app.dispatcher.drain)
    )
    failed = asyncio.create_task(unrecoverable.wait())
    await asyncio.wait({serving, failed}, return_when=asyncio.FIRST_COMPLETED)
    if not serving.done():
        # No worker can ever serve again: a restart by the orchestrator is the way back.
        log.critical("%s; exiting so that the process is restarted", app.pool.unrecoverable)
        serving.cancel()
        await app.stop()
        raise SystemExit(1)
    failed.cancel()
    serving.result()
