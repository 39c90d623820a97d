"""Command-line client of the generator.

python -m client.cli products
python -m client.cli templates [--product ID | --category CAT]
python -m client.cli generate --product ID --template beach -n 4 --out DIR
python -m client.cli rerun IMAGE.png --out DIR      # exactly, from its embedded parameters
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import grpc

from client.api import GeneratorClient, describe_error, fetch_bytes_async, generate_request
from client.channel import add_security_flags, security_from_args


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m client.cli", description=__doc__.split("\n\n")[0])
    p.add_argument("--generator", default=os.environ.get("PIA_GENERATOR_ADDRESS", "localhost:50051"))
    add_security_flags(p)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("products", help="list products")
    sub.add_parser("adapters", help="list style/background adapters")
    t = sub.add_parser("templates", help="list scene templates")
    t.add_argument("--product", default="")
    t.add_argument("--category", default="")

    g = sub.add_parser("generate", help="generate images and save them as they arrive")
    g.add_argument("--product", required=True)
    g.add_argument("--template", default="")
    g.add_argument("--prompt", default="")
    g.add_argument("--negative", default=None)
    g.add_argument("-n", "--num-images", type=int, default=1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--steps", type=int, default=0)
    g.add_argument("--guidance", type=float, default=None)
    g.add_argument("--width", type=int, default=0)
    g.add_argument("--height", type=int, default=0)
    g.add_argument("--scheduler", default="")
    g.add_argument("--product-scale", type=float, default=None)
    g.add_argument("--adapter", action="append", default=[], metavar="ID[:WEIGHT]", help="stack an adapter")
    g.add_argument("--request-id", default="")
    g.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    g.add_argument("--out", type=Path, default=Path("outputs/cli"))

    r = sub.add_parser("rerun", help="re-generate an image exactly from the parameters embedded in it")
    r.add_argument("image", type=Path)
    r.add_argument("--out", type=Path, default=Path("outputs/cli"))
    return p


def _adapters(specs: list[str]) -> list[tuple[str, float]]:
    out = []
    for spec in specs:
        name, _, weight = spec.partition(":")
        out.append((name, float(weight) if weight else 0.0))
    return out


async def _generate(
    client: GeneratorClient, request, out: Path, timeout: float | None, expect_prompt: str | None = None
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    saved: list[Path] = []
    async for event in client.generate(request, timeout=timeout):
        kind = event.WhichOneof("event")
        if kind == "accepted":
            a = event.accepted
            print(f"accepted {a.request_id}: {len(a.image_uris)} images, queue position {a.queue_position}")
            print(f"  prompt: {a.parameters.prompt}")
            if expect_prompt is not None and a.parameters.prompt != expect_prompt:
                print(f"  warning: the template changed; the original prompt was {expect_prompt!r}", file=sys.stderr)
        elif kind == "queued":
            print(f"queued: position {event.queued.queue_position}")
        elif kind == "progress":
            p = event.progress
            print(f"\r  image {p.index}: step {p.step}/{p.total_steps}", end="", flush=True)
        elif kind == "image_ready":
            r = event.image_ready
            data = r.image.png or await fetch_bytes_async(r.image.url)
            path = out / f"{r.parameters.product_id}-{r.index}-{r.seed}.png"
            path.write_bytes(data)
            saved.append(path)
            print(f"\rimage {r.index} ready (seed {r.seed}, {r.device}): {r.image.uri} -> {path}")
        elif kind == "completed":
            t = event.completed.timings
            print(
                f"completed: {event.completed.num_images} images in {t.total_seconds:.2f}s "
                f"(first after {t.first_image_seconds:.2f}s)"
            )
    return saved


def rerun_request(image: Path) -> tuple[str, object]:
    """The GenerateRequest that reproduces `image` exactly (same prompt, seed, adapters, sizes)."""
    from services.common.pngmeta import read_parameters

    params = read_parameters(image.read_bytes())
    # Same template + user text recompose to the same prompt; _generate checks it did.
    return params["prompt"], generate_request(
        product_id=params["product_id"],
        template_id=params.get("template_id", ""),
        prompt=params.get("user_prompt", ""),
        negative_prompt=params.get("negative_prompt", ""),
        num_images=1,
        seed=int(params["seed"]),
        steps=int(params["steps"]),
        guidance_scale=float(params["guidance_scale"]),
        width=int(params["width"]),
        height=int(params["height"]),
        scheduler=params.get("scheduler", ""),
        product_scale=float(params["product_scale"]),
        adapters=[(a["adapter_id"], float(a["weight"])) for a in params.get("adapters", [])],
    )


async def _main(args: argparse.Namespace) -> int:
    client = GeneratorClient(args.generator, security_from_args(args))
    try:
        if args.command == "products":
            for p in await client.products():
                print(f"{p.id:24} {p.display_name:28} {p.category:14} {' '.join(p.tokens)}")
        elif args.command == "adapters":
            for a in await client.adapters():
                print(f"{a.id:24} {a.display_name:28} {a.kind:12} weight {a.default_weight:g}")
        elif args.command == "templates":
            for t in await client.templates(product_id=args.product, category=args.category):
                print(f"{t.id:12} {t.name:12} {'(free text)' if t.free_text else t.scene}")
        elif args.command == "generate":
            request = generate_request(
                product_id=args.product,
                template_id=args.template,
                prompt=args.prompt,
                negative_prompt=args.negative,
                num_images=args.num_images,
                seed=args.seed,
                steps=args.steps,
                guidance_scale=args.guidance,
                width=args.width,
                height=args.height,
                scheduler=args.scheduler,
                product_scale=args.product_scale,
                adapters=_adapters(args.adapter),
                request_id=args.request_id,
            )
            await _generate(client, request, args.out, args.timeout)
        elif args.command == "rerun":
            prompt, request = rerun_request(args.image)
            await _generate(client, request, args.out, None, expect_prompt=prompt)
        return 0
    except grpc.aio.AioRpcError as exc:
        print(f"error: {describe_error(exc)}", file=sys.stderr)
        return 1
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(_main(_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
