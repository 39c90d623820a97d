"""Seconds per test module from a pytest JUnit XML report, written to tests/durations.json.

`make test` orders modules longest first from that file (tests/conftest.py), so its two xdist workers
start on the long modules and finish together. Refresh it after tests change much:

    .venv/bin/python -m pytest -n 2 --dist loadfile --junitxml=/tmp/junit.xml
    .venv/bin/python -m tools.test_durations /tmp/junit.xml
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "durations.json"


def module_of(classname: str) -> str | None:
    """'tests.generator.test_compile' (or '...test_compile.TestX') -> 'tests/generator/test_compile.py'."""
    parts = classname.split(".")
    for end in range(len(parts), 0, -1):
        path = "/".join(parts[:end]) + ".py"
        if (ROOT / path).is_file():
            return path
    return None


def durations(report: Path) -> dict[str, float]:
    seconds: dict[str, float] = defaultdict(float)
    for case in ET.parse(report).getroot().iter("testcase"):
        module = module_of(case.get("classname", ""))
        if module is not None:
            seconds[module] += float(case.get("time", 0.0))  # setup + call + teardown
    return {m: round(s, 1) for m, s in sorted(seconds.items(), key=lambda kv: -kv[1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report", type=Path, help="a pytest --junitxml report")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    table = durations(args.report)
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    print(f"{len(table)} modules, {sum(table.values()):.0f} s in all -> {args.out}")


if __name__ == "__main__":
    main()
