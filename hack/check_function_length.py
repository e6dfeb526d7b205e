"""Fail on functions longer than a limit (``make lint``): short functions read at a glance.

``python hack/check_function_length.py --max 80 PATH...`` lists every function or method of the
Python files under the paths whose body, from ``def`` to its last line, is longer than ``--max``
lines (nested functions count toward their parent too), and exits 1 if there is one.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from pathlib import Path


def long_functions(path: Path, limit: int) -> Iterator[tuple[int, str, int]]:
    """(line, name, length) of each function in ``path`` longer than ``limit`` lines."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > limit:
                yield node.lineno, node.name, length


def main() -> int:
    """Check the paths given; print the offenders."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max", type=int, default=80, help="Longest function allowed (lines).")
    parser.add_argument("paths", nargs="+", type=Path)
    args = parser.parse_args()
    found = 0
    for root in args.paths:
        files = [root] if root.is_file() else sorted(root.rglob("*.py"))
        for path in files:
            for line, name, length in long_functions(path, args.max):
                print(f"{path}:{line}: {name} is {length} lines (at most {args.max})")
                found += 1
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
