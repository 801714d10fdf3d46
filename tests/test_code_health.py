"""Structure the codebase promises: imports flow one way, functions stay readable.

Read from the source with `ast` (nothing is imported or run).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lmalloy"
# the pipeline, bottom to top; a package may import only from packages of a lower rank
# (the four consumers of checkpoints share a rank and do not import each other)
RANK = {"io": 0, "data": 1, "average": 2, "train": 3, "merge": 4, "moe": 4, "proxy": 4,
        "reward": 4, "eval": 5, "serve": 5, "demo": 6}
SHORT_PACKAGES = ("merge", "train", "proxy", "moe")
MAX_FUNCTION_LINES = 80


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name


def test_no_package_imports_from_a_package_above_it():
    bad = []
    for pkg, rank in RANK.items():
        for f in sorted((SRC / pkg).rglob("*.py")):
            for line, mod in _imports(f):
                parts = mod.split(".")
                if parts[0] != "lmalloy" or len(parts) < 2 or parts[1] not in RANK:
                    continue
                other = parts[1]
                if other != pkg and RANK[other] >= rank:
                    bad.append(f"{f.relative_to(SRC)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def test_functions_stay_short_in_the_engine_packages():
    long = []
    for pkg in SHORT_PACKAGES:
        for f in sorted((SRC / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        long.append(f"{f.relative_to(SRC)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "\n".join(long)


def test_threads_are_set_once_by_the_cli():
    # `--threads` is applied by `lmalloy.cli.setup_threads`; the streaming core's
    # one-thread policy for memory-bound work is the one deliberate exception
    allowed = {"cli.py", "average/weighted.py"}
    found = []
    for f in sorted(SRC.rglob("*.py")):
        rel = str(f.relative_to(SRC))
        if rel not in allowed and "set_num_threads" in f.read_text():
            found.append(rel)
    assert not found, found
