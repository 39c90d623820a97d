"""Where every benchmark's JSON result goes: written to `--out` (folders made) and echoed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def save_report(out: Path, report: dict[str, Any]) -> dict[str, Any]:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report
