"""Config of `lmalloy demo` (pydantic only)."""

from __future__ import annotations

from pydantic import Field

from lmalloy.config import Config, threads_field


class DemoConfig(Config):
    out: str | None = Field(None, description="demo folder (stages' models, report); "
                            "default runs/demo, with --quick runs/demo-quick")
    quick: bool = Field(False, description="the same pipeline with tiny models and budgets "
                        "(about a minute; for CI)")
    stages: list[str] | None = Field(None, description="run only these stages (earlier stages "
                                     "they need are reused, or run when missing)")
    rerun: bool = Field(False, description="re-run the chosen stages even if they have results")
    budget_minutes: float | None = Field(None, gt=0, description="the time budget the stages "
                                         "share (default 20, with --quick 2); a stage whose "
                                         "measured estimate would overrun its share scales "
                                         "its work down")
    threads: int | None = threads_field()
