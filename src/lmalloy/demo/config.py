"""Config of `lmalloy demo` (pydantic only)."""

from __future__ import annotations

from pydantic import Field

from lmalloy.config import Config, threads_field


class DemoConfig(Config):
    out: str | None = Field(None, description="demo folder (stages' models, report); "
                            "default runs/demo, with --quick runs/demo-quick")
    quick: bool = Field(False, description="the same pipeline with tiny models and budgets "
                        "(under 3 minutes; for CI)")
    stages: list[str] | None = Field(None, description="run only these stages (earlier stages "
                                     "they need are reused, or run when missing)")
    rerun: bool = Field(False, description="re-run the chosen stages even if they have results")
    threads: int | None = threads_field()
