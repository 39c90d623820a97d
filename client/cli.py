"""Command-line client of the generator.

python -m client.cli products
python -m client.cli templates [--product ID | --category CAT]
python -m client.cli generate --product ID --template demo-beach -n 4 --out DIR
python -m client.cli rerun IMAGE.png --out DIR      # exactly, from its embedded parameters
python -m client.cli catalogue run demo/catalogue.csv --out DIR   # a resumable job (docs/CATALOGUE.md)

Images are saved as <product>-<index>-<seed>.png (a rerun as <its input's name>-rerun.png); a name
already taken gets -2, -3 … : nothing is ever overwritten.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import grpc
from PIL import UnidentifiedImageError

from client.api import GeneratorClient, describe_error, fetch_bytes_async, generate_request
from client.balancing import reporting_interruption
from client.catalogue.commands import add_parser as add_catalogue_parser
from client.catalogue.commands import main as catalogue_main
from client.channel import add_security_flags, security_from_args
from productinaction.v1 import generator_pb2
from services.common.pngmeta import read_parameters


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m client.cli", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--generator",
        default=os.environ.get("PIA_GENERATOR_ADDRESS", "localhost:50051"),
        help="any gRPC target: host:port, dns:///name:port (round robin over every address), ipv4:h1:p1,h2:p2",
    )
    add_security_flags(p)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("products", help="list products")
    sub.add_parser("adapters", help="list style/background adapters")
    t = sub.add_parser("templates", help="list scene templates")
    t.add_argument("--product", default="")
    t.add_argument("--category", default="")

    g = sub.add_parser("generate", help="generate images and save them as they arrive")
    g.add_argument("--product", default="", help="product id (optional with --product-image)")
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
    add_placement_flags(g)

    r = sub.add_parser("rerun", help="re-generate an image exactly from the parameters embedded in it")
    r.add_argument("image", type=Path)
    r.add_argument("--out", type=Path, default=Path("outputs/cli"))
    add_catalogue_parser(sub)
    return p


# Placement mode: the product's own photo, its pixels kept exactly (docs/FIDELITY.md).


def add_placement_flags(g: argparse.ArgumentParser) -> None:
    g.add_argument(
        "--product-image",
        type=Path,
        default=None,
        help="placement mode: a photo of the product (RGBA cutout, photo + --mask, or on a plain light background)",
    )
    g.add_argument("--mask", type=Path, default=None, help="mask of --product-image (white: the product)")
    g.add_argument(
        "--place",
        default="",
        metavar="X,Y,H",
        help="product centre x, y and height as fractions of the frame (default: the template's)",
    )
    g.add_argument("--tolerance", type=int, default=0, help="mask finding on a light background (0: default)")
    g.add_argument(
        "--shadow",
        default="",
        metavar="STRENGTH[,SOFTNESS[,DX,DY]]",
        help="contact shadow under the product: 0 for none, or strength (0-1), softness (0-1) and offsets "
        "(fractions of its height); default: the template's (on for scenes with a surface)",
    )


def product_image_from_args(args: argparse.Namespace):
    """The request's ProductImage from --product-image/--mask/--place/--tolerance (None without an image)."""
    if args.product_image is None:
        if not args.product:
            raise CliError("give --product, --product-image, or both")
        return None
    try:
        message = generator_pb2.ProductImage(
            image=args.product_image.read_bytes(),
            mask=args.mask.read_bytes() if args.mask else b"",
            tolerance=args.tolerance,
        )
    except OSError as exc:
        raise CliError(f"{exc.filename}: {exc.strerror}") from None
    if args.place:
        try:
            x, y, h = (float(v) for v in args.place.split(","))
        except ValueError:
            raise CliError(f"--place {args.place!r}: give three fractions, x,y,height (e.g. 0.5,0.6,0.5)") from None
        message.placement.CopyFrom(generator_pb2.Placement(center_x=x, center_y=y, height=h))
    if args.shadow:
        try:
            values = [float(v) for v in args.shadow.split(",")]
            if len(values) not in (1, 2, 4):
                raise ValueError
        except ValueError:
            raise CliError(
                f"--shadow {args.shadow!r}: give STRENGTH, STRENGTH,SOFTNESS or STRENGTH,SOFTNESS,DX,DY"
            ) from None
        strength, softness, dx, dy = (*values, *(0.5, 0.0, 0.0)[len(values) - 1 :])
        message.shadow.CopyFrom(generator_pb2.Shadow(strength=strength, softness=softness, offset_x=dx, offset_y=dy))
    return message


def _adapters(specs: list[str]) -> list[tuple[str, float]]:
    out = []
    for spec in specs:
        name, _, weight = spec.partition(":")
        out.append((name, float(weight) if weight else 0.0))
    return out


class CliError(Exception):
    """A problem worth one line on stderr and exit status 1, no traceback."""


def save_new(out: Path, stem: str, data: bytes) -> Path:
    """Write `stem.png` in `out`, or `stem-2.png`, `stem-3.png` … : never over an existing file."""
    for n in range(1, 10_000):
        path = out / (f"{stem}.png" if n == 1 else f"{stem}-{n}.png")
        try:
            with path.open("xb") as f:  # exclusive: two runs at once cannot pick the same name either
                f.write(data)
            return path
        except FileExistsError:
            continue
    raise CliError(f"too many files named {stem}-N.png in {out}")


