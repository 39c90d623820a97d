"""`python -m client catalogue validate|run|retry-failed|status|merge`: the glue between the rooms.

A run: parse and check the file against the live generator (every bad row reported at once), plan the
items, take away what is stored (the index, and the storage listing with --storage), render the rest
(and upscale what the rows ask), then write the summary, the gallery and, with --zip, the images' zip.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from client.api import GeneratorClient, UpscalerClient
from client.catalogue import spec
from client.catalogue.merge import MergeError, merge
from client.catalogue.plan import Item, Shard, check_job_id, plan_items
from client.catalogue.progress import FORMATS, reporter
from client.catalogue.remote import fetch_catalogue, is_remote, publish
from client.catalogue.replicas import Replicas
from client.catalogue.results import IndexRecord, JobDir, JobInfo, Summary
from client.catalogue.runner import Event, FlowControl, Runner, Stored
from client.channel import ChannelSecurity, security_from_args
from services.common.errors import ServiceError
from services.common.storage import ImageStore, open_store

EXIT_INTERRUPTED = 130


class CatalogueError(Exception):
    """A problem worth one line on stderr and exit status 1."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("catalogue", help="render a catalogue file (products x scenes) as one resumable job")
    csub = c.add_subparsers(dest="catalogue_command", required=True)
    v = csub.add_parser("validate", help="check a catalogue file against the generator; report every bad row")
    v.add_argument("file", type=Path)

    r = csub.add_parser("run", help="render every image of a catalogue not stored yet (run again to resume)")
    r.add_argument(
        "file", metavar="FILE|s3://BUCKET/KEY", help="the catalogue (.csv, .yaml); from S3 with --s3-endpoint"
    )
    r.add_argument("--out", type=Path, required=True, help="the job folder: index, summary, gallery")
    r.add_argument("--job", default=None, help="job id (default: the folder's, else a new one); ids derive from it")
    r.add_argument("--shard", default="0/1", metavar="I/N", help="render only shard I of N (0-based); needs --job")
    r.add_argument("--skip-bad-rows", action="store_true", help="run the good rows of a file with bad ones")
    _flow_flags(r)
    _publish_flag(r)

    f = csub.add_parser("retry-failed", help="render again only the items the last run of DIR failed")
    f.add_argument("out", type=Path)
    _flow_flags(f)
    _publish_flag(f)

    s = csub.add_parser("status", help="counts of a job folder")
    s.add_argument("out", type=Path)

    m = csub.add_parser("merge", help="the shards' folders of one job as one folder: index, summary, gallery")
    m.add_argument("out", type=Path, help="the merged job folder (not one of the shards')")
    m.add_argument("shards", type=Path, nargs="+", metavar="SHARD_DIR", help="each shard's --out folder")
    m.add_argument("--zip", action="store_true", help="also write images.zip")
    _storage_flags(m)
    _publish_flag(m)


def _storage_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage",
        default=None,
        metavar="DIR|s3://BUCKET/PREFIX",
        help="the generator's storage: listed to find what is stored (else the server's ALREADY_EXISTS tells)",
    )
    p.add_argument("--s3-endpoint", default=os.environ.get("AWS_ENDPOINT_URL"), help="S3 endpoint for --storage")


def _publish_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--publish",
        default=None,
        metavar="DIR|s3://BUCKET/PREFIX",
        help="when done, copy the job folder's files there (index, summary, gallery, zip); S3 uses --s3-endpoint",
    )


def _flow_flags(p: argparse.ArgumentParser) -> None:
    _storage_flags(p)
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight on each replica")
    p.add_argument("--attempts", type=int, default=5, help="attempts per image for faults a retry can fix")
    p.add_argument("--timeout", type=float, default=900.0, help="deadline of one image's request, in seconds")
    p.add_argument(
        "--upscaler",
        default=os.environ.get("PIA_UPSCALER_ADDRESS", "localhost:50052"),
        help="the upscaler for rows with upscale=true (it must share the generator's storage)",
    )
    p.add_argument("--zip", action="store_true", help="also write images.zip")
    p.add_argument("--log-format", choices=FORMATS, default="auto", help="auto: a bar on a terminal, else lines")


