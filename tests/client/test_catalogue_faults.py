"""Catalogue jobs under faults: a full queue (backs off by the server's hint), requests that fail (named
reasons, `retry-failed`), and Ctrl-C (in-flight requests cancelled, the job resumable)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

from client import cli
from tests.helpers import ROOT, standin_server, until

CATALOGUE = "product,scenes,images\ntiny-star,beach;flowers,3\ntiny-mug,dogs,2\n"
ITEMS = 8


def write(tmp_path: Path) -> Path:
    path = tmp_path / "catalogue.csv"
    path.write_text(CATALOGUE)
    return path


def index(out: Path) -> list[dict]:
    path = out / "index.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def main(capsys, *argv: str) -> tuple[int, list[dict]]:
    code = await cli._main(cli._parser().parse_args(list(argv)))
    return code, [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


async def test_a_full_queue_waits_for_the_servers_hint(tiny_world, tmp_path, capsys):
    async with standin_server(tiny_world, tmp_path, step=0.02, max_queue=1) as (app, _, _):
        out = tmp_path / "out"
        code, events = await main(
            capsys, "--generator", f"127.0.0.1:{app.port}", "catalogue", "run", str(write(tmp_path)),
            "--out", str(out), "--concurrency", "4", "--log-format", "json",
        )  # fmt: skip
    assert code == 0
    retries = [e for e in events if e["type"] == "retrying"]
    assert retries and all(e["reason"].startswith("RESOURCE_EXHAUSTED") for e in retries)
    assert all(0 < e["delay_s"] <= 5 for e in retries), "the hint, not a guess"
    assert len({r["request_id"] for r in index(out)}) == ITEMS


async def test_failed_items_name_their_reason_and_retry_failed_reruns_only_them(tiny_world, tmp_path, capsys):
    async with standin_server(tiny_world, tmp_path, step=0.1) as (app, _, _):
        target = f"127.0.0.1:{app.port}"
        out = tmp_path / "out"
        # A deadline shorter than one image: every item fails, after its one attempt, with the reason.
        code, _ = await main(
            capsys, "--generator", target, "catalogue", "run", str(write(tmp_path)), "--out", str(out),
            "--timeout", "0.05", "--attempts", "1", "--log-format", "json",
        )  # fmt: skip
        assert code == 1
        summary = json.loads((out / "summary.json").read_text())
        assert len(summary["failed"]) == ITEMS - summary["done"] > 0
        assert all("DEADLINE_EXCEEDED" in f["reason"] and f["scene"] and f["row"] for f in summary["failed"])
        failed = {f["request_id"] for f in summary["failed"]}

        assert await cli._main(cli._parser().parse_args(["catalogue", "status", str(out)])) == 0
        status = capsys.readouterr().out
        assert f"{summary['done']}/{ITEMS} stored, {len(failed)} failed" in status and "DEADLINE_EXCEEDED" in status

        code, events = await main(capsys, "--generator", target, "catalogue", "retry-failed", str(out),
                                  "--log-format", "json")  # fmt: skip
        assert code == 0, events
        assert events[0]["pending"] == len(failed)
        assert {e["request_id"] for e in events if e["type"] == "imagedone"} == failed
        assert len({r["request_id"] for r in index(out)}) == ITEMS
        assert json.loads((out / "summary.json").read_text())["failed"] == []


async def test_ctrl_c_cancels_in_flight_requests_and_the_job_resumes(tiny_world, tmp_path):
    async with standin_server(tiny_world, tmp_path, step=0.1) as (app, _, _):
        out = tmp_path / "out"
        argv = [sys.executable, "-m", "client", "--generator", f"127.0.0.1:{app.port}", "catalogue", "run",
                str(write(tmp_path)), "--out", str(out), "--concurrency", "2", "--log-format", "plain"]  # fmt: skip
        first = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        await until(lambda: len(index(out)) >= 2, 60, "2 images indexed")
        first.send_signal(signal.SIGINT)
        printed = (await first.communicate())[0].decode()
        assert first.returncode == 130, printed
        assert "stopped (run again to resume)" in printed and "Traceback" not in printed
        summary = json.loads((out / "summary.json").read_text())
        assert summary["interrupted"] and summary["done"] < ITEMS
        # The server dropped the cancelled requests: a stand-in render stopped part-way.
        await until(lambda: "cancelled" in app.record.read_text(), 10, "a render cancelled")

        second = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        printed = (await second.communicate())[0].decode()
        assert second.returncode == 0, printed
        assert len({r["request_id"] for r in index(out)}) == ITEMS
        assert len(list((tmp_path / "images").glob("*/0.png"))) == ITEMS


async def test_a_replica_stopping_mid_job_loses_nothing(tiny_world, tmp_path, capsys):
    """Two replicas; one stops (its drain answers UNAVAILABLE) while the job runs: the other finishes it,
    every image stored once and none rendered twice."""
    storage = tmp_path / "images"
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    async with standin_server(tiny_world, tmp_path / "a", step=0.05, storage=str(storage)) as (a, _, _):
        second = standin_server(tiny_world, tmp_path / "b", step=0.05, storage=str(storage))
        b, _, _ = await second.__aenter__()
        out = tmp_path / "out"
        args = ["--generator", f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}", "catalogue", "run"]
        args += [str(write(tmp_path)), "--out", str(out), "--concurrency", "4", "--log-format", "json"]
        run = asyncio.create_task(cli._main(cli._parser().parse_args(args)))
        try:
            await until(lambda: len(index(out)) >= 2, 60, "2 images indexed")
        finally:
            await second.__aexit__(None, None, None)
        assert await run == 0
        records = index(out)
        assert len({r["request_id"] for r in records}) == ITEMS == len(list(storage.glob("*/0.png")))
        finished = [line for app in (a, b) for line in app.record.read_text().splitlines() if line.endswith(" 4")]
        assert len(finished) == ITEMS, "no image rendered to the end twice"
        assert any(r["device"] for r in records)
        events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        # The stopped replica's calls in flight ended UNAVAILABLE and were sent again (to the other one).
        assert any(e["type"] == "retrying" and e["reason"].startswith("UNAVAILABLE") for e in events)
