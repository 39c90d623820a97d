"""`catalogue merge`: shard folders of one job become one folder; folders of other jobs, other splits or
the target itself are refused by name; a shard not given is said, and the exit status is 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client import cli
from client.catalogue.merge import MergeError, merge
from client.catalogue.results import IndexRecord, JobDir, JobInfo, Summary


def shard_folder(root: Path, job: str, shard: str, ids: list[str], failed: tuple[str, ...] = ()) -> Path:
    folder = JobDir(root / f"{job}-{shard.replace('/', 'of')}")
    folder.save_job(JobInfo(job, "/catalogue.csv", shard))
    records = [
        IndexRecord(i, 2, "tiny-star", "", "beach", n, n, f"file:///img/{i}/0.png", "", "cpu:0", False, False, {})
        for n, i in enumerate(ids)
    ]
    folder.write_index(records)
    problems = [{"row": 3, "line": 3, "column": "scenes", "problem": "unknown scene 'moon'"}]
    reason = {"row": 2, "subject": "tiny-star", "scene": "fire", "index": 0, "reason": "NOT_FOUND"}
    reasons = [{"request_id": f, **reason} for f in failed]
    summary = Summary(job, shard, len(ids) + len(failed), len(ids), reasons, problems, seconds=float(len(ids)))
    folder.write_summary(summary)
    return folder.path


async def test_shards_merge_into_one_job_folder(tmp_path, capsys):
    a = shard_folder(tmp_path, "spring", "0/2", ["spring-a", "spring-b"])
    b = shard_folder(tmp_path, "spring", "1/2", ["spring-c"], failed=("spring-d",))
    merged = await merge(tmp_path / "all", [a, b])
    s = merged.summary
    assert (s.total, s.done, s.seconds, merged.missing_shards) == (4, 3, 2.0, [])
    assert [f["request_id"] for f in s.failed] == ["spring-d"] and len(s.skipped_rows) == 1  # said once
    index = [json.loads(line)["request_id"] for line in (tmp_path / "all" / "index.jsonl").read_text().splitlines()]
    assert sorted(index) == ["spring-a", "spring-b", "spring-c"]
    assert JobDir(tmp_path / "all").load_job() == JobInfo("spring", "/catalogue.csv", "0/1")

    # One shard missing: merged, said, exit 1.
    code = await cli._main(cli._parser().parse_args(["catalogue", "merge", str(tmp_path / "half"), str(a)]))
    out = capsys.readouterr().out
    assert code == 1 and "not given: shard(s) 1" in out and "1 of 2 shards merged: 2/2 stored" in out


async def test_folders_that_are_not_one_jobs_shards_are_refused(tmp_path):
    a = shard_folder(tmp_path, "spring", "0/2", ["spring-a"])
    other = shard_folder(tmp_path, "autumn", "1/2", ["autumn-a"])
    three = shard_folder(tmp_path, "spring", "1/3", ["spring-z"])
    with pytest.raises(MergeError, match=r"different jobs \(autumn, spring\)"):
        await merge(tmp_path / "x", [a, other])
    with pytest.raises(MergeError, match="into 2 and 3 shards"):
        await merge(tmp_path / "x", [a, three])
    with pytest.raises(MergeError, match="is one of the shards"):
        await merge(a, [a])
    with pytest.raises(MergeError, match=r"no job\.json"):
        await merge(tmp_path / "x", [tmp_path / "nothing"])
