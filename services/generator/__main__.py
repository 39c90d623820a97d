"""`python -m services.generator --help`: every flag is also a PIA_GENERATOR_* variable."""

from __future__ import annotations

import asyncio
import sys

from services.common.logs import configure_logging
from services.generator.settings import GeneratorSettings


def main(argv: list[str] | None = None) -> None:
    settings = GeneratorSettings.from_cli(sys.argv[1:] if argv is None else argv)
    configure_logging(settings.log_level, "generator")
    # After logging is configured: the app imports torch and diffusers, which log as they load.
    from services.generator.app import serve

    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