async def main(args: argparse.Namespace, client: GeneratorClient) -> int:
    try:
        if args.catalogue_command == "validate":
            return await validate(args.file, client)
        if args.catalogue_command == "status":
            return status(args.out)
        if args.catalogue_command == "merge":
            return await merge_shards(args)
        return await run(args, client)
    except (CatalogueError, MergeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


async def fetch_offer(client: GeneratorClient, products: set[str]) -> spec.Offer:
    """What the generator offers, in a few calls: products, their scenes, placement scenes, adapters."""
    listed = await client.products()
    known = {p.id for p in listed}
    everything = await client.templates()
    per_product = {p: tuple(t.id for t in await client.templates(product_id=p)) for p in sorted(products & known)}
    return spec.Offer(
        products=frozenset(known),
        product_scenes=per_product,
        placement_scenes=tuple(t.id for t in everything if t.supports_placement),
        free_text=frozenset(t.id for t in everything if t.free_text),
        adapters=frozenset(a.id for a in await client.adapters()),
    )


async def check(path: Path, client: GeneratorClient) -> spec.Catalogue:
    catalogue = spec.parse(path)
    if any(p.row == 0 for p in catalogue.problems):
        return catalogue  # the file itself is unreadable: rows mean nothing yet
    offer = await fetch_offer(client, {r.product for r in catalogue.rows if r.product})
    return spec.check_offer(catalogue, offer)


def _print_problems(catalogue: spec.Catalogue) -> None:
    for problem in catalogue.problems:
        print(f"{catalogue.path}: {problem}", file=sys.stderr)


async def validate(path: Path, client: GeneratorClient) -> int:
    catalogue = await check(path, client)
    _print_problems(catalogue)
    good = [r for r in catalogue.rows if r.number not in catalogue.bad_rows]
    images = sum(len(r.scenes) * r.images for r in good)
    bad = len(catalogue.bad_rows - {0})
    print(
        f"{len(good)} good rows ({images} images), {bad} bad rows"
        + (", file refused" if 0 in catalogue.bad_rows else "")
    )
    return 1 if catalogue.problems else 0


def new_job_id(path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-._")[:12] or "job"
    return f"{stem}-{secrets.token_hex(3)}"


async def stored_ids(store: ImageStore, job: str) -> set[str]:
    """Request ids whose image is in the store: one listing of the job's prefix, not a call per image."""
    ids = set()
    async for key in store.list(f"{job}-"):
        rid, _, name = key.partition("/")
        if name == "0.png":
            ids.add(rid)
    return ids


async def run(args: argparse.Namespace, client: GeneratorClient) -> int:
    folder = JobDir(args.out)
    info = folder.load_job()
    retry_only: set[str] | None = None
    if args.catalogue_command == "retry-failed":
        if info is None:
            raise CatalogueError(f"{args.out}: no job.json; is it a catalogue job's --out folder?")
        last = folder.read_summary()
        retry_only = {f["request_id"] for f in (last.failed if last else [])}
        if not retry_only:
            print("nothing failed in the last run")
            return 0
        source, shard, job, skip = info.catalogue, Shard.parse(info.shard), info.job, True
        args.storage = args.storage or info.storage or None
    else:
        source, skip = args.file, args.skip_bad_rows
        try:
            shard = Shard.parse(args.shard)
            given = check_job_id(args.job) if args.job else None
        except ValueError as exc:
            raise CatalogueError(str(exc)) from None
        if info is not None and given is not None and info.job != given:
            raise CatalogueError(f"{args.out} holds job {info.job!r}, not {given!r}: use another --out")
        if given is None and info is None and shard.count > 1:
            raise CatalogueError("a shard needs --job: every shard must derive the same ids")
        job = given or (info.job if info else new_job_id(Path(source)))
    try:
        path = await fetch_catalogue(source, folder.path, args.s3_endpoint) if is_remote(source) else Path(source)
    except (ValueError, ServiceError) as exc:
        raise CatalogueError(f"{source}: {getattr(exc, 'message', exc)}") from None
    options = JobOptions(
        flow=FlowControl(concurrency=args.concurrency, attempts=args.attempts, request_timeout_s=args.timeout),
        storage=args.storage or "",
        s3_endpoint=args.s3_endpoint,
        upscaler=args.upscaler,
        security=security_from_args(args),
        zip=args.zip,
    )
    loop = asyncio.get_running_loop()

    def on_plan(runner: Runner, _items: list[Item], _indexed: set[str]) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, runner.stop)

    try:
        outcome = await run_job(
            client,
            path,
            folder,
            job,
            options,
            reporter(args.log_format),
            shard,
            skip,
            retry_only,
            on_plan,
            source=source,
        )
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if outcome.summary is not None:
        print(f"{folder.index_file}, {folder.summary_file}, {folder.gallery_file}", file=sys.stderr)
        await _publish(folder, args)
    return outcome.exit_status


async def _publish(folder: JobDir, args: argparse.Namespace) -> None:
    if args.publish:
        try:
            uris = await publish(folder, args.publish, args.s3_endpoint)
        except (ValueError, ServiceError) as exc:
            raise CatalogueError(f"--publish {args.publish}: {getattr(exc, 'message', exc)}") from None
        print(f"published {len(uris)} files to {args.publish}", file=sys.stderr)


@dataclass(frozen=True)
class JobOptions:
    """How a job runs (the CLI's flags, or the web page's settings)."""

    flow: FlowControl = field(default_factory=FlowControl)
    storage: str = ""  # the generator's storage, listed to find what is stored ("" : ALREADY_EXISTS tells)
    s3_endpoint: str | None = None
    upscaler: str = "localhost:50052"
    security: ChannelSecurity | None = None
    zip: bool = False


@dataclass(frozen=True)
class JobOutcome:
    exit_status: int  # 0 every item stored, 1 failures or bad rows, 130 stopped
    summary: Summary | None  # None: nothing ran (a bad file)


def say(line: str) -> None:
    print(line, file=sys.stderr)


async def run_job(
    client: GeneratorClient,
    path: Path,
    folder: JobDir,
    job: str,
    options: JobOptions,
    report: Callable[[Event], None],
    shard: Shard = Shard(),
    skip_bad_rows: bool = False,
    retry_only: set[str] | None = None,
    on_plan: Callable[[Runner, list[Item], set[str]], None] | None = None,
    problems: Callable[[str], None] = say,
    source: str = "",
) -> JobOutcome:
    """Check, plan, resume and render one job into `folder`, then write its summary, gallery (and zip).

    `on_plan(runner, items, indexed)` is called once the items are known, before anything renders (the
    caller's hold on `runner.stop()`); `problems` gets one line per bad row or unreadable image. `source`:
    where the catalogue came from, if not `path` (an `s3://` URI: `retry-failed` reads it there again).
    """
    started = time.monotonic()
    try:
        store = open_store(options.storage, endpoint_url=options.s3_endpoint) if options.storage else None
    except ValueError as exc:
        raise CatalogueError(str(exc)) from None
    catalogue = await check(path, client)
    for problem in catalogue.problems:
        problems(f"{catalogue.path}: {problem}")
    if 0 in catalogue.bad_rows:
        return JobOutcome(1, None)
    if catalogue.problems and not skip_bad_rows:
        problems(
            f"{len(catalogue.bad_rows)} bad rows: nothing was run; fix them, or run the good rows with --skip-bad-rows"
        )
        return JobOutcome(1, None)
    good = spec.without_bad_rows(catalogue)
    folder.save_job(JobInfo(job, source if is_remote(source) else str(path.resolve()), str(shard), options.storage))

    items = plan_items(job, good.rows, shard)
    indexed = folder.read_index()
    found = await stored_ids(store, job) if store else set()
    upscaler = UpscalerClient(options.upscaler, options.security) if any(r.upscale for r in good.rows) else None
    replicas = Replicas(client.address, client.security, options.flow.concurrency)
    runner = Runner(replicas, options.flow, report, folder.append, store, uri_base=folder.uri_base(), upscaler=upscaler)
    if on_plan is not None:
        on_plan(runner, items, set(indexed))
    try:
        for item in items:
            if item.request_id in found and item.request_id not in indexed:
                folder.append(await runner.recover(item))  # stored by a run killed before it wrote the line
        indexed = folder.read_index()
        pending = [i for i in items if i.request_id not in indexed]
        # Stored, but the row's upscale is missing (a run stopped in between, or the upscale failed).
        to_upscale = [_stored(i, indexed[i.request_id]) for i in items if _needs_upscale(i, indexed)]
        if retry_only is not None:
            pending = [i for i in pending if i.request_id in retry_only]
            to_upscale = [s for s in to_upscale if s.item.request_id in retry_only]
        result = await runner.run(pending, len(items) if retry_only is None else len(pending), to_upscale)
    finally:
        await replicas.close()
        if upscaler is not None:
            await upscaler.close()

    records = _job_records(folder, items)
    skipped = [Summary.skipped(p) for p in catalogue.problems]
    summary = Summary(
        job=job,
        shard=str(shard),
        total=len(items),
        done=len(records),
        failed=[Summary.failure(f) for f in result.failed],
        skipped_rows=skipped,
        seconds=round(time.monotonic() - started, 3),
        interrupted=result.interrupted,
        rendered=sum(not s.recovered for s in result.stored),
        upscaled=sum(bool(r.upscaled_uri) for r in records),
    )
    if retry_only is not None:
        # Failures of the last full run that were not retried this time stay failed.
        previous = folder.read_summary()
        retried = {i.request_id for i in pending}
        kept = [f for f in (previous.failed if previous else []) if f["request_id"] not in retried]
        summary.failed = kept + summary.failed
    folder.write_summary(summary)
    folder.write_gallery(records, f"Catalogue job {job}" + (f", shard {shard}" if shard.count > 1 else ""))
    if options.zip and not result.interrupted:
        for unread in await folder.write_zip(records, store):
            problems(f"zip: {unread}")
    if store is not None:
        await store.close()
    if result.interrupted:
        return JobOutcome(EXIT_INTERRUPTED, summary)
    return JobOutcome(1 if summary.failed or summary.done < summary.total else 0, summary)


def _needs_upscale(item: Item, indexed: dict[str, IndexRecord]) -> bool:
    record = indexed.get(item.request_id)
    return item.row.upscale and record is not None and not record.upscaled_uri


def _stored(item: Item, r: IndexRecord) -> Stored:
    return Stored(item, r.uri, r.url, r.parameters, r.device, r.recovered, replica=r.replica)


def _job_records(folder: JobDir, items: list[Item]) -> list[IndexRecord]:
    """The index's records of this job's items (a file that lost rows keeps their lines, not their place)."""
    wanted = {i.request_id for i in items}
    return [r for r in folder.read_index().values() if r.request_id in wanted]


async def merge_shards(args: argparse.Namespace) -> int:
    """`catalogue merge`: 0 when every shard was given and every image of the job is stored, else 1."""
    store = open_store(args.storage, endpoint_url=args.s3_endpoint) if args.storage else None
    try:
        merged = await merge(args.out, args.shards, store, zip_images=args.zip)
    finally:
        if store is not None:
            await store.close()
    s = merged.summary
    for unread in merged.unread:
        print(f"zip: {unread}", file=sys.stderr)
    if merged.missing_shards:
        print(f"not given: shard(s) {', '.join(map(str, merged.missing_shards))}; their images are not in the merge")
    print(f"job {s.job}, {s.shard}: {s.done}/{s.total} stored, {len(s.failed)} failed -> {args.out}")
    await _publish(JobDir(args.out), args)
    return 0 if not merged.missing_shards and not s.failed and s.done == s.total else 1


def status(out: Path) -> int:
    folder = JobDir(out)
    info = folder.load_job()
    if info is None:
        raise CatalogueError(f"{out}: no job.json; is it a catalogue job's --out folder?")
    summary = folder.read_summary()
    stored = len(folder.read_index())
    print(f"job {info.job} (shard {info.shard}), catalogue {info.catalogue}")
    if summary is None:
        print(f"stored {stored}; no run has finished yet (run it again to resume)")
        return 0
    state = "stopped" if summary.interrupted else "finished"
    print(
        f"last run {state}: {summary.done}/{summary.total} stored, {len(summary.failed)} failed, "
        f"{len(summary.skipped_rows)} bad rows skipped, {summary.rendered} rendered in {summary.seconds:.1f}s"
        + (f", {summary.upscaled} upscaled" if summary.upscaled else "")
    )
    for f in summary.failed:
        print(f"  failed: row {f['row']} {f['subject']} {f['scene']} #{f['index']}: {f['reason']}")
    return 0
