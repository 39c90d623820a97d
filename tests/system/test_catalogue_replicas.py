"""Catalogue jobs on two generator processes (the embedded tiny model) storing into SeaweedFS: complete,
each image stored once and spread over both replicas; a replica SIGKILLed mid-job; the runner SIGKILLed
mid-job and started again; two shards at once.

"Stored once" is counted in the bucket (the generator's puts are create-only, so a second store of a key
would fail, not overwrite); "rendered" is counted by each replica's own Prometheus counters.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from client import cli
from tests.helpers import ROOT, Replica, start_replica, until, wait_serving

pytestmark = pytest.mark.slow

SCENES = 5  # `all` for the tiny category: flowers, beach, dogs, fire, minimal (custom is free text)
PHOTO = ROOT / "demo" / "catalogue-photo.png"
CATALOGUE = f"""product,photo,scenes,images
tiny-star,,all,2
tiny-mug,,all,2
,{PHOTO},beach,2
"""
ITEMS = 2 * SCENES * 2 + 2


@pytest.fixture(scope="module")
async def stack(tiny_world, tmp_path_factory, s3_server):
    """Two replicas of one deployment: the same model and bucket, their own processes and ports."""
    root = tmp_path_factory.mktemp("catalogue-replicas")
    storage = f"s3://{s3_server.bucket('catalogue-replicas')}/renders"
    # 6 steps (about 0.3 s an image): a job lasts long enough to be killed part-way.
    flags = {"s3-endpoint-url": s3_server.endpoint, "default-steps": 6}
    replicas = [start_replica(tiny_world, storage, root / f"replica-{i}.log", **flags) for i in range(2)]
    try:
        await wait_serving(replicas)
        yield replicas, storage, s3_server
    finally:
        for r in replicas:
            r.kill()


def target(replicas: list[Replica]) -> str:
    return "ipv4:" + ",".join(r.address for r in replicas)


def stored_keys(s3, storage: str, job: str) -> list[str]:
    """Every object under the job's ids in the bucket (a key stored twice would be listed once: puts are
    create-only, so a second put fails instead)."""
    bucket, _, prefix = storage.removeprefix("s3://").partition("/")
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/{job}-")
    return sorted(o["Key"].removeprefix(f"{prefix}/") for page in pages for o in page.get("Contents", []))


def index(out: Path) -> list[dict]:
    path = out / "index.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def requests_ended(replicas: list[Replica]) -> float:
    """Generate requests the replicas have ended (stored, refused, cancelled), all together."""
    return sum([(await asyncio.to_thread(r.counters))["requests"] for r in replicas])


def run_argv(replicas: list[Replica], storage: str, s3, catalogue: Path, out: Path, job: str, *extra: str) -> list[str]:
    run = ["--generator", target(replicas), "catalogue", "run", str(catalogue), "--out", str(out), "--job", job]
    flags = ["--storage", storage, "--s3-endpoint", s3.endpoint, "--concurrency", "2", "--log-format", "json"]
    return run + flags + list(extra)


def write(tmp_path: Path) -> Path:
    path = tmp_path / "catalogue.csv"
    path.write_text(CATALOGUE)
    return path


async def test_a_catalogue_over_two_replicas_stores_every_image_once(stack, tmp_path, capsys):
    replicas, storage, s3 = stack
    out = tmp_path / "out"
    before = [await asyncio.to_thread(r.counters) for r in replicas]
    argv = run_argv(replicas, storage, s3, write(tmp_path), out, "whole", "--zip")
    assert await cli._main(cli._parser().parse_args(argv)) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[-1] == {**events[-1], "type": "finished", "done": ITEMS, "failed": 0}

    records = index(out)
    ids = [r["request_id"] for r in records]
    assert len(ids) == len(set(ids)) == ITEMS
    assert stored_keys(s3, storage, "whole") == sorted(f"{i}/0.png" for i in ids)
    assert {(r["product"] or "photo", r["scene"]) for r in records} >= {("tiny-star", "fire"), ("tiny-mug", "dogs")}
    placed = [r for r in records if r["photo"]]
    assert len(placed) == 2 and all(r["parameters"]["placement"] for r in placed), placed[0]["parameters"]
    assert all(r["uri"] == f"{storage}/{r['request_id']}/0.png" for r in records)

    # Rendered once each, by both replicas (their counters and the index agree).
    after = [await asyncio.to_thread(r.counters) for r in replicas]
    rendered = [int(a["images"] - b["images"]) for a, b in zip(after, before, strict=True)]
    assert sum(rendered) == ITEMS and min(rendered) > 0, rendered
    per_replica = {r.address: sum(rec["replica"] == r.address for rec in records) for r in replicas}
    assert list(per_replica.values()) == rendered, per_replica

    gallery = (out / "gallery.html").read_text()
    assert all(f'data-request-id="{i}"' in gallery for i in ids)
    sections = re.findall(r"<h2[^>]*>([^<]+)</h2>", gallery)
    assert sections == ["tiny-star", "tiny-mug", PHOTO.name], sections  # one per product (or photo), row order
    with zipfile.ZipFile(out / "images.zip") as zf:
        assert len(zf.namelist()) == ITEMS and all(zf.read(n)[:8] == b"\x89PNG\r\n\x1a\n" for n in zf.namelist())


async def test_the_runner_killed_mid_job_resumes_rendering_only_what_is_missing(stack, tmp_path):
    replicas, storage, s3 = stack
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "client", *run_argv(replicas, storage, s3, write(tmp_path), out, "runner")]
    with (tmp_path / "first.log").open("wb") as log:
        first = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            await until(lambda: len(index(out)) >= 4, 120, "4 images indexed")
        finally:
            first.send_signal(signal.SIGKILL)
            await first.wait()
    assert len(index(out)) < ITEMS, "killed mid-job"
    # The replicas end what the dead runner had in flight (cancelled, or stored if it had finished).
    ended = await requests_ended(replicas)
    await asyncio.sleep(1.0)
    while (now := await requests_ended(replicas)) != ended:
        ended = now
        await asyncio.sleep(1.0)
    stored_before = len(stored_keys(s3, storage, "runner"))

    second = await asyncio.to_thread(subprocess.run, argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    records = index(out)
    ids = {r["request_id"] for r in records}
    assert len(ids) == ITEMS and stored_keys(s3, storage, "runner") == sorted(f"{i}/0.png" for i in ids)
    # The second run sent exactly the missing images: no request for one already stored.
    assert await requests_ended(replicas) - ended == ITEMS - stored_before
    assert json.loads((out / "summary.json").read_text())["rendered"] == ITEMS - stored_before


async def test_two_shards_at_once_are_disjoint_complete_and_merge_into_one_job(stack, tmp_path, capsys):
    replicas, storage, s3 = stack
    catalogue = write(tmp_path)
    runs = [
        await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "client"),
            *run_argv(replicas, storage, s3, catalogue, tmp_path / f"s{k}", "halves", "--shard", f"{k}/2"),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for k in range(2)
    ]
    outputs = [(await p.communicate())[0].decode() for p in runs]
    assert [p.returncode for p in runs] == [0, 0], [o[-2000:] for o in outputs]
    shards = [{r["request_id"] for r in index(tmp_path / f"s{k}")} for k in range(2)]
    assert shards[0] and shards[1] and shards[0].isdisjoint(shards[1])
    assert len(shards[0] | shards[1]) == ITEMS
    assert stored_keys(s3, storage, "halves") == sorted(f"{i}/0.png" for i in shards[0] | shards[1])

    # One folder for the whole job: one index, one gallery, one zip (read back from the bucket).
    merged = tmp_path / "all"
    argv = [
        "catalogue",
        "merge",
        str(merged),
        str(tmp_path / "s0"),
        str(tmp_path / "s1"),
        "--zip",
        "--storage",
        storage,
    ]
    assert await cli._main(cli._parser().parse_args([*argv, "--s3-endpoint", s3.endpoint])) == 0
    assert f"2 of 2 shards merged: {ITEMS}/{ITEMS} stored, 0 failed" in capsys.readouterr().out
    assert {r["request_id"] for r in index(merged)} == shards[0] | shards[1]
    gallery = (merged / "gallery.html").read_text()
    assert all(f'data-request-id="{i}"' in gallery for i in shards[0] | shards[1])
    with zipfile.ZipFile(merged / "images.zip") as zf:
        assert len(zf.namelist()) == ITEMS
    assert await cli._main(cli._parser().parse_args(["catalogue", "status", str(merged)])) == 0
    assert f"{ITEMS}/{ITEMS} stored, 0 failed" in capsys.readouterr().out


async def test_a_replica_killed_mid_job_loses_nothing(stack, tmp_path, capsys):
    """Last in the module: it leaves one replica dead."""
    replicas, storage, s3 = stack
    out = tmp_path / "out"
    argv = run_argv(replicas, storage, s3, write(tmp_path), out, "node")
    run = asyncio.create_task(cli._main(cli._parser().parse_args(argv)))
    try:
        await until(lambda: len(index(out)) >= 4, 120, "4 images indexed")
    finally:
        replicas[1].kill()
    assert await run == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    records = index(out)
    ids = {r["request_id"] for r in records}
    assert len(records) == len(ids) == ITEMS, "every image indexed once"
    assert stored_keys(s3, storage, "node") == sorted(f"{i}/0.png" for i in ids), "every image stored once"
    # The killed replica's calls in flight ended UNAVAILABLE and were sent again: the survivor rendered them,
    # or refused one as stored (REQUEST_STORED: the killed replica had stored it before its stream broke).
    retried = {e["request_id"] for e in events if e["type"] == "retrying" and e["reason"].startswith("UNAVAILABLE")}
    assert retried, "the killed replica had calls in flight"
    done = {e["request_id"]: e for e in events if e["type"] == "imagedone"}
    assert all(done[i]["replica"] == replicas[0].address or done[i]["recovered"] for i in retried), retried
