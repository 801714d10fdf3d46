"""`lmalloy demo`: run the stages in order, then write the report.

Each stage is a module with `TITLE` and `run(ctx) -> {"markdown": str, "numbers": dict,
"claims": [row, ...]}` (the rows of the claims table, `lmalloy.demo.stats.claim`).
Its result is saved to `<out>/stages/<name>.json`; a stage that already has a result is
skipped unless `--rerun`, so one stage can be re-run alone and later stages reuse what
earlier ones trained (`ctx.require("pretrain")` runs a missing prerequisite).
Each stage runs on the clock of its share of the time budget (`ctx.clock`,
`lmalloy.demo.budget`), and its result records the clock: time allotted, what was
scaled down, the machine's load. The report is rebuilt from every saved result after each
stage.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmalloy.demo.budget import MINUTES, SHARES, Budget, StageClock
from lmalloy.errors import unknown

# stage name -> module; the report follows this order
STAGES: dict[str, str] = {
    "pretrain": "lmalloy.demo.stage_pretrain",
    "averaging": "lmalloy.demo.stage_averaging",
    "merging": "lmalloy.demo.stage_merging",
    "moe": "lmalloy.demo.stage_moe",
    "proxy": "lmalloy.demo.stage_proxy",
    "warm": "lmalloy.demo.stage_warm",
}

# The demo's corpus plan: general pretraining domains (each capped), and held-out domains
# that later stages fine-tune on. Nothing held out is seen in pretraining.
PRETRAIN_DOMAINS = ["toplevel", "asyncio", "unittest", "xml", "multiprocessing", "importlib",
                    "logging", "concurrent", "urllib", "collections", "ctypes", "tkinter",
                    "lib2to3", "distutils", "idlelib", "encodings", "curses", "dbm", "venv",
                    "wsgiref", "zoneinfo", "tomllib", "re", "html"]
EXPERT_DOMAINS = ["email", "json", "http"]


@dataclass
class DemoContext:
    out: Path
    quick: bool
    threads: int | None
    rerun: bool = False
    chosen: set[str] = field(default_factory=set)
    results: dict[str, dict] = field(default_factory=dict)
    budget: Budget | None = None
    clock: StageClock | None = None  # the running stage's

    def __post_init__(self):
        if self.budget is None:
            mode = _mode_name(self.quick)
            self.budget = Budget(60 * MINUTES[mode], SHARES[mode], list(STAGES))

    def dir(self, name: str) -> Path:
        d = self.out / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def pick(self, quick, full):
        return quick if self.quick else full

    def result_path(self, name: str) -> Path:
        return self.out / "stages" / f"{name}.json"

    def require(self, name: str) -> dict:
        """The result of stage `name`, running it first if it has none."""
        if name in self.results:
            return self.results[name]
        p = self.result_path(name)
        if p.is_file() and not (self.rerun and name in self.chosen):
            self.results[name] = json.loads(p.read_text())
            self._seed_rates(self.results[name])
            return self.results[name]
        return run_stage(self, name)

    def _seed_rates(self, result: dict) -> None:
        """A reused stage result's measured throughput (`run_stage` saves the rates known
        when the stage ended), where this process has not measured its own yet."""
        for k, v in (result.get("rates") or {}).items():
            value, how = v if isinstance(v, list) else (v, "")
            if k not in self.budget.rates.tps:
                self.budget.rates.observe(k, value, f"saved by an earlier run ({how})")

    def call(self, command: str, **fields) -> int:
        """Run an lmalloy command in-process, through the same config validation as the CLI."""
        from lmalloy import cli
        from lmalloy.config import validate

        cfg_ref, main_ref, _ = cli.COMMANDS[command]
        cfg = validate(cli._load(cfg_ref), fields)
        return cli._load(main_ref)(cfg)


def run_stage(ctx: DemoContext, name: str) -> dict:
    from lmalloy.io.writer import atomic_write_text

    mod = importlib.import_module(STAGES[name])
    outer = ctx.clock  # a prerequisite runs inside the stage that required it
    ctx.clock = ctx.budget.clock(name)
    print(f"\n== demo stage: {name} — {mod.TITLE} ({ctx.clock.allotted_s:.0f} s of the "
          f"budget)", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        res = mod.run(ctx)
    finally:
        clock, ctx.clock = ctx.clock, outer
    res["title"] = mod.TITLE
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["budget"] = clock.summary()
    rates = ctx.budget.rates
    res["rates"] = {k: [v, rates.source.get(k, "")] for k, v in rates.tps.items()}
    res.setdefault("numbers", {})
    res.setdefault("claims", [])
    atomic_write_text(ctx.result_path(name), json.dumps(res, indent=1))
    ctx.results[name] = res
    write(ctx)
    print(f"== {name} done in {res['seconds']:.0f}s", file=sys.stderr)
    return res


def write(ctx: DemoContext) -> Path:
    """report.md/html from every saved stage result: the claims table and the time table
    first, then a section per stage, then the appendix."""
    from lmalloy.demo import report as R
    from lmalloy.demo.budget import load_average
    from lmalloy.demo.calibration import recorded

    results = {}
    for name in STAGES:
        p = ctx.result_path(name)
        if p.is_file():
            results[name] = json.loads(p.read_text())
    total = sum(r.get("seconds", 0) for r in results.values())
    sections = [{"title": r["title"], "markdown": r["markdown"]
                 + f"\n\nStage time: {r.get('seconds', 0):.0f} s."} for r in results.values()]
    mode = "quick (CI-sized models and budgets)" if ctx.quick else "full"
    flags = "--quick " if ctx.quick else ""
    if ctx.out.resolve() != Path(default_out(ctx.quick)).resolve():
        flags += f"--out {ctx.out} "
    loads = [(r.get("budget") or {}).get(k) for r in results.values()
             for k in ("load_start", "load_end")]
    loads = [x for x in loads if x is not None]
    load = (f"the machine's 1-minute load average ran from {min(loads):.2f} to "
            f"{max(loads):.2f} over the stages ({os.cpu_count()} cores: a load above the "
            f"core count means other work shared them)" if loads else
            f"the machine's load is {load_average():.2f}")
    intro = (f"Every number below was measured by this run ({mode} mode) on the built-in "
             f"corpus: the Python standard library of the interpreter that ran it. "
             f"Stages so far took {total / 60:.1f} minutes against a budget of "
             f"{ctx.budget.total_s / 60:.0f}; {load}. Re-run one stage with "
             f"`lmalloy demo {flags}--stages NAME --rerun`.")
    head = "\n".join(R.claims_markdown(results) + R.times_markdown(results, ctx.budget.total_s))
    tail = "\n".join(R.appendix_markdown(results, recorded()))
    return R.write_report(ctx.out, "lmalloy demo report", intro, sections, head, tail)


def default_out(quick: bool) -> str:
    """Each mode has its own folder, so a quick run never meets a full one by default."""
    return "runs/demo-quick" if quick else "runs/demo"


def _mode_name(quick: bool) -> str:
    return "quick" if quick else "full"


def prepare_out(out: Path, quick: bool) -> None:
    """Create `out` and mark its mode, before any work. A folder that holds a run of the
    other mode is refused (its models and results would mix with this run's), never
    deleted; an unusable folder is one line, not a traceback."""
    from lmalloy.errors import UserError
    from lmalloy.io.writer import atomic_write_text

    marker = out / "mode.json"
    try:
        out.mkdir(parents=True, exist_ok=True)
        held = json.loads(marker.read_text())["quick"] if marker.is_file() else quick
    except OSError as e:
        raise UserError(f"--out {out}: cannot use this folder: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError):
        raise UserError(f"--out {out}: {marker} is not a demo mode file; remove it or choose "
                        "another --out") from None
    if held != quick:
        other = default_out(quick)
        if Path(other).resolve() == out.resolve():
            other = f"{out}-{_mode_name(quick)}"
        raise UserError(f"--out {out} holds a {_mode_name(held)} run of the demo; run the "
                        f"{_mode_name(quick)} demo into another folder (e.g. --out {other}) "
                        f"or remove {out} first")
    atomic_write_text(marker, json.dumps({"quick": quick}))  # also proves `out` is writable


def main(cfg) -> int:
    for s in cfg.stages or []:
        if s not in STAGES:
            raise unknown("demo stage", s, STAGES)
    out = Path(cfg.out or default_out(cfg.quick))
    prepare_out(out, cfg.quick)  # (--threads is set by the CLI, as for every command)
    chosen = cfg.stages or list(STAGES)
    ctx = DemoContext(out, cfg.quick, cfg.threads, cfg.rerun, set(chosen))
    if cfg.budget_minutes:
        ctx.budget.total_s = 60 * cfg.budget_minutes
    t0 = time.perf_counter()
    for name in STAGES:
        if name in chosen:
            if cfg.rerun or not ctx.result_path(name).is_file():
                run_stage(ctx, name)
            else:
                ctx.require(name)
    report = write(ctx)
    print(f"\ndemo finished in {(time.perf_counter() - t0) / 60:.1f} min; report: {report}",
          file=sys.stderr)
    return 0
