"""A catalogue job whose generator stores to S3 (SeaweedFS): the job lists the bucket to know what is done."""

from __future__ import annotations

import json
import zipfile

from client import cli
from tests.helpers import standin_server


async def test_an_s3_job_resumes_from_the_bucket_listing(tiny_world, tmp_path, s3_server, s3_bucket, capsys):
    storage = f"s3://{s3_bucket}/catalogue-renders"
    server = standin_server(tiny_world, tmp_path, storage=storage, s3_endpoint_url=s3_server.endpoint)
    async with server as (app, _, _):
        path = tmp_path / "catalogue.yaml"
        path.write_text("- {product: tiny-star, scenes: [beach, dogs], images: 2}\n")
        out = tmp_path / "out"
        args = ["--generator", f"127.0.0.1:{app.port}", "catalogue", "run", str(path), "--out", str(out)]
        args += ["--job", "s3job", "--storage", storage, "--s3-endpoint", s3_server.endpoint, "--log-format", "json"]
        assert await cli._main(cli._parser().parse_args(args)) == 0
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
        with zipfile.ZipFile(out / "images.zip") as zf:  # read back through the store: no URL for these
            assert len(zf.namelist()) == 4
