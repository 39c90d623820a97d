"""The job folder (`--out DIR`): what a job knows about itself, kept as files a person can read.

- `job.json`: the job id, the catalogue file and the shard: what `retry-failed` and `status` read back.
- `index.jsonl`: one line per stored image, appended (and fsynced) as each is announced, so a killed run
  loses at most the line it was writing; a torn last line is skipped on reading. Runs append; readers keep
  the last line per request id.
- `summary.json`: the last run's counts, failed items with their reasons, bad rows skipped, seconds.
- `gallery.html`: static, grouped by product, each image by its URL with its parameters.
- `images.zip` (`--zip`): the images (and upscaled copies), read back through their URLs (or the store
  for s3:// URIs).
"""

from __future__ import annotations

import asyncio
import html
import json
import os
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from client.api import fetch_bytes
from client.catalogue.runner import Failure, Stored
from client.catalogue.spec import Problem
from services.common.storage import ImageStore


@dataclass(frozen=True)
class JobInfo:
    job: str
    catalogue: str
    shard: str = "0/1"
    storage: str = ""


@dataclass(frozen=True)
class IndexRecord:
    """One stored image: where it came from (row, scene, index, seed) and where it is (uri, url)."""

    request_id: str
    row: int
    product: str
    photo: str
    scene: str
    index: int
    seed: int
    uri: str
    url: str
    device: str
    recovered: bool
    upscale: bool  # the row asks for an upscaled copy too
    parameters: dict[str, Any]
    upscaled_uri: str = ""
    upscaled_url: str = ""
    replica: str = ""  # the generator replica that rendered it ("" : found stored, or an older index)

    @classmethod
    def of(cls, stored: Stored) -> IndexRecord:
        item, row = stored.item, stored.item.row
        return cls(
            item.request_id,
            row.number,
            row.product,
            row.photo_text,
            item.scene,
            item.index,
            item.seed,
            stored.uri,
            stored.url,
            stored.device,
            stored.recovered,
            row.upscale,
            stored.parameters,
            stored.upscaled_uri,
            stored.upscaled_url,
            stored.replica,
        )

    @property
    def subject(self) -> str:
        return self.product or Path(self.photo).name or self.photo


@dataclass
class Summary:
    job: str
    shard: str
    total: int
    done: int
    failed: list[dict[str, Any]] = field(default_factory=list)
    skipped_rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False
    rendered: int = 0  # by this run (the rest were stored before, or found stored)
    upscaled: int = 0  # images with their upscaled copy (rows with `upscale`)

    @staticmethod
    def failure(f: Failure) -> dict[str, Any]:
        item = f.item
        return {
            "request_id": item.request_id,
            "row": item.row.number,
            "subject": item.row.subject,
            "scene": item.scene,
            "index": item.index,
            "reason": f.reason,
        }

    @staticmethod
    def skipped(p: Problem) -> dict[str, Any]:
        return {"row": p.row, "line": p.line, "column": p.column, "problem": p.problem}


class JobDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.job_file = self.path / "job.json"
        self.index_file = self.path / "index.jsonl"
        self.summary_file = self.path / "summary.json"
        self.gallery_file = self.path / "gallery.html"
        self.zip_file = self.path / "images.zip"

    def load_job(self) -> JobInfo | None:
        try:
            return JobInfo(**json.loads(self.job_file.read_text()))
        except FileNotFoundError:
            return None

    def save_job(self, info: JobInfo) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.job_file, json.dumps(asdict(info), indent=2) + "\n")

    def read_index(self) -> dict[str, IndexRecord]:
        """{request_id: record}; the last line of an id wins; a torn line (a killed run's) is skipped."""
        records: dict[str, IndexRecord] = {}
        try:
            lines = self.index_file.read_text().splitlines()
        except FileNotFoundError:
            return records
        for line in lines:
            try:
                record = IndexRecord(**json.loads(line))
            except (ValueError, TypeError):
                continue
            records[record.request_id] = record
        return records

    def uri_base(self) -> str:
        """What stored URIs start with, from any indexed image (`{base}{request_id}/0.png`)."""
        for record in self.read_index().values():
            suffix = f"{record.request_id}/0.png"
            if record.uri.endswith(suffix):
                return record.uri.removesuffix(suffix)
        return ""

    def append(self, stored: Stored) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        line = json.dumps(asdict(IndexRecord.of(stored)), sort_keys=True) + "\n"
        # One write of one line in append mode, then fsync: the image is stored, the index must say so.
        with self.index_file.open("a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def write_index(self, records: list[IndexRecord]) -> None:
        """The whole index at once (a merge), replacing any: one line per record, in gallery order."""
        lines = [json.dumps(asdict(r), sort_keys=True) + "\n" for r in sorted(records, key=_order)]
        _write_atomic(self.index_file, "".join(lines))

    def write_summary(self, summary: Summary) -> None:
        _write_atomic(self.summary_file, json.dumps(asdict(summary), indent=2) + "\n")

    def read_summary(self) -> Summary | None:
        try:
            return Summary(**json.loads(self.summary_file.read_text()))
        except FileNotFoundError:
            return None

    def write_gallery(self, records: list[IndexRecord], title: str) -> None:
        _write_atomic(self.gallery_file, gallery_html(records, title))

    async def write_zip(self, records: list[IndexRecord], store: ImageStore | None) -> list[str]:
        """images.zip as `{subject}/{scene}-{index}-{seed}.png`; returns the problems (images it could not read)."""
        problems = []
        tmp = self.zip_file.with_suffix(".zip.tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:  # PNGs are compressed already
            for r in sorted(records, key=_order):
                try:
                    data = await read_image(r, store)
                except Exception as exc:
                    problems.append(f"{r.request_id}: {type(exc).__name__}: {exc}")
                    continue
                name = f"{_safe(r.subject)}/{_safe(r.scene)}-{r.index}-{r.seed}"
                zf.writestr(f"{name}.png", data)
                if r.upscaled_uri:
                    try:
                        zf.writestr(f"{name}.upscaled.png", await read_image(r, store, upscaled=True))
                    except Exception as exc:
                        problems.append(f"{r.request_id} (upscaled): {type(exc).__name__}: {exc}")
        tmp.replace(self.zip_file)
        return problems


async def read_image(record: IndexRecord, store: ImageStore | None, upscaled: bool = False) -> bytes:
    uri, url = (record.upscaled_uri, record.upscaled_url) if upscaled else (record.uri, record.url)
    if uri.startswith("s3://") and store is not None and store.owns(uri):
        return await store.get(uri)
    if not url:
        raise ValueError(f"no URL for {uri or record.request_id} (give --storage to read it)")
    return await asyncio.to_thread(fetch_bytes, url)


def _order(r: IndexRecord) -> tuple[Any, ...]:
    return (r.row, r.subject, r.scene, r.index)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "image"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def gallery_html(records: list[IndexRecord], title: str) -> str:
    """A static page: one section per product (or photo), each image by its URL with its parameters."""
    groups: dict[str, list[IndexRecord]] = {}
    for r in sorted(records, key=_order):
        groups.setdefault(r.subject, []).append(r)
    e = html.escape
    parts = [
        "<!doctype html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em}section{margin-bottom:2em}"
        ".grid{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0;width:260px}"
        "img{width:256px;height:auto;border:1px solid #ccc}figcaption{font-size:12px}"
        "pre{white-space:pre-wrap;font-size:11px;background:#f5f5f5;padding:4px}</style>",
        f"</head><body><h1>{e(title)}</h1><p>{len(records)} images</p>",
    ]
    for subject, rs in groups.items():
        parts.append(f'<section><h2 id="{e(_safe(subject))}">{e(subject)}</h2><div class="grid">')
        for r in rs:
            params = json.dumps(r.parameters, indent=1, sort_keys=True)
            img = f'<img src="{e(r.url)}" alt="{e(r.scene)} {r.index}" loading="lazy">' if r.url else "(no URL)"
            upscaled = f' <a href="{e(r.upscaled_url or r.upscaled_uri)}">upscaled</a>' if r.upscaled_uri else ""
            parts.append(
                f'<figure data-request-id="{e(r.request_id)}">{img}<figcaption>'
                f"<b>{e(r.scene)}</b> #{r.index}, seed {r.seed}, row {r.row}<br>"
                f"<code>{e(r.uri)}</code>{upscaled}"
                f"<details><summary>parameters</summary><pre>{e(params)}</pre></details>"
                "</figcaption></figure>"
            )
        parts.append("</div></section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
