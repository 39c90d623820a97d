"""Prometheus metrics of the generator (served when --metrics-port is set)."""

from prometheus_client import Counter, Gauge, Histogram

IMAGES = Counter("pia_images_generated_total", "Images generated and stored.", ["device"])
REQUESTS = Counter(
    "pia_requests_total",
    "Generate requests by outcome: ok, cancelled, deadline_exceeded, stalled (client stopped reading), or the "
    "status of a failure (invalid_argument, unavailable, ...).",
    ["outcome"],
)
REQUEST_LATENCY = Histogram(
    "pia_request_latency_seconds",
    "Generate request latency, acceptance to completion.",
    buckets=(0.25, 0.5, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144),
)
FIRST_IMAGE_LATENCY = Histogram(
    "pia_first_image_latency_seconds",
    "Acceptance to first image stored.",
    buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 21, 34),
)
QUEUE_DEPTH = Gauge("pia_queue_depth", "Images waiting for a device.")
DEVICE_BUSY = Counter("pia_device_busy_seconds_total", "Seconds each device spent computing jobs.", ["device"])
WORKERS_READY = Gauge("pia_workers_ready", "Workers loaded, warm and alive.")
WORKER_RESTARTS = Counter("pia_worker_restarts_total", "Workers respawned after dying.", ["device"])
WORKER_HANGS = Counter(
    "pia_worker_hangs_total", "Workers killed by the watchdog for a job far past its time.", ["device"]
)
ADAPTER_CACHE = Counter("pia_adapter_cache_total", "Adapter cache lookups on workers.", ["device", "result"])
