"""Prometheus metrics of the upscaler (served when --metrics-port is set)."""

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("pia_upscale_requests_total", "Upscale requests by backend and outcome.", ["backend", "outcome"])
LATENCY = Histogram(
    "pia_upscale_latency_seconds",
    "Upscale latency, acceptance to the stored result.",
    ["backend"],
    buckets=(0.25, 0.5, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144),
)
QUEUE_DEPTH = Gauge("pia_upscale_queue_depth", "Upscale jobs waiting for the device.")
DEVICE_BUSY = Counter("pia_upscale_device_busy_seconds_total", "Seconds the device spent upscaling.")
