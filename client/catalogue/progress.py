"""What a run says while it runs: a live bar on a terminal, one plain line per event otherwise, or
JSON lines (`--log-format json`) for machines. Each is a callable taking the runner's `Event`s."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import TextIO

from client.catalogue.runner import Event, Finished, ImageDone, ItemFailed, Retrying, Started, Upscaled

Reporter = Callable[[Event], None]
FORMATS = ("auto", "bar", "plain", "json")


class _Rate:
    """Images per minute over this run, and the time left at that rate."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.rendered = 0

    def per_minute(self) -> float:
        elapsed = time.monotonic() - self.started
        return 60.0 * self.rendered / elapsed if elapsed > 0 else 0.0

    def eta(self, left: int) -> str:
        rate = self.per_minute()
        if not rate:
            return "--:--"
        seconds = int(60 * left / rate)
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Plain:
    """One line per event: greppable, and what a log file or CI keeps."""

    def __init__(self, out: TextIO | None = None):
        self.out = out or sys.stdout  # read when made, so a redirected stdout (tests, wrappers) is used
        self.rate = _Rate()

    def __call__(self, event: Event) -> None:
        line = self.line(event)
        if line:
            print(line, file=self.out, flush=True)

    def line(self, event: Event) -> str:
        if isinstance(event, Started):
            return f"job: {event.total} images, {event.done} already stored, {event.pending} to render"
        if isinstance(event, ImageDone):
            s = event.stored
            self.rate.rendered += not s.recovered
            where = " ".join(filter(None, (s.replica, s.device)))
            how = "found stored" if s.recovered else f"stored ({where})" if where else "stored"
            return f"[{event.done}/{event.total}] {s.item.row.subject} {s.item.scene} #{s.item.index}: {how} {s.uri}"
        if isinstance(event, Upscaled):
            s = event.stored
            return f"upscaled: {s.item.row.subject} {s.item.scene} #{s.item.index}: {s.upscaled_uri}"
        if isinstance(event, ItemFailed):
            f = event.failure
            return f"failed: {f.item.row.subject} {f.item.scene} #{f.item.index} ({f.item.request_id}): {f.reason}"
        if isinstance(event, Retrying):
            return f"retry in {event.delay_s:.1f}s: {event.item.request_id}: {event.reason}"
        if isinstance(event, Finished):
            state = "stopped (run again to resume)" if event.interrupted else "finished"
            return f"{state}: {event.done}/{event.total} stored, {event.failed} failed, {event.seconds:.1f}s"
        return ""


class Bar(Plain):
    """A live bar on a terminal (done/total, images per minute, ETA); failures and the end get lines."""

    WIDTH = 30

    def __init__(self, out: TextIO | None = None):
        super().__init__(out or sys.stderr)
        self.done = self.total = 0

    def __call__(self, event: Event) -> None:
        if isinstance(event, Started):
            self.done, self.total = event.done, event.total
        if isinstance(event, ImageDone):
            self.rate.rendered += not event.stored.recovered
            self.done = event.done
        elif isinstance(event, ItemFailed | Finished):
            print(f"\r\033[K{self.line(event)}", file=self.out, flush=True)
            if isinstance(event, Finished):
                return
        filled = int(self.WIDTH * self.done / self.total) if self.total else self.WIDTH
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        rate, eta = self.rate.per_minute(), self.rate.eta(self.total - self.done)
        print(
            f"\r\033[K[{bar}] {self.done}/{self.total}  {rate:.1f} img/min  ETA {eta}",
            end="",
            file=self.out,
            flush=True,
        )


class JsonLines:
    """One JSON object per event, with a `type`, for machines."""

    def __init__(self, out: TextIO | None = None):
        self.out = out or sys.stdout

    def __call__(self, event: Event) -> None:
        record: dict[str, object] = {"type": type(event).__name__.lower(), "time": round(time.time(), 3)}
        if isinstance(event, Started):
            record |= {"total": event.total, "done": event.done, "pending": event.pending}
        elif isinstance(event, ImageDone):
            s = event.stored
            record |= {
                "request_id": s.item.request_id,
                "row": s.item.row.number,
                "scene": s.item.scene,
                "index": s.item.index,
                "uri": s.uri,
                "device": s.device,
                "replica": s.replica,
                "recovered": s.recovered,
                "done": event.done,
                "total": event.total,
            }
        elif isinstance(event, Upscaled):
            record |= {"request_id": event.stored.item.request_id, "uri": event.stored.upscaled_uri}
        elif isinstance(event, ItemFailed):
            record |= {"request_id": event.failure.item.request_id, "reason": event.failure.reason}
        elif isinstance(event, Retrying):
            record |= {"request_id": event.item.request_id, "reason": event.reason, "delay_s": round(event.delay_s, 3)}
        elif isinstance(event, Finished):
            record |= {
                "done": event.done,
                "failed": event.failed,
                "total": event.total,
                "seconds": round(event.seconds, 3),
                "interrupted": event.interrupted,
            }
        print(json.dumps(record), file=self.out, flush=True)


def reporter(log_format: str) -> Reporter:
    """`auto`: the bar (on stderr) when stdout is a terminal, plain lines otherwise."""
    if log_format == "json":
        return JsonLines()
    if log_format == "bar" or (log_format == "auto" and sys.stdout.isatty()):
        return Bar()
    return Plain()
