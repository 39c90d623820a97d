"""A catalogue job whose generator stores to S3 (SeaweedFS): the job lists the bucket to know what is done."""

from __future__ import annotations

import asyncio
import json
import urllib.request
import zipfile

from client import cli
from tests.helpers import standin_server


async def test_an_s3_job_resumes_from_the_bucket_listing(tiny_world, tmp_path, s3_server, s3_bucket, capsys):
    storage = f"s3://{s3_bucket}/catalogue-renders"
    server = standin_server(tiny_world, tmp_path, storage=storage, s3_endpoint_url=s3_server.endpoint)
    s3 = s3_server.client()
    # The catalogue in the bucket and the job folder published there: as the Kubernetes Job's pods run.
    yaml = b"- {product: tiny-star, scenes: [beach, dogs], images: 2}\n"
    s3.put_object(Bucket=s3_bucket, Key="catalogues/spring.yaml", Body=yaml)
    published = f"s3://{s3_bucket}/catalogue-jobs/s3job"
    async with server as (app, _, _):
        path = f"s3://{s3_bucket}/catalogues/spring.yaml"
        out = tmp_path / "out"
        args = ["--generator", f"127.0.0.1:{app.port}", "catalogue", "run", path, "--out", str(out)]
        args += ["--job", "s3job", "--storage", storage, "--s3-endpoint", s3_server.endpoint, "--log-format", "json"]
        assert await cli._main(cli._parser().parse_args([*args, "--publish", published])) == 0
        assert (out / "catalogue.yaml").read_bytes() == yaml
        assert json.loads((out / "job.json").read_text())["catalogue"] == path  # retry-failed reads it there again
        for name, kind in (("index.jsonl", "application/x-ndjson"), ("gallery.html", "text/html; charset=utf-8")):
            head = s3.head_object(Bucket=s3_bucket, Key=f"catalogue-jobs/s3job/{name}")
            assert head["ContentType"] == kind and head["ContentLength"] == (out / name).stat().st_size
        records = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
        assert len(records) == 4
        assert all(r["uri"] == f"{storage}/{r['request_id']}/0.png" and r["url"].startswith("http") for r in records)
        capsys.readouterr()
        steps = app.record.read_text()

        # The index lost its lines (killed in between): the bucket's listing says what is done; nothing renders.
        (out / "index.jsonl").write_text("")
        assert await cli._main(cli._parser().parse_args([*args, "--zip"])) == 0
        events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert events[0]["pending"] == 0 and app.record.read_text() == steps
        again = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
        assert sorted(r["uri"] for r in again) == sorted(r["uri"] for r in records)
        assert all(r["recovered"] and r["parameters"]["template_id"] == r["scene"] for r in again)
        # Fresh presigned URLs for the gallery: a browser can fetch what was found stored.
        png = await asyncio.to_thread(lambda: urllib.request.urlopen(again[0]["url"], timeout=10).read())
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        with zipfile.ZipFile(out / "images.zip") as zf:  # read back through the store: no URL for these
            assert len(zf.namelist()) == 4
