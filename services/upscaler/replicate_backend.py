"""Replicate's hosted mv-lab/swin2sr, as an optional backend.

The version is pinned and the task set explicitly (settings.replicate_task), so results do not
change under us. The token comes from REPLICATE_API_TOKEN in the server's environment, read per
request and never logged. The output URL is downloaded with httpx; the servicer then stores it
like a local result.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time

import httpx

from services.common.errors import FailedPrecondition, ResourceExhausted, Unavailable
from services.upscaler.settings import UpscalerSettings

log = logging.getLogger(__name__)

TOKEN_ENV = "REPLICATE_API_TOKEN"
# mv-lab/swin2sr upscales x4 in every task.
SCALE = 4
TERMINAL = ("succeeded", "failed", "canceled")


class ReplicateBackend:
    def __init__(self, settings: UpscalerSettings):
        self.settings = settings
        self.in_flight = 0
        # Shared by every request's client, so connections are pooled and closed on stop.
        self._transport = httpx.AsyncHTTPTransport(retries=1)

    def token(self) -> str:
        token = os.environ.get(TOKEN_ENV, "").strip()
        if not token:
            raise FailedPrecondition(f"the replicate backend needs {TOKEN_ENV} in the upscaler's environment")
        return token

    def reserve(self) -> None:
        """Count a prediction in flight; RESOURCE_EXHAUSTED beyond the concurrency limit."""
        if self.in_flight >= self.settings.replicate_max_concurrency:
            raise ResourceExhausted(
                f"{self.in_flight} Replicate predictions already in flight",
                retry_after_s=self.settings.replicate_poll_s,
            )
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1

    async def upscale(self, png: bytes, request_id: str) -> bytes:
        """PNG bytes in, the prediction's output image bytes out. UNAVAILABLE on any Replicate failure."""
        # An optional backend: its client loads with the first Replicate request, not with every server.
        import replicate
        from replicate.exceptions import ReplicateError  # as above: the optional Replicate client

        s = self.settings
        client = replicate.Client(
            api_token=self.token(),
            base_url=s.replicate_base_url or None,
            timeout=httpx.Timeout(30.0, connect=10.0),
            transport=self._transport,
        )
        client.poll_interval = s.replicate_poll_s
        image = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        prediction = None
        try:
            prediction = await client.predictions.async_create(
                version=s.replicate_version, input={"image": image, "task": s.replicate_task}
            )
            log.info(
                "replicate prediction %s created (%s, task %s)", prediction.id, s.replicate_model, s.replicate_task
            )
            deadline = time.monotonic() + s.replicate_timeout_s
            while prediction.status not in TERMINAL:
                if time.monotonic() > deadline:
                    raise Unavailable(f"Replicate prediction {prediction.id} took over {s.replicate_timeout_s:.0f}s")
                await asyncio.sleep(s.replicate_poll_s)
                await prediction.async_reload()
        except asyncio.CancelledError:
            if prediction is not None and prediction.status not in TERMINAL:
                # Best effort, so an abandoned request stops costing money.
                await asyncio.shield(_cancel(prediction))
            raise
        except ReplicateError as exc:
            raise Unavailable(f"Replicate refused the prediction: {_describe(exc)}") from None
        except httpx.HTTPError as exc:
            raise Unavailable(f"Replicate is unreachable: {type(exc).__name__}") from None
        if prediction.status != "succeeded":
            raise Unavailable(
                f"Replicate prediction {prediction.id} {prediction.status}: {prediction.error or 'no reason'}"
            )
        url = _output_url(prediction.output)
        if url is None:
            raise Unavailable(f"Replicate prediction {prediction.id} returned no image URL")
        return await self._download(url)

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def _download(self, url: str) -> bytes:
        limit = self.settings.replicate_max_output_bytes
        try:
            async with (
                httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=10.0), follow_redirects=True) as http,
                http.stream("GET", url) as resp,
            ):
                if resp.status_code != 200:
                    raise Unavailable(f"downloading Replicate's output failed: HTTP {resp.status_code}")
                chunks, size = [], 0
                async for chunk in resp.aiter_bytes():
                    size += len(chunk)
                    if size > limit:
                        raise Unavailable(f"Replicate's output is larger than {limit} bytes")
                    chunks.append(chunk)
        except httpx.HTTPError as exc:
            raise Unavailable(f"downloading Replicate's output failed: {type(exc).__name__}") from None
        return b"".join(chunks)


def _output_url(output) -> str | None:
    if isinstance(output, list):
        output = output[-1] if output else None
    return output if isinstance(output, str) and output.startswith(("https://", "http://")) else None


def _describe(exc) -> str:
    parts = [p for p in (exc.title, exc.detail) if p]
    return (" - ".join(parts) or "no details") + (f" (HTTP {exc.status})" if exc.status else "")


async def _cancel(prediction) -> None:
    try:
        await prediction.async_cancel()
    except Exception as exc:
        log.warning("could not cancel Replicate prediction %s: %s", prediction.id, type(exc).__name__)
