"""The import graph of our packages: arrows between modules, cycles, and function-local imports.

    python -m tools.import_graph services client      # rooms, arrows, cycles; exit 1 on a cycle

A function-local import is fine for an optional heavy dependency; each one is listed so that a
reviewer can check it says why (a comment on the line above or the same line).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Module:
    name: str
    path: Path
    lines: int
    imports: set[str] = field(default_factory=set)  # our modules imported at module level
    local_imports: list[tuple[int, str, str]] = field(default_factory=list)  # (line, module, reason)
    deferred: set[str] = field(default_factory=set)  # our modules imported inside functions


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(name: str, known: set[str]) -> str | None:
    # "services.generator.messages.RenderSettings" -> the longest known module prefix.
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _reason(source: list[str], line: int) -> str:
    here = source[line - 1]
    if "#" in here:
        return here.split("#", 1)[1].strip()
    above = source[line - 2].strip() if line >= 2 else ""
    return above[1:].strip() if above.startswith("#") else ""


def scan(packages: Iterable[str]) -> dict[str, Module]:
    files = [p for pkg in packages for p in sorted((ROOT / pkg).rglob("*.py"))]
    modules = {module_name(p): Module(module_name(p), p, len(p.read_text().splitlines())) for p in files}
    for module in modules.values():
        text = module.path.read_text()
        source = text.splitlines()
        tree = ast.parse(text)
        local_nodes = {
            id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)
        }
        type_checking = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            else:
                continue
            if id(node) in type_checking:
                continue
            targets = module.deferred if id(node) in local_nodes else module.imports
            if id(node) in local_nodes:
                module.local_imports.append((node.lineno, names[-1], _reason(source, node.lineno)))
            for name in names:
                target = _resolve(name, set(modules))
                if target and target != module.name and target in modules:
                    targets.add(target)
                    break
    return modules


def cycles(modules: dict[str, Module], deferred: bool = True) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan); `deferred`: counting
    function-local imports too, since a cycle they hide is still a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in modules[v].imports | (modules[v].deferred if deferred else set()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for name in sorted(modules):
        if name not in index:
            visit(name)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("packages", nargs="*", default=["services", "client"])
    parser.add_argument("--arrows", action="store_true", help="print every module's imports")
    args = parser.parse_args(argv)
    modules = scan(args.packages)
    if args.arrows:
        for m in sorted(modules.values(), key=lambda m: m.name):
            later = f" (in functions: {', '.join(sorted(m.deferred - m.imports))})" if m.deferred - m.imports else ""
            print(f"{m.name} ({m.lines} lines) -> {', '.join(sorted(m.imports)) or '-'}{later}")
    local = [(m.name, *item) for m in modules.values() for item in m.local_imports]
    print(f"{len(modules)} modules, {sum(len(m.imports) for m in modules.values())} arrows, {len(local)} local imports")
    for name, line, target, reason in sorted(local):
        print(f"  local {name}:{line} {target}  # {reason or '(no reason given)'}")
    found = cycles(modules)
    for component in found:
        print("cycle: " + " <-> ".join(component))
    print("no cycles" if not found else f"{len(found)} cycle(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
