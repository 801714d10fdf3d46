"""Configs of weight averaging (pydantic only: cheap to import).

`EMASettings`, `SWASettings` and `LaWASettings` are the nested `--ema.*`, `--swa.*` and
`--lawa.*` training flags; `AverageConfig` is `lmalloy average`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from lmalloy.config import Config, also, positional, threads_field

AVERAGERS = ("ema", "swa", "lawa")


def _decay(v: float | None) -> float | None:
    if v is not None and not 0 < v < 1:
        raise ValueError("must be in (0, 1)")
    return v


class EMASettings(Config):
    decay: float = Field(0.999, description="EMA decay: avg <- decay·avg + (1 − decay)·w")
    warmup: bool = Field(False, description="timm's decay warmup: decay_t = clamp(1 − (1 + "
                         "t/gamma)^(−power), min_decay, decay)")
    gamma: float = Field(1.0, gt=0, description="warmup gamma (timm: 1)")
    power: float = Field(2 / 3, gt=0, description="warmup power (timm: 2/3; 3/4 for "
                         "shorter runs)")
    min_decay: float = Field(0.0, ge=0, lt=1, description="lower clamp of the warmup decay")
    update_every: int = Field(1, gt=0, description="update the average every N optimizer steps")
    start: int = Field(0, ge=0, description="steps before this copy the weights (decay 0)")

    @field_validator("decay")
    @classmethod
    def _decay_range(cls, v: float) -> float:
        return _decay(v)


class SWASettings(Config):
    start: float = Field(0.75, gt=0, description="first averaged step: a step number (>= 1) "
                         "or a fraction of the run (< 1)")
    every: int = Field(1, gt=0, description="average every N optimizer steps from the start")
    lr: float | None = Field(None, gt=0, description="SWA learning rate from the start on "
                             "(default: keep the run's schedule)")
    anneal: Literal["constant", "cos"] = Field("cos", description="reach --swa.lr at once "
                                               "(constant) or by cosine annealing (cos)")
    anneal_steps: int = Field(10, ge=1, description="steps of the cosine anneal to --swa.lr")

    @field_validator("start")
    @classmethod
    def _start(cls, v: float) -> float:
        if v >= 1 and v != int(v):
            raise ValueError("must be a whole step number (>= 1) or a fraction (< 1)")
        return v


class LaWASettings(Config):
    k: int = Field(5, ge=1, description="average the latest k snapshots (Sanyal et al.: 5)")
    every: int = Field(200, gt=0, description="take a snapshot every N steps (Sanyal et al.: "
                       "200)")
    start: int = Field(0, ge=0, description="first step that may be a snapshot")
    mode: Literal["memory", "disk"] = Field("memory", description="keep the k snapshots in "
                                            "memory, or on disk (then only one extra copy "
                                            "is held in memory)")


class AverageConfig(Config):
    inputs: list[str] = Field([], **positional(
        "HF model folders, oldest first (or one run folder with --last)"))
    out: str = Field(..., description="output HF model folder", **also("output"))
    method: Literal["uniform", "ema"] = Field("uniform", description="uniform mean, or an "
                                              "EMA over the inputs in order (needs --decay)")
    last: int | None = Field(None, ge=1, description="average the latest K checkpoints of "
                             "the run folder given as input (LaWA)")
    decay: float | None = Field(None, description="EMA decay for --method ema, in (0, 1)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="output dtype (auto: the newest input's); accumulation is fp32")
    overwrite: bool = Field(False, description="replace an existing output folder")
    allow_pickle: bool = Field(False, description="allow pickle inputs (weights_only)")
    threads: int | None = threads_field()

    @field_validator("decay")
    @classmethod
    def _decay_range(cls, v: float | None) -> float | None:
        return _decay(v)

    @model_validator(mode="after")
    def _check(self):
        if self.method == "ema" and self.decay is None:
            raise ValueError("`--method ema` needs `--decay` in (0, 1)")
        if self.method != "ema" and self.decay is not None:
            raise ValueError("`--decay` applies only to `--method ema`")
        return self
