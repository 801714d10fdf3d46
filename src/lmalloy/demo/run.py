"""`lmalloy demo`: run the stages in order, then write the report.

Each stage is a module with `TITLE` and `run(ctx) -> {"markdown": str, "numbers": dict}`.
Its result is saved to `<out>/stages/<name>.json`; a stage that already has a result is
skipped unless `--rerun`, so one stage can be re-run alone and later stages reuse what
earlier ones trained (`ctx.require("pretrain")` runs a missing prerequisite).
The report is rebuilt from every saved result after each stage.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

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
            return self.results[name]
        return run_stage(self, name)

    def call(self, command: str, **fields) -> int:
        """Run an lmalloy command in-process, through the same config validation as the CLI."""
        from lmalloy import cli
        from lmalloy.config import validate

        cfg_ref, main_ref, _ = cli.COMMANDS[command]
        cfg = validate(cli._load(cfg_ref), fields)
        return cli._load(main_ref)(cfg)


def run_stage(ctx: DemoContext, name: str) -> dict:
    mod = importlib.import_module(STAGES[name])
    print(f"\n== demo stage: {name} — {mod.TITLE}", file=sys.stderr)
    t0 = time.perf_counter()
    res = mod.run(ctx)
    res["title"] = mod.TITLE
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res.setdefault("numbers", {})
    ctx.result_path(name).parent.mkdir(parents=True, exist_ok=True)
    ctx.result_path(name).write_text(json.dumps(res, indent=1))
    ctx.results[name] = res
    write(ctx)
    print(f"== {name} done in {res['seconds']:.0f}s", file=sys.stderr)
    return res


def write(ctx: DemoContext) -> Path:
    from lmalloy.demo.report import write_report

    sections = []
    total = 0.0
    for name in STAGES:
        p = ctx.result_path(name)
        if p.is_file():
            r = json.loads(p.read_text())
            total += r.get("seconds", 0)
            sections.append({"title": r["title"], "markdown": r["markdown"]
                             + f"\n\nStage time: {r.get('seconds', 0):.0f} s."})
    mode = "quick (CI-sized models and budgets)" if ctx.quick else "full"
    intro = (f"Every number below was measured by this run ({mode} mode) on the built-in "
             f"corpus: the Python standard library of the interpreter that ran it. "
             f"Stages so far took {total / 60:.1f} minutes. Re-run one stage with "
             f"`lmalloy demo --stages NAME --rerun`.")
    return write_report(ctx.out, "lmalloy demo report", intro, sections)


def main(cfg) -> int:
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    for s in cfg.stages or []:
        if s not in STAGES:
            raise unknown("demo stage", s, STAGES)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    marker = out / "mode.json"
    mode = {"quick": cfg.quick}
    if marker.is_file() and json.loads(marker.read_text()) != mode:
        import shutil

        print(f"demo: {out} holds a {'quick' if not cfg.quick else 'full'} run; starting over",
              file=sys.stderr)
        shutil.rmtree(out)
        out.mkdir(parents=True)
    marker.write_text(json.dumps(mode))
    chosen = cfg.stages or list(STAGES)
    ctx = DemoContext(out, cfg.quick, cfg.threads, cfg.rerun, set(chosen))
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
