"""The demo's guards and small readers, without running a stage: a folder of the other mode
is refused and left as it was, an unusable --out is one line, CI's report check, and
greedy soup's choice read from its JSON."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmalloy import cli
from lmalloy.demo.report import claims_markdown, times_markdown, write_report
from lmalloy.demo.run import STAGES, default_out
from lmalloy.demo.stage_merging import greedy_choice
from lmalloy.demo.stats import (
    HELD,
    INCONCLUSIVE,
    NOT_HELD,
    all_of,
    claim,
    mean_interval,
    verdict,
    wilson,
)

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / ".ci" / "check_demo_report.py"


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("held,flags,other", [(False, ["--quick"], "full"),
                                              (True, [], "quick")])
def test_other_mode_is_refused_and_kept(tmp_path, capsys, held, flags, other):
    out = tmp_path / "demo"
    (out / "stages").mkdir(parents=True)
    (out / "mode.json").write_text(json.dumps({"quick": held}))
    (out / "stages" / "pretrain.json").write_text('{"markdown": "kept"}')
    before = _tree(out)
    assert cli.main(["demo", *flags, "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert f"holds a {other} run" in line and "--out" in line
    assert _tree(out) == before


def test_unusable_out_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert cli.main(["demo", "--quick", "--out", str(blocker / "demo")]) == 2
    assert "--out" in _error_line(capsys)
    assert blocker.read_text() == "not a folder"


def test_each_mode_has_its_own_default_folder():
    assert default_out(quick=False) == "runs/demo"
    assert default_out(quick=True) == "runs/demo-quick"


def _fake_report(out: Path, skip: str | None = None, tamper: bool = False) -> Path:
    """A report written the demo's way from fake stage results: one claim per stage
    (`tamper`: the first claim's saved verdict contradicts its interval)."""
    results = {}
    for i, (name, mod) in enumerate(STAGES.items()):
        if name == skip:
            continue
        c = claim(f"claim {i}", "paper", "1", "0.5 [0.4, 0.6]", 0.5, 0.4, 0.6, 0.3)
        if tamper and not results:
            c["verdict"] = NOT_HELD
        results[name] = {"title": importlib.import_module(mod).TITLE, "markdown": "numbers",
                         "seconds": 1.0, "claims": [c]}
    (out / "stages").mkdir(parents=True, exist_ok=True)
    for name, r in results.items():
        (out / "stages" / f"{name}.json").write_text(json.dumps(r))
    sections = [{"title": r["title"], "markdown": r["markdown"]} for r in results.values()]
    head = "\n".join(claims_markdown(results) + times_markdown(results, 60.0))
    write_report(out, "lmalloy demo report", "intro", sections, head)
    return out / "report.md"


def _check(report: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), str(report)], capture_output=True,
                          text=True, timeout=60)


def test_report_check(tmp_path):
    (tmp_path / "all").mkdir()
    ok = _check(_fake_report(tmp_path / "all"))
    assert ok.returncode == 0, ok.stderr
    (tmp_path / "some").mkdir()
    bad = _check(_fake_report(tmp_path / "some", skip="moe"))
    assert bad.returncode == 1 and "moe" in bad.stderr
    assert _check(tmp_path / "none" / "report.md").returncode == 1
    (tmp_path / "tampered").mkdir()
    bad = _check(_fake_report(tmp_path / "tampered", tamper=True))
    assert bad.returncode == 1 and "claim 0" in bad.stderr


def test_verdicts_follow_the_interval():
    assert verdict(0.1, 0.2, 0.0) == HELD
    assert verdict(-0.2, -0.1, 0.0) == NOT_HELD
    assert verdict(-0.1, 0.1, 0.0) == INCONCLUSIVE
    assert verdict(-0.2, -0.1, 0.0, higher=False) == HELD
    assert verdict(float("nan"), 1.0, 0.0) == INCONCLUSIVE
    assert all_of([HELD, HELD]) == HELD and all_of([HELD, NOT_HELD]) == NOT_HELD
    assert all_of([HELD, INCONCLUSIVE]) == INCONCLUSIVE and all_of([]) == INCONCLUSIVE
    lo, hi = wilson(40, 100)
    assert lo < 0.4 < hi and hi - lo < 0.2
    v, lo, hi = mean_interval([1.0, 2.0, 3.0, 4.0])
    assert v == 2.5 and 1.0 <= lo < 2.5 < hi <= 4.0


def test_greedy_choice_reads_greedy_soup_json(tmp_path):
    experts = {d: str(tmp_path / f"expert-{d}" / "final") for d in ("email", "json", "http")}
    merged = tmp_path / "merged-greedy soup"
    merged.mkdir()
    chosen = [experts["http"], experts["email"]]  # greedy order: best first
    (merged / "greedy_soup.json").write_text(json.dumps({
        "scores": {m: 1.0 for m in experts.values()}, "order": list(experts.values()),
        "steps": [], "chosen": chosen, "soup_loss": 1.0}))
    assert greedy_choice(merged, experts) == ["email", "http"]


def test_report_rerun_hint_names_mode_and_folder(tmp_path):
    from lmalloy.demo.run import DemoContext, write

    write(DemoContext(tmp_path, quick=True, threads=None))
    hint = f"`lmalloy demo --quick --out {tmp_path} --stages NAME --rerun`"
    assert hint in (tmp_path / "report.md").read_text()
