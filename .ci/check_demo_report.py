"""CI: fail unless a demo report exists and has a section for every demo stage.

usage: python .ci/check_demo_report.py OUT/report.md

A stage's section is the heading `## TITLE` (its module's TITLE), as `lmalloy.demo.report`
writes it; the stages are `lmalloy.demo.run.STAGES`.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from lmalloy.demo.run import STAGES


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: check_demo_report.py REPORT.md", file=sys.stderr)
        return 2
    report = Path(argv[0])
    if not report.is_file():
        print(f"demo report check: {report} does not exist", file=sys.stderr)
        return 1
    headings = set(report.read_text(encoding="utf-8").splitlines())
    missing = [name for name, mod in STAGES.items()
               if f"## {importlib.import_module(mod).TITLE}" not in headings]
    if missing:
        print(f"demo report check: {report} has no section for stage(s): "
              f"{', '.join(missing)}", file=sys.stderr)
        return 1
    print(f"demo report check: {report} names all {len(STAGES)} stages")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
