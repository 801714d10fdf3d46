"""CI: fail unless a demo report exists with its claims table, its time table and a section
for every demo stage, and every verdict is the one its interval gives.

usage: python .ci/check_demo_report.py OUT/report.md

A stage's section is the heading `## TITLE` (its module's TITLE), as `lmalloy.demo.report`
writes it; the stages are `lmalloy.demo.run.STAGES`. The claims table (`## Claims: ...`)
must come first, hold at least one row per stage and only the verdicts of
`lmalloy.demo.stats.VERDICTS`; where the stages' results (`stages/NAME.json` beside the
report) are present, each row must match its result, and each verdict must be what
`lmalloy.demo.stats.verdict` computes from the row's interval and threshold (claims made
of several parts are checked for a valid verdict only).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from lmalloy.demo.report import CLAIMS_COLUMNS, CLAIMS_HEADING, TIMES_HEADING
from lmalloy.demo.run import STAGES
from lmalloy.demo.stats import VERDICTS, verdict


def claim_rows(lines: list[str]) -> list[dict]:
    """The rows of the claims table, as {column: cell}."""
    start = lines.index(CLAIMS_HEADING)
    rows = []
    in_table = False
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not in_table:  # the header
                in_table = True
                continue
            if all(set(c) <= set("-:") for c in cells):
                continue
            rows.append(dict(zip(CLAIMS_COLUMNS, cells, strict=False)))
        elif in_table and line.strip():
            break
    return rows


def problems(report: Path) -> list[str]:
    lines = report.read_text(encoding="utf-8").splitlines()
    out = []
    headings = [x for x in lines if x.startswith("## ")]
    missing = [name for name, mod in STAGES.items()
               if f"## {importlib.import_module(mod).TITLE}" not in headings]
    if missing:
        out.append(f"no section for stage(s): {', '.join(missing)}")
    for h in (CLAIMS_HEADING, TIMES_HEADING):
        if h not in headings:
            out.append(f"no `{h}` table")
    if out:
        return out
    if headings[0] != CLAIMS_HEADING:
        out.append("the claims table is not the first section")
    rows = claim_rows(lines)
    for name in STAGES:
        if not any(r.get("stage") == name for r in rows):
            out.append(f"the claims table has no row for stage {name}")
    for r in rows:
        v = r.get("verdict", "").strip("*")
        if v not in VERDICTS:
            out.append(f"claim `{r.get('claim')}`: verdict `{v}` is none of {VERDICTS}")
    times = lines[lines.index(TIMES_HEADING):]
    if not any(x.startswith("| **total** |") for x in times):
        out.append("the time table has no total row")
    out += _against_results(report.parent / "stages", rows)
    return out


def _against_results(folder: Path, rows: list[dict]) -> list[str]:
    """Each stage's claims in its saved result against the table, and each verdict
    recomputed from its interval."""
    out = []
    for name in STAGES:
        p = folder / f"{name}.json"
        if not p.is_file():
            continue
        claims = json.loads(p.read_text()).get("claims", [])
        shown = [r for r in rows if r.get("stage") == name]
        if len(shown) != len(claims):
            out.append(f"stage {name}: {len(claims)} claims in {p.name}, {len(shown)} in the "
                       "table")
            continue
        for c, r in zip(claims, shown, strict=True):
            if r.get("verdict", "").strip("*") != c["verdict"]:
                out.append(f"claim `{c['claim']}`: the table says {r.get('verdict')}, the "
                           f"result {c['verdict']}")
            if not c.get("combined"):
                want = verdict(c["lo"], c["hi"], c["threshold"], c["higher"])
                if want != c["verdict"]:
                    out.append(f"claim `{c['claim']}`: interval [{c['lo']}, {c['hi']}] "
                               f"against {c['threshold']} gives {want}, not {c['verdict']}")
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: check_demo_report.py REPORT.md", file=sys.stderr)
        return 2
    report = Path(argv[0])
    if not report.is_file():
        print(f"demo report check: {report} does not exist", file=sys.stderr)
        return 1
    bad = problems(report)
    if bad:
        for b in bad:
            print(f"demo report check: {report}: {b}", file=sys.stderr)
        return 1
    n = len(claim_rows(report.read_text(encoding="utf-8").splitlines()))
    print(f"demo report check: {report} names all {len(STAGES)} stages and {n} claims, "
          "each verdict from its interval")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
