"""Print the core crate's module import graph; exit 1 if it has a cycle.

Each top-level module of `rust/layerstore-core/src` (a submodule counts as its parent) is listed
with the modules of the crate it names (`crate::x`, `use crate::{x, …}`), comments and test
modules left out. docs/architecture.md keeps the layering this checks.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "rust" / "layerstore-core" / "src"


def module_of(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    return rel.parts[0]


def code_of(path: Path) -> str:
    text = path.read_text()
    test = text.find("#[cfg(test)]")
    if test >= 0:
        text = text[:test]
    return "\n".join(line for line in text.splitlines() if not line.strip().startswith("//"))


def graph() -> dict[str, set[str]]:
    deps: dict[str, set[str]] = {}
    for path in sorted(SRC.rglob("*.rs")):
        code = code_of(path)
        names = set(re.findall(r"crate::([a-z_]+)", code))
        for group in re.findall(r"use crate::\{([^}]*)\}", code, re.S):
            names.update(item.strip().split("::")[0] for item in group.split(",") if item.strip())
        deps.setdefault(module_of(path), set()).update(names)
    known = set(deps)
    return {m: {d for d in ds if d in known and d != m} for m, ds in deps.items()}


def cycles(deps: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in deps[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(deps):
        if v not in index:
            visit(v)
    return found


def main() -> int:
    deps = graph()
    for module in sorted(deps):
        print(f"{module} -> {' '.join(sorted(deps[module]))}")
    bad = cycles(deps)
    for comp in bad:
        print(f"cycle: {' '.join(comp)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
