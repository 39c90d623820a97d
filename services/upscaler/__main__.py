"""`python -m services.upscaler --help`: every flag is also a PIA_UPSCALER_* variable."""

from __future__ import annotations

import asyncio
import sys

from services.common.logs import configure_logging
from services.upscaler.settings import UpscalerSettings


def main(argv: list[str] | None = None) -> None:
    settings = UpscalerSettings.from_cli(sys.argv[1:] if argv is None else argv)
    configure_logging(settings.log_level, "upscaler")
    # Only now: the app imports torch, whose import-time log lines must find logging configured.
    from services.upscaler.app import serve

    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
