"""Catalogue jobs against two stand-in replicas sharing one storage: complete, exactly once, resumable
after a SIGKILL, and sharded without overlap."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from client import cli
from tests.helpers import ROOT, standin_server, until

STEPS = 4  # the stand-in servers' default steps (tests.helpers.generator_settings)
CATALOGUE = """product,scenes,images
tiny-star,beach;flowers;dogs,2
tiny-mug,all,1
"""
ITEMS = 3 * 2 + 5  # tiny-mug's `all`: flowers, beach, dogs, fire, minimal (custom is free text)


@pytest.fixture(scope="module")
async def replicas(tiny_world, tmp_path_factory):
    """Two stand-in generators (one worker each) storing into one folder, as replicas behind one target."""
    root = tmp_path_factory.mktemp("replicas")
    storage = root / "images"
    (root / "a").mkdir()
    (root / "b").mkdir()
    async with (
        standin_server(tiny_world, root / "a", step=0.05, storage=str(storage)) as (a, _, _),
        standin_server(tiny_world, root / "b", step=0.05, storage=str(storage)) as (b, _, _),
    ):
        yield f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}", storage, (a.record, b.record)


def write(tmp_path: Path) -> Path:
    path = tmp_path / "catalogue.csv"
    path.write_text(CATALOGUE)
    return path


def renders(logs: tuple[Path, ...], seeds: set[int]) -> list[Counter[int]]:
    """Per server: how many times each of `seeds` was rendered to the last step."""
    out = []
    for log in logs:
        done: Counter[int] = Counter()
        for line in log.read_text().splitlines() if log.exists() else []:
            m = re.fullmatch(r"step \S+ \((\d+),\) (\d+)", line)
            if m and int(m[2]) == STEPS and int(m[1]) in seeds:
                done[int(m[1])] += 1
        out.append(done)
    return out


def stored_keys(storage: Path, job: str) -> list[str]:
    return sorted(p.relative_to(storage).as_posix() for p in storage.glob(f"{job}-*/*.png"))


def index(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]


def command(target: str, *argv: str) -> list[str]:
    return [sys.executable, "-m", "client", "--generator", target, "catalogue", *argv]


async def test_a_job_over_two_replicas_stores_every_image_once(replicas, tmp_path, capsys):
    target, storage, logs = replicas
    out = tmp_path / "out"
    args = ["--generator", target, "catalogue", "run", str(write(tmp_path)), "--out", str(out), "--job", "two"]
    args += ["--storage", str(storage), "--concurrency", "4", "--zip", "--log-format", "json"]
    assert await cli._main(cli._parser().parse_args(args)) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[0] == {**events[0], "type": "started", "total": ITEMS, "pending": ITEMS}
    assert events[-1]["type"] == "finished" and events[-1]["done"] == ITEMS and events[-1]["failed"] == 0

    records = index(out)
    ids = [r["request_id"] for r in records]
    assert len(ids) == len(set(ids)) == ITEMS
    assert stored_keys(storage, "two") == sorted(f"{i}/0.png" for i in ids)
    for r in records:
        assert r["parameters"]["seed"] == r["seed"]
        assert r["parameters"]["template_id"] == r["scene"] and r["parameters"]["steps"] == STEPS
        assert Path(r["uri"].removeprefix("file://")).exists()
    seeds = {r["seed"] for r in records}
    per_server = renders(logs, seeds)
    assert all(per_server), f"both replicas render: {per_server}"
    assert sum(per_server, Counter()) == Counter(seeds), "every image rendered exactly once"

    gallery = (out / "gallery.html").read_text()
    assert all(f'data-request-id="{i}"' in gallery for i in ids)
    assert gallery.index("<h2") < gallery.index("tiny-star") and "tiny-mug" in gallery
    with zipfile.ZipFile(out / "images.zip") as zf:
        assert len(zf.namelist()) == ITEMS and all(n.endswith(".png") for n in zf.namelist())
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["done"], summary["total"], summary["failed"], summary["rendered"]) == (ITEMS, ITEMS, [], ITEMS)

    # Again: everything is stored, nothing renders.
    assert await cli._main(cli._parser().parse_args(args)) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["pending"] == 0
    assert sum(renders(logs, seeds), Counter()) == Counter(seeds)

    # An index that lost lines (a run killed between the store and the line), without --storage: the server's
    # ALREADY_EXISTS says what is stored, the indexed line gives the URIs' base; nothing renders.
    lines = (out / "index.jsonl").read_text().splitlines()
    (out / "index.jsonl").write_text(lines[0] + "\n")
    no_storage = [a for a in args if a not in ("--storage", str(storage), "--zip")]
    assert await cli._main(cli._parser().parse_args(no_storage)) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["pending"] == ITEMS - 1
    assert sum(renders(logs, seeds), Counter()) == Counter(seeds)
    again = {r["request_id"]: r for r in index(out)}
    assert sorted(again) == sorted(ids) and sum(r["recovered"] for r in again.values()) == ITEMS - 1
    assert all(again[r["request_id"]]["uri"] == r["uri"] for r in records)
    assert all(again[r["request_id"]]["parameters"]["prompt"] == r["parameters"]["prompt"] for r in records)

    assert await cli._main(cli._parser().parse_args(["catalogue", "status", str(out)])) == 0
    assert f"{ITEMS}/{ITEMS} stored, 0 failed" in capsys.readouterr().out


async def test_a_killed_run_resumes_without_duplicates_or_gaps(replicas, tmp_path):
    """SIGKILL mid-job; the second run (without --storage: the server's ALREADY_EXISTS is the truth for an
    image stored after the kill) renders only what is missing."""
    target, storage, logs = replicas
    out = tmp_path / "out"
    argv = command(target, "run", str(write(tmp_path)), "--out", str(out), "--job", "kill", "--concurrency", "2")
    argv += ["--log-format", "plain"]
    log = (tmp_path / "first.log").open("wb")
    first = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        await until(lambda: (out / "index.jsonl").exists() and len(index(out)) >= 3, 60, "3 images indexed")
    finally:
        first.send_signal(signal.SIGKILL)
        await first.wait()
        log.close()
    killed_at = len(index(out))
    assert killed_at < ITEMS, "killed mid-job"
    await asyncio.sleep(0.5)  # the servers cancel the dead client's requests (or store what had finished)
    before = stored_keys(storage, "kill")

    second = await asyncio.to_thread(subprocess.run, argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0, second.stdout + second.stderr
    records = index(out)
    ids = {r["request_id"] for r in records}
    assert len(ids) == ITEMS and len(stored_keys(storage, "kill")) == ITEMS
    assert stored_keys(storage, "kill") == sorted(f"{i}/0.png" for i in ids)
    seeds = {r["seed"] for r in records}
    assert sum(renders(logs, seeds), Counter()) == Counter(seeds), "no image rendered twice"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rendered"] == ITEMS - len(before), second.stdout
    assert f"{ITEMS - killed_at} to render" in second.stdout
    recovered = [r for r in records if r["recovered"]]
    assert len(recovered) == len(before) - killed_at
    assert all(r["uri"].endswith(f"{r['request_id']}/0.png") and r["parameters"] for r in recovered)


async def test_two_shards_at_once_are_disjoint_and_complete(replicas, tmp_path):
    target, storage, _ = replicas
    path = write(tmp_path)
    argv = [
        command(target, "run", str(path), "--out", str(tmp_path / f"s{k}"), "--job", "halves", "--shard", f"{k}/2")
        for k in range(2)
    ]
    runs = [
        await asyncio.create_subprocess_exec(
            *a, "--log-format", "plain", cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for a in argv
    ]
    outputs = [(await p.communicate())[0].decode() for p in runs]
    assert [p.returncode for p in runs] == [0, 0], outputs
    shards = [{r["request_id"] for r in index(tmp_path / f"s{k}")} for k in range(2)]
    assert shards[0] and shards[1] and shards[0].isdisjoint(shards[1])
    assert len(shards[0] | shards[1]) == ITEMS
    assert stored_keys(storage, "halves") == sorted(f"{i}/0.png" for i in shards[0] | shards[1])