def _image_name(ready) -> str:
    return f"{ready.parameters.product_id or 'placed'}-{ready.index}-{ready.seed}"


async def _generate(
    client: GeneratorClient,
    request,
    out: Path,
    timeout: float | None,
    expect_prompt: str | None = None,
    name=_image_name,
) -> list[Path]:
    """Stream one Generate call, saving each image as it arrives under `name(image_ready)` (made unique)."""
    out.mkdir(parents=True, exist_ok=True)
    saved: list[Path] = []

    def report(message: str) -> None:
        print(f"\n{message}", file=sys.stderr)

    # A broken stream is not retried (it may have rendered already): say how far it got.
    stream = reporting_interruption(
        client.generate(request, timeout=timeout), lambda: len(saved), request.num_images, report
    )
    async for event in stream:
        kind = event.WhichOneof("event")
        if kind == "accepted":
            a = event.accepted
            print(f"accepted {a.request_id}: {len(a.image_uris)} images, queue position {a.queue_position}")
            print(f"  prompt: {a.parameters.prompt}")
            if a.parameters.scene_prompt:
                print(f"  scene prompt (around the kept product): {a.parameters.scene_prompt}")
            if expect_prompt is not None and a.parameters.prompt != expect_prompt:
                print(f"  warning: the template changed; the original prompt was {expect_prompt!r}", file=sys.stderr)
        elif kind == "queued":
            print(f"queued: position {event.queued.queue_position}")
        elif kind == "progress":
            p = event.progress
            if sys.stdout.isatty():  # a live step counter on a terminal; piped output stays one line per event
                print(f"\r  image {p.index}: step {p.step}/{p.total_steps}", end="", flush=True)
        elif kind == "image_ready":
            r = event.image_ready
            data = r.image.png or await fetch_bytes_async(r.image.url)
            path = save_new(out, name(r), data)
            saved.append(path)
            start = "\r" if sys.stdout.isatty() else ""
            print(f"{start}image {r.index} ready (seed {r.seed}, {r.device}): {r.image.uri} -> {path}")
        elif kind == "completed":
            t = event.completed.timings
            print(
                f"completed: {event.completed.num_images} images in {t.total_seconds:.2f}s "
                f"(first after {t.first_image_seconds:.2f}s)"
            )
    return saved


def rerun_request(image: Path) -> tuple[str, generator_pb2.GenerateRequest]:
    """The GenerateRequest that reproduces `image` exactly (same prompt, seed, adapters, sizes).

    Raises CliError when the file is missing or carries no generation settings.
    """
    try:
        params = read_parameters(image.read_bytes())
    except FileNotFoundError:
        raise CliError(f"{image}: no such file") from None
    except IsADirectoryError:
        raise CliError(f"{image}: is a folder, not an image") from None
    except UnidentifiedImageError:
        raise CliError(f"{image}: not a PNG image") from None
    except (ValueError, OSError) as exc:
        raise CliError(f"{image}: carries no generation settings, so it cannot be rerun ({exc})") from None
    try:
        return params["prompt"], _rerun_request(params)
    except (KeyError, TypeError, ValueError) as exc:
        raise CliError(f"{image}: its generation settings are incomplete ({exc})") from None


def _rerun_request(params: dict[str, Any]) -> generator_pb2.GenerateRequest:
    if placed := params.get("placement"):
        # The photo itself is not in the image (only its hash): say how to make it again.
        where = ",".join(f"{placed['placement'][k]:.6g}" for k in ("center_x", "center_y", "height"))
        product = f" --product {params['product_id']}" if params.get("product_id") else ""
        sh = placed.get("shadow") or {}
        shadow = ",".join(f"{sh.get(k, 0.0):.6g}" for k in ("strength", "softness", "offset_x", "offset_y"))
        raise CliError(
            f"made in placement mode from a product photo (sha256 {placed['product_image_sha256'][:12]}…): "
            f"run generate --product-image PHOTO{product} --template {params.get('template_id') or '…'} "
            f"--place {where} --shadow {shadow} --seed {params['seed']}"
        )
    # Same template + user text recompose to the same prompt; _generate checks it did.
    return generate_request(
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
            if (product_image := product_image_from_args(args)) is not None:
                request.product_image.CopyFrom(product_image)
            await _generate(client, request, args.out, args.timeout)
        elif args.command == "catalogue":
            return await catalogue_main(args, client)
        elif args.command == "rerun":
            prompt, request = rerun_request(args.image)
            # Named after the input, so its index stays in the name; save_new never overwrites (the input included).
            stem = f"{args.image.stem}-rerun"
            await _generate(client, request, args.out, None, expect_prompt=prompt, name=lambda _ready: stem)
        return 0
    except grpc.aio.AioRpcError as exc:
        print(f"error: {_rpc_error(exc, args.generator)}", file=sys.stderr)
        return 1
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. an output folder that cannot be written
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    finally:
        await client.close()


def _rpc_error(exc: grpc.aio.AioRpcError, address: str) -> str:
    reason = describe_error(exc)
    if reason == "service unreachable":
        return f"the generator at {address} is unreachable (is `make run` running?)"
    if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
        return exc.details() or reason
    return reason


def main(argv: list[str] | None = None) -> int:
    try:
        return asyncio.run(_main(_parser().parse_args(argv)))
    except KeyboardInterrupt:  # Ctrl-C outside a catalogue run's own handler: no traceback
        return 130


if __name__ == "__main__":
    sys.exit(main())
