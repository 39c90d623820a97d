"""`catalogue merge OUT SHARD_DIR...`: the shards of one job (each ran with its own `--out`) as one job
folder: one index, one summary, one gallery (and zip), as if a single run had rendered them all.

Nothing renders and no generator is asked: the shards' folders hold everything. The merged folder is a
job folder like any other (`status`, `retry-failed` and `run` without `--shard` work on it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from client.catalogue.plan import Shard
from client.catalogue.results import IndexRecord, JobDir, JobInfo, Summary
from services.common.storage import ImageStore


class MergeError(Exception):
    """Folders that are not shards of one job."""


@dataclass(frozen=True)
class Merged:
    summary: Summary
    missing_shards: list[int]  # shard indexes no folder was given for: their images are not in the merge
    unread: list[str]  # images the zip could not read


async def merge(out: Path, shard_dirs: list[Path], store: ImageStore | None = None, zip_images: bool = False) -> Merged:
    folders = [JobDir(p) for p in shard_dirs]
    infos: list[JobInfo] = []
    for folder in folders:
        info = folder.load_job()
        if info is None:
            raise MergeError(f"{folder.path}: no job.json; is it a catalogue job's --out folder?")
        infos.append(info)
    jobs = sorted({i.job for i in infos})
    if len(jobs) > 1:
        raise MergeError(f"the folders hold different jobs ({', '.join(jobs)}); merge the shards of one job")
    shards = [Shard.parse(i.shard) for i in infos]
    counts = sorted({s.count for s in shards})
    if len(counts) > 1:
        raise MergeError(f"the folders split the job differently (into {' and '.join(map(str, counts))} shards)")
    missing = sorted(set(range(counts[0])) - {s.index for s in shards})

    records: dict[str, IndexRecord] = {}
    summaries = [s for s in (f.read_summary() for f in folders) if s is not None]
    for folder in folders:
        records.update(folder.read_index())
    failed = [f for s in summaries for f in s.failed if f["request_id"] not in records]
    # Every shard parses the same file, so each reports the same bad rows: once each.
    skipped = list({(r["row"], r["column"], r["problem"]): r for s in summaries for r in s.skipped_rows}.values())
    merged = JobDir(out)
    if merged.path.resolve() in {f.path.resolve() for f in folders}:
        raise MergeError(f"{out} is one of the shards: merge into another folder")
    summary = Summary(
        job=jobs[0],
        shard=f"{counts[0] - len(missing)} of {counts[0]} shards merged",
        total=sum(s.total for s in summaries),
        done=len(records),
        failed=failed,
        skipped_rows=skipped,
        seconds=max((s.seconds for s in summaries), default=0.0),  # the shards ran side by side
        interrupted=any(s.interrupted for s in summaries),
        rendered=sum(s.rendered for s in summaries),
        upscaled=sum(bool(r.upscaled_uri) for r in records.values()),
    )
    merged.save_job(JobInfo(jobs[0], infos[0].catalogue, str(Shard()), infos[0].storage))
    merged.write_index(list(records.values()))
    merged.write_summary(summary)
    merged.write_gallery(list(records.values()), f"Catalogue job {jobs[0]}")
    unread = await merged.write_zip(list(records.values()), store) if zip_images else []
    return Merged(summary, missing, unread)
